# Two commands do all the set-up on a fresh clone:
#   make run    install, then SRDS on the embedded digits model (offline)
#   make test   install with test extras, then the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 CPU lies on this workplace's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install install-dev run test cpp export bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev,tensorrt-rtx]"

run: install
	$(BIN)/python -m srds_trt.generate --out out/digits --overwrite

# libsrds_trt (cpp/): the C ABI runtime, its gtest/C tests through ctest, then the Python suite (which drives the
# library through ctypes against the Python reference; SRDS_TRT_REQUIRE_CPP makes a missing build a failure).
CPP_BUILD ?= build/cpp
CPP_APT := libgtest-dev nlohmann-json3-dev libssl-dev
cpp: install-dev
	@dpkg -s $(CPP_APT) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(CPP_APT); }
	$(BIN)/cmake -S cpp -B $(CPP_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	$(BIN)/cmake --build $(CPP_BUILD)

test: cpp
	$(BIN)/ctest --test-dir $(CPP_BUILD) --output-on-failure
	SRDS_TRT_REQUIRE_CPP=1 $(BIN)/python -m pytest -q

export: install-dev
	POLYGRAPHY_USE_TENSORRT_RTX=1 $(BIN)/python -m srds_trt.export --model digits

bench: install-dev
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf out .pytest_cache build
