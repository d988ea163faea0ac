"""Every sampler with the flow-matching Euler solver: serial against diffusers' scheduler on tiny SD3 and Flux
transformers, every parallel sampler at tol = 0 against serial, and iterates short of convergence against
textbook loops written here from the formulas (Euler x + (s_to - s_from) v; Parareal; sliding-window Picard)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_core import flow_euler_ref as euler_ref, parareal_iterates, single_thread  # noqa: F401  (fixture)
from srds_trt.samplers import eps_picard_sample
from srds_trt.samplers.guidance import conditional
from srds_trt.models.transformers import image_seq_len, load_transformer, pooled_size, text_length, transformer_model_fn
from srds_trt.samplers import paradigms_sample
from srds_trt.samplers import SAMPLERS, serial_sample, srds_sample
from srds_trt.samplers.flow import FlowMatchEuler, flow_scheduler, flow_sigmas, hard_flow_mixture, mu_for
from srds_trt.samplers.plan import block_bounds

pytestmark = pytest.mark.usefixtures("single_thread")

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
EULER = FlowMatchEuler()


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _transformer_case(kind: str, dtype: torch.dtype, steps: int):
    loaded = load_transformer(kind, tiny=True, seed=3, dtype=dtype)
    cond_model = transformer_model_fn(loaded)
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(2, *loaded.cond_shape, generator=gen, dtype=dtype)
    if kind == "flux":
        cond[:, text_length(loaded), pooled_size(loaded)] = 3.5  # the distilled guidance scale
    x = torch.randn(2, *loaded.sample_shape, generator=gen, dtype=dtype)
    scheduler = flow_scheduler(loaded.scheduler_config)
    seq = image_seq_len(loaded)
    kwargs = {"mu": mu_for(scheduler.config, seq)} if scheduler.config.use_dynamic_shifting else {}
    scheduler.set_timesteps(steps, **kwargs)
    sigmas = flow_sigmas(loaded.scheduler_config, steps, image_seq_len=seq)
    return loaded, conditional(cond_model, cond), x, scheduler, sigmas


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_serial_is_diffusers_scheduler_fp32(kind):
    """Step by step: diffusers' FlowMatchEulerDiscreteScheduler.step on the model called at scheduler.timesteps
    (Flux: / 1000, as its pipeline does) equals serial_sample's state after every step count."""
    loaded, model, x, scheduler, sigmas = _transformer_case(kind, torch.float32, 6)
    ref = x.clone()
    for k, t in enumerate(scheduler.timesteps):
        out = model(ref, sigmas[k].expand(2))  # the wrapper calls the transformer at t (next test)
        ref = scheduler.step(out, t, ref).prev_sample
        mine = serial_sample(model, x, sigmas[: k + 2], EULER)
        assert max_abs(mine, ref) <= 1e-5, (kind, k)
    assert max_abs(ref, x) > 0.1  # the model moved the state: not vacuous


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_wrapper_calls_the_transformer_at_the_schedulers_timesteps(kind):
    loaded, model, x, scheduler, sigmas = _transformer_case(kind, torch.float32, 4)
    seen = []
    hook = loaded.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                        with_kwargs=True)
    try:
        serial_sample(model, x, sigmas, EULER)
    finally:
        hook.remove()
    expected = scheduler.timesteps / 1000 if kind == "flux" else scheduler.timesteps
    assert torch.equal(torch.stack([s[0] for s in seen]), expected)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_serial_is_the_schedulers_euler_float64(kind):
    """float64: diffusers' step casts the state to float32, so the reference is its update written out, on its own
    float64-cast sigmas: prev = sample + (sigmas[i + 1] - sigmas[i]) * model_output."""
    loaded, model, x, scheduler, sigmas = _transformer_case(kind, torch.float64, 6)
    ref = x.clone()
    s = scheduler.sigmas.double()
    for k in range(6):
        ref = ref + (s[k + 1] - s[k]) * model(ref, s[k].expand(2))
        assert max_abs(serial_sample(model, x, sigmas[: k + 2], EULER), ref) <= 1e-12


def _mixture_case(steps: int, batch: int = 6):
    mix = hard_flow_mixture(dim=3)
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return mix, x, flow_sigmas(SD3_SCHEDULER, steps)


@pytest.mark.parametrize("steps", [1, 7, 28, 100])
def test_every_sampler_at_tol_zero_is_the_serial_flow_sample(steps):
    mix, x, sigmas = _mixture_case(steps)
    serial = serial_sample(mix, x, sigmas, EULER)
    assert max_abs(serial, euler_ref(mix, x, sigmas.tolist())) <= 1e-12
    for name, sampler in SAMPLERS.items():
        for options in ({}, {"pipelined": False}) if name == "srds" else ({},):
            result = sampler(mix, x, sigmas, EULER, tol=0.0, prediction_type="flow", **options)
            assert result.converged, name
            assert max_abs(result.sample, serial) <= 1e-9, (name, options)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_every_sampler_at_tol_zero_on_a_tiny_transformer(kind):
    _, model, x, _, sigmas = _transformer_case(kind, torch.float64, 9)
    serial = serial_sample(model, x, sigmas, EULER)
    for name, sampler in SAMPLERS.items():
        result = sampler(model, x, sigmas, EULER, tol=0.0)
        assert max_abs(result.sample, serial) <= 1e-9, name


def parareal_flow_ref(model, x, sigmas: list[float], bounds: list[int], iterations: int):
    return parareal_iterates(x, bounds, iterations, lambda u, steps: euler_ref(model, u, [sigmas[i] for i in steps]))


@pytest.mark.parametrize("steps, num_blocks", [(10, None), (28, 5), (26, 4)])
def test_srds_iterates_are_textbook_parareal(steps, num_blocks):
    mix, x, sigmas = _mixture_case(steps)
    bounds = list(block_bounds(steps, num_blocks))
    blocks = len(bounds) - 1
    ref = parareal_flow_ref(mix, x, sigmas.tolist(), bounds, blocks)
    samples = []
    for k in range(blocks + 1):
        for pipelined in (False, True):
            res = srds_sample(mix, x, sigmas, EULER, tol=0.0, num_blocks=num_blocks, max_iters=k, pipelined=pipelined)
            assert res.iterations == k
            assert max_abs(res.sample, ref[k][blocks]) <= 1e-10, (k, pipelined)
        samples.append(res.sample)
    assert max_abs(samples[0], samples[-1]) > 1e-2


def paradigms_flow_ref(model, x, sigmas: list[float], w: int, tol: float, sweeps: int):
    """ParaDiGMS from the formulas: window Picard sums of Euler drifts, per-point threshold tol^2 * var_j with
    var_j the DDPM step variance of the equivalent variance-preserving process (alpha = (1-s)^2 / r^2, r^2 =
    (1-s)^2 + s^2) in units of r_{j+1}^2."""
    n = len(sigmas) - 1
    r2 = [(1 - s) ** 2 + s**2 for s in sigmas]
    a = [(1 - s) ** 2 / q for s, q in zip(sigmas, r2)]
    var = [(1 - a[j + 1]) / (1 - a[j]) * (1 - a[j] / a[j + 1]) * r2[j + 1] for j in range(n)] + [0.0]
    xs = [x.clone() for _ in range(n + 1)]
    begin, end = 0, w
    slides = []
    for _ in range(sweeps):
        if begin >= n:
            break
        drifts = [(sigmas[j + 1] - sigmas[j]) * model(xs[j], torch.full((x.shape[0],), sigmas[j], dtype=torch.float64))
                  for j in range(begin, end)]
        new = []
        acc = xs[begin]
        for d in drifts:
            acc = acc + d
            new.append(acc)
        moved = [bool((((nw - xs[j + 1]) ** 2).mean(1) > tol**2 * var[j + 1]).any())
                 for nw, j in zip(new, range(begin, end))]
        for nw, j in zip(new, range(begin, end)):
            xs[j + 1] = nw
        slide = min((moved.index(True) + 1) if True in moved else end - begin, w)
        slides.append(min(slide, n - begin))
        begin, old_end = begin + slide, end
        end = min(begin + w, n)
        for j in range(old_end + 1, end + 1):
            xs[j] = xs[old_end].clone()
    return xs[n], slides


@pytest.mark.parametrize("tol, w, sweeps", [(0.0, 6, 4), (1e-3, 5, 6), (3e-2, 8, 5)])
def test_paradigms_iterates_are_textbook(tol, w, sweeps):
    mix, x, sigmas = _mixture_case(20, batch=3)
    ref, slides = paradigms_flow_ref(mix, x, sigmas.tolist(), w, tol, sweeps)
    result = paradigms_sample(mix, x, sigmas, EULER, tol=tol, window=w, max_iters=sweeps)
    assert max_abs(result.sample, ref) <= 1e-10
    assert result.slides == slides
    assert not result.converged


def test_paradigms_slides_follow_the_flow_thresholds():
    """The per-point thresholds decide the slides: across tolerances they must agree with the textbook's."""
    mix, x, sigmas = _mixture_case(40, batch=4)
    distinct = set()
    for tol in (1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5):
        _, slides = paradigms_flow_ref(mix, x, sigmas.tolist(), 8, tol, 40)
        result = paradigms_sample(mix, x, sigmas, EULER, tol=tol, window=8)
        assert result.slides == slides, tol
        distinct.add(tuple(slides))
    assert len(distinct) >= 4  # the thresholds really decide


def eps_picard_flow_ref(model, x, sigmas: list[float], w: int, tol: float, sweeps: int):
    """eps-Picard from the formulas with the flow solver: Euler recurrence, prior slope (2s - 1) / ((1-s)^2 + s^2)
    in the first sweep, secant + Broyden from the last two evaluations, the neighbour's slope for a first
    evaluation, entering points warm-started by the line through the last two used outputs in sigma."""
    n = len(sigmas) - 1
    xs = [x.clone() for _ in range(n + 1)]
    pt = [dict() for _ in range(n)]
    zero = torch.zeros(x.shape[0], 1, dtype=x.dtype)

    def run(first, last):
        for j in range(first, last):
            p = pt[j]
            d = xs[j] - p["at"] if "at" in p else torch.zeros_like(x)
            used = p["out"] + p.get("s", zero) * d
            if "u" in p:
                used = used + p["u"] * (p["v"] * d).sum(1, keepdim=True)
            p["used"] = used
            xs[j + 1] = xs[j] + (sigmas[j + 1] - sigmas[j]) * used

    begin, end = 0, w
    for sweep in range(sweeps):
        if begin >= n:
            break
        for j in range(begin, end):
            out, p = model(xs[j], torch.full((x.shape[0],), sigmas[j], dtype=torch.float64)), pt[j]
            if "at" in p:
                dx, dout = xs[j] - p["at"], out - p["out"]
                norm = (dx * dx).sum(1, keepdim=True)
                p["s"] = torch.where(norm > 0, (dout * dx).sum(1, keepdim=True) / norm.clamp_min(1e-300), 0.0)
                p["u"], p["v"] = dout - p["s"] * dx, torch.where(norm > 0, dx / norm.clamp_min(1e-300), 0.0)
            else:
                p.pop("u", None)
                p.pop("v", None)
                if sweep == 0:
                    s = sigmas[j]
                    p["s"] = torch.full_like(zero, (2 * s - 1) / ((1 - s) ** 2 + s**2))
                elif j > 0 and "s" in pt[j - 1]:
                    p["s"] = pt[j - 1]["s"]
            p["out"], p["at"] = out, xs[j].clone()
        old = [v.clone() for v in xs]
        run(begin, end)
        moved = [float((xs[j + 1] - old[j + 1]).abs().max()) > tol for j in range(begin, end)]
        slide = moved.index(True) + 1 if True in moved else end - begin
        begin, old_end, end = begin + slide, end, min(begin + slide + w, n)
        if end > old_end:
            m0, m1 = old_end - 1, old_end - 2
            for j in range(old_end, end):
                lam = sigmas
                out = pt[m0]["used"] if m1 < 0 else (
                    ((lam[j] - lam[m1]) * pt[m0]["used"] - (lam[j] - lam[m0]) * pt[m1]["used"]) / (lam[m0] - lam[m1]))
                pt[j] = {"out": out}
            run(old_end, end)
    return xs[n]


@pytest.mark.parametrize("tol, w, sweeps", [(0.0, 6, 4), (1e-4, 5, 8), (1e-2, 8, 5)])
def test_eps_picard_iterates_are_textbook(tol, w, sweeps):
    mix, x, sigmas = _mixture_case(24, batch=3)
    ref = eps_picard_flow_ref(mix, x, sigmas.tolist(), w, tol, sweeps)
    result = eps_picard_sample(mix, x, sigmas, EULER, tol=tol, window=w, max_iters=sweeps)
    assert max_abs(result.sample, ref) <= 1e-9
    assert not result.converged


def test_flow_needs_the_flow_solver():
    mix, x, sigmas = _mixture_case(5)
    with pytest.raises(ValueError, match="FlowMatchEuler"):
        serial_sample(mix, x, sigmas, torch.ones(1000), prediction_type="flow")
    with pytest.raises(ValueError, match="solver"):
        serial_sample(mix, x, sigmas, EULER, solver="ddim")
    with pytest.raises(ValueError, match="prediction_type"):
        srds_sample(mix, x, sigmas, EULER, prediction_type="v_prediction")
    assert math.isfinite(float(serial_sample(mix, x, sigmas, EULER, solver="flow-euler").sum()))
