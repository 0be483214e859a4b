"""The placeholders of the docs' examples and what the test puts in their place.

An example is run as written except for these fill-ins, each a thing the reader supplies (their
aggregator's address, their servers, their capture, their tokens) or that would leave the test's
machine changed or its time budget blown:

- the aggregator the reader talks to (`http://127.0.0.1:8470`) is the module's running demo;
  an example that starts an aggregator (`--listen H:8470`) gets a free loopback port instead;
  `eastwest demo` and `make run|demo` keep 8470 (they are run one at a time);
- `...` after `eastwest aggregator` is "your other flags": `--listen` and `--data` of its own;
- servers named in examples (`tempo`, `tempo.example`, `ch-1`, `nats-1`, `nats-2`) are the ones
  the test started on loopback (a fake OTLP receiver for Tempo: Tempo cannot run here; real
  ClickHouse and NATS servers); `clickhouse://eastwest@ch-1:9000/eastwest?cluster=eastwest` is a
  database on the test's ClickHouse cluster; a CA file path is a generated CA;
- token values written `...` are fresh random tokens; `$TOKEN` is set;
- capture file names are captures from tests/captures (copied into the example's directory);
- the bare interface `eth0` of this host (`--underlay eth0`, `--wire-interface eth0`) is `lo`
  (the test machine has no `eth0` necessarily, and the test's traffic stays on loopback and the
  lab's namespaces);
- `/etc/bash_completion.d/` is a directory of the example's own, and so is zsh's first `fpath`
  directory (`${fpath[1]}`, set by the runner's zsh prelude): the test does not install into
  the machine's shells;
- `--duration N` above DURATION_CAP seconds is DURATION_CAP (the suite's time budget).

Each example runs in its own fresh directory (relative paths as written), with EASTWEST_SERVER,
EASTWEST_TOKEN, EASTWEST_INGEST_TOKEN and EASTWEST_READ_TOKEN set to the module's aggregator (as a
reader following README.md would have them) and ./data/tokens.env holding the same tokens (what
`make run` writes there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DURATION_CAP = 6
DEFAULT_AGGREGATOR = "127.0.0.1:8470"


@dataclass
class Servers:
    """Where the test's servers are; ports are filled in by the runner."""
    aggregator: str = ""                 # host:port of the module's aggregator
    otlp_http: str = ""                  # host:port of the fake OTLP/HTTP receiver
    otlp_grpc: str = ""                  # host:port of the fake OTLP gRPC receiver
    clickhouse_url: str = ""             # clickhouse://127.0.0.1:P/db?cluster=...
    nats_url: str = ""                   # nats://127.0.0.1:P
    ca_file: str = ""
    free_port: object = None             # () -> int
    files: dict[str, str] = field(default_factory=dict)  # name as written -> tests/captures file


# what a reader's example names -> what this machine has (applied in order)
def fill(cmd: str, s: Servers) -> str:
    out = cmd
    starts_own = re.search(r"(^|\s)eastwest aggregator\b", out) and " --help" not in out
    if starts_own and " ... " in f"{out} ":
        out = re.sub(r"eastwest aggregator \.\.\.",
                     "eastwest aggregator --listen 127.0.0.1:8470 --data ./data", out)
    if starts_own:
        port = s.free_port() if callable(s.free_port) else 0
        out = re.sub(r"--listen (0\.0\.0\.0|127\.0\.0\.1):8470", f"--listen 127.0.0.1:{port}", out)
    out = out.replace(f"http://{DEFAULT_AGGREGATOR}", f"http://{s.aggregator}")
    out = re.sub(r"clickhouse://eastwest@ch-1:9000/eastwest\?cluster=eastwest", s.clickhouse_url,
                 out)
    out = out.replace("nats://nats-1:4222,nats://nats-2:4222", f"{s.nats_url},{s.nats_url}")
    out = out.replace("http://tempo:4318", f"http://{s.otlp_http}")
    out = out.replace("http://tempo:4317", f"http://{s.otlp_grpc}")
    out = out.replace("https://tempo.example:4317", f"https://{s.otlp_grpc}")
    out = out.replace("/etc/ssl/tempo-ca.pem", s.ca_file)
    out = re.sub(r"\b(EASTWEST_[A-Z_]+_TOKEN)=\.\.\.", r'\1="$EW_FILL_\1"', out)
    out = re.sub(r"--(underlay|wire-interface) eth0\b", r"--\1 lo", out)
    out = out.replace("> /etc/bash_completion.d/", "> ./bash_completion.d/")
    out = re.sub(r"--duration (\d+)",
                 lambda m: f"--duration {min(int(m.group(1)), DURATION_CAP)}", out)
    return out


def unfilled(cmd: str) -> list[str]:
    """What in a filled command still needs the reader: `...`, example host names, /etc paths."""
    bad = []
    for pat in (r"(^|\s)\.\.\.(\s|$)", r"=\.\.\.", r"\btempo\b", r"\bch-\d\b", r"\bnats-\d\b",
                r"\s/etc/", r"--(underlay|wire-interface) eth0\b"):
        if re.search(pat, cmd):
            bad.append(pat)
    return bad


CAPTURES = {  # names the docs use -> tests/captures files
    "capture.pcap": "generated_vxlan_vlan_dns_tls.pcap",   # VXLAN with TCP, UDP and VLAN tags
    "capture.pcapng": "CESNET_FlowTest_vxlan.pcap",   # rewritten as pcapng by the runner
    "flannel.pcap": "the-tcpdump-group_tcpdump_vxlan_port_8472.pcap",
    "ovn.pcap": "the-tcpdump-group_tcpdump_geneve.pcap",
}
