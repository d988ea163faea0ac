"""`python -m srds_trt.export` on bad input: one line on stderr, exit code 2, nothing left on disk."""
from __future__ import annotations

import sys

import pytest

from srds_trt.cli import export as cli
from srds_trt.export import model_source as registry
from export_support import digits_like


class UnknownModel(LookupError):
    pass


@pytest.fixture
def stub_registry(monkeypatch):
    """A registry holding only a tiny digits-shaped UNet; records whether weights were loaded."""
    loads = []

    def check_model(name):
        if name != "digits":
            raise UnknownModel(f"unknown model {name!r}; known: digits")
        return name

    def load_model(config):
        loads.append(config.model)
        return digits_like()

    monkeypatch.setattr(registry, "check_model", check_model)
    monkeypatch.setattr(registry, "load_model", load_model)
    monkeypatch.setattr(registry, "registry_errors", lambda: (UnknownModel,))
    return loads


def run_cli(capsys, *args):
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def assert_one_line_error(code, lines, *needles):
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_unknown_model(stub_registry, tmp_path, capsys):
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, "--model", "nope", "--out", str(out), "--quiet")
    assert_one_line_error(code, lines, "nope")
    assert not out.exists() and stub_registry == []


def test_max_below_min_rejected_before_loading(stub_registry, tmp_path, capsys):
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, "--model", "digits", "--out", str(out), "--min-batch", "8", "--max-batch", "4")
    assert_one_line_error(code, lines, "--max-batch", "--min-batch")
    assert not out.exists() and stub_registry == []


def test_no_tensorrt_names_the_pip_extras(stub_registry, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes `import` raise ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, "--model", "digits", "--out", str(out))
    assert_one_line_error(code, lines, "srds_trt[tensorrt]", "srds_trt[tensorrt-rtx]")
    assert not out.exists() and stub_registry == []


def test_unwritable_out_dir(stub_registry, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a path under a file fails even for root, unlike chmod
    code, lines = run_cli(capsys, "--model", "digits", "--out", str(blocker / "engines"))
    assert_one_line_error(code, lines, "not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and stub_registry == []


def test_parity_failure_builds_nothing(stub_registry, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    from srds_trt.export import build as pipeline
    def no_build(*args, **kwargs):
        raise AssertionError("built a plan after a failed parity gate")

    monkeypatch.setattr(pipeline, "build_tensorrt_plan", no_build)
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, "--model", "digits", "--out", str(out), "--dtype", "fp32", "--max-batch", "4",
                          "--parity-tol", "1e-12", "--quiet")
    assert_one_line_error(code, lines, "parity", "nothing built")
    assert not out.exists() and stub_registry == ["digits"]


@pytest.mark.parametrize("args, needle", [
    (["--opt-batch", "1024"], "--opt-batch"),  # above the digits default --max-batch 512
    (["--height", "64"], "--height"),
    (["--profiles", "0"], "--profiles"),
    (["--height", "60", "--width", "60"], "multiple of 8"),
])
def test_other_bad_options(stub_registry, tmp_path, capsys, args, needle):
    code, lines = run_cli(capsys, "--model", "digits", "--out", str(tmp_path / "e"), *args)
    assert_one_line_error(code, lines, needle)
    assert not (tmp_path / "e").exists()
