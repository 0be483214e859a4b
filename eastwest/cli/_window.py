"""Time windows of the aggregate commands (graph, workloads, top, diff).

In:  `--since`/`--until` (a duration ago, RFC 3339 or `now`), or `A..B` for diff's `--a`/`--b`.
Out: UTC datetimes and the API's `from`/`to` parameters. Parsing is `eastwest.filters.parse_time`,
the one time syntax of the CLI and the API; errors name the flag.
"""

from __future__ import annotations

from datetime import UTC, datetime

from eastwest.errors import ConfigError
from eastwest.filters import parse_time


def rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def window(since: str | None, until: str | None, now: datetime | None = None,
           prefix: str = "") -> list[tuple[str, str]]:
    """`from`/`to` query parameters (with a prefix such as `a_`), validated."""
    out: list[tuple[str, str]] = []
    now = now or datetime.now(UTC)
    t0 = parse_time("--since", since, now) if since else None
    t1 = parse_time("--until", until, now) if until else None
    if t0 is not None and t1 is not None and t1 <= t0:
        raise ConfigError("--until", until, f"is not after --since {since}")
    if t0 is not None:
        out.append((f"{prefix}from", rfc3339(t0)))
    if t1 is not None:
        out.append((f"{prefix}to", rfc3339(t1)))
    return out


def span(flag: str, text: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """`1h..30m`, `2026-11-28T04:00Z..now`: start and end, start before end."""
    a, sep, b = text.partition("..")
    if not sep or not a or not b:
        raise ConfigError(flag, text, "expected START..END, e.g. 1h..30m or 30m..now")
    t0, t1 = parse_time(flag, a, now), parse_time(flag, b, now)
    if t1 <= t0:
        raise ConfigError(flag, text, "the end is not after the start")
    return t0, t1
