"""The NetworkPolicy rules the upstream e2e cases leave out (tests/unit/test_policy_upstream.py
has those): endPort, ipBlock for ends outside the cluster (IPv4 and IPv6, except), Exists /
DoesNotExist / NotIn on a missing key, policyTypes defaults, named ports that cannot be
resolved, and the loader's files: Lists, several documents, errors naming file, document and
field."""

from __future__ import annotations

import pytest

from eastwest.policy.load import load_files, load_text
from eastwest.policy.semantics import Conn, Endpoint, PolicyError, evaluate

HEAD = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"


def pol(name: str, spec: str, ns: str = "x") -> str:
    return f"{HEAD}metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"


def pods(ns: str = "x", **labels: str) -> Endpoint:
    return Endpoint(ns, labels)


SERVER = Endpoint("x", {"app": "db"}, ports={"sql": (5432, "TCP")})
CLIENT = Endpoint("y", {"app": "api"})


def allowed(policy_yaml: str, conn: Conn) -> bool | None:
    return evaluate(load_text(policy_yaml, "t.yaml"), conn).allowed


@pytest.mark.parametrize(("port", "ok"), [(7999, False), (8000, True), (8040, True), (8080, True),
                                          (8081, False)])
def test_end_port_is_an_inclusive_range(port, ok):
    p = pol("r", "  podSelector: {}\n  ingress: [{ports: [{port: 8000, endPort: 8080}]}]\n")
    assert allowed(p, Conn(CLIENT, SERVER, port)) is ok


@pytest.mark.parametrize(("ip", "ok"), [("203.0.113.9", True), ("203.0.113.66", False),
                                        ("198.51.100.1", False), ("2001:db8::1", True),
                                        ("2001:db8::ff", False), (None, False)])
def test_ip_block_with_except_judges_ends_outside_the_cluster(ip, ok):
    p = pol("ext", "  podSelector: {}\n  ingress:\n  - from:\n"
            "    - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.64/26]}\n"
            "    - ipBlock: {cidr: '2001:db8::/64', except: ['2001:db8::ff/128']}\n")
    assert allowed(p, Conn(Endpoint(None, ip=ip), SERVER, 5432)) is ok


def test_pod_selectors_never_match_an_end_outside_the_cluster():
    p = pol("all-pods", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n")
    assert allowed(p, Conn(Endpoint(None, ip="10.0.0.1"), SERVER, 5432)) is False
    assert allowed(p, Conn(CLIENT, SERVER, 5432)) is True


@pytest.mark.parametrize(("expr", "labels", "ok"), [
    ("{key: tier, operator: Exists}", {"tier": "a"}, True),
    ("{key: tier, operator: Exists}", {}, False),
    ("{key: tier, operator: DoesNotExist}", {}, True),
    ("{key: tier, operator: DoesNotExist}", {"tier": "a"}, False),
    ("{key: tier, operator: NotIn, values: [a]}", {}, True),
    ("{key: tier, operator: NotIn, values: [a]}", {"tier": "a"}, False),
    ("{key: tier, operator: In, values: [a, b]}", {"tier": "b"}, True),
])
def test_match_expressions(expr, labels, ok):
    p = pol("e", f"  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{}}, "
            f"podSelector: {{matchExpressions: [{expr}]}}}}]}}]\n")
    assert allowed(p, Conn(Endpoint("y", labels), SERVER, 5432)) is ok


def test_empty_policy_types_are_defaulted_like_absent_ones():
    v = evaluate(load_text(pol("e", "  podSelector: {}\n  policyTypes: []\n  egress: []\n"), "t"),
                 Conn(pods("x"), pods("x"), 80))
    assert v.denied_by == "both"


def test_policy_types_default_to_ingress_and_egress_only_when_egress_is_present():
    ingress_only = pol("i", "  podSelector: {}\n  ingress: []\n")
    assert allowed(ingress_only, Conn(pods("x"), Endpoint("y"), 80)) is True  # x's egress free
    with_egress = pol("e", "  podSelector: {}\n  egress: []\n")
    v = evaluate(load_text(with_egress, "t"), Conn(pods("x"), pods("x"), 80))
    assert (v.ingress.allowed, v.egress.allowed, v.denied_by) == (False, False, "both")
    assert v.ingress.policies == v.egress.policies == ("x/e",)
    egress_only = pol("o", "  podSelector: {}\n  policyTypes: [Egress]\n")
    v = evaluate(load_text(egress_only, "t"), Conn(pods("y"), pods("x"), 80))
    assert (v.ingress.isolated, v.allowed) == (False, True)


def test_a_named_port_is_unknown_without_port_names_and_never_matches_outside():
    p = pol("n", "  podSelector: {}\n  ingress: [{ports: [{port: sql}]}]\n"
            "  egress: [{ports: [{port: sql}]}]\n")
    assert allowed(p, Conn(CLIENT, SERVER, 5432)) is True
    assert allowed(p, Conn(CLIENT, SERVER, 5433)) is False
    assert allowed(p, Conn(CLIENT, Endpoint("x", {"app": "db"}), 5432)) is None  # names unknown
    assert allowed(p, Conn(pods("x"), Endpoint(None, ip="1.2.3.4"), 5432)) is False
    # another rule that allows it settles it, unknown or not
    both = p.replace("[{ports: [{port: sql}]}]\n  egress", "[{ports: [{port: sql}]}, {}]\n  egress")
    assert allowed(both, Conn(CLIENT, Endpoint("x", {"app": "db"}), 5432)) is True


def test_a_list_and_several_documents_are_one_set(tmp_path):
    (tmp_path / "a.yaml").write_text(
        f"apiVersion: v1\nkind: List\nitems:\n- {HEAD.replace(chr(10), chr(10) + '  ')}"
        "metadata: {name: a, namespace: x}\n  spec: {podSelector: {}}\n")
    (tmp_path / "b.yaml").write_text(pol("b", "  podSelector: {}\n") + "---\n" +
                                     pol("c", "  podSelector: {}\n", ns="y"))
    assert [p.ref for p in load_files([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])] == \
        ["x/a", "x/b", "y/c"]


@pytest.mark.parametrize(("text", "message"), [
    ("a: [", "t.yaml: not valid YAML"),
    ("", "t.yaml: no NetworkPolicy in it"),
    (pol("a", "  podSelector: {}\n") + "---\n" + pol("a", "  podSelector: {}\n"),
     "t.yaml: policy x/a is defined twice"),
    (pol("a", "  podSelector: {}\n  egress: [{ports: [{port: 90, endPort: 80}]}]\n"),
     "t.yaml: document 1 (a): spec.egress[0].ports[0].endPort: 80 must be in 90..65535"),
    (pol("a", "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: "
              "[11.0.0.0/16]}}]}]\n"),
     "t.yaml: document 1 (a): spec.egress[0].to[0].ipBlock.except[0]: 11.0.0.0/16 is not inside"),
    (pol("a", "  podSelector: {}\n  ingress: [{from: [{}]}]\n"),
     "t.yaml: document 1 (a): spec.ingress[0].from[0]: a peer needs podSelector"),
    (HEAD + "metadata: {namespace: x}\nspec: {podSelector: {}}\n",
     "t.yaml: document 1: metadata.name: is required"),
    (pol("a", "  podSelector: {}\n  ingress: [{ports: [{port: Web_Port}]}]\n"),
     "t.yaml: document 1 (a): spec.ingress[0].ports[0].port: 'Web_Port' is not a port name"),
    (pol("a", "  podSelector: {}\n  ingress: [{ports: [{port: 123}, {port: web--x}]}]\n"),
     "t.yaml: document 1 (a): spec.ingress[0].ports[1].port: 'web--x' is not a port name"),
    (pol("a", "  podSelector: {}\n  policyTypes: [Inbound]\n"),
     "t.yaml: document 1 (a): spec.policyTypes[0]: 'Inbound' is not Ingress or Egress"),
])
def test_file_errors_name_the_file_document_and_field(tmp_path, text, message):
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_files([str(tmp_path / "t.yaml")])
    assert str(exc.value).startswith(str(tmp_path / message.split(":", 1)[0]) + ":" +
                                     message.split(":", 1)[1]), str(exc.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot be read"):
        load_files([str(tmp_path / "nope.yaml")])
