"""Classifier-free guidance wrapper: one doubled call, [uncond; cond] layout, segment-major conditioning."""

from __future__ import annotations

import pytest
import torch

from helpers_core import SD_CONFIG, RowwiseMLP, max_abs
from helpers_core import single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.guidance import classifier_free_guidance, conditional, tile_rows
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers import serial_sample, srds_sample

pytestmark = pytest.mark.usefixtures("single_thread")

FEATURES = 5
EMBED = 3


class CondMLP:
    """cond_model(x, t, cond): output depends nonlinearly on each row's own conditioning. Records calls."""

    def __init__(self, seed: int = 0):
        self.base = RowwiseMLP(features=FEATURES, seed=seed)
        gen = torch.Generator().manual_seed(seed + 100)
        self.wc = torch.randn(EMBED, FEATURES, generator=gen, dtype=torch.float64)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, cond):
        assert cond.shape[0] == x.shape[0] == t.shape[0]
        self.calls.append((x.shape[0], t.clone(), cond.clone()))
        return self.base(x, t) + torch.tanh(cond.to(x.dtype) @ self.wc.to(x.dtype)) * (1 + x)


def _data(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, FEATURES, generator=gen, dtype=torch.float64)
    cond = torch.randn(batch, EMBED, generator=gen, dtype=torch.float64)
    uncond = torch.zeros(batch, EMBED, dtype=torch.float64)
    return x, cond, uncond


def test_one_call_with_doubled_rows_in_uncond_cond_layout():
    batch, segments = 2, 3
    x, cond, uncond = _data(batch)
    uncond = uncond + 0.25  # distinguishable from zero rows
    rows = torch.randn(batch * segments, FEATURES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([900, 900, 500, 500, 100, 100])
    inner = CondMLP()
    scale = 7.5
    out = classifier_free_guidance(inner, cond, uncond, scale)(rows, t)
    assert len(inner.calls) == 1
    n, t_seen, c_seen = inner.calls[0]
    assert n == 2 * rows.shape[0]
    assert torch.equal(t_seen, torch.cat([t, t]))
    # [uncond rows; cond rows], each tiled segment-major: row r belongs to image r % batch
    assert torch.equal(c_seen[: rows.shape[0]], uncond.repeat(segments, 1))
    assert torch.equal(c_seen[rows.shape[0]:], cond.repeat(segments, 1))
    for r in range(rows.shape[0]):
        assert torch.equal(c_seen[rows.shape[0] + r], cond[r % batch])
    # equals two separate calls combined
    probe = CondMLP()
    u = probe(rows, t, uncond.repeat(segments, 1))
    c = probe(rows, t, cond.repeat(segments, 1))
    assert max_abs(out, u + scale * (c - u)) <= 1e-12
    assert max_abs(out, c) > 1e-3  # guidance did something


def test_scale_one_is_a_single_undoubled_conditional_call():
    x, cond, uncond = _data(3)
    inner = CondMLP()
    t = torch.full((6,), 700)
    rows = torch.cat([x, x * 0.5])
    out = classifier_free_guidance(inner, cond, uncond, 1.0)(rows, t)
    assert len(inner.calls) == 1 and inner.calls[0][0] == rows.shape[0]
    assert torch.equal(inner.calls[0][2], tile_rows(cond, 6))
    assert max_abs(out, CondMLP()(rows, t, cond.repeat(2, 1))) == 0.0


def test_scale_zero_is_the_unconditional_model():
    x, cond, uncond = _data(2)
    t = torch.full((2,), 300)
    out = classifier_free_guidance(CondMLP(), cond, uncond, 0.0)(x, t)
    assert max_abs(out, CondMLP()(x, t, uncond)) <= 1e-12


def test_mismatched_shapes_and_ragged_rows_raise():
    x, cond, uncond = _data(2)
    with pytest.raises(ValueError, match="same shape"):
        classifier_free_guidance(CondMLP(), cond, uncond[:1], 3.0)
    with pytest.raises(ValueError, match="same shape"):
        classifier_free_guidance(CondMLP(), cond, torch.zeros(2, EMBED + 1), 3.0)
    with pytest.raises(ValueError, match="segments"):
        tile_rows(cond, 3)  # 3 rows are not whole segments of 2 images
    with pytest.raises(ValueError):
        classifier_free_guidance(CondMLP(), cond, uncond, 3.0)(torch.zeros(3, FEATURES, dtype=torch.float64), torch.zeros(3, dtype=torch.long))


def test_tile_rows_is_segment_major():
    per_image = torch.arange(6.0).view(3, 2)
    tiled = tile_rows(per_image, 12)
    assert tiled.shape == (12, 2)
    for r in range(12):
        assert torch.equal(tiled[r], per_image[r % 3])


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("n, batch", [(10, 2), (25, 3), (7, 1)])
def test_srds_with_cfg_at_tol_zero_equals_serial_with_cfg(n, batch, pipelined):
    grid, alphas = ddim_grid(SD_CONFIG, n)
    x, cond, uncond = _data(batch, seed=n)
    inner = CondMLP(seed=n)
    model = classifier_free_guidance(inner, cond, uncond, 5.0)
    serial = serial_sample(model, x, grid, alphas)
    inner.calls.clear()
    res = srds_sample(model, x, grid, alphas, tol=0.0, pipelined=pipelined)
    assert max_abs(res.sample, serial) <= 1e-9
    # one inner call per tick, always doubled, conditioning always matching each row's image
    assert len(inner.calls) == res.sequential_calls
    assert sum(c[0] for c in inner.calls) == 2 * res.model_evals
    for rows, _, c in inner.calls:
        half = rows // 2
        assert torch.equal(c[:half], uncond.repeat(half // batch, 1))
        assert torch.equal(c[half:], cond.repeat(half // batch, 1))
    # the conditioning matters: per-image conditioning swapped between images changes the sample
    if batch > 1:
        swapped = classifier_free_guidance(CondMLP(seed=n), cond.flip(0), uncond, 5.0)
        assert max_abs(srds_sample(swapped, x, grid, alphas, tol=0.0).sample, serial) > 1e-3
        # ... and equals the serial sample of the images whose conditioning it received
        per_image = torch.cat([
            serial_sample(classifier_free_guidance(CondMLP(seed=n), cond[i: i + 1], uncond[i: i + 1], 5.0), x[j: j + 1], grid, alphas)
            for j, i in enumerate(range(batch - 1, -1, -1))
        ])
        assert max_abs(srds_sample(swapped, x, grid, alphas, tol=0.0).sample, per_image) <= 1e-9


def test_conditional_wrapper_without_guidance():
    grid, alphas = ddim_grid(SD_CONFIG, 9)
    x, cond, _ = _data(2)
    model = conditional(CondMLP(), cond)
    serial = serial_sample(model, x, grid, alphas)
    res = srds_sample(model, x, grid, alphas, tol=0.0, pipelined=True)
    assert max_abs(res.sample, serial) <= 1e-9
