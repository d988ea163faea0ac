"""A staged log with times: `[export 2/5] onnx ... 1.3 s`. One line per stage, to stderr, silenced by quiet=True."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, TextIO


@dataclass
class StageLog:
    total: int
    quiet: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    times: dict[str, float] = field(default_factory=dict)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"[export] {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[list[str]]:
        """Time a stage; details appended to the yielded list are printed on its line."""
        index = len(self.times) + 1
        self.note(f"{index}/{self.total} {name} ...")
        start = time.perf_counter()
        self.times[name] = float("nan")  # claims the index even if the stage fails
        details: list[str] = []
        yield details
        self.times[name] = time.perf_counter() - start
        self.note(f"{index}/{self.total} {name} done in {self.times[name]:.1f} s{': ' + ', '.join(details) if details else ''}")
