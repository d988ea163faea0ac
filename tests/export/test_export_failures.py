"""Export failures: every failure through the CLI's entry point is one `error:` line, the documented exit
code, and nothing left behind (no artifact folder, no `.tmp-*`, no created parents)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from srds_trt.cli import export as cli
from srds_trt.export import build as pipeline
from srds_trt.export.parity import ParityReport
from srds_trt.export.trt_build import BuildResult
from test_export_cli import assert_one_line_error, run_cli, stub_registry  # noqa: F401  (fixture)

FAST = ("--model", "digits", "--dtype", "fp32", "--max-batch", "2", "--quiet")


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


@pytest.fixture
def no_plan_build(monkeypatch):
    """Stand-ins for the ONNX export, parity gate and TensorRT build (each covered by test_export_onnx/_plan):
    these tests are about what happens around them, and must stay fast."""
    def fake_onnx(module, contract, example, folder, **kwargs):
        path = folder / "unet.onnx"
        path.write_bytes(b"onnx")
        return [path]

    monkeypatch.setattr(pipeline, "export_onnx", fake_onnx)
    monkeypatch.setattr(pipeline, "check_parity", lambda *a, **k: ParityReport((1, 2), 0.0, 0.0, 1e-3))
    monkeypatch.setattr(pipeline, "build_tensorrt_plan", lambda *a, **k: BuildResult(b"plan", 0.0, None))


def test_opset_too_new_refused_before_loading(stub_registry, tmp_path, capsys):
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, *FAST, "--out", str(out), "--opset", "99")
    assert_one_line_error(code, lines, "--opset 99")
    assert not out.exists() and stub_registry == []


@pytest.mark.parametrize("stage, exc, needles", [
    ("export_onnx", RuntimeError("Exporting the operator 'aten::x'\nto ONNX opset version 17 is not supported"),
     ["ONNX export failed", "--opset 17", "aten::x"]),
    ("check_parity", type("Fail", (Exception,), {})("[ONNXRuntimeError] : 1 : FAIL : Load model\nfailed"),
     ["ONNX Runtime could not run", "Fail"]),
    ("write_manifest", OSError(errno.ENOSPC, "No space left on device", "manifest.json"),
     ["No space left on device", "nothing was kept"]),
])
def test_stage_failures_are_one_line(stub_registry, no_plan_build, tmp_path, capsys, monkeypatch, stage, exc, needles):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(pipeline, stage, fail)
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, *FAST, "--out", str(out))
    assert_one_line_error(code, lines, *needles)
    assert leftovers(out) == [] and not out.exists()


def test_rename_collision_is_one_line(stub_registry, no_plan_build, tmp_path, capsys, monkeypatch):
    def collide(src, dst):
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))

    monkeypatch.setattr(pipeline.os, "replace", collide)
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, *FAST, "--out", str(out))
    assert_one_line_error(code, lines, "Directory not empty", "nothing was kept")
    assert not out.exists()


def test_ctrl_c_exits_130_with_one_line_and_nothing_written(stub_registry, no_plan_build, tmp_path, capsys,
                                                            monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "check_parity", interrupted)  # mid-export: the ONNX is already in the temp folder
    out = tmp_path / "engines"
    code, lines = run_cli(capsys, *FAST, "--out", str(out))
    assert code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted")
    assert not out.exists()


def test_export_still_succeeds_end_to_end(stub_registry, no_plan_build, tmp_path, capsys):
    """The guards above must not break the good path: exit 0, the folder printed, no temp folder left."""
    out = tmp_path / "engines"
    code = cli.main([*FAST, "--out", str(out)])
    folder = Path(capsys.readouterr().out.strip())
    assert code == 0 and folder.parent == out / "digits"
    assert [p.name for p in (out / "digits").iterdir()] == [folder.name]
    assert ".lock" not in os.listdir(folder)


HOLDER = """
import sys, tempfile, time
from pathlib import Path
from srds_trt.export.build import _hold_lock
tmp = Path(tempfile.mkdtemp(dir=sys.argv[1], prefix=".tmp-0123456789abcdef-"))
_hold_lock(tmp)
print(tmp, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_sigkilled_export_is_cleaned_but_a_live_one_survives(stub_registry, no_plan_build, tmp_path, capsys):
    """A process holding a temp folder's lock (a running export) keeps it; once SIGKILLed, the next export's
    cleanup removes it. The lock is the kernel's (flock), released at death, so PID reuse cannot fool it."""
    model_dir = tmp_path / "engines" / "digits"
    model_dir.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        held = Path(live.stdout.readline().strip())
        old_unlocked = Path(tempfile.mkdtemp(dir=model_dir, prefix=".tmp-fedcba9876543210-"))
        os.utime(old_unlocked, (time.time() - 3600,) * 2)  # an older version's leftover: no lock file, old
        fresh_unlocked = Path(tempfile.mkdtemp(dir=model_dir, prefix=".tmp-aaaaaaaaaaaaaaaa-"))  # being created
        assert pipeline.remove_stale_temporaries(model_dir) == [old_unlocked.name]
        assert held.is_dir() and fresh_unlocked.is_dir()
        live.kill()
        live.wait()
        # The next export cleans up before building.
        assert cli.main([*FAST, "--out", str(tmp_path / "engines")]) == 0
        assert not held.exists() and fresh_unlocked.is_dir()
    finally:
        live.kill()
        live.wait()


def test_help_shows_defaults_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    flat = " ".join(text.split())  # argparse wraps help lines
    assert "512 for digits" in flat and "fp32 for digits" in flat and "(default: engines)" in flat
    assert "examples:" in text and "--max-batch 16" in text and "130" in text
