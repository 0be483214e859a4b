# eastwest: every target installs what it needs first (idempotently), so a fresh clone needs
# only `make run` or `make test`. See README.md.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup system venv web run demo test test-unit test-golden test-lab test-heavy test-image image bench lint clean

help:
	@echo "make run    install what is missing, start eastwest on this host (Ctrl-C stops it)"
	@echo "make demo   the same plus a 3-host lab with a demo application and live traffic"
	@echo "make test   install what is missing, lint, and run the whole suite (unit, golden, lab)"
	@echo "make test-heavy  the few tests kept out of make test (a collector restarted over its spool, the image's second build)"
	@echo "make bench  side-by-side benchmarks; results in docs/benchmarks.md"
	@echo "make lint   ruff and mypy"
	@echo "make image  the container image (collector + aggregator) with podman; docs/deploy.md"
	@echo "            (IMAGE_ARGS='--save eastwest.tar' also writes an archive; see --help)"

setup: system venv web

system:
	@bash scripts/setup-system.sh

venv:
	@bash scripts/setup-venv.sh

web:
	@bash scripts/setup-web.sh

run: setup
	@bash scripts/run.sh

demo: setup
	@bash scripts/demo.sh

test: setup lint
	@bash scripts/test.sh $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-golden: setup
	$(PY) -m pytest tests/golden $(PYTEST_ARGS)

test-lab: setup
	$(PY) -m pytest tests/lab $(PYTEST_ARGS)

# scripts/build-image.sh --help: the steps, the cache, loading the image into a cluster
image: setup
	@bash scripts/build-image.sh $(IMAGE_ARGS)

test-heavy: setup
	$(PY) -m pytest tests -m heavy $(PYTEST_ARGS)

test-image: setup
	$(PY) -m pytest tests/image $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

lint: venv
	$(VENV)/bin/ruff check eastwest collector aggregator tests bench
	$(VENV)/bin/mypy eastwest collector aggregator

clean:
	-$(PY) -m eastwest lab down --all 2>/dev/null || true
	rm -rf .pytest_cache build *.egg-info
