"""Build, check and load the project's small C helpers (ctypes), one shared recipe.

Stage: set-up (scripts/setup-venv.sh builds each helper) and run time (each helper's loader).
In: a `NativeSpec`: the C sources beside a Python module, the compiler flags, the environment
variable that disables or redirects it. Out: `<venv>/lib/eastwest/lib<name>.so`, built with the
digest of its sources compiled in (`ew_source_digest()`), so a stale build is told from a
current one and refused, never half used. Users: collector/vxlan/native.py (the bulk VXLAN
path) and aggregator/store/wire_columns.py (the wire batch decoder).

Setting the variable to 0/off/no/false refuses the library on purpose (benchmarks, tests of the
fallback); to a path, loads that build instead of the venv's.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NOT_BUILT = " (run `python -m {module}`; it needs a C compiler)"


@dataclass(frozen=True)
class NativeSpec:
    name: str  # the library is lib<name>.so
    here: Path  # the directory of the sources
    sources: tuple[str, ...]  # .c and .h files; the .c ones are compiled
    cflags: tuple[str, ...]
    env: str  # EASTWEST_..._NATIVE
    build_module: str  # `python -m <build_module>` builds it

    @property
    def library(self) -> str:
        return f"lib{self.name}.so"

    def source_digest(self) -> str:
        """CRC-32 of the compiler flags and the sources: what a build must have been made from.
        FileNotFoundError naming the first missing source (an install that ships no C)."""
        crc = zlib.crc32(" ".join(self.cflags).encode())
        for name in self.sources:
            crc = zlib.crc32((self.here / name).read_bytes(), crc)
        return f"{crc:08x}"

    def sources_present(self) -> bool:
        return all((self.here / name).is_file() for name in self.sources)

    def default_path(self) -> Path:
        """Where setup builds the library: inside the environment (venv), not the source tree."""
        return Path(sys.prefix) / "lib" / "eastwest" / self.library

    def not_built(self) -> str:
        return NOT_BUILT.format(module=self.build_module)

    def open(self, declare: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL | None, str | None]:
        """The library with its functions declared (`declare`) and its digest checked, or None
        and why not. The caller checks its own layouts on top and caches the result."""
        setting = os.environ.get(self.env, "")
        if setting.lower() in ("0", "off", "no", "false"):
            return None, f"disabled by {self.env}={setting}"
        path = Path(setting) if setting else self.default_path()
        if not path.exists():
            return None, f"{path} is not built{self.not_built()}"
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            return None, f"{path} does not load: {exc}"
        try:
            declare(lib)
        except AttributeError as exc:
            return None, f"{path} lacks a function: {exc}"
        built = lib.ew_source_digest().decode()
        if not self.sources_present():
            return lib, None  # an install without the C sources: its build is all there is
        if built != self.source_digest():
            return None, (f"{path} was built from other sources (digest {built}, sources "
                          f"{self.source_digest()}): rebuild with `python -m {self.build_module}`")
        return lib, None

    def is_refusal(self, why: str | None) -> bool:
        """True when a library exists but was refused (stale, foreign, broken): worth a warning,
        unlike a machine without a compiler or the variable set to 0."""
        return why is not None and not why.endswith(self.not_built()) and not why.startswith(
            "disabled")


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


def build(spec: NativeSpec, output: Path | None = None, *, force: bool = False,
          defines: tuple[str, ...] = ()) -> Path:
    """Compile the library to `output` (default: the venv's) unless it is current; its path.
    `defines` (NAME=VALUE) are for tests only. RuntimeError when there is no compiler or the
    compiler fails (its output included)."""
    output = output or spec.default_path()
    if not spec.sources_present():
        missing = [n for n in spec.sources if not (spec.here / n).is_file()]
        raise RuntimeError(f"cannot build lib{spec.name}.so: its C sources are not installed "
                           f"({', '.join(missing)} missing in {spec.here})")
    digest = spec.source_digest()
    if not force and output.exists() and built_digest(output) == digest:
        return output
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".lib{spec.name}-", suffix=".so", dir=output.parent)
    os.close(fd)
    cmd = [cc, *spec.cflags, f'-DEW_SOURCE_DIGEST="{digest}"', *(f"-D{d}" for d in defines),
           "-o", tmp, *(str(spec.here / name) for name in spec.sources if name.endswith(".c"))]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)  # atomic: a running process keeps the file it mapped
    return output


def main(spec: NativeSpec, argv: list[str] | None, *, what: str, fallback: str) -> int:
    """The command line of a helper's build module: `what` names the helper, `fallback` says
    what runs without it. Without a compiler it says so and exits 0."""
    ap = argparse.ArgumentParser(description=f"Build the {what} with this machine's C compiler.")
    ap.add_argument("--force", action="store_true", help="rebuild even if the build is current")
    ap.add_argument("--output", type=Path, help=f"library path (default {spec.default_path()})")
    ap.add_argument("--quiet", action="store_true", help="print only failures")
    args = ap.parse_args(argv)
    try:
        path = build(spec, args.output, force=args.force)
    except RuntimeError as exc:
        print(f"eastwest: {what} not built ({exc}); {fallback}", file=sys.stderr)
        return 0
    if not args.quiet:
        print(f"eastwest: {what} {path} (sources {spec.source_digest()})")
    return 0
