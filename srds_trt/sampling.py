"""Serial DDIM and Self-Refining Diffusion Samplers (SRDS): pure functions over a model callable.

`model(x[rows, ...], t[rows]) -> output[rows, ...]` with per-row integer timesteps. SRDS stacks the rows of
every live segment, segment-major: row r of a call belongs to image r % batch, so conditioning wrappers
(guidance.py) can tile per-image embeddings without knowing the schedule.

States are kept in at least float32 whatever `x` is, and the Parareal correction G_new + (F - G_old) is
formed there: in fp16 the difference of two close states would lose most of its digits.

Stopping rule (what `tol` means)
--------------------------------
After iteration p the sampler measures r_p = max over block boundaries b and elements of |U[p][b] - U[p-1][b]|,
i.e. every boundary, not just the final sample. The first p boundaries are exact after p iterations, so r_p
contains the true error that boundary p still had one iteration earlier. A small r_p alone is not enough:
when Parareal contracts slowly, consecutive iterates stay close while far from the fixed point (a Gaussian
mixture at N=100 showed a final-sample change of 0.07 at an error of 1.5). So the rule estimates the remaining
error with the contraction rate rho_p = r_p / r_{p-1}, as for any contractive fixed-point iteration,

    e_p = r_p * max(1, rho_p / (1 - rho_p))      (infinite when rho_p >= 1; unknown, so infinite, at p = 1)

and, because one small ratio can be luck (two iterates wrong in the same way; seen on single mixture images at
tol = 0.1), it asks for the bound to hold twice in a row: it stops when max(e_p, e_{p-1}) <= tol, or after B
iterations (then the result is the serial sample). `tol` is therefore an estimate of the max-abs distance
between the returned sample and the serial sample, in the units of x. It is a heuristic (no rule that reads
residuals alone can be certain); tol = 0 runs until the serial sample is reproduced (to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .schedule import Plan, build_plan
from .solvers import alphas_at, as_grid, check_solver, ddim_coefficients, ddim_update

Model = Callable[[Tensor, Tensor], Tensor]

# Max-abs distance to the serial sample. Below half an 8-bit grey level of an image in [-1, 1]
# (2 / 255 / 2 ~ 3.9e-3) with a margin, and above the batch-variance noise floor of fp32 engines (~1e-5).
DEFAULT_TOL = 1e-3


@dataclass
class SRDSResult:
    sample: Tensor
    iterations: int  # Parareal iterations run (0 = the coarse sample alone)
    num_blocks: int
    model_evals: int  # rows evaluated, in all calls
    serial_evals: int  # model calls on the critical path: a batched call counts once
    residuals: list[float] = field(default_factory=list)  # r_p for p = 1..iterations
    error_estimates: list[float] = field(default_factory=list)  # what the stopping rule compared with tol
    converged: bool = False  # stopped by the rule or by exactness (p = B), not by max_iters


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
    solver: str = "ddim",
    prediction_type: str = "epsilon",
) -> Tensor:
    """The reference: N sequential DDIM steps t_0 -> t_1 -> ... -> t_N."""
    check_solver(solver, prediction_type)
    timesteps = check_grid(x, timesteps)
    alphas = alphas_at(timesteps, alphas_cumprod)
    c_x, c_out = ddim_coefficients(alphas[:-1], alphas[1:], prediction_type)
    state = x.to(state_dtype(x))
    for i in range(len(timesteps) - 1):
        out = model(state, timesteps[i].expand(x.shape[0]).to(x.device))
        state = ddim_update(state, out, c_x[i].expand(x.shape[0]), c_out[i].expand(x.shape[0]))
    return state.to(x.dtype)


def _contraction_bound(residuals: list[float]) -> float:
    r = residuals[-1]
    if r == 0.0:
        return 0.0
    if len(residuals) < 2 or residuals[-2] == 0.0:
        return math.inf
    rho = r / residuals[-2]
    if rho >= 1.0:
        return math.inf
    return r * max(1.0, rho / (1.0 - rho))


def error_estimate(residuals: list[float]) -> float:
    """Estimated remaining error after the last iteration: the contraction bound, held two iterations running."""
    if residuals[-1] == 0.0:
        return 0.0  # the iterate reproduced itself: it is the fixed point, to rounding
    if len(residuals) < 2:
        return math.inf
    return max(_contraction_bound(residuals), _contraction_bound(residuals[:-1]))


def srds_sample(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    solver: str = "ddim",
    prediction_type: str = "epsilon",
    tol: float = DEFAULT_TOL,
    num_blocks: int | None = None,
    max_iters: int | None = None,
    pipelined: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> SRDSResult:
    """Parareal SRDS over the N-step DDIM grid; converges to `serial_sample` (exactly after B iterations).

    num_blocks defaults to round(sqrt(N)); max_iters defaults to (and is capped at) the block count.
    pipelined=True starts each segment as soon as its start state exists (schedule.py): same iterates,
    fewer sequential calls. progress(iteration, residual) is called after each Parareal iteration.
    """
    check_solver(solver, prediction_type)
    timesteps = check_grid(x, timesteps)
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    plan = build_plan(len(timesteps) - 1, num_blocks, max_iters, pipelined)
    return _run_plan(model, x, plan, timesteps, alphas_cumprod, prediction_type, tol, progress)


def _run_plan(
    model: Model,
    x: Tensor,
    plan: Plan,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    tol: float,
    progress: Callable[[int, float], None] | None,
) -> SRDSResult:
    """Walk the plan tick by tick: one model call per tick, then form the boundaries that became ready."""
    batch, bounds, blocks = x.shape[0], plan.bounds, plan.num_blocks
    alphas = alphas_at(timesteps, alphas_cumprod)
    fine_cx, fine_cout = ddim_coefficients(alphas[:-1], alphas[1:], prediction_type)
    starts, ends = list(bounds[:-1]), list(bounds[1:])
    coarse_cx, coarse_cout = ddim_coefficients(alphas[starts], alphas[ends], prediction_type)

    x0 = x.to(state_dtype(x))
    U: dict[tuple[int, int], Tensor] = {}  # boundary states U[p][b] (b >= 1)
    F: dict[tuple[int, int], Tensor] = {}  # fine segment states: running, then final
    G: dict[tuple[int, int], Tensor] = {}  # coarse outputs G(p, b)
    residuals: list[float] = []
    estimates: list[float] = []
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
                U[(p, b)] = G[(p, b - 1)] + (F[(p - 1, b - 1)] - G[(p - 1, b - 1)])

        for p in tick.completes:
            if p == 0:
                continue
            residual = max(float((U[(p, b)] - U[(p - 1, b)]).abs().max()) for b in range(p, blocks + 1))
            residuals.append(residual)
            estimates.append(error_estimate(residuals))
            _forget_iteration(p - 1, U, F, G)
            if progress is not None:
                progress(p, residual)
            exact = p == blocks
            if exact or estimates[-1] <= tol or p == plan.max_iters:
                return SRDSResult(
                    sample=U[(p, blocks)].to(x.dtype),
                    iterations=p,
                    num_blocks=blocks,
                    model_evals=model_evals,
                    serial_evals=tick_index + 1,
                    residuals=residuals,
                    error_estimates=estimates,
                    converged=exact or estimates[-1] <= tol,
                )
    # Only reached with max_iters = 0: the coarse sample itself.
    return SRDSResult(
        sample=U[(0, blocks)].to(x.dtype),
        iterations=0,
        num_blocks=blocks,
        model_evals=model_evals,
        serial_evals=plan.ticks_until(0),
        converged=False,
    )


def _forget_iteration(p: int, *tables: dict[tuple[int, int], Tensor]) -> None:
    """Drop iteration p's states once iteration p + 1 is complete: nothing reads them any more."""
    for table in tables:
        for key in [k for k in table if k[0] == p]:
            del table[key]
