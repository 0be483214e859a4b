#!/usr/bin/env bash
# `make test`'s suite: the whole of tests/, in two pytest processes side by side on this machine.
#   tests/unit (CPU-bound: hypothesis, DuckDB, the C helpers; no network namespaces of the lab)
#     runs in the background, its output in test-artifacts/unit-tests.log;
#   everything else (docs examples, golden, the image, lab, web: mostly waiting on namespaces,
#     servers, a browser and the kernel) runs in the foreground, its progress on the terminal.
# Serially the two take ~24 minutes on a 2-core machine at under one busy core on average; side by
# side they share the two cores. Both must pass; the unit tests' summary (all of it when they
# failed) is printed at the end. EASTWEST_TEST_SERIAL=1 runs one process over tests/ instead.
# tests/unit runs at nice 19: the lab's collectors, servers and traffic keep their CPU when they
# need it (test_dns_identity_lab missed a late DNS answer beside a CPU-bound neighbour at normal
# priority, 3 runs of 3; at nice 19, none). Arguments are passed to both pytest processes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ "${EASTWEST_TEST_SERIAL:-0}" = 1 ]; then
  exec "$PY" -m pytest tests "$@"
fi
mkdir -p test-artifacts
LOG=test-artifacts/unit-tests.log
echo "eastwest test: tests/unit runs alongside (log: $LOG); the rest of the suite follows here"
nice -n 19 "$PY" -m pytest tests/unit -p no:cacheprovider "$@" > "$LOG" 2>&1 &
UNIT=$!
trap 'kill "$UNIT" 2>/dev/null' INT TERM
"$PY" -m pytest tests --ignore=tests/unit "$@"
REST=$?
if kill -0 "$UNIT" 2>/dev/null; then
  echo "eastwest test: waiting for tests/unit (log: $LOG)"
fi
wait "$UNIT"
UNIT_RC=$?
echo
if [ "$UNIT_RC" = 0 ]; then
  echo "eastwest test: tests/unit:"
  grep -E "^(FAILED|ERROR)|^=+ .*(passed|failed|error).* =+$|slowest|^[0-9.]+s (call|setup|teardown)" "$LOG" | tail -45
else
  echo "eastwest test: tests/unit FAILED (exit $UNIT_RC); its output:"
  cat "$LOG"
fi
if [ "$REST" != 0 ] || [ "$UNIT_RC" != 0 ]; then
  echo "eastwest test: FAILED (tests/unit exit $UNIT_RC, the rest exit $REST)"
  exit 1
fi
echo "eastwest test: passed (tests/unit and the rest)"
