"""Build the native helper of the bulk VXLAN path with this machine's C compiler.

Stage: set-up (scripts/setup-venv.sh runs `python -m collector.vxlan.native_build`). In: the
sources `ewvxlan*.c` / `ewvxlan.h` beside this file, `$CC` (default `cc`, else `gcc`). Out:
`<venv>/lib/eastwest/libewvxlan.so` (see `native.default_path`), with the digest of its sources
compiled in, so `native.load` can tell a stale build from a current one. Idempotent: a current
build is left alone. Without a compiler it says so and exits 0: the collector then takes the
numpy path (same records, slower), as docs/vxlan.md explains.

Usage: python -m collector.vxlan.native_build [--force] [--output FILE] [--quiet]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from collector.vxlan.native import CFLAGS, HERE, SOURCES, default_path, source_digest


def compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def built_digest(path: Path) -> str | None:
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.ew_source_digest
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    digest = fn()
    return digest.decode() if digest else None


def build(output: Path | None = None, *, force: bool = False,
          defines: tuple[str, ...] = ()) -> Path:
    """Compile the library to `output` (default: the venv's) unless it is current; its path.
    `defines` (NAME=VALUE) are for tests only (e.g. EW_ORDER_HASH_MASK). RuntimeError when
    there is no compiler or the compiler fails (its output included)."""
    output = output or default_path()
    digest = source_digest()
    if not force and output.exists() and built_digest(output) == digest:
        return output
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libewvxlan-", suffix=".so", dir=output.parent)
    os.close(fd)
    cmd = [cc, *CFLAGS, f'-DEW_SOURCE_DIGEST="{digest}"', *(f"-D{d}" for d in defines), "-o", tmp,
           *(str(HERE / name) for name in SOURCES if name.endswith(".c"))]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)  # atomic: a running collector keeps the file it mapped
    return output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the build is current")
    ap.add_argument("--output", type=Path, help=f"library path (default {default_path()})")
    ap.add_argument("--quiet", action="store_true", help="print only failures")
    args = ap.parse_args(argv)
    try:
        path = build(args.output, force=args.force)
    except RuntimeError as exc:
        print(f"eastwest: VXLAN native helper not built ({exc}); the numpy path will be used",
              file=sys.stderr)
        return 0
    if not args.quiet:
        print(f"eastwest: VXLAN native helper {path} (sources {source_digest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
