"""The shared native-helper recipe (eastwest/native_build.py) when an install ships no C sources:
the library built with the package is loaded as it is, and a rebuild says what is missing."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from aggregator.store import wire_columns
from eastwest import native_build


def _spec_in(tmp_path: Path) -> native_build.NativeSpec:
    src = tmp_path / "src"
    src.mkdir()
    for name in wire_columns.SPEC.sources:
        shutil.copy(wire_columns.SPEC.here / name, src / name)
    return dataclasses.replace(wire_columns.SPEC, here=src, env="EASTWEST_TEST_NATIVE_UNSET")


def _declare(lib) -> None:  # what open() needs to check a digest
    wire_columns._declare(lib)


def test_library_without_its_sources_is_loaded(tmp_path: Path, monkeypatch) -> None:
    if native_build.compiler() is None:
        pytest.skip("no C compiler")
    spec = _spec_in(tmp_path)
    out = native_build.build(spec, tmp_path / "lib" / spec.library)
    monkeypatch.setenv(spec.env, str(out))
    lib, why = spec.open(_declare)
    assert lib is not None and why is None
    (spec.here / "ewwire.c").write_text("/* edited */\n" + (spec.here / "ewwire.c").read_text())
    lib, why = spec.open(_declare)
    assert lib is None and "other sources" in (why or "")  # sources present: the digest counts
    shutil.rmtree(spec.here)
    lib, why = spec.open(_declare)
    assert lib is not None and why is None  # no sources: the build is all there is


def test_build_without_sources_names_them(tmp_path: Path) -> None:
    spec = dataclasses.replace(wire_columns.SPEC, here=tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match=r"ewwire\.c missing"):
        native_build.build(spec, tmp_path / "lib.so")
    assert native_build.main(spec, ["--output", str(tmp_path / "lib.so")], what="decoder",
                             fallback="the reference path runs") == 0
