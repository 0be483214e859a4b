"""Who a collector is: collectors scoped to different namespaces of one machine get distinct,
stable ids and spool folders without being told; an id the aggregator would refuse, or one that
cannot name a folder, is refused at start naming `--collector-id`; `--check` says both."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from collector import identity
from collector.main import identity_lines
from collector.spool import Spool
from eastwest.errors import ConfigError


def flags(**kw) -> argparse.Namespace:
    base = dict(collector_id=None, netns=[], spool_dir=None, spool_base=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw,cid,spool", [
    ({}, "vm", "/var/lib/eastwest/spool/vm"),
    ({"netns": ["ewlab-h2", "ewlab-h2-p0"]}, "vm-ewlab-h2", "/var/lib/eastwest/spool/vm-ewlab-h2"),
    ({"netns": ["4026532301"]}, "vm-4026532301", "/var/lib/eastwest/spool/vm-4026532301"),
    ({"netns": ["odd name:ä"]}, "vm-odd_name__", "/var/lib/eastwest/spool/vm-odd_name__"),
    ({"netns": ["ewlab-h1"], "spool_base": "/tmp/s"}, "vm-ewlab-h1", "/tmp/s/vm-ewlab-h1"),
    ({"netns": ["ewlab-h1"], "collector_id": "n1"}, "n1", "/var/lib/eastwest/spool/n1"),
    ({"netns": ["ewlab-h1"], "spool_dir": "/srv/sp"}, "vm-ewlab-h1", "/srv/sp"),
    ({"collector_id": "a/b", "spool_dir": "/srv/sp"}, "a/b", "/srv/sp"),
])
def test_id_and_spool_folder_from_the_flags(kw, cid, spool):
    ident = identity.resolve(flags(**kw), hostname="vm")
    assert (ident.collector_id, str(ident.spool_dir)) == (cid, spool)


def test_three_lab_hosts_give_three_ids_and_three_folders():
    got = {identity.resolve(flags(netns=[f"ewlab-h{n}", f"ewlab-h{n}-p0"]), hostname="vm")
           for n in (1, 2, 3)}
    assert len({i.collector_id for i in got}) == 3 and len({i.spool_dir for i in got}) == 3


@pytest.mark.parametrize("cid", ["", "x" * 254])
def test_an_id_the_aggregator_refuses_is_refused_at_start(cid):
    with pytest.raises(ConfigError) as err:
        identity.resolve(flags(collector_id=cid))
    assert err.value.key == "--collector-id" and "1..253" in str(err.value)


@pytest.mark.parametrize("cid", ["a/b", "..", "."])
def test_an_id_that_cannot_name_a_folder_needs_a_spool_dir(cid):
    ident = identity.resolve(flags(collector_id=cid))
    assert ident.spool_dir is None                       # fine for --stdout
    with pytest.raises(ConfigError) as err:              # not for a spooling collector
        identity.spool_dir(flags(collector_id=cid))
    assert err.value.key == "--collector-id" and "--spool-dir" in str(err.value)


def test_check_names_the_id_the_folder_and_who_holds_it(tmp_path: Path):
    ident = identity.resolve(flags(netns=["ewlab-h2"], spool_base=str(tmp_path)), hostname="vm")
    lines = identity_lines(ident).splitlines()
    assert lines[0].split() == ["collector", "id:", "vm-ewlab-h2", "(the", "host", "name", "and",
                                "the", "first", "--netns;", "set", "one", "with", "--collector-id)"]
    assert lines[1].endswith("not created yet)")
    with Spool(ident.spool_dir):
        assert "IN USE by pid " in identity_lines(ident)
    assert identity_lines(ident).endswith("; free)")
