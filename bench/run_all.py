"""Run every bench/bench_*.py script in turn (each prints its own side-by-side results).

Usage: python bench/run_all.py [NAME_SUBSTRING ...]   (default: all). Exit 1 if any script failed.
Results are recorded by hand in docs/benchmarks.md, each under its own section.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    wanted = sys.argv[1:]
    failed = []
    for script in sorted(here.glob("bench_*.py")):
        if wanted and not any(w in script.name for w in wanted):
            continue
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
