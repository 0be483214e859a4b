"""Every benchmark that runs without a lab or extra servers still runs: each script at a tiny
size, its exit status and its ratios. `make bench` is how the targets in docs/benchmarks.md are
proven; bench_graph_api.py once broke silently in a refactor of the aggregator's state, found
only when it was next run. Sizes here prove nothing about speed (that is `make bench`'s job).

Not here: bench_socket_probes.py, bench_drops.py, bench_vxlan_live.py, bench_footprint.py and
bench_udp_storm.py (real eBPF, tcpreplay, namespaces: the lab suites cover their code paths),
bench_conntrack.py (root, two network namespaces and iptables: tests/lab/test_lab_services.py
and test_services_join_lab.py cover the conntrack reader and the folding it measures),
bench_scaleout.py (NATS + ClickHouse servers), bench_nodeport_delete.py (a ClickHouse server;
tests/unit/test_store_nodeport.py covers the tombstones it times), bench_web.py
(Chromium; tests/web cover the dashboard).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

CASES = {
    "bench_pipeline.py": ["--records", "20000", "--batch", "2000", "--backlog", "10000",
                          "--rate", "5000", "--seconds", "2"],
    "bench_graph_api.py": ["--flows", "20000", "--requests", "2"],
    "bench_correlate.py": ["--records", "5000"],
    "bench_correlate_drops.py": ["--records", "5000", "--batch", "1000", "--repeat", "1"],
    "bench_store.py": ["--records", "20000"],
    "bench_wire_columns.py": ["--records", "5000", "--repeat", "1"],
    "bench_transport.py": ["--records", "5000", "--rounds", "1", "--sustained", "5000"],
    "bench_vxlan.py": ["--packets", "5000", "--repeat", "1", "--scapy-sample", "500"],
}
RATIO = re.compile(r"\d\.\d+x")


def test_every_bench_script_is_either_smoke_tested_or_named_as_not():
    named = set(CASES) | {"bench_socket_probes.py", "bench_drops.py", "bench_vxlan_live.py",
                          "bench_footprint.py", "bench_udp_storm.py",
                          "bench_scaleout.py", "bench_conntrack.py", "bench_nodeport_delete.py",
                          "bench_web.py"}
    assert {p.name for p in BENCH.glob("bench_*.py")} == named


@pytest.mark.parametrize("script", sorted(CASES))
def test_the_bench_runs_and_reports_its_ratios(script):
    r = subprocess.run([sys.executable, str(BENCH / script), *CASES[script]], cwd=BENCH.parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert RATIO.search(r.stdout), f"{script} printed no ratio:\n{r.stdout[-2000:]}"
