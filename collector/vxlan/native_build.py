"""Build the native helper of the bulk VXLAN path with this machine's C compiler.

Stage: set-up (scripts/setup-venv.sh runs `python -m collector.vxlan.native_build`). In: the
sources `ewvxlan*.c` / `ewvxlan.h` beside this file, `$CC` (default `cc`, else `gcc`). Out:
`<venv>/lib/eastwest/libewvxlan.so` (see `native.default_path`), with the digest of its sources
compiled in, so `native.load` can tell a stale build from a current one. Idempotent: a current
build is left alone. Without a compiler it says so and exits 0: the collector then takes the
numpy path (same records, slower), as docs/vxlan.md explains. The recipe (compiler lookup,
digest check, atomic build) is shared with the other helpers: eastwest/native_build.py.

Usage: python -m collector.vxlan.native_build [--force] [--output FILE] [--quiet]
"""

from __future__ import annotations

import sys
from pathlib import Path

from collector.vxlan.native import SPEC, default_path, source_digest
from eastwest import native_build as _nb

compiler = _nb.compiler
built_digest = _nb.built_digest
__all__ = ["build", "built_digest", "compiler", "default_path", "main", "source_digest"]


def build(output: Path | None = None, *, force: bool = False,
          defines: tuple[str, ...] = ()) -> Path:
    """Compile the library to `output` (default: the venv's) unless it is current; its path.
    `defines` (NAME=VALUE) are for tests only (e.g. EW_ORDER_HASH_MASK). RuntimeError when
    there is no compiler or the compiler fails (its output included)."""
    return _nb.build(SPEC, output, force=force, defines=defines)


def main(argv: list[str] | None = None) -> int:
    return _nb.main(SPEC, argv, what="VXLAN native helper", fallback="the numpy path will be used")


if __name__ == "__main__":
    sys.exit(main())
