# Two commands for a new user: `make demo` and `make test`.
# Both create .venv, install the pinned CPU torch (override: make test TORCH=2.14.1)
# and belm with its extras.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.belm-installed-$(TORCH)

.PHONY: setup demo test bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that no later requirement can pull a different (CUDA) build.
	$(BIN)/pip install --quiet "torch==$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]" "torch==$(TORCH)"
	touch $@

# belm runs torch on 1 CPU thread unless told otherwise (BELM_THREADS=0 make demo: one per core).
demo: $(STAMP)
	$(BIN)/belm demo --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) outputs build *.egg-info
