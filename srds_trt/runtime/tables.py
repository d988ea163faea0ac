"""Static state layout for a plan: every state SRDS ever holds gets its own slot in one pool tensor.

Slots are never reused within a run, so a late-read residual still finds its iterate, a speculative tick of the
next iteration cannot overwrite a result, and every index a tick needs is known before the first call: the tick
tables below are built once per (plan, batch) and copied to the device once.

Row r of a slot (image r of the batch) lives at pool row slot * batch + r.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule import Plan

ZERO, SINK, X_T = 0, 1, 2  # a slot of zeros (padding reads it), a write-only slot (padding writes it), x_T


@dataclass(frozen=True)
class SlotMap:
    U: dict[tuple[int, int], int]
    F: dict[tuple[int, int], int]
    G: dict[tuple[int, int], int]
    count: int

    def boundary(self, p: int, b: int) -> int:
        return X_T if b == 0 else self.U[(p, b)]


def slot_map(plan: Plan) -> SlotMap:
    blocks, iters = plan.num_blocks, plan.max_iters
    next_slot = X_T + 1
    U, F, G = {}, {}, {}
    for p in range(iters + 1):
        for b in range(max(p, 1), blocks + 1):
            U[(p, b)], next_slot = next_slot, next_slot + 1
        for b in range(p, blocks):
            G[(p, b)], next_slot = next_slot, next_slot + 1
            if p < iters:
                F[(p, b)], next_slot = next_slot, next_slot + 1
    return SlotMap(U=U, F=F, G=G, count=next_slot)


@dataclass(frozen=True)
class CallRows:
    """The rows of one model call, slot-level: input slot, output slot, solver step index (fine) or block (coarse)."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    steps_from: tuple[int, ...]  # grid index the row evaluates the model at
    steps_to: tuple[int, ...]  # grid index the row's DDIM step lands on


@dataclass(frozen=True)
class Formations:
    """U = a + (b - c) per entry; plain copies use (ZERO, ZERO) for (b, c) so they stay exact."""

    out: tuple[int, ...]
    a: tuple[int, ...]
    b: tuple[int, ...]
    c: tuple[int, ...]


def tick_rows(plan: Plan, slots: SlotMap, tick_index: int, which: str) -> CallRows:
    """Rows of tick `tick_index`: which = "fine", "coarse" or "all" (fine rows first, then coarse)."""
    tick = plan.ticks[tick_index]
    bounds = plan.bounds
    inputs, outputs, steps_from, steps_to = [], [], [], []
    if which in ("fine", "all"):
        for r in tick.fine:
            key = (r.iteration, r.block)
            inputs.append(slots.boundary(*key) if r.step == 0 else slots.F[key])
            outputs.append(slots.F[key])
            steps_from.append(bounds[r.block] + r.step)
            steps_to.append(bounds[r.block] + r.step + 1)
    if which in ("coarse", "all"):
        for r in tick.coarse:
            key = (r.iteration, r.block)
            inputs.append(slots.boundary(*key))
            outputs.append(slots.G[key])
            steps_from.append(bounds[r.block])
            steps_to.append(bounds[r.block + 1])
    return CallRows(tuple(inputs), tuple(outputs), tuple(steps_from), tuple(steps_to))


def tick_formations(plan: Plan, slots: SlotMap, tick_index: int) -> Formations:
    out, a, b_, c = [], [], [], []
    for p, b in plan.ticks[tick_index].ready:
        out.append(slots.U[(p, b)])
        if p == 0:
            a.append(slots.G[(0, b - 1)]), b_.append(ZERO), c.append(ZERO)
        elif b == p:
            a.append(slots.F[(p - 1, b - 1)]), b_.append(ZERO), c.append(ZERO)
        else:
            a.append(slots.G[(p, b - 1)]), b_.append(slots.F[(p - 1, b - 1)]), c.append(slots.G[(p - 1, b - 1)])
    return Formations(tuple(out), tuple(a), tuple(b_), tuple(c))
