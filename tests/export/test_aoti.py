"""The AOTInductor side of the export (export/aoti.py): the row range the C++ runtime relies on, the package
cache, and sampler.json. Compiling itself is exercised by tests/cpp/ (cached)."""
from __future__ import annotations

import json

import pytest
import torch

from srds_trt.export import aoti
from srds_trt.export.onnx_export import UNetForExport
from srds_trt.models.loading import load_unet
from srds_trt.samplers.stopping import (DEFAULT_TOL, FAST_CONTRACTION, INTERIOR_CONTRACTION, INTERIOR_WEIGHT,
                                       WINDOW_ACCEPT)


@pytest.fixture(scope="module")
def digits_module():
    loaded = load_unet("digits")
    return loaded, UNetForExport(loaded.unet, "class").eval()


def export_rows(module, max_rows):
    rows = torch.export.Dim("rows", min=1, max=max_rows)
    spec = aoti.PackageSpec("w", "fp32", "class", (1, 16, 16), ())
    return torch.export.export(module, spec.example(), dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))


def test_diffusers_upsample_branch_is_the_63_row_guard_and_the_patch_removes_it(digits_module):
    _, module = digits_module
    with pytest.raises(Exception, match="63"):
        export_rows(module, 256)  # diffusers' `if hidden_states.shape[0] >= 64` specialises the graph
    with aoti.batch_oblivious_upsampling(module):
        program = export_rows(module, 256)
    assert "forward" not in vars(module.unet.up_blocks[0].upsamplers[0])  # restored afterwards
    for rows in (1, 63, 64, 130):  # both sides of the old branch, and rows = 1
        x = torch.randn(rows, 1, 16, 16, generator=torch.Generator().manual_seed(rows))
        t, c = torch.linspace(999, 0, rows), torch.arange(rows) % 11
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, t, c), module(x, t, c), rtol=0, atol=1e-5)


def test_package_key_covers_what_changes_the_code():
    base = aoti.PackageSpec("w", "fp32", "class", (1, 16, 16), ())
    keys = {base.key(), aoti.PackageSpec("w2", "fp32", "class", (1, 16, 16), ()).key(),
            aoti.PackageSpec("w", "fp16", "class", (1, 16, 16), ()).key(),
            aoti.PackageSpec("w", "fp32", "class", (1, 32, 32), ()).key(),
            aoti.PackageSpec("w", "fp32", "class", (1, 16, 16), (), max_rows=64).key()}
    assert len(keys) == 5


def test_compile_is_cached_by_key(tmp_path, monkeypatch, digits_module):
    _, module = digits_module
    calls = []

    def fake_compile(program, package_path):
        calls.append(package_path)
        with open(package_path, "wb") as handle:
            handle.write(b"package")
        return package_path

    monkeypatch.setattr(torch.export, "export", lambda *a, **k: "program")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    spec = aoti.PackageSpec("w", "fp32", "class", (1, 16, 16), ())
    first = aoti.compile_package(module, spec, tmp_path / "a.pt2", cache_dir=tmp_path / "cache")
    second = aoti.compile_package(module, spec, tmp_path / "b.pt2", cache_dir=tmp_path / "cache")
    assert (first[1], second[1]) == (False, True) and len(calls) == 1
    assert (tmp_path / "b.pt2").read_bytes() == b"package"
    other = aoti.PackageSpec("w2", "fp32", "class", (1, 16, 16), ())
    assert aoti.compile_package(module, other, tmp_path / "c.pt2", cache_dir=tmp_path / "cache")[1] is False


def test_compile_failure_is_one_line(tmp_path, monkeypatch, digits_module):
    _, module = digits_module

    def broken(*args, **kwargs):
        raise RuntimeError("Constraints violated (rows)!\nmore\nlines")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(aoti.AOTIError, match="Constraints violated") as info:
        aoti.compile_package(module, aoti.PackageSpec("x", "fp32", "class", (1, 16, 16), ()), tmp_path / "p.pt2",
                             cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value) and not (tmp_path / "cache").exists()


def test_sampler_spec_carries_the_schedule_and_the_rule_constants(digits_module, tmp_path):
    loaded, _ = digits_module
    spec = aoti.sampler_spec(scheduler_config=dict(loaded.scheduler_config), prediction_type="epsilon",
                             conditioning="class", sample_shape=(1, 16, 16), cond_shape=(), null_class=10,
                             class_names=[str(i) for i in range(10)], default_guidance_scale=4.0, dtype="fp32")
    path = aoti.write_sampler_spec(tmp_path, spec)
    back = json.loads(path.read_text())
    from srds_trt.samplers.timesteps import ddim_grid

    _, alphas = ddim_grid(loaded.scheduler_config, 10)
    assert back["schedule"]["alphas_cumprod"] == alphas.tolist()  # bit for bit through JSON
    assert back["stopping"] == {"default_tol": DEFAULT_TOL, "interior_contraction": INTERIOR_CONTRACTION,
                                "fast_contraction": FAST_CONTRACTION, "interior_weight": INTERIOR_WEIGHT,
                                "window_accept": {k: list(v) for k, v in WINDOW_ACCEPT.items()}}
    assert back["conditioning"]["num_classes"] == 11 and back["guidance"]["default_scale"] == 4.0


def test_export_cli_flag():
    from srds_trt.cli.export import parse_args

    assert parse_args(["--model", "digits", "--aoti"]).aoti is True
    assert parse_args(["--model", "digits"]).aoti is False  # opt-in: minutes of compile on a small CPU
