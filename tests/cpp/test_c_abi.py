"""libsrds_trt through its C ABI (ctypes) against the Python reference path on the same AOTInductor engine:
plans and grids, every SRDS iterate, serial, the seed's noise, refusals (artifacts, arguments, non-finite states:
a status, one line, nothing written), the C test program and the C example."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from srds_trt.export.manifest import file_entries
from srds_trt.samplers.guidance import classifier_free_guidance
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.runtime import cabi
from srds_trt.samplers import serial_sample, srds_sample
from srds_trt.samplers.plan import build_tick_plan
from srds_trt.samplers.ddim import alphas_at, ddim_coefficients

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100
TOL = 1e-5  # fp32, the same engine on both sides


def python_reference(export: Path):
    """(model(x, t), timesteps, alphas) for the Python reference samplers over the export's own package."""
    package = torch._inductor.aoti_load_package(str(export / "unet.pt2"))
    manifest = json.loads((export / "manifest.json").read_text())

    def cond_model(x, t, c):
        return package(x, t.to(torch.float32), c)

    return cond_model, manifest["scheduler_config"]


def reference_model(export: Path, classes: list[int], scale: float):
    cond_model, _ = python_reference(export)
    cond = torch.tensor(classes, dtype=torch.long)
    return classifier_free_guidance(cond_model, cond, torch.full_like(cond, 10), scale)


def noise(seed: int, images: int) -> torch.Tensor:
    return torch.randn((images, 1, 16, 16), generator=torch.Generator().manual_seed(seed))


# ---- one source of truth for schedules ----------------------------------------------------------------------

def assert_plan_equal(described: str, steps: int, blocks: int | None, max_iters: int, scheduler_config) -> None:
    got = json.loads(described)
    plan = build_tick_plan(steps, blocks, None if max_iters < 0 else max_iters, pipelined=True)
    assert got["bounds"] == list(plan.bounds) and got["max_iters"] == plan.max_iters
    assert len(got["ticks"]) == len(plan.ticks)
    for mine, theirs in zip(got["ticks"], plan.ticks):
        assert mine["fine"] == [[r.iteration, r.block, r.step] for r in theirs.fine]
        assert mine["coarse"] == [[r.iteration, r.block] for r in theirs.coarse]
        assert mine["ready"] == [list(r) for r in theirs.ready]
        assert mine["completes"] == list(theirs.completes)
    grid, alphas_cumprod = ddim_grid(scheduler_config, steps)
    assert got["integer_grid"] == (not grid.is_floating_point())
    assert got["timesteps"] == grid.to(torch.float64).tolist()
    alphas = alphas_at(grid, alphas_cumprod)
    c_x, c_out = ddim_coefficients(alphas[:-1], alphas[1:], scheduler_config["prediction_type"])
    assert got["fine_cx"] == c_x.tolist() and got["fine_cout"] == c_out.tolist()  # bit for bit


PLAN_CASES = [(n, b) for n in (1, 2, 3, 5, 8, 13, 16, 17, 31, 50, 64, 99, 100, 128, 197)
              for b in sorted({0, 1, max(1, n // 3), n})]


def test_plans_grids_and_coefficients_equal_python(runtime, aoti_export):
    _, config = python_reference(aoti_export)
    for steps, blocks in PLAN_CASES:
        for max_iters in (-1, 0, 2):
            assert_plan_equal(runtime.describe_plan(steps, blocks, max_iters), steps, blocks or None, max_iters, config)
    for steps in (250, 999, 1000, 1001, 1024, 2048):  # long grids and the fractional ones past T
        assert_plan_equal(runtime.describe_plan(steps, 0, 3), steps, None, 3, config)


def respaced_export(export: Path, folder: Path, spacing: str, offset: int = 0) -> Path:
    """A copy of the export whose scheduler uses another timestep spacing (sampler.json re-hashed)."""
    shutil.copytree(export, folder)
    sampler = json.loads((folder / "sampler.json").read_text())
    sampler["schedule"].update(timestep_spacing=spacing, steps_offset=offset)
    (folder / "sampler.json").write_text(json.dumps(sampler))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].update(file_entries([folder / "sampler.json"]))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("trailing", 0), ("leading", 1)])
def test_grids_of_every_spacing_equal_diffusers(runtime, aoti_export, tmp_path, spacing, offset):
    _, config = python_reference(aoti_export)
    config = {**config, "timestep_spacing": spacing, "steps_offset": offset}
    folder = respaced_export(aoti_export, tmp_path / spacing, spacing, offset)
    with cabi.Runtime(folder, runtime.lib) as other:
        for steps in list(range(1, 200)) + list(range(200, 1001, 37)) + [1000]:
            try:
                grid, alphas = ddim_grid(config, steps)
                alphas_at(grid, alphas)
                expected = grid.to(torch.float64).tolist()
            except ValueError:  # diffusers' rounding gives no valid grid: the C++ side must refuse too
                with pytest.raises(cabi.CABIError) as info:
                    other.describe_plan(steps, 1, 0)
                assert info.value.status == cabi.INVALID_ARGUMENT
                continue
            assert json.loads(other.describe_plan(steps, 1, 0))["timesteps"] == expected, steps


# ---- the samplers, at every iterate ------------------------------------------------------------------------

@pytest.mark.slow
def test_srds_equals_python_at_every_iterate_and_serial(runtime, aoti_export):
    """Digits N = 100, guidance 4, tol 0: iterations 1..5 (short of convergence), and B (the serial sample)."""
    classes, seed, scale = [3], 11, 4.0
    model = reference_model(aoti_export, classes, scale)
    _, config = python_reference(aoti_export)
    timesteps, alphas = ddim_grid(config, STEPS)
    x = noise(seed, len(classes))
    serial = serial_sample(model, x, timesteps, alphas)
    mine = runtime.generate(class_ids=classes, sampler="serial", steps=STEPS, seed=seed, guidance_scale=scale)
    serial_diff = float(np.abs(mine.sample - serial.numpy()).max())
    assert serial_diff <= TOL
    assert (mine.report.iterations, mine.report.sequential_calls, mine.report.converged) == (-1, STEPS, 1)
    blocks = None
    previous, diffs = None, {}
    for k in (1, 2, 3, 4, 5, None):
        ref = srds_sample(model, x, timesteps, alphas, tol=0.0, max_iters=k)
        blocks = ref.num_blocks
        got = runtime.generate(class_ids=classes, steps=STEPS, seed=seed, guidance_scale=scale, tol=0.0,
                               max_iters=-1 if k is None else k)
        r = got.report
        diffs[k or ref.iterations] = float(np.abs(got.sample - ref.sample.numpy()).max())
        assert diffs[k or ref.iterations] <= TOL, f"iterate {k}: {diffs}"
        assert (r.iterations, r.num_blocks, r.sequential_calls) == (ref.iterations, blocks, ref.sequential_calls)
        assert math.isclose(r.residual, ref.residuals[-1], rel_tol=1e-3, abs_tol=TOL)
        assert (r.converged, r.cut) == (int(ref.converged), int(not ref.converged))
        if k == 1:  # iterate 1 is far from serial: comparing iterates means something at this TOL
            assert np.abs(got.sample - serial.numpy()).max() > 100 * TOL
        previous = got.sample
    assert np.abs(previous - serial.numpy()).max() <= TOL  # k = B reproduces serial
    print(f"C++ vs Python max-abs per SRDS iterate: {diffs}; serial: {serial_diff}")


@pytest.mark.slow
def test_paradigms_equals_python_at_every_sweep(runtime, aoti_export):
    """The window sampler: sweeps 1..6 and the converged run, at the per-point threshold Python derives from tol."""
    from srds_trt.samplers.paradigms import paradigms_sample
    from srds_trt.samplers.stopping import window_accept_tol

    classes, seed, scale, tol = [7], 3, 4.0, 1e-3
    model = reference_model(aoti_export, classes, scale)
    _, config = python_reference(aoti_export)
    timesteps, alphas = ddim_grid(config, STEPS)
    x = noise(seed, 1)
    diffs = {}
    for k in (1, 2, 3, 4, 5, 6, None):
        ref = paradigms_sample(model, x, timesteps, alphas, tol=window_accept_tol(tol, "paradigms"), max_iters=k)
        got = runtime.generate(class_ids=classes, sampler="paradigms", steps=STEPS, seed=seed, guidance_scale=scale,
                               tol=tol, max_iters=-1 if k is None else k)
        diffs[ref.iterations] = float(np.abs(got.sample - ref.sample.numpy()).max())
        assert diffs[ref.iterations] <= TOL, diffs
        r = got.report
        assert (r.iterations, r.sequential_calls, r.converged) == (ref.iterations, ref.iterations, int(ref.converged))
        assert math.isclose(r.residual, ref.residuals[-1], rel_tol=1e-3, abs_tol=TOL)
    assert ref.converged and ref.iterations > 6  # the sweeps compared above were short of convergence
    print(f"ParaDiGMS C++ vs Python max-abs per sweep: {diffs}")


@pytest.mark.slow
def test_default_tol_run_stops_where_python_stops(runtime, aoti_export):
    classes, seed = [3, 7], 5
    model = reference_model(aoti_export, classes, 4.0)
    _, config = python_reference(aoti_export)
    timesteps, alphas = ddim_grid(config, STEPS)
    ref = srds_sample(model, noise(seed, 2), timesteps, alphas, tol=1e-3)
    got = runtime.generate(class_ids=classes, steps=STEPS, seed=seed)  # defaults: guidance 4, tol 1e-3
    assert (got.report.iterations, got.report.sequential_calls, got.report.converged) == \
        (ref.iterations, ref.sequential_calls, 1)
    assert math.isclose(got.report.estimated_error, ref.error_estimates[-1], rel_tol=1e-3, abs_tol=TOL)
    assert np.abs(got.sample - ref.sample.numpy()).max() <= TOL
    assert got.report.engine_calls == got.report.sequential_calls  # 2 images x 2 fit the package's rows


def test_seed_draws_the_noise_python_draws(runtime):
    by_seed = runtime.generate(class_ids=[1, 2], sampler="serial", steps=3, seed=2**40 + 7)
    by_noise = runtime.generate(class_ids=[1, 2], sampler="serial", steps=3, initial_noise=noise(2**40 + 7, 2).numpy())
    assert np.array_equal(by_seed.sample, by_noise.sample)
    other = runtime.generate(class_ids=[1, 2], sampler="serial", steps=3, seed=8)
    assert not np.array_equal(by_seed.sample, other.sample)


def test_one_handle_shared_by_threads_gives_the_sequential_results(runtime):
    """The header promises calls on one handle are serialised inside it (ctypes drops the GIL during the call)."""
    from concurrent.futures import ThreadPoolExecutor

    seeds = [1, 2, 3, 4]
    alone = [runtime.generate(class_ids=[s % 10], sampler="serial", steps=4, seed=s).sample for s in seeds]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: runtime.generate(class_ids=[s % 10], sampler="serial", steps=4,
                                                            seed=s).sample, seeds))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


# ---- refusals: a status, one line, nothing written ----------------------------------------------------------

def copy_export(export: Path, folder: Path) -> Path:
    shutil.copytree(export, folder)
    return folder


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


BAD_ARTIFACTS = {
    "tampered package": (lambda f: (f / "unet.pt2").open("ab").write(b"x"), "sha256"),
    "tampered sampler": (lambda f: (f / "sampler.json").write_text("{}"), "sha256"),
    "missing package": (lambda f: (f / "unet.pt2").unlink(), "missing"),
    "package outside": (lambda f: edit_manifest(f, lambda m: m["aoti"].update(package="../unet.pt2")),
                        "not a file of this folder"),
    "plan outside": (lambda f: edit_manifest(f, lambda m: m["tensorrt"].update(plan="../../../evil.plan")),
                     "not a file of this folder"),
    "plan unlisted": (lambda f: edit_manifest(f, lambda m: m["files"].pop("unet.plan")), "not listed"),
    "no aoti section": (lambda f: edit_manifest(f, lambda m: m.pop("aoti")), "--aoti"),
    "foreign schema": (lambda f: edit_manifest(f, lambda m: m.update(schema="x/9")), "schema"),
    "not json": (lambda f: (f / "manifest.json").write_text("{"), "JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_bad_artifacts_are_refused_in_one_line(runtime, aoti_export, tmp_path, case):
    damage, needle = BAD_ARTIFACTS[case]
    folder = copy_export(aoti_export, tmp_path / "export")
    damage(folder)
    with pytest.raises(cabi.CABIError) as info:
        cabi.Runtime(folder, runtime.lib)
    assert info.value.status == cabi.ARTIFACT_ERROR and needle in info.value.message
    assert "\n" not in info.value.message


def test_python_and_cpp_refuse_the_same_engine_files(aoti_export, tmp_path, runtime):
    from srds_trt.export.artifacts import ArtifactError, verify_onnx

    for case in ("plan outside", "plan unlisted", "package outside"):
        folder = copy_export(aoti_export, tmp_path / case.replace(" ", "-"))
        BAD_ARTIFACTS[case][0](folder)
        with pytest.raises(ArtifactError):
            verify_onnx(folder)
        with pytest.raises(cabi.CABIError):
            cabi.Runtime(folder, runtime.lib)


def test_tensorrt_engine_is_refused_by_a_build_without_it(runtime, aoti_export):
    import ctypes

    handle = ctypes.c_void_p()
    status = runtime.lib.srds_trt_open_engine(str(aoti_export).encode(), 1, ctypes.byref(handle))
    assert status == cabi.INVALID_ARGUMENT and not handle.value
    assert "without TensorRT" in runtime.lib.srds_trt_last_error().decode()


BAD_REQUESTS = {
    "steps 0": (dict(steps=0), cabi.INVALID_ARGUMENT, "steps"),
    "steps 8193": (dict(steps=8193), cabi.INVALID_ARGUMENT, "steps"),
    "sampler 5": (dict(sampler=5), cabi.INVALID_ARGUMENT, "sampler"),
    "window > steps": (dict(sampler="paradigms", window=11), cabi.INVALID_ARGUMENT, "window"),
    "overflowing guidance (paradigms)": (dict(guidance_scale=1e38, sampler="paradigms"), cabi.NON_FINITE, "NaN/Inf"),
    "tol -1": (dict(tol=-1.0), cabi.INVALID_ARGUMENT, "tol"),
    "tol inf": (dict(tol=math.inf), cabi.INVALID_ARGUMENT, "tol"),
    "guidance inf": (dict(guidance_scale=math.inf), cabi.INVALID_ARGUMENT, "guidance"),
    "class 11": (dict(class_ids=[3, 11]), cabi.INVALID_ARGUMENT, "class_ids"),
    "class -1": (dict(class_ids=[-1, 3]), cabi.INVALID_ARGUMENT, "class_ids"),
    "blocks > steps": (dict(num_blocks=20), cabi.INVALID_ARGUMENT, "num_blocks"),
    "max_iters -2": (dict(max_iters=-2), cabi.INVALID_ARGUMENT, "max_iters"),
    "NaN noise": (dict(initial_noise=np.full((2, 1, 16, 16), np.nan, np.float32)), cabi.INVALID_ARGUMENT, "finite"),
    "overflowing guidance (srds)": (dict(guidance_scale=1e38), cabi.NON_FINITE, "NaN/Inf"),
    "overflowing guidance (serial)": (dict(guidance_scale=1e38, sampler="serial"), cabi.NON_FINITE, "NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_return_a_status_and_write_nothing(runtime, case):
    changes, status, needle = BAD_REQUESTS[case]
    kwargs = dict(class_ids=[3, 7], steps=10) | changes
    request, keep = runtime.request(**kwargs)
    out = np.full((2, 1, 16, 16), 7.0, np.float32)
    report = cabi.Report()
    runtime.lib.srds_trt_report_init(report)
    report.iterations = 99
    assert runtime.generate_into(request, out, report) == status
    message = runtime.lib.srds_trt_last_error().decode()
    assert needle in message and "\n" not in message
    assert (out == 7.0).all() and report.iterations == 99  # nothing half-written


def test_wrong_buffer_size_and_struct_size_are_refused(runtime):
    request, keep = runtime.request(class_ids=[3, 7], steps=4)
    out = np.full((1, 1, 16, 16), 7.0, np.float32)  # one image short
    assert runtime.generate_into(request, out) == cabi.INVALID_ARGUMENT and (out == 7.0).all()
    request.cuda_stream = 1234
    assert runtime.generate_into(request, np.zeros((2, 1, 16, 16), np.float32)) == cabi.INVALID_ARGUMENT
    assert "cuda_stream" in runtime.lib.srds_trt_last_error().decode()
    request.cuda_stream = None
    request.struct_size = 8
    assert runtime.generate_into(request, np.zeros((2, 1, 16, 16), np.float32)) == cabi.INVALID_ARGUMENT
    assert "struct_size" in runtime.lib.srds_trt_last_error().decode()


# ---- the C programs -----------------------------------------------------------------------------------------

def test_c_test_program_through_ctest(cpp_build, aoti_export):
    env = {**os.environ, "SRDS_TRT_TEST_EXPORT": str(aoti_export)}
    done = subprocess.run(["ctest", "--test-dir", str(cpp_build), "-R", "^c_abi$", "--output-on-failure"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "100% tests passed" in done.stdout and "Skipped" not in done.stdout


def read_pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, size, maxval, pixels = data.split(b"\n", 3)
    width, height = map(int, size.split())
    assert magic == b"P5" and maxval == b"255"
    return np.frombuffer(pixels, np.uint8).reshape(height, width)


@pytest.mark.slow
def test_c_example_writes_the_image_python_generate_writes(cpp_build, aoti_export, tmp_path):
    from PIL import Image

    flags = dict(seed="5", steps="30", sampler="srds")
    done = subprocess.run([str(cpp_build / "srds_trt_digits"), str(aoti_export), str(tmp_path / "c.pgm"),
                           "--prompt", "3,7", *[x for k, v in flags.items() for x in (f"--{k}", v)]],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    out = tmp_path / "py"
    done = subprocess.run([sys.executable, "-m", "srds_trt.generate", "--prompt", "3", "7", "--out", str(out),
                           "--quiet", "--no-compare-serial", *[x for k, v in flags.items() for x in (f"--{k}", v)]],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    mine = read_pgm(tmp_path / "c.pgm").astype(int)
    theirs = np.concatenate([np.asarray(Image.open(out / f"{i:03d}.png")) for i in range(2)], axis=1).astype(int)
    assert mine.shape == theirs.shape == (16, 32)
    assert np.abs(mine - theirs).max() <= 2
    assert np.abs(mine - 128).max() > 60  # an image, not a flat field


def test_example_refuses_bad_input_in_one_line(cpp_build, tmp_path):
    done = subprocess.run([str(cpp_build / "srds_trt_digits"), str(tmp_path), str(tmp_path / "x.pgm")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "x.pgm").exists()
