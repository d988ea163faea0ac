"""The examples `--help` prints (generate, export) run as written, at small sizes, in one temporary folder.

Convention: every `python -m` line of a command's EXAMPLES runs unless SKIP names why not; sizes shrink as in
tests/test_readme_commands.py (`--steps N` -> 4, `--num-images N` -> 1; a generate line without --steps gets
`--steps 4`). Export examples run first, so `generate --backend onnxruntime --engine-dir engines` finds their export.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from srds_trt.cli import export as export_cli
from srds_trt.cli import generate as generate_cli

ROOT = Path(__file__).resolve().parents[2]
SKIP = {
    "--device cuda": "needs a CUDA GPU",
    "--model sd2": "the 866 M-parameter SD2 architecture: minutes and GBs on a CPU (the tiny SD path is tested)",
    "./my-unet-folder": "a placeholder for the user's own folder",
}
SCALE = [(r"--steps \d+", "--steps 4"), (r"--num-images \d+", "--num-images 1")]


def example_lines(text: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip().startswith("python -m")]


def test_every_example_is_run_or_skipped_with_a_reason():
    lines = example_lines(export_cli.EXAMPLES) + example_lines(generate_cli.EXAMPLES)
    assert len(lines) >= 7
    ran = [line for line in lines if not any(key in line for key in SKIP)]
    assert any("--backend onnxruntime" in line for line in ran) and any("export --model digits" in line for line in ran)


@pytest.mark.slow
def test_help_examples_run_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for line in example_lines(export_cli.EXAMPLES) + example_lines(generate_cli.EXAMPLES):
        if any(key in line for key in SKIP):
            continue
        for pattern, repl in SCALE:
            line = re.sub(pattern, repl, line)
        if "srds_trt.generate" in line and "--steps" not in line and "--list-models" not in line:
            line += " --steps 4"
        argv = shlex.split(line)
        argv[0] = sys.executable
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-2000:])
