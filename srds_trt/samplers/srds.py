"""Self-Refining Diffusion Samplers (SRDS, Parareal): the reference executor of the tick plan (plan.py).

Iteration 0 is the coarse sqrt(N)-step sample; each iteration runs every block's fine solve from the last
iterate's boundaries (all blocks in one batched call per tick) and the sequential correction
G_new + (F - G_old). States are kept in at least float32, where that correction is formed: in fp16 the
difference of two close states would lose most of its digits. When to stop is stopping.StoppingRule's, shared
with the runtime; tol = 0 runs until the serial sample is reproduced (to float rounding).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import Model, SampleResult, check_grid, state_dtype
from .ddim import ddim_update, parareal_update
from .solver import Solver, resolve_solver
from .plan import Plan, build_tick_plan
from .stopping import DEFAULT_TOL, StoppingRule, check_finite, check_tol


def srds_sample(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    solver: str | None = None,
    prediction_type: str = "epsilon",
    tol: float = DEFAULT_TOL,
    num_blocks: int | None = None,
    max_iters: int | None = None,
    pipelined: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> SampleResult:
    """Parareal SRDS over the N-step DDIM grid; converges to `serial_sample` (exactly after B iterations).

    num_blocks defaults to schedule.default_num_blocks(N) (~ sqrt(3N): the fewest pipelined calls for the
    iterations the stopping rule typically needs); max_iters defaults to (and is capped at) the block count.
    pipelined (the default) starts each segment as soon as its start state exists (schedule.py): same
    iterates, fewer sequential calls; pipelined=False runs iteration by iteration (the textbook schedule).
    progress(iteration, residual) is called after each Parareal iteration.
    """
    ode = resolve_solver(alphas_cumprod, prediction_type, solver)
    timesteps = check_grid(x, timesteps)
    tol = check_tol(tol)
    plan = build_tick_plan(len(timesteps) - 1, num_blocks, max_iters, pipelined)
    return _run_plan(model, x, plan, timesteps, ode, tol, progress)


def _run_plan(
    model: Model,
    x: Tensor,
    plan: Plan,
    timesteps: Tensor,
    ode: Solver,
    tol: float,
    progress: Callable[[int, float], None] | None,
) -> SampleResult:
    """Walk the plan tick by tick: one model call per tick, then form the boundaries that became ready."""
    batch, bounds, blocks = x.shape[0], plan.bounds, plan.num_blocks
    fine_cx, fine_cout = ode.coefficients(timesteps[:-1], timesteps[1:])
    starts, ends = list(bounds[:-1]), list(bounds[1:])
    coarse_cx, coarse_cout = ode.coefficients(timesteps[starts], timesteps[ends])

    x0 = x.to(state_dtype(x))
    U: dict[tuple[int, int], Tensor] = {}  # boundary states U[p][b] (b >= 1)
    F: dict[tuple[int, int], Tensor] = {}  # fine segment states: running, then final
    G: dict[tuple[int, int], Tensor] = {}  # coarse outputs G(p, b)
    rule = StoppingRule(tol, blocks)
    model_evals = 0

    def boundary(p: int, b: int) -> Tensor:
        return x0 if b == 0 else U[(p, b)]

    for tick_index, tick in enumerate(plan.ticks):
        inputs, step_from, cxs, couts, keys = [], [], [], [], []
        for r in tick.fine:
            key = (r.iteration, r.block)
            inputs.append(boundary(*key) if r.step == 0 else F[key])
            step = bounds[r.block] + r.step
            step_from.append(timesteps[step])
            cxs.append(fine_cx[step])
            couts.append(fine_cout[step])
            keys.append((F, key))
        for r in tick.coarse:
            key = (r.iteration, r.block)
            inputs.append(boundary(*key))
            step_from.append(timesteps[bounds[r.block]])
            cxs.append(coarse_cx[r.block])
            couts.append(coarse_cout[r.block])
            keys.append((G, key))
        state = torch.cat(inputs)
        t = torch.stack(step_from).repeat_interleave(batch).to(x.device)
        out = model(state, t)
        model_evals += state.shape[0]
        new = ddim_update(state, out, torch.stack(cxs).repeat_interleave(batch), torch.stack(couts).repeat_interleave(batch))
        for (table, key), chunk in zip(keys, new.split(batch)):
            table[key] = chunk

        for p, b in tick.ready:
            if p == 0:
                U[(0, b)] = G[(0, b - 1)]
            elif b == p:
                U[(p, b)] = F[(p - 1, b - 1)]  # exact: no coarse terms, so no rounding either
            else:
                U[(p, b)] = parareal_update(G[(p, b - 1)], F[(p - 1, b - 1)], G[(p - 1, b - 1)])

        for p in tick.completes:
            if p == 0:
                check_finite(float(U[(0, blocks)].abs().max()), "iteration 0 (the coarse sample)")
                continue
            changes = [0.0] * (p - 1) + [float((U[(p, b)] - U[(p - 1, b)]).abs().max()) for b in range(p, blocks + 1)]
            stop = rule.observe(p, changes)
            _forget_iteration(p - 1, U, F, G)
            if progress is not None:
                progress(p, rule.residuals[-1])
            if stop or p == plan.max_iters:
                return _result(U[(p, blocks)].to(x.dtype), p, blocks, model_evals, tick_index + 1, rule)
    # Only reached with max_iters = 0: the coarse sample itself.
    return _result(U[(0, blocks)].to(x.dtype), 0, blocks, model_evals, plan.ticks_until(0), rule)


def _result(sample: Tensor, iterations: int, blocks: int, model_evals: int, calls: int, rule: StoppingRule) -> SampleResult:
    return SampleResult(sample=sample, sampler="srds", iterations=iterations, model_evals=model_evals,
                        sequential_calls=calls, residuals=rule.residuals, error_estimates=rule.estimates,
                        converged=iterations > 0 and rule.converged, tol=rule.tol, num_blocks=blocks,
                        boundary_changes=rule.boundary_changes)


def _forget_iteration(p: int, *tables: dict[tuple[int, int], Tensor]) -> None:
    """Drop iteration p's states once iteration p + 1 is complete: nothing reads them any more."""
    for table in tables:
        for key in [k for k in table if k[0] == p]:
            del table[key]


