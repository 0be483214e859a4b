#!/usr/bin/env bash
# `make run`: eastwest on this host until Ctrl-C: an aggregator (DuckDB under ./data/store) and a
# collector for this host (socket probes; VXLAN capture where the host has VXLAN devices) pointed
# at it. Tokens are generated into ./data/tokens.env (mode 0600) on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/eastwest collector --check || echo "eastwest: some kernel features are missing (above); starting anyway" >&2
exec .venv/bin/eastwest demo --no-lab --data ./data "$@"
