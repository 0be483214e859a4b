"""The capability probe's decisions: which features run, what records lack, one warning for all
degradations, exit codes of --check; with hooks faked, no root."""

from __future__ import annotations

import argparse
import logging

import pytest

from collector import capabilities as capmod
from collector.capabilities import HOOKS, Capabilities
from collector.netns import resolve, resolve_all
from eastwest.errors import ConfigError


def caps(missing=(), failed_checks=(), udp_offsets=True) -> Capabilities:
    c = Capabilities()
    c.udp_offsets = object() if udp_offsets else None
    for h in HOOKS:
        c.hooks[h.name] = h.name not in missing
        if h.name in missing:
            c.notes[h.name] = "no such tracepoint"
    for what in ("BTF", "permissions", "bcc"):
        c.checks.append((what, what not in failed_checks, "detail"))
    return c


def test_everything_present():
    c = caps()
    assert c.features() == {"bytes", "retransmit", "resets", "rtt", "destroy", "udp"}
    assert c.missing_measurements() == () and c.problems() == [] and c.degradations() == []
    c.require()


def test_every_udp_syscall_is_a_hook_of_the_udp_feature():
    names = {h.name for h in HOOKS if h.feature == "udp"}
    assert names == {f"sys_{e}_{c}" for e in ("enter", "exit") for c in
                     ("sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg")}


@pytest.mark.parametrize("missing, offsets, why", [
    (("sys_exit_recvmmsg",), True, "syscalls:sys_exit_recvmmsg unusable"),
    ((), False, "UDP flows off (its BTF offsets are unknown)"),
    (("sock_send_length",), True, "UDP flows off (the byte hooks are missing)"),
])
def test_a_missing_udp_piece_turns_udp_off_and_tcp_keeps_running(missing, offsets, why):
    c = caps(missing=missing, udp_offsets=offsets)
    assert "udp" not in c.features()
    assert {"retransmit", "resets", "rtt", "destroy"} <= c.features()
    assert c.problems() == []
    c.require()
    assert any(d.startswith(why) for d in c.degradations()), c.degradations()


def test_missing_byte_tracepoint_degrades_bytes_only():
    c = caps(missing=("sock_recv_length",))
    assert "bytes" not in c.features() and "resets" in c.features()
    assert c.missing_measurements() == ("bytes",)
    assert c.problems() == []


def test_one_warning_names_every_degradation(caplog):
    c = caps(missing=("sock_send_length", "tcp_probe"))
    with caplog.at_level(logging.WARNING):
        c.warn_once(logging.getLogger("t"))
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "sock:sock_send_length" in msg and "tcp:tcp_probe" in msg


def test_missing_lifecycle_tracepoint_or_permission_is_fatal():
    c = caps(missing=("inet_sock_set_state",), failed_checks=("permissions",))
    problems = c.problems()
    assert any("inet_sock_set_state" in p for p in problems)
    assert any(p.startswith("permissions") for p in problems)
    with pytest.raises(Exception, match="cannot run here"):
        c.require()


@pytest.mark.parametrize("missing, failed, rc", [((), (), 0), (("tcp_probe",), (), 0),
                                                 (("inet_sock_set_state",), (), 1),
                                                 ((), ("bcc",), 1)])
def test_check_exit_code_and_table(monkeypatch, capsys, missing, failed, rc):
    monkeypatch.setattr(capmod, "probe", lambda: caps(missing, failed))
    assert capmod.main_check(argparse.Namespace(map_entries=1024)) == rc
    out = capsys.readouterr().out
    assert "hook" in out and "sock:inet_sock_set_state" in out and "map memory" in out


def test_netns_resolves_names_and_inodes(tmp_path):
    (tmp_path / "lab-h1").write_text("")
    ino = (tmp_path / "lab-h1").stat().st_ino
    assert resolve("lab-h1", tmp_path) == ino
    assert resolve("4026531840", tmp_path) == 4026531840
    assert resolve_all(["lab-h1", str(ino)], tmp_path) == (ino,)
    with pytest.raises(ConfigError, match="no such namespace.*known: lab-h1"):
        resolve("nope", tmp_path)
    with pytest.raises(ConfigError, match="netns='../x'"):
        resolve("../x", tmp_path)


def test_check_says_when_conntrack_cannot_be_read():
    """A namespace that is not there (or, without CAP_NET_ADMIN, any) cannot give NAT
    translations: --check says so, naming it; an inode number is not opened."""
    lines = capmod.conntrack_lines(["ewnosuchns", "4026531840"])
    assert len(lines) == 1
    assert lines[0].startswith("conntrack ewnosuchns:") and "NOT READABLE" in lines[0]
    assert "cannot open /run/netns/ewnosuchns" in lines[0]
