"""Policy files: YAML with NetworkPolicy documents (one or many, `---` separated, or a `List` /
`NetworkPolicyList` of them), each checked against the official Kubernetes OpenAPI schema of
one pinned Kubernetes version (the `kubernetes-validate` package, strict: an unknown field is an
error), then against the rules the API server adds (eastwest/policy/semantics.py
`parse_policy`).

In:  paths (or text). Out: `Policy` objects, or a `PolicyError` naming the file, the document
(its index from 1 and its name) and the field (`spec.ingress[0].ports[0].protocol`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from eastwest.policy.semantics import Policy, PolicyError, parse_policy

K8S_VERSION = "1.31"  # the schema every document is checked against
API_VERSION = "networking.k8s.io/v1"


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@cache
def _validator() -> Any:
    """The strict NetworkPolicy schema of `K8S_VERSION` as a jsonschema validator, built once
    (`kubernetes_validate.validate` reads its 2 MB of definitions on every call: 10 ms a
    document); the same files and registry as that function."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict"
    schema = schema_contents(f"{folder}/networkpolicy-networking-v1.json", K8S_VERSION)
    defs = schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate_document(doc: Any, where: str) -> None:
    """`doc` as the Kubernetes API would take it, by the schema of `K8S_VERSION`."""
    import jsonschema

    if not isinstance(doc, Mapping):
        raise PolicyError(where, "not a mapping (a NetworkPolicy object)")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "NetworkPolicy":
        raise PolicyError(where, f"apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r}: "
                          f"only {API_VERSION} NetworkPolicy documents are policies")
    try:
        _validator().validate(dict(doc))
    except jsonschema.ValidationError as exc:
        field = _path(exc.path) or "(document)"
        raise PolicyError(f"{where}: {field}",
                          f"{exc.message} (Kubernetes {K8S_VERSION} schema)") from None
    name = (doc.get("metadata") or {}).get("name")
    if not name:
        raise PolicyError(f"{where}: metadata.name", "is required")


def documents(text: str, origin: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Each policy document of a YAML text with where it is (`f.yaml: document 2 (name)`)."""
    try:
        raw = [d for d in yaml.safe_load_all(text)]
    except yaml.YAMLError as exc:
        raise PolicyError(origin, f"not valid YAML: {exc}") from None
    out: list[tuple[str, Mapping[str, Any]]] = []
    for i, doc in enumerate(raw, 1):
        if doc is None:
            continue
        where = f"{origin}: document {i}"
        if isinstance(doc, Mapping) and str(doc.get("kind", "")).endswith("List"):
            items = doc.get("items")
            if not isinstance(items, list):
                raise PolicyError(f"{where}: items", "a List needs a list of items")
            out += [(f"{where} item {j}{_named(d)}", d) for j, d in enumerate(items, 1)]
        else:
            out.append((f"{where}{_named(doc)}", doc))
    return out


def _named(doc: Any) -> str:
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc, Mapping) else None
    return f" ({name})" if name else ""


def load_text(text: str, origin: str) -> list[Policy]:
    out = []
    for where, doc in documents(text, origin):
        validate_document(doc, where)
        out.append(parse_policy(doc, where))
    return out


def load_files(paths: Iterable[str]) -> list[Policy]:
    """Every policy of every file; the same namespace/name twice is an error (the API server
    would keep one)."""
    out: list[Policy] = []
    seen: dict[str, str] = {}
    for p in paths:
        try:
            text = Path(p).read_text() if p != "-" else sys.stdin.read()
        except OSError as exc:
            raise PolicyError(p, f"cannot be read: {exc.strerror}") from None
        for pol in load_text(text, p):
            if pol.ref in seen:
                raise PolicyError(p, f"policy {pol.ref} is defined twice (also in {seen[pol.ref]})")
            seen[pol.ref] = p
            out.append(pol)
    if not out:
        raise PolicyError(", ".join(paths) or "(no file)", "no NetworkPolicy in it")
    return out
