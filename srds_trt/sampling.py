"""Serial DDIM and Self-Refining Diffusion Samplers (SRDS): pure functions over a model callable.

`model(x[rows, ...], t[rows]) -> output[rows, ...]` with per-row integer timesteps. SRDS stacks the rows of
every live segment, segment-major: row r of a call belongs to image r % batch, so conditioning wrappers
(guidance.py) can tile per-image embeddings without knowing the schedule.

States are kept in at least float32 whatever `x` is, and the Parareal correction G_new + (F - G_old) is
formed there: in fp16 the difference of two close states would lose most of its digits.

Stopping (what `tol` means) lives in stopping.py: one StoppingRule for this reference executor and the runtime.
`tol` is the max-abs distance to the serial sample the caller accepts; tol = 0 runs until the serial sample is
reproduced (to float rounding). NaN/Inf anywhere in the state raises stopping.NonFiniteError.

Every sampler returns one result type, SampleResult, and registers in SAMPLERS (name -> function with the contract
`(model, x, timesteps, alphas_cumprod, *, tol, prediction_type, **options) -> SampleResult`). The solver is a
parameter of every sampler (samplers/solver.py): `alphas_cumprod` is a DDIM table or a Solver object such as
samplers.flow.FlowMatchEuler() (then `timesteps` is the sigma grid and the model predicts the velocity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .schedule import Plan, build_tick_plan
from .samplers.solver import Solver, resolve_solver
from .solvers import as_grid, ddim_update, parareal_update
from .stopping import DEFAULT_TOL, NonFiniteError, StoppingRule, check_finite, check_tol, window_accept_tol

Model = Callable[[Tensor, Tensor], Tensor]

__all__ = ["DEFAULT_TOL", "Model", "NonFiniteError", "SAMPLERS", "SampleResult", "check_grid", "serial_sample",
           "srds_sample", "state_dtype"]


@dataclass
class SampleResult:
    """What every sampler returns (reference samplers and runtime runners alike).

    iterations: parallel iterations run (SRDS: Parareal iterations, 0 = the coarse sample alone; ParaDiGMS: Picard
    sweeps; serial: None). sequential_calls: batched model calls on the critical path (hardware-free latency).
    model_evals: state rows evaluated in all calls (x2 engine rows under guidance). residuals: the max-abs change
    per iteration; error_estimates: what the stopping rule compared with tol. converged: stopped by the rule or
    by exactness, not by max_iters.
    """

    sample: Tensor
    sampler: str
    iterations: int | None
    model_evals: int
    sequential_calls: int
    residuals: list[float] = field(default_factory=list)
    error_estimates: list[float] = field(default_factory=list)
    converged: bool = False
    tol: float = 0.0  # the tolerance used (a runtime raises a positive tol above its engine's noise floor)
    accept_tol: float | None = None  # sliding-window samplers: the per-point threshold run for tol (stopping.py)
    num_blocks: int | None = None  # SRDS-family samplers
    window: int | None = None  # ParaDiGMS: points per sweep
    slides: list[int] = field(default_factory=list)  # ParaDiGMS: how far the window advanced per sweep
    boundary_changes: list[list[float]] = field(default_factory=list)  # SRDS: per-boundary changes, per iteration
    ticks_launched: int | None = None  # runtime: includes speculative ticks launched while a residual was in flight
    engine_calls: dict[int, int] = field(default_factory=dict)  # runtime: engine bucket -> calls


def state_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def check_grid(x: Tensor, timesteps: Tensor) -> Tensor:
    timesteps = as_grid(timesteps)
    if timesteps.dim() != 1 or timesteps.numel() < 2:
        raise ValueError("timesteps must be a 1-D tensor of N+1 >= 2 grid points t_0 > ... > t_N")
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {timesteps.tolist()}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a batch [images, ...] with at least one image")
    return timesteps


def serial_sample(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    solver: str | None = None,
    prediction_type: str = "epsilon",
) -> Tensor:
    """The reference: N sequential solver steps t_0 -> t_1 -> ... -> t_N (DDIM, or flow Euler on a sigma grid)."""
    step = resolve_solver(alphas_cumprod, prediction_type, solver)
    timesteps = check_grid(x, timesteps)
    c_x, c_out = step.coefficients(timesteps[:-1], timesteps[1:])
    state = x.to(state_dtype(x))
    for i in range(len(timesteps) - 1):
        out = model(state, timesteps[i].expand(x.shape[0]).to(x.device))
        state = ddim_update(state, out, c_x[i].expand(x.shape[0]), c_out[i].expand(x.shape[0]))
    check_finite(float(state.abs().max()), "serial sample")
    return state.to(x.dtype)


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
    step = resolve_solver(alphas_cumprod, prediction_type, solver)
    timesteps = check_grid(x, timesteps)
    tol = check_tol(tol)
    plan = build_tick_plan(len(timesteps) - 1, num_blocks, max_iters, pipelined)
    return _run_plan(model, x, plan, timesteps, step, tol, progress)


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


def serial_result(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    tol: float = 0.0,
    prediction_type: str = "epsilon",
    solver: str | None = None,
) -> SampleResult:
    """serial_sample in the SAMPLERS contract (tol is accepted and meaningless: the serial sample is exact)."""
    check_tol(tol)
    steps = len(as_grid(timesteps)) - 1
    sample = serial_sample(model, x, timesteps, alphas_cumprod, solver=solver, prediction_type=prediction_type)
    return SampleResult(sample=sample, sampler="serial", iterations=None, model_evals=steps * x.shape[0],
                        sequential_calls=steps, converged=True)


# The registry's sliding-window samplers take `tol` in this module's meaning (max-abs distance to the serial sample)
# and run with the per-point threshold stopping.window_accept_tol calibrated for it; paradigms_sample and
# eps_picard_sample themselves keep their own per-point knobs (ParaDiGMS: diffusers' `tolerance`, call for call).
def _paradigms(*args, tol: float = DEFAULT_TOL, **kwargs) -> SampleResult:
    from .paradigms import paradigms_sample  # paradigms imports this module

    return with_asked_tol(paradigms_sample(*args, tol=window_accept_tol(tol, "paradigms"), **kwargs), tol)


def _eps_picard(*args, tol: float = DEFAULT_TOL, **kwargs) -> SampleResult:
    from .eps_picard import eps_picard_sample  # eps_picard imports this module

    return with_asked_tol(eps_picard_sample(*args, tol=window_accept_tol(tol, "eps-picard"), **kwargs), tol)


def with_asked_tol(result: SampleResult, tol: float) -> SampleResult:
    """A sliding-window result run at a per-point threshold (its .tol) for the caller's `tol`: .tol becomes what
    was asked and .accept_tol the threshold that ran (the registry here, and the runtime's RuntimeSampler.window)."""
    result.accept_tol, result.tol = result.tol, tol
    return result


# name -> sampler with the contract (model, x, timesteps, alphas_cumprod, *, tol, prediction_type, **options)
SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "serial": serial_result,
    "srds": srds_sample,
    "paradigms": _paradigms,
    "eps-picard": _eps_picard,
}
