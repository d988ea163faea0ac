"""The README's commands run as written, at small sizes.

Convention for README.md (what a writer must keep true):
- Every ```bash block is a script a user can paste. The test runs each block, in README order, as ONE
  `bash -euo pipefail` script in a temporary folder shared by all blocks (an export block may feed a generate line
  after it), with `python` this test's interpreter and the repository on PYTHONPATH. A block may start a server
  with a trailing `&` and must stop it (`kill $!`); the test also kills what is left when the block ends.
- Sizes are scaled down by SCALE (below) before running: `--steps 100` runs as `--steps 8`, and so on. Write the
  command a user should run; add a row to SCALE when a new flag needs shrinking.
- Lines whose command is in SKIP (make, torchrun, pip) are not run; each has its reason there. Every other line
  must exit 0 within TIMEOUT_S (the whole block fails otherwise).
- Every ```python block runs as a script (`python -c`) in the same folder, after the same scaling.
- Port 8000 is replaced by a free port.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 300  # per block; the export block takes ~15 s and the server ~20 s to warm up on 2 idle cores

# (pattern, replacement) applied to every line before it runs: small sizes, same code paths.
SCALE = [
    (r"--steps \d+", "--steps 8"),
    (r"--default-steps \d+", "--default-steps 4"),
    (r"--num-images \d+", "--num-images 1"),
    (r"num_inference_steps=\d+", "num_inference_steps=8"),
]

# commands the test does not run, with the reason (checked elsewhere or outside a test's reach)
SKIP = {
    "make": "creates a fresh .venv and installs into it; CI runs `make test` itself",
    "torchrun": "several processes: tests/test_distributed.py runs `torchrun ... -m srds_trt.generate`; the cuda line needs GPUs",
    "pip": "installs packages",
}


def blocks(text: str) -> list[tuple[str, str]]:
    """The README's fenced blocks as (language, body), in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M)]


def logical_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined."""
    return body.replace("\\\n", " ").splitlines()


def skip_reason(line: str) -> str | None:
    words = line.split()
    return SKIP.get(words[0]) if words else None


def scale(text: str, port: int) -> str:
    for pattern, repl in SCALE:
        text = re.sub(pattern, repl, text)
    return re.sub(r"\b8000\b", str(port), text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runnable_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in blocks(README.read_text()) if lang in ("bash", "python")]


def test_readme_is_short_and_its_commands_are_classified():
    """The README stays a user's page (<= 250 lines), and every shell line is either run here or skipped with a
    reason in SKIP: a new command cannot slip past the slow test unnoticed."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    found = runnable_blocks()
    assert any(lang == "python" for lang, _ in found)
    commands = [line.strip() for lang, body in found if lang == "bash" for line in logical_lines(body)]
    commands = [c for c in commands if c and not c.startswith("#")]
    first_words = {c.split()[0] for c in commands}
    assert first_words <= {"python", "curl", "until", "kill", *SKIP}, first_words
    for needed in ("python -m srds_trt.generate", "python -m srds_trt.export", "python -m srds_trt.serve", "torchrun", "make run", "make test"):
        assert any(c.startswith(needed) for c in commands), needed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(runnable_blocks())), ids=lambda i: f"block{i}")
def test_readme_block_runs(index, workdir):
    """Block `index` of the README runs as written (scaled by SCALE) and exits 0."""
    lang, body = runnable_blocks()[index]
    port = free_port()
    if lang == "python":
        cmd = [sys.executable, "-c", scale(body, port)]
    else:
        lines, skipped = [], []
        for line in logical_lines(body):
            reason = skip_reason(line.strip())
            if reason:
                skipped.append(f"{line.split()[0]}: {reason}")
            else:
                lines.append(line)
        if not any(line.strip() and not line.strip().startswith("#") for line in lines):
            pytest.skip("; ".join(dict.fromkeys(skipped)))
        if any(line.split()[:1] == ["curl"] for line in lines) and shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + scale("\n".join(lines), port)
        cmd = ["bash", "-euo", "pipefail", "-c", script]
    # own process group: a timeout also ends a server the block started
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"README block {index} did not finish within {TIMEOUT_S} s:\n{body}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"README block {index} exited {proc.returncode}:\n{body}\n{out[-2000:]}\n{err[-3000:]}"
