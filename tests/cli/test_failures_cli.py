"""Every failure of `python -m srds_trt.generate` is one line, a documented exit code, and nothing written.

Refusals that need no model run in-process through generate.main (the real argument parser and checks, no
import cost per case); numerical failures and interrupts inject a broken model into the real pipeline; a few cases
run the real command in a subprocess (import, signals, exit status as a shell sees them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch

from srds_trt.cli import generate
from srds_trt.cli.generate import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_TERMINATED, EXIT_USAGE, main


def run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srds_trt.generate: error:"), err
    assert all(w in lines[0] for w in words), (words, err)


def leftovers(folder):
    """Anything a run left beside --out (temporary folders included)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("argv, words", [
    (["--guidance-scale", "nan"], ["--guidance-scale"]),
    (["--guidance-scale", "inf"], ["--guidance-scale"]),
    (["--guidance-scale", "1e30"], ["--guidance-scale"]),
    (["--guidance-scale", "-5"], ["--guidance-scale"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--device", "tpu9"], ["--device", "tpu9"]),
    (["--resolution", "32"], ["--resolution", "digits"]),
    (["--steps", "8193"], ["--steps"]),
    (["--steps", "0"], ["--steps"]),
    (["--tol", "nan"], ["--tol"]),
    (["--blocks", "0"], ["--blocks"]),
    (["--num-images", "-3"], ["--num-images"]),
    (["--sampler", "euler"], ["--sampler"]),
    (["--prompt", "3", "--prompt", "x"], ["--prompt"]),  # a repeated --prompt is read whole, not dropped
    (["--backend", "tensorrt", "--device", "cpu"], ["--backend tensorrt", "CUDA"]),
    (["--dist-timeout", "-5"], ["--dist-timeout"]),
    (["--dist-timeout", "inf"], ["--dist-timeout"]),
    (["--window", "0", "--sampler", "eps-picard"], ["--window"]),
])
def test_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, words):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("srds_trt.pipeline.SRDSPipeline.from_pretrained", no_load)
    out = tmp_path / "out"
    rc, stdout, err = run([*argv, "--out", str(out)], capsys)
    assert rc == EXIT_USAGE and stdout == ""
    assert_one_error_line(err, *words)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("srds_trt.pipeline.SRDSPipeline.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    rc, _, err = run(["--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "--device cuda", "--device cpu")


def test_non_empty_out_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_text("stale")
    rc, _, err = run(["--out", str(out), "--steps", "2"], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "--out", "--overwrite")
    assert leftovers(out) == ["old.png"] and leftovers(tmp_path) == ["out"]


def test_help_shows_defaults_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "(unset: 100; SD3 and Flux: 28" in " ".join(text.split()) and "(default: srds)" in text and "(default: True)" in text  # --pipelined on
    assert "examples:" in text and "exit codes:" in text and "130" in text


class _Broken:
    """A cond_model wrapper: NaN from a given call on, or a wrong batch size."""

    def __init__(self, model, mode: str, after: int = 3):
        self.model, self.mode, self.after, self.calls = model, mode, after, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        out = self.model(x, t, cond)
        if self.mode == "nan" and self.calls > self.after:
            return out * float("nan")
        if self.mode == "batch":
            return out[:1]
        return out


@pytest.fixture(scope="module")
def digits():
    from srds_trt import SRDSPipeline

    return SRDSPipeline.from_pretrained("digits")


def broken_pipeline(monkeypatch, digits, mode):
    monkeypatch.setattr(digits, "cond_model", _Broken(digits.cond_model, mode))
    monkeypatch.setattr("srds_trt.pipeline.SRDSPipeline.from_pretrained", classmethod(lambda cls, *a, **k: digits))


@pytest.mark.parametrize("sampler", ["srds", "serial", "paradigms"])
def test_nan_model_exits_3_with_nothing_written(tmp_path, capsys, monkeypatch, digits, sampler):
    broken_pipeline(monkeypatch, digits, "nan")
    out = tmp_path / "out"
    rc, stdout, err = run(["--out", str(out), "--steps", "6", "--prompt", "3", "--sampler", sampler, "--quiet"], capsys)
    assert rc == EXIT_NONFINITE and stdout == ""
    assert_one_error_line(err, "NaN")
    assert leftovers(tmp_path) == []


def test_nan_under_compare_serial_is_caught_on_both_paths(tmp_path, capsys, monkeypatch, digits):
    broken_pipeline(monkeypatch, digits, "nan")
    rc, _, err = run(["--out", str(tmp_path / "o"), "--steps", "6", "--prompt", "3", "--compare-serial", "--quiet"],
                     capsys)
    assert rc == EXIT_NONFINITE and leftovers(tmp_path) == []


def test_wrong_batch_size_is_an_error_not_a_broadcast(tmp_path, capsys, monkeypatch, digits):
    broken_pipeline(monkeypatch, digits, "batch")
    rc, _, err = run(["--out", str(tmp_path / "o"), "--steps", "4", "--prompt", "3", "7", "--quiet"], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "shape")
    assert leftovers(tmp_path) == []


def test_ctrl_c_exits_130_with_one_line_and_nothing_written(tmp_path, capsys, monkeypatch, digits):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "cond_model", interrupted)
    monkeypatch.setattr("srds_trt.pipeline.SRDSPipeline.from_pretrained", classmethod(lambda cls, *a, **k: digits))
    rc, _, err = run(["--out", str(tmp_path / "o"), "--steps", "4", "--quiet"], capsys)
    assert rc == EXIT_INTERRUPTED
    assert_one_error_line(err, "interrupted")
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_no_half_folder(tmp_path, capsys, monkeypatch):
    """A write that fails mid-way (full disk) leaves neither --out nor the temporary folder behind."""
    from PIL import Image

    calls = {"n": 0}
    real_save = Image.Image.save

    def save(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    rc, _, err = run(["--out", str(tmp_path / "o"), "--steps", "2", "--prompt", "1", "2", "--quiet"], capsys)
    assert rc == generate.EXIT_RESOURCES
    assert_one_error_line(err, "No space left")
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_whole_folder_and_stats_are_strict_json(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "009.png").write_text("stale image of an earlier run")
    rc, _, _ = run(["--out", str(out), "--steps", "3", "--prompt", "4", "--num-images", "2", "--overwrite", "--quiet"],
                   capsys)
    assert rc == 0
    assert leftovers(out) == ["000.png", "001.png", "grid.png", "stats.json"]  # never a mix of two runs
    assert leftovers(tmp_path) == ["out"]  # no temporary or old folder left beside it

    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")

    stats = json.loads((out / "stats.json").read_text(), parse_constant=no_constants)
    assert stats["pipelined"] is True and stats["first_call"] is True and stats["files"][-1] == "grid.png"
    assert all(isinstance(stats[k], float) and math.isfinite(stats[k]) for k in ("wall_time_s", "setup_s"))


@pytest.mark.slow
def test_real_command_line_refusal_and_sigint(tmp_path):
    """As a shell sees it: a refusal (one line, exit 2, nothing written), and Ctrl-C at any moment, from the
    interpreter's first second (torch still importing) to the middle of sampling: one line, exit 130, nothing
    written. The last signal waits for the run's first progress output, so no delay depends on this machine's speed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "srds_trt.generate"]
    bad = subprocess.run([*command, "--quiet", "--seed", str(2**64), "--out", str(tmp_path / "a")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == EXIT_USAGE and len(bad.stderr.strip().splitlines()) == 1 and "--seed" in bad.stderr
    for i, delay in enumerate((0.3, 0.8, 1.5, None)):
        child = subprocess.Popen([*command, "--steps", "4096", "--sampler", "serial", "--out", str(tmp_path / f"b{i}")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if delay is None:  # mid-run: after the progress bar's first output (the run has begun sampling)
            child.stderr.read(1)
        else:
            time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
        err = err.decode()
        if delay is None:
            err = err.rsplit("\r", 1)[-1].lstrip()  # the progress bar's carriage-returned line, then ours
        assert child.returncode == EXIT_INTERRUPTED, (delay, err)
        assert_one_error_line(err, "interrupted")
        assert leftovers(tmp_path) == [], delay


@pytest.mark.slow
def test_sigterm_mid_run_is_one_line_and_nothing_written(tmp_path):
    """What a launcher (torchrun, after another rank died; a service manager) sends: one line, exit 143."""
    child = subprocess.Popen([sys.executable, "-m", "srds_trt.generate", "--steps", "4096", "--sampler", "serial",
                              "--out", str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.stderr.read(1)  # sampling has begun
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    err = err.decode().rsplit("\r", 1)[-1].lstrip()
    assert child.returncode == EXIT_TERMINATED, err
    assert_one_error_line(err, "terminated", "SIGTERM")
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_billion_images_stream_in_bounded_memory(tmp_path):
    """--num-images 10^9: images are sampled and written chunk by chunk (a line per chunk), so resident memory stays
    flat while chunks complete; Ctrl-C then leaves nothing behind. Judged by chunks done, not by seconds."""
    child = subprocess.Popen([sys.executable, "-m", "srds_trt.generate", "--steps", "4", "--prompt", "1",
                              "--num-images", "1000000000", "--sampler", "serial", "--out", str(tmp_path / "out")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             text=True)
    rss = []
    try:
        for line in child.stderr:
            if ": chunk " not in line:
                continue
            done = int(line.split(": chunk ")[1].split("/")[0])
            rss.append(_rss_mb(child.pid))
            if done >= 40:
                break
        assert len(rss) >= 40, "the run printed no chunk lines"
        # no trend: the second 20 chunks (5,120 more images written) hold no more than the first 20 did, give or take
        # the allocator's churn (~100 MB here); holding every image would add ~250 MB per second
        assert max(rss[20:]) < max(rss[:20]) + 100, rss
        assert max(rss) < 2000, rss
    finally:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    assert child.returncode == EXIT_INTERRUPTED, err
    assert leftovers(tmp_path) == []


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
