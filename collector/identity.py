"""Which collector this process is: its id and its spool folder.

Stage: collector start-up (collector/main.py), before any source or sink is built; `--check`.
In:  `--collector-id`, `--netns`, `--spool-dir`, `--spool-base` and the host name.
Out: `Identity`: the collector id (in every record id, every batch's `(collector, batch_seq)`,
     the NATS subject) and the spool folder, each with where it came from, for the start-up line
     and `--check`.

Defaults, so that collectors of one machine differ without being told:
- no `--netns`: the host name (one collector per host, as before);
- with `--netns`: the host name, `-`, and the first `--netns` value, e.g. `vm-ewlab-h2`. Several
  collectors scoped to different namespaces of one machine (docs/lab.md) get distinct ids, and
  the same collector gets the same id at every start. Characters other than letters, digits,
  `.`, `_` and `-` in the namespace name become `_`: the id is a folder name, a metric label
  value and (after the NATS mapping, eastwest/jetstream.py) a subject token.
- the spool folder: `--spool-dir`, else `<--spool-base>/<collector id>` (base default
  /var/lib/eastwest/spool), so it follows the id.
The aggregator refuses a collector id that is empty or longer than 253 characters
(aggregator/ingest.py MAX_COLLECTOR_LEN): that is checked here, at start, not at every batch.
"""

from __future__ import annotations

import argparse
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from eastwest.errors import ConfigError

DEFAULT_SPOOL_BASE = Path("/var/lib/eastwest/spool")
MAX_ID_LEN = 253  # = aggregator/ingest.py MAX_COLLECTOR_LEN (the collector does not import it)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Identity:
    collector_id: str
    id_from: str     # "--collector-id", "the host name", "the host name and the first --netns"
    spool_dir: Path | None  # None: the id cannot name a folder and no --spool-dir (see spool_from)
    spool_from: str  # "--spool-dir", "<base>/<collector id>", or why there is no default


def default_collector_id(hostname: str, netns: list[str]) -> str:
    """The host name; with `--netns`, the host name and the first namespace (`vm-ewlab-h2`)."""
    if not netns:
        return hostname
    return f"{hostname}-{_UNSAFE.sub('_', str(netns[0]).strip())}"


def resolve(args: argparse.Namespace, hostname: str | None = None) -> Identity:
    """The collector id and spool folder of these flags; ConfigError naming `--collector-id`
    when the aggregator would refuse the id."""
    given = getattr(args, "collector_id", None)
    netns = list(getattr(args, "netns", None) or [])
    if given is not None:
        cid, id_from = str(given), "--collector-id"
    else:
        host = hostname if hostname is not None else socket.gethostname()
        cid = default_collector_id(host, netns)
        id_from = "the host name and the first --netns" if netns else "the host name"
    if not 1 <= len(cid) <= MAX_ID_LEN:
        raise ConfigError("--collector-id", cid, f"must be 1..{MAX_ID_LEN} characters (the "
                          "aggregator refuses other lengths)")
    if getattr(args, "spool_dir", None):
        return Identity(cid, id_from, Path(args.spool_dir), "--spool-dir")
    base = Path(getattr(args, "spool_base", None) or DEFAULT_SPOOL_BASE)
    if "/" in cid or cid in (".", "..") or "\0" in cid:
        return Identity(cid, id_from, None, f"the collector id cannot name a spool folder "
                        f"under {base}: pass --spool-dir")
    return Identity(cid, id_from, base / cid, f"{base}/<collector id>")


def spool_dir(args: argparse.Namespace) -> Path:
    """The spool folder of a collector that spools (--aggregator, --nats); ConfigError when its
    id cannot name one and no --spool-dir is given."""
    ident = resolve(args)
    if ident.spool_dir is None:
        raise ConfigError("--collector-id", ident.collector_id, ident.spool_from)
    return ident.spool_dir
