"""Every `eastwest aggregator` flag's value is checked whatever the other flags are
(aggregator/settings.py): `--otlp-sample 2` is refused without an OTLP endpoint as with one, a
NATS value without `--nats`, a duration, a size, a ratio. A bad value is one line naming the
flag, exit 2, before anything is bound or opened."""

from __future__ import annotations

import pytest

import aggregator.serve
from eastwest.cli import main

BAD = [
    (["--otlp-sample", "2"], "--otlp-sample=2.0: expected a share between 0 and 1"),
    (["--otlp-sample", "-0.1"], "--otlp-sample=-0.1: expected a share between 0 and 1"),
    (["--otlp-sample", "nan"], "--otlp-sample=nan: expected a share between 0 and 1"),
    (["--otlp-endpoint", "tempo:4317"], "--otlp-endpoint='tempo:4317': expected a URL"),
    (["--otlp-signals", "logs"], "--otlp-signals='logs': 'logs': expected traces, metrics"),
    (["--otlp-signals", ","], "--otlp-signals='': expected traces, metrics or both"),
    (["--otlp-filter", "colour=red"], "--otlp-filter='colour=red': unknown filter"),
    (["--otlp-filter", "protocol=smtp"], "--otlp-filter='protocol=smtp': must be one of esp,"),
    (["--otlp-filter", "not_outcome=meh"], "--otlp-filter='not_outcome=meh': must be one of ok,"),
    (["--otlp-timeout", "0"], "--otlp-timeout=0.0: must be a positive number of seconds"),
    (["--otlp-timeout", "inf"], "--otlp-timeout=inf: must be a positive number of seconds"),
    (["--otlp-metrics-interval", "-1"], "--otlp-metrics-interval=-1.0: must be a positive"),
    (["--otlp-queue-size", "0"], "--otlp-queue-size=0: must be at least 1"),
    (["--export-settle", "-1"], "--export-settle=-1.0: must be a number of seconds, 0 or more"),
    (["--nats-ack-wait", "0"], "--nats-ack-wait=0.0: must be a positive number of seconds"),
    (["--nats-max-bytes", "0"], "--nats-max-bytes=0: at least 1 MiB"),
    (["--nats-max-age", "0"], "--nats-max-age=0.0: must be a positive number of seconds"),
    (["--nats-stream", "a.b"], "--nats-stream='a.b': letters, digits, _ and - only"),
    (["--nats-creds", "/nonexistent/x.creds"], "--nats-creds='/nonexistent/x.creds': no such file"),
    (["--nats-partitions", "0"], "--nats-partitions=0: a whole number from 1 to 1024"),
    (["--nats-partitions", "2000"], "--nats-partitions=2000: a whole number from 1 to 1024"),
    (["--nats-lease", "0"], "--nats-lease=0.0: must be a positive number of seconds"),
    (["--retention", "0s"], "--retention='0s': must be longer than 0"),
    (["--retention", "a week"], "--retention='a week': not a duration"),
    (["--identity-settle", "nan"], "--identity-settle=nan: must be between 0 and 3600 seconds"),
    (["--identity-settle", "-1"], "--identity-settle=-1.0: must be between 0 and 3600 seconds"),
    (["--edge-budget", "0"], "--edge-budget=0: must be at least 1"),
    (["--nodeport-hold", "-1"], "--nodeport-hold=-1.0: must be between 0 (off) and 60 seconds"),
    (["--nodeport-hold", "nan"], "--nodeport-hold=nan: must be between 0 (off) and 60 seconds"),
    (["--nodeport-range", "30000"], "--nodeport-range='30000': must be LOW-HIGH, two ports"),
    (["--nodeport-range", "a-b"], "--nodeport-range='a-b': must be LOW-HIGH, two ports"),
    (["--nodeport-range", "32767-30000"], "--nodeport-range='32767-30000': must be LOW-HIGH ports"),
    (["--nodeport-range", "0-100"], "--nodeport-range='0-100': must be LOW-HIGH ports with 1 <="),
    (["--nodeport-range", "1-70000"], "--nodeport-range='1-70000': must be LOW-HIGH ports with"),
    (["--correlation-backlog", "0"], "--correlation-backlog=0: must hold at least one whole batch"),
    (["--max-batch-records", "1000", "--correlation-backlog", "999"],
     "--correlation-backlog=999: must hold at least one whole batch (--max-batch-records 1000)"),
    (["--max-body-bytes", "10"], "--max-body-bytes=10: must be at least 1024"),
    (["--max-batch-records", "0"], "--max-batch-records=0: must be at least 1"),
    (["--cidr-group", "corp"], "--cidr-group='corp': expected NAME=CIDR"),
    (["--cidr-group", "corp=10.0.0.0/33"], "--cidr-group='corp=10.0.0.0/33': '10.0.0.0/33' is not a CIDR"),
]


@pytest.fixture
def never_serves(monkeypatch, tmp_path):
    """Tokens set, no OTLP endpoint in the environment; `serve` replaced, so that a flag that
    is wrongly accepted shows as exit 99 instead of a server."""
    monkeypatch.setenv("EASTWEST_INGEST_TOKEN", "i" * 24)
    monkeypatch.setenv("EASTWEST_READ_TOKEN", "r" * 24)
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(aggregator.serve, "serve", lambda settings, verbose=False: 99)
    return ["aggregator", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_a_bad_value_is_refused_whatever_the_other_flags(never_serves, capsys, flags, message):
    rc = main([*never_serves, *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"eastwest aggregator: {message}") and err.count("\n") == 1, err


def test_the_otlp_sample_is_refused_with_an_endpoint_as_without(never_serves, capsys):
    for extra in ([], ["--otlp-endpoint", "http://127.0.0.1:4318"]):
        assert main([*never_serves, "--otlp-sample", "2", *extra]) == 2
        assert "--otlp-sample=2.0" in capsys.readouterr().err


def test_good_values_reach_serve(never_serves, capsys):
    flags = ["--otlp-sample", "0.25", "--otlp-timeout", "3", "--otlp-signals", "traces",
             "--export-settle", "0", "--nats-ack-wait", "10", "--nats-max-bytes", "2097152",
             "--retention", "36h", "--identity-settle", "0", "--cidr-group", "corp=10.0.0.0/8"]
    assert main([*never_serves, *flags]) == 99, capsys.readouterr().err


def test_the_live_fanin_is_on_by_default_and_no_live_fanin_turns_it_off(never_serves,
                                                                        monkeypatch):
    seen = []
    monkeypatch.setattr(aggregator.serve, "serve",
                        lambda settings, verbose=False: seen.append(settings.live_fanin) or 99)
    nats = ["--nats", "nats://127.0.0.1:4222"]
    assert main([*never_serves, *nats]) == 99
    assert main([*never_serves, *nats, "--no-live-fanin"]) == 99
    assert seen == [True, False]


def test_the_nodeport_range_defaults_to_kubernetes_and_a_flag_reaches_the_settings(never_serves,
                                                                                  monkeypatch):
    """The flag's declared default (the CLI does not import the aggregator) is the range the
    store's queries default to."""
    from aggregator.store.query import NODEPORT_RANGE

    seen = []
    monkeypatch.setattr(aggregator.serve, "serve",
                        lambda settings, verbose=False: seen.append(settings.nodeport_range) or 99)
    assert main(never_serves) == 99
    assert main([*never_serves, "--nodeport-range", "20000-20999"]) == 99
    assert seen == [NODEPORT_RANGE, (20000, 20999)]
