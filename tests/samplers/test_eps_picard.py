"""eps-Picard (srds_trt.samplers.eps_picard): fixed point = serial DDIM, iterates = an independent textbook loop, counts,
and the sequential-call advantage over ParaDiGMS at matched error (the issue-13 claim, on one small mixture)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_core import (CountingModel, RowwiseMLP, alpha_of, ddim_step_ref, max_abs, serial_ref,
                          single_thread)  # noqa: F401 (fixture)
from srds_trt.models.analytic import hard_mixture
from srds_trt.samplers.eps_picard import eps_picard_experiment, eps_picard_sample
from srds_trt.samplers.window import default_window
from srds_trt.samplers.guidance import classifier_free_guidance
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers.paradigms import paradigms_sample
from srds_trt.samplers import SAMPLERS, serial_sample

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
          "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0}
GMM_CONFIG = {"num_train_timesteps": 1024, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
              "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "linspace", "steps_offset": 0}


def rel(a, b) -> float:
    """max-abs difference relative to the reference's scale (the cosine grid's first steps blow states up ~1e4)."""
    return max_abs(a, b) / max(1.0, float(b.abs().max()))


def guided_mlp(batch: int):
    """A class-conditional row-wise model behind the CFG wrapper (rows doubled inside one call)."""
    mlp = RowwiseMLP(features=6)

    def cond_model(x, t, cond):
        return mlp(x + 0.1 * cond.to(x.dtype)[:, None], t)

    labels = torch.arange(batch) % 3
    return classifier_free_guidance(cond_model, cond=labels, uncond=torch.full_like(labels, 5), scale=4.0)


@pytest.mark.parametrize("steps", [7, 25, 60])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tol_zero_is_the_serial_sample(steps, prediction_type):
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = guided_mlp(3)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ref = serial_ref(model, x, timesteps.tolist(), alphas, prediction_type)
    for window in (None, 1, 4, steps):
        result = eps_picard_sample(model, x, timesteps, alphas, tol=0.0, window=window, prediction_type=prediction_type)
        assert result.converged
        assert rel(result.sample, ref) < 1e-13, (window, rel(result.sample, ref))


def textbook_iterates(model, x, grid, alphas, sweeps, broyden=True, prior=True):
    """Whole-trajectory sweeps (window = N, no sliding), written from the formulas with python loops:
    out_j = model(x_j); from the previous sweep (') dx = x_j - x_j', dout = out_j - out_j';
    slope_j = <dout, dx> / |dx|^2 per image; J_j = slope_j I + (dout - slope_j dx) dx^T / |dx|^2 (Broyden);
    in the first sweep J_j = sqrt(1 - alpha_j) I (prior) or none;
    x_{j+1} = DDIM step from x_j^new with out_j + J_j (x_j^new - x_j)."""
    n = len(grid) - 1
    xs = [x.clone() for _ in range(n + 1)]
    prev_x, prev_out, iterates = None, None, []
    for _ in range(sweeps):
        outs = [model(xs[j], torch.full((x.shape[0],), grid[j], dtype=torch.long)) for j in range(n)]
        jac = [None] * n
        if prev_out is None and prior:
            eye = torch.eye(x.shape[1], dtype=x.dtype)
            jac = [math.sqrt(1 - alpha_of(grid[j], alphas)) * eye.expand(x.shape[0], -1, -1) for j in range(n)]
        if prev_out is not None:
            for j in range(n):
                dx, dout = xs[j] - prev_x[j], outs[j] - prev_out[j]
                norm = (dx * dx).sum(1)
                slope = torch.where(norm > 0, (dout * dx).sum(1) / norm.clamp_min(1e-300), 0.0)
                eye = torch.eye(x.shape[1], dtype=x.dtype)
                mats = slope[:, None, None] * eye  # [batch, d, d]
                if broyden:
                    inv = torch.where(norm > 0, 1 / norm.clamp_min(1e-300), 0.0)
                    mats = mats + torch.einsum("bi,bj->bij", dout - slope[:, None] * dx, dx) * inv[:, None, None]
                jac[j] = mats
        evaluated = [v.clone() for v in xs]
        new = [xs[0]]
        for j in range(n):
            out = outs[j]
            if jac[j] is not None:
                out = out + torch.einsum("bij,bj->bi", jac[j], new[j] - evaluated[j])
            new.append(ddim_step_ref(new[j], out, alpha_of(grid[j], alphas), alpha_of(grid[j + 1], alphas), "epsilon"))
        prev_x, prev_out, xs = evaluated, outs, new
        iterates.append(xs[n])
    return iterates


@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("broyden", [True, False])
@pytest.mark.parametrize("sweeps", [1, 2, 3, 5])
def test_iterates_short_of_convergence_match_a_textbook_loop(sweeps, broyden, prior):
    steps = 24  # the analytic mixture: nonlinear enough that 5 sweeps are far from converged
    timesteps, alphas = ddim_grid(GMM_CONFIG, steps)
    model = hard_mixture(alphas)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = textbook_iterates(model, x, timesteps.tolist(), alphas, sweeps, broyden, prior)[-1]
    result = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=steps, max_iters=sweeps, broyden=broyden,
                               prior_slope=prior)
    assert result.iterations == sweeps
    assert rel(result.sample, expected) < 1e-9  # the textbook x0-form step rounds differently near alpha ~ 0
    # ... and far from converged: the comparison is not the fixed point in disguise.
    assert rel(result.sample, serial_sample(model, x, timesteps, alphas)) > 1e-6
    if sweeps >= 3:  # and the Broyden term is in play: the other variant's iterate differs
        other = textbook_iterates(model, x, timesteps.tolist(), alphas, sweeps, not broyden, prior)[-1]
        assert rel(other, expected) > 1e-6
    # ... and so is the prior slope, in every sweep (the first sweep's states feed every later one)
    other = textbook_iterates(model, x, timesteps.tolist(), alphas, sweeps, broyden, not prior)[-1]
    assert rel(other, expected) > 1e-6


@pytest.mark.parametrize("prior", [True, False])
def test_first_sweep_is_ddim_with_the_noise_prediction_at_x_T(prior):
    """Hand-derived: from x_T everywhere, sweep 1 evaluates out_j = model(x_T, t_j) and chains DDIM steps with
    out_j moved to the chain's state along the prior slope sqrt(1 - alpha_j) (prior_slope=False: unmoved)."""
    steps = 9
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = RowwiseMLP(features=4)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grid = timesteps.tolist()
    state = x
    for j in range(steps):
        out = model(x, torch.full((2,), grid[j], dtype=torch.long))
        if prior:
            out = out + math.sqrt(1 - alpha_of(grid[j], alphas)) * (state - x)
        state = ddim_step_ref(state, out, alpha_of(grid[j], alphas), alpha_of(grid[j + 1], alphas), "epsilon")
    result = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=steps, max_iters=1, prior_slope=prior)
    assert rel(result.sample, state) < 1e-13


class GaussianData:
    """out(x, t) = sqrt(1 - alpha_t) x + g(t): the noise prediction of unit-variance Gaussian data (g = 0), plus an
    x-independent term, so d out / d x is exactly the prior slope at every point."""

    def __init__(self, alphas, features: int):
        self.g = torch.randn(features, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        self.alphas = alphas

    def __call__(self, x, t):
        from srds_trt.samplers.ddim import alphas_at

        alpha = alphas_at(t, self.alphas).to(x)[:, None]
        return (1 - alpha).sqrt() * x + self.g * alpha  # g(t) = alpha_t g: not constant along the window


def test_prior_slope_is_exact_for_gaussian_data():
    """With d out / d x = sqrt(1 - alpha) exactly, the first sweep's prior-corrected states are the serial ones,
    so the second sweep accepts its whole window; without the prior it cannot."""
    steps, w = 64, 16
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = GaussianData(alphas, features=3)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = serial_sample(model, x, timesteps, alphas)
    ours = eps_picard_sample(model, x, timesteps, alphas, tol=1e-9, window=w)
    plain = eps_picard_experiment(model, x, timesteps, alphas, tol=1e-9, window=w, prior_slope=False)
    assert ours.slides[:2] == [1, w], ours.slides
    assert plain.slides[1] < w, plain.slides
    for run in (ours, plain):
        assert rel(run.sample, ref) < 1e-10


def test_counts_rows_calls_and_width():
    steps, batch = 49, 3
    timesteps, alphas = ddim_grid(CONFIG, steps)
    counting = CountingModel(guided_mlp(batch))
    x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = eps_picard_sample(counting, x, timesteps, alphas, tol=1e-6)
    assert result.window == default_window("eps-picard", steps) == 14  # 2 round(sqrt(49))
    # the CFG wrapper doubles rows inside one call: the sampler's model sees rows = points x images
    assert result.sequential_calls == result.iterations == len(counting.rows)
    assert sum(counting.rows) == result.model_evals
    assert max(counting.rows) <= 14 * batch
    assert sum(result.slides) >= steps and len(result.slides) == result.iterations
    assert SAMPLERS["eps-picard"](counting, x, timesteps, alphas, tol=1e-6).sequential_calls == result.sequential_calls


def test_rejects_bad_options():
    timesteps, alphas = ddim_grid(CONFIG, 10)
    x = torch.zeros(1, 4, dtype=torch.float64)
    model = RowwiseMLP(features=4)
    for kwargs in ({"window": 0}, {"tol": -1.0}, {"tol": math.nan}, {"max_iters": -1}):
        with pytest.raises((ValueError, TypeError)):  # coarse_steps: the removed coarse warm start
            eps_picard_sample(model, x, timesteps, alphas, **kwargs)


@pytest.mark.slow
def test_fewer_sequential_calls_than_paradigms_at_matched_error():
    """The matched-error claim on one small case: at max-abs error <= 1e-3 vs serial, eps-Picard at width 2 round(sqrt N)
    needs <= 0.6x the sequential calls of ParaDiGMS at its better window (round(sqrt N) or 2 round(sqrt N)),
    ParaDiGMS's tol chosen knowing the serial result (the cheapest of its grid that reaches the target)."""
    timesteps, alphas = ddim_grid(GMM_CONFIG, 196)
    gmm = hard_mixture(alphas)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = serial_sample(gmm, x, timesteps, alphas)
    target = 1e-3
    ours = eps_picard_sample(gmm, x, timesteps, alphas, tol=1e-3)
    assert max_abs(ours.sample, ref) <= target
    theirs = []
    for window in (14, 28):
        for tol in (3e-3, 1e-3):  # 3e-3 misses the target on both windows, 1e-3 reaches it (benchmarks)
            run = paradigms_sample(gmm, x, timesteps, alphas, tol=tol, window=window)
            if max_abs(run.sample, ref) <= target:
                theirs.append(run.sequential_calls)
    assert theirs, "ParaDiGMS reached the target with none of its tolerances"
    assert ours.sequential_calls <= 0.6 * min(theirs), (ours.sequential_calls, min(theirs))


class LambdaLinear:
    """out(x, t) = a + b lambda(t) + k x, lambda = log sqrt(alpha / (1 - alpha)): linear in the warm start's
    extrapolation variable and (k != 0) linear in x with one scalar slope, so each mechanism's prediction is exact."""

    def __init__(self, alphas, features: int, k: float = 0.0):
        gen = torch.Generator().manual_seed(1)
        self.a = torch.randn(features, generator=gen, dtype=torch.float64)
        self.b = torch.randn(features, generator=gen, dtype=torch.float64) * 0.3
        self.alphas, self.k = alphas, k

    def __call__(self, x, t):
        from srds_trt.samplers.ddim import alphas_at

        alpha = alphas_at(t, self.alphas).to(x)
        lam = 0.5 * (alpha / (1 - alpha)).log()
        return self.a + self.b * lam[:, None] + self.k * x


def test_extrapolated_warm_start_is_exact_for_an_output_linear_in_lambda():
    """Frozen outputs (extrapolate=0) put entering points off the trajectory; the linear extrapolation puts them
    on it, so after the first window every sweep accepts the whole window: 2 + ceil((N - w) / w) sweeps."""
    steps, w = 60, 8
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = LambdaLinear(alphas, features=3)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = serial_sample(model, x, timesteps, alphas)
    # the output does not depend on x: no slope (prior_slope=False) is the exact first sweep here
    ours = eps_picard_experiment(model, x, timesteps, alphas, tol=1e-9, window=w, prior_slope=False)
    assert rel(ours.sample, ref) < 1e-12
    assert ours.slides[2:-1] == [w] * (len(ours.slides) - 3)
    assert ours.iterations == 2 + math.ceil((steps - w) / w)
    frozen = eps_picard_experiment(model, x, timesteps, alphas, tol=1e-9, window=w, extrapolate=0, prior_slope=False)
    assert frozen.iterations >= ours.iterations + 4, (frozen.iterations, ours.iterations)


def test_first_evaluation_inherits_the_neighbours_secant_slope():
    """out = k x + (linear in lambda): the secant slope is k exactly; a point evaluated for the first time at its
    warm-start state is corrected by the inherited k and is exact after that one sweep. Without inheritance its
    state moves again in the next sweep: one more sweep per window."""
    steps, w = 60, 8
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = LambdaLinear(alphas, features=3, k=0.4)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = serial_sample(model, x, timesteps, alphas)
    runs = {inherit: eps_picard_experiment(model, x, timesteps, alphas, tol=1e-9, window=w, inherit_slope=inherit)
            for inherit in (True, False)}
    for run in runs.values():
        assert rel(run.sample, ref) < 1e-10
    assert runs[True].iterations + 4 <= runs[False].iterations, {k: r.slides for k, r in runs.items()}


def test_every_switch_keeps_the_serial_fixed_point():
    """tol = 0 with each mechanism off (and all off), or Newton's exact derivative (finite differences) in place
    of the quasi-Newton model: still the serial sample, v prediction with CFG."""
    from benchmarks.newton_bound import FiniteDifferenceJVP

    steps = 30
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = guided_mlp(2)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = serial_ref(model, x, timesteps.tolist(), alphas, "v_prediction")
    jvp = FiniteDifferenceJVP(model)
    for kwargs in ({"extrapolate": 0}, {"extrapolate": 2}, {"inherit_slope": False}, {"broyden": False},
                   {"secant": False}, {"warm_start": False}, {"prior_slope": False}, {"jvp": jvp}):
        result = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=7, prediction_type="v_prediction",
                                   **kwargs)
        assert result.converged and rel(result.sample, ref) < 1e-13, kwargs
    assert jvp.calls > 0


def textbook_window(model, x, grid, alphas, w, tol, sweeps):
    """Sliding windows from the formulas, one dict per point (python loops, x0-form DDIM step of helpers_core):
    evaluate the window; secant s and Broyden (u, v) from the last two evaluations, or s of the point before for a
    first evaluation (sqrt(1 - alpha) in the first sweep); recurrence with out + s d + u <v, d>; slide past the unmoved prefix + 1; entering points get
    the output line through the last two used outputs in lambda = log sqrt(a / (1 - a)), evaluated at their lambda."""
    n = len(grid) - 1
    lam = [0.5 * math.log(alpha_of(g, alphas) / (1 - alpha_of(g, alphas))) for g in grid[:n]]
    xs = [x.clone() for _ in range(n + 1)]
    pt = [dict() for _ in range(n)]  # out, at (state evaluated), s, u, v, used
    zero = torch.zeros(x.shape[0], 1, dtype=x.dtype)

    def run(first, last):
        for j in range(first, last):
            p = pt[j]
            d = xs[j] - p["at"] if "at" in p else torch.zeros_like(x)
            used = p["out"] + p.get("s", zero) * d
            if "u" in p:
                used = used + p["u"] * (p["v"] * d).sum(1, keepdim=True)
            p["used"] = used
            xs[j + 1] = ddim_step_ref(xs[j], used, alpha_of(grid[j], alphas), alpha_of(grid[j + 1], alphas), "epsilon")

    begin, end = 0, w
    residuals, slides = [], []
    for sweep in range(sweeps):
        if begin >= n:
            break
        for j in range(begin, end):
            out, p = model(xs[j], torch.full((x.shape[0],), grid[j], dtype=torch.long)), pt[j]
            if "at" in p:
                dx, dout = xs[j] - p["at"], out - p["out"]
                norm = (dx * dx).sum(1, keepdim=True)
                p["s"] = torch.where(norm > 0, (dout * dx).sum(1, keepdim=True) / norm.clamp_min(1e-300), 0.0)
                p["u"], p["v"] = dout - p["s"] * dx, torch.where(norm > 0, dx / norm.clamp_min(1e-300), 0.0)
            else:
                p.pop("u", None)
                p.pop("v", None)
                if sweep == 0:  # the prior slope: nothing measured yet
                    p["s"] = torch.full_like(zero, math.sqrt(1 - alpha_of(grid[j], alphas)))
                elif j > 0 and "s" in pt[j - 1]:
                    p["s"] = pt[j - 1]["s"]
            p["out"], p["at"] = out, xs[j].clone()
        old = [v.clone() for v in xs]
        run(begin, end)
        changes = [float((xs[j + 1] - old[j + 1]).abs().max()) for j in range(begin, end)]
        moved = [c > tol for c in changes]
        slide = moved.index(True) + 1 if True in moved else end - begin
        residuals.append(max(changes))
        slides.append(slide)
        begin, old_end, end = begin + slide, end, min(begin + slide + w, n)
        if end > old_end:
            m0, m1 = old_end - 1, old_end - 2
            for j in range(old_end, end):
                if m1 < 0:
                    out = pt[m0]["used"]
                else:
                    out = ((lam[j] - lam[m1]) * pt[m0]["used"] - (lam[j] - lam[m0]) * pt[m1]["used"]) / (lam[m0] - lam[m1])
                pt[j] = {"out": out}
            run(old_end, end)
    return xs[n], residuals, slides


@pytest.mark.parametrize("tol, steps, w, sweeps", [(0.0, 24, 20, 5), (1e-4, 40, 10, 10), (1e-2, 40, 10, 7)])
def test_sliding_iterates_match_a_textbook_loop(tol, steps, w, sweeps):
    """Every mechanism at once, short of convergence: windows that slide (data-dependent at tol > 0), warm
    starts extrapolated from the used outputs, inherited slopes, Broyden terms. Every sweep's largest change and
    slide (they see every window point) and the final point once the window reached the end."""
    timesteps, alphas = ddim_grid(GMM_CONFIG, steps)
    model = hard_mixture(alphas)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    final, residuals, slides = textbook_window(model, x, timesteps.tolist(), alphas, w, tol, sweeps)
    result = eps_picard_sample(model, x, timesteps, alphas, tol=tol, window=w, max_iters=sweeps)
    assert result.slides == slides
    assert result.residuals == pytest.approx(residuals, rel=1e-9, abs=1e-12)
    assert sum(slides[:-1]) + w >= steps, slides  # the window reached x_N: the final point is an iterate, not x_T
    assert not result.converged
    assert rel(result.sample, final) < 1e-9
    assert residuals[-1] > max(tol, 1e-6)  # still moving: not the fixed point in disguise


# ---- experimental options (reference only; the runtime runner refuses them): wide-baseline extrapolation.
# benchmarks/results/eps-picard-experiments says what it buys.

EXPERIMENTS = ({"extrapolate_span": 3}, {"extrapolate_span": 8}, {"extrapolate_span": 3, "extrapolate": 2},
               {"extrapolate_span": 4, "extrapolate_fit": "lsq"})


@pytest.mark.parametrize("kwargs", EXPERIMENTS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_experimental_options_keep_the_serial_fixed_point(kwargs, prediction_type):
    """tol = 0, float64, CFG: the serial sample, whatever the warm start did (it only initialises)."""
    steps = 30
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = guided_mlp(2)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = serial_ref(model, x, timesteps.tolist(), alphas, prediction_type)
    for window in (7, 12, steps):
        result = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=window,
                                   prediction_type=prediction_type, **kwargs)
        assert result.converged and rel(result.sample, ref) < 1e-13, (kwargs, window, rel(result.sample, ref))


def _lam(grid, alphas, j):
    a = alpha_of(grid[j], alphas)
    return 0.5 * math.log(a / (1 - a))


def _chain(x, outs, grid, alphas):
    state = x
    for j, out in enumerate(outs):
        state = ddim_step_ref(state, out, alpha_of(grid[j], alphas), alpha_of(grid[j + 1], alphas), "epsilon")
    return state


@pytest.mark.parametrize("fit, span", [("nodes", 1), ("nodes", 3), ("nodes", 6), ("lsq", 3)])
def test_wide_baseline_warm_start_by_hand(fit, span):
    """N = 8, w = 7, tol = 0, one sweep: sweep 1 evaluates out_j = model(x_T, t_j), j < 7, and slides by 1; the
    entering point 7 gets the line in lambda through out_6 and out_{6-k} (nodes), or the least-squares line
    through out_6 .. out_{6-k} (lsq). The sample is the DDIM chain through those outputs, and it differs from the
    adjacent-node default's (so the option is not ignored)."""
    steps = 8
    timesteps, alphas = ddim_grid(CONFIG, steps)
    grid = timesteps.tolist()
    model = RowwiseMLP(features=4)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    outs = [model(x, torch.full((2,), grid[j], dtype=torch.long)) for j in range(7)]
    lam = [_lam(grid, alphas, j) for j in range(steps)]
    if fit == "nodes":
        a, b = 6, 6 - span
        out7 = ((lam[7] - lam[b]) * outs[a] - (lam[7] - lam[a]) * outs[b]) / (lam[a] - lam[b])
    else:
        nodes = list(range(6 - span, 7))
        mean = sum(lam[m] for m in nodes) / len(nodes)
        slope = sum((lam[m] - mean) * outs[m] for m in nodes) / sum((lam[m] - mean) ** 2 for m in nodes)
        out7 = sum(outs[m] for m in nodes) / len(nodes) + slope * (lam[7] - mean)
    expected = _chain(x, outs + [out7], grid, alphas)
    kwargs = {"extrapolate_span": span, "extrapolate_fit": fit}
    kwargs["prior_slope"] = False  # sweep 1 propagates the outputs unmoved (the prior slope has its own tests)
    result = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=7, max_iters=1, **kwargs)
    assert result.slides == [1]
    assert rel(result.sample, expected) < 1e-13
    if (fit, span) != ("nodes", 1):
        default = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=7, max_iters=1, prior_slope=False)
        assert rel(default.sample, expected) > 1e-6


def test_rejects_bad_experimental_options():
    timesteps, alphas = ddim_grid(CONFIG, 10)
    x = torch.zeros(1, 4, dtype=torch.float64)
    model = RowwiseMLP(features=4)
    for kwargs in ({"extrapolate_span": 0}, {"extrapolate_span": 1.5}, {"extrapolate_fit": "cubic"},
                   {"extrapolate_fit": "lsq", "extrapolate": 2}, {"coarse_steps": 4}):
        with pytest.raises((ValueError, TypeError)):  # coarse_steps: the removed coarse warm start
            eps_picard_experiment(model, x, timesteps, alphas, **kwargs)


class _Linear:
    """out = A x + t c: linear in x, with d out / dx = A (not a multiple of I), row-wise."""

    def __init__(self, features: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.a = 0.3 * torch.randn(features, features, generator=gen, dtype=torch.float64)
        self.c = torch.randn(features, generator=gen, dtype=torch.float64)

    def __call__(self, x, t):
        return x @ self.a.T + t.to(x.dtype)[:, None] / 1000 * self.c

    def jvp(self, x, t, direction):
        return direction @ self.a.T


def test_newton_correction_is_exact_for_a_model_linear_in_x():
    """jvp = the exact derivative: one sweep over the whole trajectory (window = N) corrects every output
    evaluated at x_T to its value at this sweep's state, so the sample is serial's to rounding; the quasi-Newton
    model (prior slope, no secant yet) is not, so the hook is not ignored."""
    steps = 12
    timesteps, alphas = ddim_grid(CONFIG, steps)
    model = _Linear(5)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = serial_ref(model, x, timesteps.tolist(), alphas, "epsilon")
    newton = eps_picard_experiment(model, x, timesteps, alphas, tol=0.0, window=steps, max_iters=1, jvp=model.jvp)
    assert rel(newton.sample, ref) < 1e-12
    quasi = eps_picard_sample(model, x, timesteps, alphas, tol=0.0, window=steps, max_iters=1)
    assert rel(quasi.sample, ref) > 1e-4
    assert newton.sequential_calls == 1  # the derivative calls are not model calls of the sampler
