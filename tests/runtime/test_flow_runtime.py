"""The runtime runners with the flow-matching Euler solver (CPU, eager programs, float64): every SRDS boundary of
every iterate against a textbook flow Parareal, the serial runner against Euler, and the window runners against
the reference samplers short of convergence and at tol = 0."""

from __future__ import annotations

import pytest
import torch

from helpers_core import flow_euler_ref, parareal_iterates, single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.guidance import classifier_free_guidance
from srds_trt.runtime import SRDSRunner
from srds_trt.runtime.engines import EngineSpec, TorchEngine
from srds_trt.runtime.serial_runner import SerialRunner
from srds_trt.runtime.window.runner import WindowRunner
from srds_trt.samplers import SAMPLERS, serial_sample
from srds_trt.samplers.flow import FlowMatchEuler, flow_sigmas

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = EngineSpec(sample_shape=(2, 2, 2), cond_shape=(), cond_dtype=torch.long, dtype=torch.float64)
STEPS, BLOCKS, BATCH, SCALE = 16, 4, 2, 3.0
LABELS, NULL = torch.tensor([1, 6]), torch.full((BATCH,), 10)
EULER = FlowMatchEuler()
SIGMAS = flow_sigmas({"num_train_timesteps": 1000, "shift": 3.0}, STEPS)

_GEN = torch.Generator().manual_seed(0)
W1 = torch.randn(9, 24, generator=_GEN, dtype=torch.float64) / 2
W2 = torch.randn(24, 8, generator=_GEN, dtype=torch.float64) / 4
EMB = torch.randn(11, 8, generator=_GEN, dtype=torch.float64) / 3


def cond_model(x, sigma, c):
    """Row-wise nonlinear conditional velocity field in float64 (sigma in [0, 1])."""
    h = torch.cat([x.flatten(1).double(), sigma.double()[:, None]], 1)
    return ((torch.tanh(h @ W1) @ W2) + EMB[c.long()] - 0.6 * x.flatten(1)).view_as(x).to(x.dtype)


def x_T(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, *SPEC.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


MODEL = classifier_free_guidance(cond_model, LABELS, NULL, SCALE)


def euler(u, sigmas):
    return flow_euler_ref(MODEL, u, sigmas)


def textbook_parareal(x, bounds):
    s = SIGMAS.tolist()
    return parareal_iterates(x, bounds, len(bounds) - 1, lambda u, steps: euler(u, [s[i] for i in steps]))


def engine():
    return TorchEngine(cond_model, SPEC, max_rows=64)


@pytest.mark.parametrize("coarse", ["merged", "separate"])
@pytest.mark.parametrize("pipelined", [False, True])
def test_srds_runner_every_boundary_of_every_iterate_is_textbook(coarse, pipelined):
    runner = SRDSRunner(engine(), batch=BATCH, timesteps=SIGMAS, alphas_cumprod=EULER, num_blocks=BLOCKS,
                        pipelined=pipelined, coarse=coarse, state_dtype=torch.float64)
    result = runner.run(x_T(0), LABELS, NULL, guidance_scale=SCALE, tol=0.0)
    ref = textbook_parareal(x_T(0), [0, 4, 8, 12, 16])
    assert result.iterations == BLOCKS
    for p in range(BLOCKS + 1):
        for b in range(1, BLOCKS + 1):
            torch.testing.assert_close(runner.boundary(p, b), ref[p][b], rtol=0, atol=1e-10)
    assert float((ref[0][BLOCKS] - ref[BLOCKS][BLOCKS]).abs().max()) > 1e-3  # iterates differ: not vacuous


@pytest.mark.parametrize("k", [1, 2, 3])
def test_srds_runner_short_of_convergence_is_the_reference(k):
    runner = SRDSRunner(engine(), batch=BATCH, timesteps=SIGMAS, alphas_cumprod=EULER, num_blocks=BLOCKS,
                        max_iters=k, state_dtype=torch.float64)
    got = runner.run(x_T(2), LABELS, NULL, guidance_scale=SCALE, tol=0.0)
    ref = SAMPLERS["srds"](MODEL, x_T(2), SIGMAS, EULER, tol=0.0, num_blocks=BLOCKS, max_iters=k)
    assert got.iterations == ref.iterations == k
    torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=1e-12)
    assert got.residuals == pytest.approx(ref.residuals, abs=1e-12)


def test_serial_runner_is_euler():
    runner = SerialRunner(engine(), batch=BATCH, timesteps=SIGMAS, alphas_cumprod=EULER, state_dtype=torch.float64)
    got = runner.run(x_T(3), LABELS, NULL, guidance_scale=SCALE)
    torch.testing.assert_close(got, euler(x_T(3), SIGMAS.tolist()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", ["paradigms", "eps-picard"])
@pytest.mark.parametrize("sweeps", [1, 3, 6, None])
def test_window_runner_is_the_reference_sweep_for_sweep(sampler, sweeps):
    """Every sweep count short of convergence (and to the end at tol = 0, where it is the serial sample)."""
    runner = WindowRunner(engine(), sampler=sampler, batch=BATCH, timesteps=SIGMAS, alphas_cumprod=EULER, window=5,
                          state_dtype=torch.float64)
    tol = 0.0 if sweeps is None else 1e-3
    got = runner.run(x_T(4), LABELS, NULL, guidance_scale=SCALE, tol=tol, max_iters=sweeps)
    from srds_trt.samplers import eps_picard_sample
    from srds_trt.samplers import paradigms_sample

    reference = {"paradigms": paradigms_sample, "eps-picard": eps_picard_sample}[sampler]
    ref = reference(MODEL, x_T(4), SIGMAS, EULER, tol=got.accept_tol if got.accept_tol is not None else tol,
                    window=5, max_iters=sweeps)
    if sweeps is None:  # tol = 0: the serial sample
        assert got.converged
        torch.testing.assert_close(got.sample, serial_sample(MODEL, x_T(4), SIGMAS, EULER), rtol=0, atol=1e-9)
        if sampler == "eps-picard":
            return  # at tol = 0 rounding decides eps-Picard's slides (test_runtime_window.py says why)
    assert got.slides == ref.slides
    torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=1e-10)
    assert got.residuals == pytest.approx(ref.residuals, abs=1e-10)
