"""serial_sample and the timestep grid against diffusers' own DDIMScheduler (eta = 0), in float64.

diffusers keeps alphas_cumprod in float32 and takes its square roots in float32 before promoting to the
sample's dtype, which alone would leave ~1e-7 relative differences. To compare the algorithms (not float32
rounding) the scheduler's tables are upcast to float64 before stepping; ddim_grid returns the very same
float32 table upcast, so both sides see identical alphas.
"""

from __future__ import annotations

import pytest
import torch

from helpers_core import LINEAR_CONFIG, SD_CONFIG, RowwiseMLP, max_abs, serial_ref
from helpers_core import single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers import serial_sample, srds_sample
from srds_trt.samplers.ddim import alphas_at, ddim_coefficients

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4)  # [images, channels, h, w]

pytestmark = pytest.mark.usefixtures("single_thread")


def _scheduler(config: dict, num_steps: int, prediction_type: str):
    sched = diffusers.DDIMScheduler.from_config(dict(config, prediction_type=prediction_type))
    sched.set_timesteps(num_steps)
    sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0 if sched.config.set_alpha_to_one else float(sched.alphas_cumprod[0]),
                                             dtype=torch.float64)
    return sched


def _diffusers_sample(model, x: torch.Tensor, sched) -> torch.Tensor:
    for t in sched.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = sched.step(out, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 36, 100])  # 3, 7, 36 do not divide 1000
def test_serial_sample_equals_diffusers_ddim_sd_leading(num_steps, prediction_type):
    grid, alphas = ddim_grid(SD_CONFIG, num_steps)
    sched = _scheduler(SD_CONFIG, num_steps, prediction_type)
    assert grid[:-1].tolist() == sched.timesteps.tolist()
    model = RowwiseMLP(features=48, seed=num_steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(num_steps), dtype=torch.float64)
    expected = _diffusers_sample(model, x, sched)
    got = serial_sample(model, x, grid, alphas, prediction_type=prediction_type)
    assert got.dtype == torch.float64 and got.shape == x.shape
    assert max_abs(got, expected) <= 1e-9 * max(1.0, float(expected.abs().max()))
    # and the sample actually moved: a no-op sampler would not pass by accident
    assert max_abs(got, x) > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [7, 25])
def test_srds_exact_equals_diffusers_ddim(num_steps, prediction_type):
    """SRDS at tol=0 reproduces diffusers' serial DDIM too (epsilon and v-prediction)."""
    grid, alphas = ddim_grid(SD_CONFIG, num_steps)
    sched = _scheduler(SD_CONFIG, num_steps, prediction_type)
    model = RowwiseMLP(features=48, seed=1)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = _diffusers_sample(model, x, sched)
    for pipelined in (False, True):
        res = srds_sample(model, x, grid, alphas, prediction_type=prediction_type, tol=0.0, pipelined=pipelined)
        assert res.converged and res.iterations <= res.num_blocks
        assert max_abs(res.sample, expected) <= 1e-9 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize(
    "config",
    [
        SD_CONFIG,
        dict(SD_CONFIG, steps_offset=0),
        LINEAR_CONFIG,
        dict(LINEAR_CONFIG, timestep_spacing="trailing"),
        dict(LINEAR_CONFIG, timestep_spacing="linspace"),
    ],
    ids=["sd-leading-offset1", "leading-offset0", "linear", "trailing", "linspace"],
)
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 10, 25, 36, 50, 100])
def test_ddim_grid_is_scheduler_timesteps_plus_the_end(config, num_steps):
    try:
        grid, alphas = ddim_grid(config, num_steps)
    except ValueError:
        # the one fix of test_other_spacings_follow_diffusers_or_are_refused that refuses such configs
        assert config.get("timestep_spacing", "leading") != "leading"
        return
    sched = diffusers.DDIMScheduler.from_config(config)
    sched.set_timesteps(num_steps)
    assert grid.dtype == torch.long and grid.shape == (num_steps + 1,)
    assert grid[:-1].tolist() == sched.timesteps.tolist()
    assert bool((grid[1:] < grid[:-1]).all())
    assert alphas.dtype == torch.float64
    assert torch.equal(alphas, sched.alphas_cumprod.to(torch.float64))
    # The end is where DDIMScheduler.step lands from the last timestep; below 0 it is the clean end (-1).
    prev = int(sched.timesteps[-1]) - sched.config.num_train_timesteps // num_steps
    assert int(grid[-1]) == (-1 if prev < 0 else prev)


@pytest.mark.parametrize("num_steps", [1, 3, 10, 36, 100, 500])
def test_ddim_grid_last_entry_is_clean_end_with_set_alpha_to_one(num_steps):
    grid, alphas = ddim_grid(SD_CONFIG, num_steps)
    assert int(grid[-1]) == -1
    assert float(alphas_at(grid[-1:], alphas)) == 1.0


def test_ddim_grid_without_set_alpha_to_one_ends_on_alphas_cumprod_0():
    grid, alphas = ddim_grid(dict(SD_CONFIG, set_alpha_to_one=False), 10)
    assert int(grid[-1]) == 0
    # ...and serial_sample then equals diffusers, whose final alpha is alphas_cumprod[0]
    config = dict(SD_CONFIG, set_alpha_to_one=False)
    sched = _scheduler(config, 10, "epsilon")
    model = RowwiseMLP(features=48, seed=3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert max_abs(serial_sample(model, x, grid, alphas), _diffusers_sample(model, x, sched)) <= 1e-9


def test_ddim_grid_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="num_steps"):
        ddim_grid(SD_CONFIG, 0)
    with pytest.raises(ValueError, match="num_steps"):
        ddim_grid(SD_CONFIG, -3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_coefficients_match_the_x0_eps_form(prediction_type):
    """c_x * x + c_out * out equals 'predict x0 and eps, then re-noise' for random alpha pairs (incl. the clean end)."""
    gen = torch.Generator().manual_seed(0)
    a_from = torch.rand(50, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    a_to = torch.cat([torch.ones(5, dtype=torch.float64), a_from[5:] + (1 - a_from[5:]) * torch.rand(45, generator=gen, dtype=torch.float64)])
    x = torch.randn(50, generator=gen, dtype=torch.float64)
    out = torch.randn(50, generator=gen, dtype=torch.float64)
    c_x, c_out = ddim_coefficients(a_from, a_to, prediction_type)
    from helpers_core import ddim_step_ref

    expected = torch.stack([ddim_step_ref(x[i], out[i], float(a_from[i]), float(a_to[i]), prediction_type) for i in range(50)])
    assert torch.allclose(c_x * x + c_out * out, expected, rtol=0, atol=1e-12)


def test_v_prediction_mixture_gives_the_same_sample_as_epsilon_mixture():
    """The analytic GMM in v-parametrisation is the same ODE: serial samples must agree (checks both the
    v-conversion of the model and the v-coefficients of the solver)."""
    from helpers_core import gaussian_mixture

    grid, alphas = ddim_grid(SD_CONFIG, 20)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = serial_sample(gaussian_mixture(alphas, 3, 0), x, grid, alphas, prediction_type="epsilon")
    v = serial_sample(gaussian_mixture(alphas, 3, 0, prediction_type="v_prediction"), x, grid, alphas, prediction_type="v_prediction")
    ref = serial_ref(gaussian_mixture(alphas, 3, 0), x, grid.tolist(), alphas)
    assert max_abs(eps, ref) <= 1e-9
    assert max_abs(v, eps) <= 1e-8
    # wrong parametrisation gives a different sample: the check above can fail
    wrong = serial_sample(gaussian_mixture(alphas, 3, 0, prediction_type="v_prediction"), x, grid, alphas, prediction_type="epsilon")
    assert max_abs(wrong, eps) > 1e-2


@pytest.mark.parametrize(
    "spacing, num_steps", [("trailing", 7), ("trailing", 30), ("linspace", 10), ("linspace", 7)]
)
def test_off_grid_spacings_chain_the_grid(spacing, num_steps):
    """DDIMScheduler.step lands on t_i - T // N, which for "linspace" (and "trailing" when N does not divide T) is
    not the next timestep: diffusers' steps leave its own grid there. srds_trt documents that it chains the grid
    (t_i -> t_{i+1}, noise_schedule.py): check it equals the textbook DDIM on that grid, and that diffusers really
    differs (so the documentation is about a real case), while the timesteps themselves are diffusers'.
    """
    config = dict(LINEAR_CONFIG, timestep_spacing=spacing)
    grid, alphas = ddim_grid(config, num_steps)
    sched = _scheduler(config, num_steps, "epsilon")
    assert grid[:-1].tolist() == sched.timesteps.tolist()
    model = RowwiseMLP(features=48, seed=0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = serial_sample(model, x, grid, alphas)
    assert max_abs(got, serial_ref(model, x, grid.tolist(), alphas)) <= 1e-9
    assert max_abs(got, _diffusers_sample(model, x, sched)) > 1e-6


def test_grid_finer_than_training_schedule_is_fractional_and_exact_for_srds():
    grid, alphas = ddim_grid(SD_CONFIG, 1500)
    assert grid.dtype == torch.float64 and grid[-1] == -1 and len(grid) == 1501
    assert bool((grid[1:] < grid[:-1]).all()) and float(grid[0]) == 999.0
    a = alphas_at(grid, alphas)
    assert bool((a[1:] > a[:-1]).all())  # monotone in time, interpolated between table entries
    assert float(alphas_at(torch.tensor([3.0]), alphas)) == float(alphas[3])
    from srds_trt.models.analytic import hard_mixture

    model = hard_mixture(alphas)  # takes fractional timesteps: its alphas come from alphas_at
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = serial_sample(model, x, grid, alphas)
    got = srds_sample(model, x, grid, alphas, tol=0.0, pipelined=True)
    assert max_abs(got.sample, ref) <= 1e-9
