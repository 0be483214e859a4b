#!/usr/bin/env bash
# Creates .venv with eastwest installed editable (plus dev tools) and links Debian's bcc into it.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'eastwest setup: %s\n' "$*"; }

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.eastwest-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing eastwest (editable) and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
else
  say ".venv up to date"
fi

# The bulk VXLAN path's C helper, compiled from collector/vxlan/ewvxlan*.c with this machine's
# compiler into .venv/lib/eastwest/ (rebuilt only when the sources changed). Without a compiler
# it says so and the collector decodes with numpy instead: same records, slower.
.venv/bin/python -m collector.vxlan.native_build --quiet
# The aggregator's wire batch decoder (aggregator/store/ewwire.c), the same way; without it the
# aggregator decodes batches with msgspec: same rows, slower.
.venv/bin/python -m aggregator.store.wire_columns --quiet
.venv/bin/python -m aggregator.correlate_columns --quiet  # C core of ColumnCorrelator; without it, the reference Correlator runs

# bcc is pure Python over libbcc.so, packaged only for Debian's python3. Link that package (and
# nothing else of dist-packages) into the venv. PyPI's "bcc" is an unrelated project.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
else
  say "warning: /usr/lib/python3/dist-packages/bcc missing (python3-bpfcc not installed?)"
fi
