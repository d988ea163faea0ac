"""The plan as device-ready data (pure: no device, no engine): state slots and per-tick tables.

Every state SRDS ever holds gets its own slot in one pool tensor. Slots are never reused within a run, so a
late-read residual still finds its iterate, a speculative tick of the next iteration cannot overwrite a result,
and every index a tick needs is known before the first call. Row r of a slot (image r of the batch) lives at
pool row slot * batch + r.

The tables of one program (one call kind at one row capacity) are STACKED over the ticks that use it, in plan
order, plus one neutral entry at the end (reads ZERO, writes SINK: what warm-up and capture run). A program
walks its stack with a device-side counter, so a tick costs no host-to-device copy at all (runtime/programs.py).
Index tables are int64 and coefficient tables are in the state dtype, so nothing is cast inside a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...samplers.plan import Plan
from ...samplers.solver import resolve_solver

ZERO, SINK, X_T = 0, 1, 2  # a slot of zeros (padding reads it), a write-only slot (padding writes it), x_T


@dataclass(frozen=True)
class SlotMap:
    U: dict[tuple[int, int], int]  # boundary state U[p][b], b >= 1
    F: dict[tuple[int, int], int]  # fine segment F(p, b): running, then final
    G: dict[tuple[int, int], int]  # coarse output G(p, b)
    count: int

    def boundary(self, p: int, b: int) -> int:
        """The slot of U[p][b]; b < p is exact since iteration b, so it is U[b][b]'s slot (x_T for b = 0)."""
        return X_T if b == 0 else self.U[(min(p, b), b)]


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
    """The rows of one model call, slot-level."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    steps_from: tuple[int, ...]  # grid index the row evaluates the model at
    steps_to: tuple[int, ...]  # grid index the row's DDIM step lands on


@dataclass(frozen=True)
class Formations:
    """The boundaries a tick makes ready: U[out] = G_new[a] + (F_old[b] - G_old[c]).

    Plain copies (iteration 0, and the exact boundary b = p) use (ZERO, ZERO) for (b, c): x + (0 - 0) = x exactly.
    """

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


# ----- stacked, row-level tables (still host tensors; the runner moves them to its device once) -----

@dataclass(frozen=True)
class CallTable:
    """Row-level tables of one call program, stacked over its ticks: shape [ticks + 1, cap] (last: neutral)."""

    src: Tensor  # int64 pool rows gathered as the call's input
    dst: Tensor  # int64 pool rows the DDIM update is scattered to
    t: Tensor  # timesteps, in the engine's timestep dtype
    c_x: Tensor  # DDIM coefficients, in the state dtype
    c_out: Tensor

    @property
    def cap(self) -> int:
        return self.src.shape[1]

    def to(self, device: torch.device) -> "CallTable":
        return CallTable(*(v.to(device) for v in (self.src, self.dst, self.t, self.c_x, self.c_out)))


@dataclass(frozen=True)
class FormationTable:
    """Row-level formation tables stacked over ticks, [ticks + 1, cap]; unused entries write SINK from ZERO."""

    out: Tensor
    a: Tensor
    b: Tensor
    c: Tensor

    def to(self, device: torch.device) -> "FormationTable":
        return FormationTable(*(v.to(device) for v in (self.out, self.a, self.b, self.c)))


@dataclass(frozen=True)
class ProgramPlan:
    """One program: which call kind, its row capacity, the ticks it runs at (plan order), and its tables."""

    kind: str  # "all" (fine + coarse rows, formations ride along), "fine", "coarse" or "form"
    cap: int
    ticks: tuple[int, ...]
    call: CallTable | None
    formation: FormationTable | None


@dataclass(frozen=True)
class TickTables:
    """Everything a runner walks: slots, programs, which program runs at each tick, and residual rows."""

    slots: SlotMap
    programs: tuple[ProgramPlan, ...]
    schedule: tuple[dict[str, int], ...]  # per tick: kind -> index into programs
    form_cap: int


def widest_call(plan: Plan, split: bool) -> int:
    """Slot rows of the plan's widest model call (split: fine and coarse rows are separate calls)."""
    if split:
        return max(max(len(t.fine), len(t.coarse)) for t in plan.ticks)
    return max(t.rows for t in plan.ticks)


def rows_of(slots: tuple[int, ...], batch: int) -> list[int]:
    return [s * batch + i for s in slots for i in range(batch)]


def _capacity(rows: int, caps: tuple[int, ...]) -> int | None:
    return next((cap for cap in caps if cap >= rows), None)


def build_tick_tables(
    plan: Plan,
    *,
    batch: int,
    caps: tuple[int, ...],
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    split: bool,
    state_dtype: torch.dtype,
    timestep_dtype: torch.dtype,
) -> TickTables:
    """Pure: plan + batch + row capacities -> stacked tables. Raises ValueError naming the widest tick if none fits.

    split=False: one "all" program per capacity, formations inside it. split=True: "fine" and "coarse" programs
    and one "form" program that runs every tick.
    """
    slots = slot_map(plan)
    ode = resolve_solver(alphas_cumprod, prediction_type)
    form_cap = max(1, max(len(t.ready) for t in plan.ticks)) * batch
    kinds = ("fine", "coarse") if split else ("all",)
    per_program: dict[tuple[str, int], list[int]] = {}
    schedule: list[dict[str, int]] = []
    rows: dict[tuple[int, str], CallRows] = {}
    caps_at: dict[tuple[int, str], int] = {}
    for i in range(len(plan.ticks)):
        for kind in kinds:
            call = tick_rows(plan, slots, i, kind)
            if not call.inputs:
                continue
            cap = _capacity(len(call.inputs) * batch, caps)
            if cap is None:
                raise ValueError(f"tick {i} needs {len(call.inputs) * batch} state rows; the largest capacity is {max(caps)}")
            rows[(i, kind)], caps_at[(i, kind)] = call, cap
            per_program.setdefault((kind, cap), []).append(i)
    programs: list[ProgramPlan] = []
    index: dict[tuple[str, int], int] = {}
    for (kind, cap), ticks in sorted(per_program.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        index[(kind, cap)] = len(programs)
        call = _call_table([rows[(i, kind)] for i in ticks], cap, batch, timesteps, ode,
                           state_dtype, timestep_dtype)
        formation = None if split else _formation_table([tick_formations(plan, slots, i) for i in ticks], form_cap, batch)
        programs.append(ProgramPlan(kind, cap, tuple(ticks), call, formation))
    if split:
        index[("form", form_cap)] = len(programs)
        every = tuple(range(len(plan.ticks)))
        programs.append(ProgramPlan("form", form_cap, every, None,
                                    _formation_table([tick_formations(plan, slots, i) for i in every], form_cap, batch)))
    for i in range(len(plan.ticks)):
        entry = {kind: index[(kind, caps_at[(i, kind)])] for kind in kinds if (i, kind) in caps_at}
        if split:
            entry["form"] = index[("form", form_cap)]
        schedule.append(entry)
    return TickTables(slots=slots, programs=tuple(programs), schedule=tuple(schedule), form_cap=form_cap)


def _call_table(calls: list[CallRows], cap: int, batch: int, timesteps: Tensor, ode,
                state_dtype: torch.dtype, timestep_dtype: torch.dtype) -> CallTable:
    n = len(calls) + 1
    src = torch.full((n, cap), ZERO * batch, dtype=torch.int64)
    dst = torch.full((n, cap), SINK * batch, dtype=torch.int64)
    t = torch.full((n, cap), float(timesteps[0]), dtype=torch.float64)  # a real timestep keeps padding finite
    c_x = torch.zeros(n, cap, dtype=torch.float64)
    c_out = torch.zeros(n, cap, dtype=torch.float64)
    for k, call in enumerate(calls):
        width = len(call.inputs) * batch
        src[k, :width] = torch.tensor(rows_of(call.inputs, batch))
        dst[k, :width] = torch.tensor(rows_of(call.outputs, batch))
        c_x_k, c_out_k = ode.coefficients(timesteps[list(call.steps_from)], timesteps[list(call.steps_to)])
        t[k, :width] = timesteps[list(call.steps_from)].to(torch.float64).repeat_interleave(batch)
        c_x[k, :width] = c_x_k.repeat_interleave(batch)
        c_out[k, :width] = c_out_k.repeat_interleave(batch)
    # coefficients are computed in float64 once, here, and rounded once to the state dtype
    return CallTable(src, dst, t.to(timestep_dtype), c_x.to(state_dtype), c_out.to(state_dtype))


def _formation_table(forms: list[Formations], cap: int, batch: int) -> FormationTable:
    n = len(forms) + 1
    out = torch.full((n, cap), SINK * batch, dtype=torch.int64)
    a, b, c = (torch.full((n, cap), ZERO * batch, dtype=torch.int64) for _ in range(3))
    for k, form in enumerate(forms):
        for table, column in ((out, form.out), (a, form.a), (b, form.b), (c, form.c)):
            values = rows_of(column, batch)
            table[k, : len(values)] = torch.tensor(values, dtype=torch.int64)
    return FormationTable(out, a, b, c)


def residual_rows(plan: Plan, slots: SlotMap, batch: int, p: int) -> tuple[Tensor, Tensor]:
    """Pool rows compared by iteration p's residual: U[p][b] vs U[p-1][b] for b = p..B (p = 0: U[0] vs ZERO)."""
    bs = range(max(p, 1), plan.num_blocks + 1)
    new = rows_of(tuple(slots.U[(p, b)] for b in bs), batch)
    old = rows_of(tuple(slots.U[(p - 1, b)] if p else ZERO for b in bs), batch)
    return torch.tensor(new, dtype=torch.int64), torch.tensor(old, dtype=torch.int64)
