"""ParaDiGMS (srds_trt.samplers.paradigms): converges to the serial DDIM sample, counts what it says it counts."""

from __future__ import annotations

import math

import pytest
import torch

from srds_trt.models.analytic import hard_mixture
from srds_trt.samplers.guidance import classifier_free_guidance
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers.ddim import step_noise_variance
from srds_trt.samplers.paradigms import paradigms_sample
from srds_trt.samplers import SampleResult
from srds_trt.samplers import serial_sample

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
          "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0}


def grid(steps: int):
    return ddim_grid(CONFIG, steps)


def gmm_setup(steps: int, samples: int = 32, prediction_type: str = "epsilon"):
    timesteps, alphas = grid(steps)
    gmm = hard_mixture(alphas, prediction_type=prediction_type)
    x = torch.randn(samples, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return gmm, x, timesteps, alphas


class TinyNet(torch.nn.Module):
    """A small conv net with a timestep embedding and class conditioning: cond_model(x, t, cond)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 1, 3, padding=1)
        self.embed = torch.nn.Embedding(11, 8)
        self.time = torch.nn.Linear(2, 8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, x, t, cond):
        tt = t.float()[:, None] / 1000
        h = self.conv1(x) + (self.time(torch.cat([tt.sin(), tt.cos()], 1)) + self.embed(cond))[:, :, None, None]
        return 0.5 * torch.tanh(self.conv2(torch.tanh(h))) + 0.2 * x


class Counting:
    def __init__(self, inner):
        self.inner, self.rows, self.timesteps = inner, [], []

    def __call__(self, x, t):
        self.rows.append(x.shape[0])
        self.timesteps.append(t.clone())
        return self.inner(x, t)


@pytest.mark.parametrize("window", [1, 3, 7, None, 25])
def test_tol_zero_is_the_serial_sample_on_the_gmm(window):
    gmm, x, timesteps, alphas = gmm_setup(25)
    reference = serial_sample(gmm, x, timesteps, alphas)
    result = paradigms_sample(gmm, x, timesteps, alphas, tol=0.0, window=window)
    assert isinstance(result, SampleResult) and result.converged
    assert torch.allclose(result.sample, reference, atol=1e-10, rtol=0)
    assert result.window == (5 if window is None else window)
    assert sum(result.slides) == 25 and min(result.slides) >= 1


def test_full_window_picard_converges_in_fewer_sweeps_than_steps():
    gmm, x, timesteps, alphas = gmm_setup(100)
    reference = serial_sample(gmm, x, timesteps, alphas)
    result = paradigms_sample(gmm, x, timesteps, alphas, tol=1e-3, window=100)
    assert result.converged and result.iterations < 100
    assert (result.sample - reference).abs().max() < 1e-2


@pytest.mark.parametrize("tol, bound", [(1e-2, 3e-2), (1e-3, 3e-3)])
def test_tolerance_bounds_the_error_on_the_gmm(tol, bound):
    gmm, x, timesteps, alphas = gmm_setup(100)
    reference = serial_sample(gmm, x, timesteps, alphas)
    result = paradigms_sample(gmm, x, timesteps, alphas, tol=tol)
    assert result.converged and result.iterations < 100
    assert (result.sample - reference).abs().max() < bound


def test_tighter_tolerance_costs_more_and_errs_less():
    gmm, x, timesteps, alphas = gmm_setup(100)
    reference = serial_sample(gmm, x, timesteps, alphas)
    loose, tight = (paradigms_sample(gmm, x, timesteps, alphas, tol=tol) for tol in (1e-1, 1e-4))
    assert tight.iterations >= loose.iterations
    assert (tight.sample - reference).abs().max() <= (loose.sample - reference).abs().max()


def test_v_prediction_matches_serial():
    gmm, x, timesteps, alphas = gmm_setup(16, prediction_type="v_prediction")
    reference = serial_sample(gmm, x, timesteps, alphas, prediction_type="v_prediction")
    result = paradigms_sample(gmm, x, timesteps, alphas, prediction_type="v_prediction", tol=0.0, window=6)
    assert torch.allclose(result.sample, reference, atol=1e-10, rtol=0)


@pytest.mark.parametrize("window", [4, 30])
def test_small_net_with_guidance_converges_to_serial(window):
    torch.manual_seed(0)
    net = TinyNet().eval()
    labels = torch.tensor([3, 7, 1])
    model = classifier_free_guidance(net, cond=labels, uncond=torch.full_like(labels, 10), scale=3.0)
    timesteps, alphas = grid(30)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = serial_sample(model, x, timesteps, alphas)
        exact = paradigms_sample(model, x, timesteps, alphas, tol=0.0, window=window)
        loose = paradigms_sample(model, x, timesteps, alphas, tol=1e-3, window=window)
    assert exact.sample.dtype == x.dtype and exact.converged
    scale = float(reference.abs().max())
    assert (exact.sample - reference).abs().max() <= 1e-5 * max(1.0, scale)
    assert (loose.sample - reference).abs().max() <= 1e-2 * max(1.0, scale)
    assert loose.iterations < 30


def test_counts_match_a_counting_model():
    gmm, x, timesteps, alphas = gmm_setup(40, samples=3)
    model = Counting(gmm)
    result = paradigms_sample(model, x, timesteps, alphas, tol=1e-3, window=6)
    assert len(model.rows) == result.iterations == result.sequential_calls
    assert sum(model.rows) == result.model_evals
    assert all(rows % 3 == 0 and rows <= 6 * 3 for rows in model.rows)
    assert len(result.residuals) == len(result.slides) == result.iterations
    begin = 0
    for t, slide in zip(model.timesteps, result.slides):
        points = t.view(-1, 3)  # segment-major: row r belongs to image r % batch
        assert (points == points[:, :1]).all()  # one timestep per window point
        span = points.shape[0]
        assert points[:, 0].tolist() == timesteps[begin : begin + span].tolist()  # consecutive grid points
        begin += slide
    assert begin == 40


def test_max_iters_stops_early_and_reports_not_converged():
    gmm, x, timesteps, alphas = gmm_setup(25)
    result = paradigms_sample(gmm, x, timesteps, alphas, tol=0.0, window=5, max_iters=3)
    assert result.iterations == 3 and not result.converged
    nothing = paradigms_sample(gmm, x, timesteps, alphas, max_iters=0)
    assert nothing.iterations == nothing.model_evals == 0 and torch.equal(nothing.sample, x)


def test_window_is_capped_at_the_step_count():
    gmm, x, timesteps, alphas = gmm_setup(5)
    assert paradigms_sample(gmm, x, timesteps, alphas, window=100).window == 5


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"tol": -1.0}, {"tol": math.nan}, {"max_iters": -1},
                                    {"prediction_type": "sample"}])
def test_invalid_arguments_are_rejected(kwargs):
    gmm, x, timesteps, alphas = gmm_setup(5)
    with pytest.raises(ValueError):
        paradigms_sample(gmm, x, timesteps, alphas, **kwargs)


def test_step_noise_variance_is_the_ddpm_posterior_variance():
    timesteps, alphas_cumprod = grid(10)
    from srds_trt.samplers.ddim import alphas_at

    a = alphas_at(timesteps, alphas_cumprod)
    var = step_noise_variance(a)
    # The last step lands on the clean image (alpha = 1): no DDPM noise there, nor at the end point.
    assert var.shape == (11,) and (var[-2:] == 0).all() and (var[:-2] > 0).all()
    beta = 1 - a[0] / a[1]  # the step's effective beta
    assert torch.isclose(var[0], (1 - a[1]) / (1 - a[0]) * beta)
