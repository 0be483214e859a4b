"""`eastwest collector --dns`: the kernel filter keeps port 53 only, the command reports the DNS of
the namespaces it is given, and bad DNS flags exit 2 naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from collector.dns.capture import DnsCapture

pytestmark = pytest.mark.lab
EW = [sys.executable, "-m", "eastwest"]
NS = "ewnd3"


def in_ns(code: str) -> None:
    subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", code], check=True)


def test_kernel_filter_keeps_udp_and_tcp_port_53_only_v4_and_v6():
    from tests.conftest import require_root

    require_root()
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        cap = DnsCapture(NS)
        in_ns("""
import socket
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    for port in (53, 5353, 8053, 80):
        s = socket.socket(fam, socket.SOCK_DGRAM); s.sendto(b"x" * 20, (host, port)); s.close()
    for port in (53, 5353):
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(1)
        try: s.connect((host, port))
        except OSError: pass
        s.close()
""")
        time.sleep(0.2)
        seen = []
        while True:
            try:
                data, addr = cap.sock.recvfrom(65535)
            except BlockingIOError:
                break
            seen.append((addr[1], data))
        cap.close()
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=True)
    from collector.dns.capture import decode

    got = [decode(d, proto) for proto, d in seen]
    assert all(g is not None for g in got)
    kinds = {(g[0], g[1], g[3] if g[3] == 53 else g[5]) for g in got}  # type: ignore[index]
    # UDP to 53 (the ICMP unreachable it provokes is not kept), the SYN to 53 and its RST
    assert kinds == {("udp", 4, 53), ("udp", 6, 53), ("tcp", 4, 53), ("tcp", 6, 53)}
    # on lo every packet is seen leaving and arriving: 1 UDP + SYN + RST per family, twice
    assert len(got) == 2 * 3 * 2


def test_collector_command_reports_the_dns_of_a_lab_pod(lab_factory, tmp_path):
    lab = lab_factory(name="ewnd4", hosts=2, pods_per_host=4)
    api = next(p for p in lab.inventory["pods"] if p["service"] == "api")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([*EW, "collector", "--netns", api["netns"], "--dns", "scoped",
                             "--no-socket", "--no-vxlan", "--output", str(out), "--interval",
                             "0.5", "--idle-timeout", "1", "--duration", "9",
                             "--collector-id", "dnscli"], stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # the command imports and opens its sockets
    truth = lab.traffic(duration=4.0, truth_path=tmp_path / "t.jsonl", seed=9, rate=25)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    finals = {(r["client"]["ip"], r["client"]["port"]): r for r in records if r["final"]}
    # the one api pod watched: its queries, none of the other api pod's
    queries = [t for t in truth if "dns" in t and t["client_pod"] == api["name"]]
    assert queries and len(finals) == len(queries)
    for t in queries:
        d = finals[(t["client_ip"], t["client_port"])]["dns"]
        assert (d["names"][0]["name"], d["names"][0]["type"], d["rcodes"]) == (
            t["dns"]["name"], t["dns"]["type"], {t["dns"]["rcode"]: 1})
        assert sorted(a["value"] for a in d["answers"] if a["type"] == "A") == sorted(
            t["dns"]["answers"])


@pytest.mark.parametrize("flags, named", [
    (["--dns", "scoped"], "--dns"), (["--dns", "x", "--dns-timeout", "0"], "--dns-timeout"),
    (["--dns", "x", "--dns-top-names", "0"], "--dns-top-names"),
    (["--dns", "a/"], "expected NETNS, NETNS/IF or /IF")])
def test_bad_dns_flags_exit_2_naming_the_flag(flags, named):
    r = subprocess.run([*EW, "collector", "--no-socket", "--no-vxlan", "--stdout", "--duration",
                        "1", *flags], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert named in r.stderr


def test_a_namespace_that_is_not_there_exits_1_naming_it():
    """As --underlay: the flag is well formed, the machine lacks what it names (a capture error)."""
    r = subprocess.run([*EW, "collector", "--no-socket", "--no-vxlan", "--stdout", "--duration",
                        "1", "--dns", "no-such-netns-ewnd"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "no network namespace /run/netns/no-such-netns-ewnd" in r.stderr
