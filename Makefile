# Two commands on a fresh machine: `make run` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

## Ingest the embedded SmolLM2-135M on the embedded corpus into ./stores and print the summary.
run: setup
	$(VENV)/bin/selfrepair ingest --store stores

## The whole test suite.
test: setup
	$(PY) -m pytest

## Benchmarks (speed and memory ratios, measured in one run).
bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf stores out
