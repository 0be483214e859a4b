"""Network namespaces: names (as `ip netns` keeps them) <-> inode numbers.

Stage: collector settings (the `--netns NAME|INODE` scope) and record enrichment.
In: a name under /run/netns or an inode number.  Out: the inode number the kernel reports for
the namespace (`ns_common.inum`, the same number `stat -c %i /run/netns/NAME` prints).
Source: ip-netns(8) bind-mounts /proc/PID/ns/net at /run/netns/NAME; the inode of that mount
is the namespace's inode.
"""

from __future__ import annotations

import os
from pathlib import Path

from eastwest.errors import ConfigError

NETNS_DIR = Path("/run/netns")


def resolve(spec: str | int, netns_dir: Path = NETNS_DIR) -> int:
    """The inode of a namespace given by name (under /run/netns) or by inode number."""
    text = str(spec).strip()
    if text.isdigit():
        inode = int(text)
        if inode <= 0:
            raise ConfigError("netns", spec, "an inode number must be positive")
        return inode
    if not text or "/" in text or text in (".", ".."):
        raise ConfigError("netns", spec, "expected a namespace name (ip netns list) or an inode number")
    try:
        return os.stat(netns_dir / text).st_ino
    except FileNotFoundError:
        known = ", ".join(sorted(names(netns_dir).values())) or "none"
        raise ConfigError("netns", spec, f"no such namespace under {netns_dir} (known: {known})") from None
    except OSError as exc:
        raise ConfigError("netns", spec, f"cannot stat {netns_dir / text}: {exc.strerror}") from exc


def resolve_all(specs: list[str], netns_dir: Path = NETNS_DIR) -> tuple[int, ...]:
    """Inodes of every `--netns` value, de-duplicated, in the given order."""
    out: list[int] = []
    for spec in specs:
        inode = resolve(spec, netns_dir)
        if inode not in out:
            out.append(inode)
    return tuple(out)


def names(netns_dir: Path = NETNS_DIR) -> dict[int, str]:
    """inode -> name of every named namespace."""
    out: dict[int, str] = {}
    try:
        entries = list(netns_dir.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            out.setdefault(os.stat(entry).st_ino, entry.name)
        except OSError:
            continue
    return out

