"""Fixed-shape tick work over static buffers: a call program and a formation program (graph-capturable).

A program owns stacked tables (tables.py: one entry per tick it runs at, plus a neutral entry) and a one-element
int64 counter on the device. Each run reads entry `counter` of its tables and then advances the counter, on
the device: a CUDA graph of the program replays tick after tick with no host-to-device copy in between. The
runner resets all counters with one fill per run (and points them at the neutral entry for warm-up/capture).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ...samplers.ddim import ddim_update, parareal_update
from ..cuda_graphs import CapturedGraph
from ..engine_call import guided_call
from ..engines.base import Engine
from .tables import CallTable, FormationTable


def _entry(table: Tensor, counter: Tensor) -> Tensor:
    """Row `counter` of a stacked [ticks + 1, cap] table, read on the device (no host sync)."""
    return table.index_select(0, counter).squeeze(0)


def form_boundaries(pool: Tensor, table: FormationTable, counter: Tensor) -> None:
    """pool[out] = parareal_update(pool[a], pool[b], pool[c]) for the current entry (copies use b = c = ZERO)."""
    out, a, b, c = (_entry(t, counter) for t in (table.out, table.a, table.b, table.c))
    pool.index_copy_(0, out, parareal_update(pool.index_select(0, a), pool.index_select(0, b), pool.index_select(0, c)))


@dataclass
class FormationProgram:
    """The boundaries that became ready at a tick (coarse != "merged": runs after the tick's calls)."""

    pool: Tensor
    formation: FormationTable
    counter: Tensor  # int64 [1], a view into the runner's counters
    lane: int = 0
    kind: str = "form"
    captured: CapturedGraph | None = field(default=None, repr=False)

    @property
    def neutral(self) -> int:
        return self.formation.out.shape[0] - 1

    def fn(self) -> None:
        form_boundaries(self.pool, self.formation, self.counter)
        self.counter.add_(1)

    def run(self) -> None:
        (self.captured or CapturedGraph(self.fn)).run()


@dataclass
class CallProgram:
    """One engine call of `cap` state rows: gather -> guided engine call -> DDIM update -> scatter [-> formations].

    kind "all" carries the tick's formations (coarse = "merged"); "fine" and "coarse" leave them to the
    FormationProgram. bucket: the engine bucket it fills (cap, or 2 x cap under guidance).
    """

    kind: str
    lane: int
    bucket: int
    engine: Engine
    pool: Tensor
    call: CallTable
    formation: FormationTable | None
    counter: Tensor
    scale: Tensor | None  # guidance scale (a device scalar), None without guidance
    captured: CapturedGraph | None = field(default=None, repr=False)

    @property
    def cap(self) -> int:
        return self.call.cap

    @property
    def neutral(self) -> int:
        return self.call.src.shape[0] - 1

    def fn(self) -> None:
        call, k = self.call, self.counter
        x = self.pool.index_select(0, _entry(call.src, k))
        out = guided_call(self.engine, self.bucket, self.lane, x, _entry(call.t, k), self.scale)
        self.pool.index_copy_(0, _entry(call.dst, k), ddim_update(x, out, _entry(call.c_x, k), _entry(call.c_out, k)))
        if self.formation is not None:
            form_boundaries(self.pool, self.formation, k)
        k.add_(1)

    def run(self) -> None:
        (self.captured or CapturedGraph(self.fn)).run()
