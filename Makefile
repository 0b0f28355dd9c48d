# Every target installs what it needs first, so each one works from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One torch thread per process and passive OpenMP waits: the services share two cores.
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export RAY_worker_niceness ?= 0

.PHONY: install test test-python test-rust proto proto-check demo serve bench clean

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

test-rust:
	cargo test --manifest-path crates/sampler/Cargo.toml --no-default-features -q

demo: $(STAMP)
	$(BIN)/loftey demo

serve: $(STAMP)
	$(BIN)/loftey serve

bench: $(STAMP)
	$(BIN)/loftey bench --help

clean:
	rm -rf $(VENV) target build dist
