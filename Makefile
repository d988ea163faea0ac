# Two commands do all the set-up on a fresh clone:
#   make run    install, then SRDS on the embedded digits model (offline)
#   make test   install with test extras, then the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 CPU lies on this workplace's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install install-dev run test export bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev,tensorrt-rtx]"

run: install
	$(BIN)/python -m srds_trt.generate --out out/digits --overwrite

test: install-dev
	$(BIN)/python -m pytest -q

export: install-dev
	POLYGRAPHY_USE_TENSORRT_RTX=1 $(BIN)/python -m srds_trt.export --model digits

bench: install-dev
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf out .pytest_cache
