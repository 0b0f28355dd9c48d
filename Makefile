# Every target installs what it needs first, so each one works from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One torch thread per process and passive OpenMP waits: the services share two cores.
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export RAY_worker_niceness ?= 0

.PHONY: install test test-python test-rust test-compiled proto proto-check demo serve bench bench-quick clean

$(STAMP): pyproject.toml Cargo.toml crates/sampler/Cargo.toml $(wildcard crates/sampler/src/*.rs)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m loftey.protogen

# buf lint and buf breaking on proto/ (installs buf through npm on first use).
proto-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/interop/test_buf.py

test: test-rust test-python

test-python: $(STAMP)
	$(BIN)/python -m pytest -q

# Ray compiled-graph tests, in a process of their own: Ray 2.60 can crash a
# process that ran a compiled graph, so make test skips them.
test-compiled: $(STAMP)
	LOFTEY_TEST_RAY_COMPILED=1 $(BIN)/python -m pytest -q tests/forward -k compiled

test-rust:
	cargo test --manifest-path crates/sampler/Cargo.toml --no-default-features -q

demo: $(STAMP)
	$(BIN)/loftey demo

serve: $(STAMP)
	$(BIN)/loftey serve

# Regenerate benchmarks/RESULTS.md and benchmarks/plots/ (an estimate: about 30 minutes on 2 cores;
# bench-quick runs fewer points, requests and tokens).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) target build dist
