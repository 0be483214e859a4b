#!/usr/bin/env bash
# `make run`: start eastwest on this host until Ctrl-C.
# Today: the collector with its socket probes, records as JSON lines on stdout. When the
# aggregator lands (issue #5) this starts it too and points the collector at it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "eastwest: starting the collector on this host (Ctrl-C stops it)" >&2
.venv/bin/eastwest collector --check || true
exec .venv/bin/eastwest collector --stdout --verbose
