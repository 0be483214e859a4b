#!/usr/bin/env bash
# `make demo`: a 3-host lab in network namespaces with the demo application, one collector per
# lab host (scoped with --netns) and an aggregator; live cross-host traffic within a minute.
# Ctrl-C tears everything down (collectors flush, aggregator stops, lab removed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/eastwest demo --data ./data "$@"
