"""Fixtures of the C ABI tests: the built library (make test builds it: cmake -S cpp -B build/cpp) and a digits
export with the AOTInductor package (its compile is cached under ~/.cache/srds_trt/aoti, see export/aoti.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("SRDS_TRT_CPP_BUILD", ROOT / "build" / "cpp"))
REQUIRE_ENV = "SRDS_TRT_REQUIRE_CPP"  # set by `make test`: a missing build is a failure there, not a skip


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    if not (BUILD / "libsrds_trt.so").exists():
        message = f"libsrds_trt not built in {BUILD}: cmake -S cpp -B build/cpp -G Ninja && cmake --build build/cpp"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return BUILD


@pytest.fixture(scope="session")
def aoti_export(tmp_path_factory) -> Path:
    """A real `python -m srds_trt.export --model digits --dtype fp32 --aoti` folder (fp32: the equality tests)."""
    pytest.importorskip("tensorrt_rtx")
    from srds_trt.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("engines")
    result = export_model(ExportConfig(model="digits", out=out, dtype="fp32", min_batch=1, max_batch=32, aoti=True),
                          quiet=True)
    return result.folder


@pytest.fixture(scope="session")
def runtime(cpp_build, aoti_export):
    from srds_trt.runtime.cabi import Runtime, load_library

    with Runtime(aoti_export, load_library(cpp_build / "libsrds_trt.so")) as rt:
        yield rt
