"""python -m srds_trt.generate: outputs, the summary table, bad input (exit 2, one line) and reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from srds_trt.cli.generate import main, summary_table



def run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.slow
def test_writes_images_grid_and_stats(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = run(["--steps", "9", "--prompt", "3", "7", "--num-images", "2", "--out", str(out)], capsys)
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000.png", "001.png", "002.png", "003.png", "grid.png", "stats.json"]
    assert Image.open(out / "000.png").size == (16, 16)
    stats = json.loads((out / "stats.json").read_text())
    for key in ("model", "sampler", "steps", "blocks", "iterations", "model_evals", "sequential_calls", "wall_time_s",
                "max_abs_diff_vs_serial", "residuals", "seed", "device", "torch"):
        assert key in stats, key
    assert stats["prompts"] == ["3", "3", "7", "7"] and stats["serial"]["sequential_calls"] == 9
    # The table: serial vs SRDS with every column the issue names.
    for word in ("serial", "SRDS", "iterations", "blocks", "model evals", "sequential calls", "setup s", "wall time", "max |diff|"):
        assert word in stdout, word


def test_quiet_serial_sampler(tmp_path, capsys):
    rc, stdout, _ = run(["--steps", "5", "--prompt", "1", "--sampler", "serial", "--quiet", "--out", str(tmp_path)], capsys)
    assert rc == 0 and stdout == ""
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["sampler"], stats["sequential_calls"], stats["blocks"]) == ("serial", 5, 1)
    assert "serial" in summary_table(stats)


def test_same_seed_same_images(tmp_path, capsys):
    for name, seed in (("a", "4"), ("b", "4"), ("c", "5")):
        assert run(["--steps", "6", "--prompt", "8", "--seed", seed, "--quiet", "--out", str(tmp_path / name)], capsys)[0] == 0
    pixels = {name: np.asarray(Image.open(tmp_path / name / "000.png")) for name in "abc"}
    assert np.array_equal(pixels["a"], pixels["b"]) and not np.array_equal(pixels["a"], pixels["c"])


@pytest.mark.parametrize("argv, words", [
    (["--model", "nope"], ["unknown model", "digits", "sd2", "sd2.1", "sd1.5"]),
    (["--prompt", "x"], ["digits 0..9"]),
    (["--prompt", "3", "11"], ["digits 0..9"]),
    (["--steps", "0"], ["steps"]),
    (["--tol", "-0.1"], ["tol"]),
    (["--steps", "4", "--blocks", "5"], ["blocks"]),
    (["--num-images", "0"], ["num-images"]),
    (["--steps", "many"], ["--steps"]),
    (["--sampler", "euler"], ["--sampler"]),
    (["--steps", "8", "--sampler", "eps-picard", "--window", "9"], ["--window", "[1, --steps=8]"]),
    (["--sampler", "paradigms", "--window", "0"], ["--window"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    rc, stdout, stderr = run([*argv, "--out", str(out)], capsys)
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("srds_trt.generate: error:")
    assert all(word in stderr for word in words), stderr
    assert not out.exists()


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, stderr = run(["--out", str(blocker / "sub")], capsys)
    assert rc == 2 and stderr.count("\n") == 1 and "not writable" in stderr
    assert not (blocker / "sub").exists()


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    """The real command line, as a user types it (a subprocess: import time included)."""
    bad = subprocess.run([sys.executable, "-m", "srds_trt.generate", "--model", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    good = subprocess.run([sys.executable, "-m", "srds_trt.generate", "--steps", "4", "--prompt", "0", "--quiet",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "000.png").is_file()


@pytest.mark.parametrize("sampler", ["eps-picard", "paradigms"])
def test_window_flag_reaches_the_sliding_window_sampler(tmp_path, capsys, sampler):
    rc, _, _ = run(["--steps", "12", "--prompt", "5", "--sampler", sampler, "--window", "5", "--quiet", "--out",
                    str(tmp_path)], capsys)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert rc == 0 and stats["sampler"] == sampler and stats["window"] == 5  # neither default (6, 3)
    assert stats["sequential_calls"] >= -(-12 // 5)  # a window of 5 slides at most 5 points per sweep
    assert " w=5 " in summary_table(stats)


@pytest.mark.parametrize("sampler", ["srds", "eps-picard", "paradigms"])
def test_flow_digits_end_to_end(tmp_path, capsys, sampler):
    """--model digits-flow: the flow Euler grid reaches every sampler through the CLI; tol = 0 is the serial sample."""
    rc, _, stderr = run(["--model", "digits-flow", "--steps", "12", "--prompt", "3", "--sampler", sampler, "--tol", "0",
                         "--compare-serial", "--quiet", "--out", str(tmp_path)], capsys)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert rc == 0, stderr
    assert stats["model"] == "digits-flow" and stats["sampler"] == sampler and stats["converged"]
    assert stats["max_abs_diff_vs_serial"] <= 1e-5
