"""DNS filters of graph edges: `--dns-name GLOB` and `--dns-rcode CODE` (API `dns_name`,
`dns_rcode`).

In: the flags' (or query parameters') values. Out: a `DnsEdgeFilter` whose `matches(dns)` says
whether an edge's `dns` object (docs/api.md; aggregator/dns_names.py `edge_dns`) matches: an
edge to a resolver that asked a name matching one of the globs (shell patterns, case-insensitive,
the trailing dot optional: `*.example.com`), and that got one of the response codes (or
`timeout`: queries without an answer); both flags: a matching name that got one of the codes.
Values of one flag are OR-ed, as every filter flag (eastwest/filters.py). Why not a dimension of that module: a dimension is a
column of every connection and record in every store, and DNS is a summary of a few flows that
the graph adds to its edges; these filters select among the graph's edges.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from eastwest.errors import ConfigError

# RFC 1035 4.1.1, RFC 6895 2.3 (the mnemonics dnspython prints), and `timeout`
RCODES = ("noerror", "formerr", "servfail", "nxdomain", "notimp", "refused", "yxdomain",
          "yxrrset", "nxrrset", "notauth", "notzone", "badvers", "timeout")


@dataclass(frozen=True)
class DnsEdgeFilter:
    names: tuple[str, ...] = ()
    rcodes: tuple[str, ...] = ()

    @classmethod
    def build(cls, names: Iterable[str] = (), rcodes: Iterable[str] = (), *,
              name_flag: str = "--dns-name", rcode_flag: str = "--dns-rcode") -> DnsEdgeFilter:
        globs = []
        for g in names:
            g = g.strip().lower().rstrip(".")
            if not g:
                raise ConfigError(name_flag, g, "must not be empty (a name or a glob such as "
                                  "*.example.com)")
            globs.append(g)
        codes = []
        for c in rcodes:
            c = c.strip().lower()
            if c not in RCODES:
                raise ConfigError(rcode_flag, c, f"must be one of {', '.join(RCODES)}")
            codes.append(c)
        return cls(tuple(dict.fromkeys(globs)), tuple(dict.fromkeys(codes)))

    @property
    def empty(self) -> bool:
        return not self.names and not self.rcodes

    def __str__(self) -> str:
        """In the words of the flow filter's text: `dns_name=*.example.com AND dns_rcode=nxdomain`
        (several values of one: OR-ed, in brackets)."""
        parts = []
        for dim, values in (("dns_name", self.names), ("dns_rcode", self.rcodes)):
            if values:
                s = " OR ".join(f"{dim}={v}" for v in values)
                parts.append(f"({s})" if len(values) > 1 else s)
        return " AND ".join(parts) or "(everything)"

    def query_params(self) -> list[tuple[str, str]]:
        return [*(("dns_name", n) for n in self.names), *(("dns_rcode", c) for c in self.rcodes)]

    def matches(self, dns: Mapping[str, Any] | None) -> bool:
        """Whether an edge's `dns` object matches (an edge without DNS never does)."""
        if not dns:
            return False
        if self.names:
            asked = [n for n in dns.get("names") or ()
                     if any(fnmatch.fnmatchcase(str(n.get("name", "")).rstrip(".").lower(), g)
                            for g in self.names)]
            if not asked:
                return False
            # both flags: a matching name that got one of the codes
            return not self.rcodes or any(self._got(n, "timeouts") for n in asked)
        return not self.rcodes or self._got(dns, "timeouts")

    def _got(self, obj: Mapping[str, Any], timeouts: str) -> bool:
        got = {str(k).lower(): int(v) for k, v in (obj.get("rcodes") or {}).items()}
        got["timeout"] = int(obj.get(timeouts) or 0)
        return any(got.get(c, 0) > 0 for c in self.rcodes)
