"""DNS on port 53 (UDP and TCP) of the namespaces a collector watches: capture, parse (dnspython),
queries matched to answers, and a `dns` summary on each flow to a resolver (docs/collector.md)."""

from collector.dns.flows import DnsFlowTable
from collector.dns.message import DnsMessage, DnsParseError, parse
from collector.dns.source import DnsSource

__all__ = ["DnsFlowTable", "DnsMessage", "DnsParseError", "DnsSource", "parse"]
