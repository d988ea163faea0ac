"""What the commands share: one-line usage errors, help that shows each set default once, and the early signal
handler that makes Ctrl-C / SIGTERM one line while nothing needs cleaning up yet."""

from __future__ import annotations

import argparse
import os

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT / SIGTERM, as shells report them


class UsageError(Exception):
    """A refusal the command prints as its one `error:` line (exit 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every set default once and keeps the examples' line breaks; a flag whose default is unset
    (None, or False for a switch) says in its own text what unset means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def exit_on_signals(prog: str, outcome: str) -> None:
    """Until a command has something to clean up (imports, argument checks, model loading): SIGINT / SIGTERM print
    one line, `<prog>: error: interrupted; <outcome>`, and exit at once (130 / 143) wherever the interpreter is (a
    KeyboardInterrupt inside torch's import would leave a half-imported module and a traceback instead)."""
    import signal

    def now(signum, frame):
        interrupted = signum == signal.SIGINT
        what = "interrupted" if interrupted else "terminated (SIGTERM)"
        os.write(2, f"{prog}: error: {what}; {outcome}\n".encode())
        os._exit(EXIT_INTERRUPTED if interrupted else EXIT_TERMINATED)

    signal.signal(signal.SIGINT, now)
    signal.signal(signal.SIGTERM, now)


def check_resolution(spec, resolution: int | None) -> None:
    """--resolution: latent models only (SD, SD3, Flux), a positive multiple of 8 (the VAE's downsampling)."""
    if resolution is None:
        return
    if spec.family == "digits":
        raise UsageError("--resolution applies to SD, SD3 and Flux models; the digits models are 16x16 pixels")
    if resolution < 8 or resolution % 8:
        raise UsageError(f"--resolution must be a positive multiple of 8, got {resolution}")
