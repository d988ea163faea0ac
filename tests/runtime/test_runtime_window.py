"""The sliding-window samplers on the runtime (runtime/window_runner.py) against their reference functions.

The reference (eps_picard.py, paradigms.py) is the specification, sweep by sweep. Comparing converged samples
proves little (tol = 0 returns the serial sample whatever the warm start or the secant do), so these tests
compare every sweep short of convergence: the states each sweep hands the model (recorded on both sides: the
reference's model calls and the engine's input buffer), the residual and the slide of every sweep, and the
sample of runs stopped at max_iters = 1, 2, 3, ... They run guided and not, with a window that divides N and
one that leaves a tail, and with every eps-Picard option flipped one at a time (the options and their defaults
are read from eps_picard_sample's signature: a new or changed option there shows up here as a failure).

scripts/mutants.py breaks the runner on purpose (warm start off, window index off by one, ...) and checks this
file fails for each.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers_core import single_thread  # noqa: F401  (fixture)
from test_runtime_iterates import BATCH, LABELS, NULL, SCALE, SD_LIKE, SPEC, cond_model, x_T
from dataclasses import fields

from srds_trt.samplers.eps_picard import MECHANISMS, EpsPicardOptions, eps_picard_experiment, eps_picard_sample
from srds_trt.samplers.guidance import classifier_free_guidance, conditional
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers.paradigms import paradigms_sample
from srds_trt.runtime.engines import EngineError, TorchEngine
from srds_trt.runtime.window.runner import WindowRunner
from srds_trt.samplers.window import window_rows
from srds_trt.samplers import serial_sample
from srds_trt.samplers.stopping import NonFiniteError

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = {"eps-picard": eps_picard_sample, "paradigms": paradigms_sample}
TOL = {"eps-picard": 1e-3, "paradigms": 0.05}  # loose enough that windows slide by more than one point
GRIDS = [(17, None), (16, 5)]  # default window (eps-Picard 8: tail of 1; ParaDiGMS 4: tail of 1), and w = 5 with a tail


@functools.lru_cache(maxsize=None)
def grid(steps: int):
    return ddim_grid(SD_LIKE, steps)


class Recorder:
    """The states and timesteps of every model call (state rows only: the unconditional half under guidance)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reference_model(self, guided: bool):
        model = classifier_free_guidance(cond_model, LABELS, NULL, SCALE) if guided else conditional(cond_model, LABELS)

        def recorded(x, t):
            self.calls.append((x.clone(), t.clone()))
            return model(x, t)

        return recorded


def make_runner(sampler: str, steps: int, window, guided: bool, max_rows: int = 64, **options):
    ts, ac = grid(steps)
    calls: list[torch.Tensor] = []

    def engine_model(x, t, c):
        calls.append((x.clone(), t.clone()))
        return cond_model(x, t, c)

    engine = TorchEngine(engine_model, SPEC, max_rows=max_rows)
    runner_options = {k: options.pop(k) for k in ("fused_chains", "cuda_graphs", "noise_floor") if k in options}
    runner = WindowRunner(engine, sampler=sampler, batch=BATCH, timesteps=ts, alphas_cumprod=ac, window=window,
                          guided=guided, state_dtype=torch.float64, options=EpsPicardOptions(**options) if options else None,
                          **runner_options)
    return runner, calls


def run(runner: WindowRunner, guided: bool, seed: int, **kwargs):
    if guided:
        return runner.run(x_T(seed), LABELS, NULL, guidance_scale=SCALE, **kwargs)
    return runner.run(x_T(seed), LABELS, **kwargs)


def reference(sampler: str, steps: int, window, guided: bool, seed: int, recorder: Recorder | None = None, **kwargs):
    ts, ac = grid(steps)
    model = (recorder or Recorder()).reference_model(guided)
    if sampler == "eps-picard" and set(kwargs) & {f.name for f in fields(EpsPicardOptions)}:
        return eps_picard_experiment(model, x_T(seed), ts, ac, window=window, **kwargs)
    return REFERENCE[sampler](model, x_T(seed), ts, ac, window=window, **kwargs)


def assert_same_result(got, ref, atol=1e-12):
    assert got.iterations == ref.iterations and got.sequential_calls == ref.sequential_calls
    assert got.slides == ref.slides, "the window slid differently"
    assert got.model_evals == ref.model_evals and got.converged == ref.converged and got.window == ref.window
    torch.testing.assert_close(torch.tensor(got.residuals), torch.tensor(ref.residuals), rtol=0, atol=atol)
    torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=atol)


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("steps,window", GRIDS)
@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_every_sweep_equals_the_reference(sampler, steps, window, guided):
    """Per sweep: the window states the model sees, the timesteps, the residual and the slide; the tail of the
    grid included (the engine is called at one fixed bucket, past-N rows are padding and are not compared)."""
    tol = TOL[sampler]
    recorder = Recorder()
    ref = reference(sampler, steps, window, guided, seed=0, recorder=recorder, tol=tol)
    runner, engine_calls = make_runner(sampler, steps, window, guided)
    got = run(runner, guided, seed=0, tol=tol)
    assert_same_result(got, ref)
    assert max(ref.slides) > 1, "tol too tight to test the slide"
    assert len(engine_calls) == len(recorder.calls) == got.iterations
    assert len({x.shape[0] for x, _ in engine_calls}) == 1, "one fixed bucket for every sweep"
    for k, ((ref_x, ref_t), (x, t)) in enumerate(zip(recorder.calls, engine_calls)):
        rows = ref_x.shape[0]
        torch.testing.assert_close(x[:rows], ref_x, rtol=0, atol=1e-12, msg=lambda m, k=k: f"sweep {k + 1} states: {m}")
        torch.testing.assert_close(t[:rows].double(), ref_t.double(), rtol=0, atol=0)
    assert runner.last_run.host_reads == got.iterations == runner.last_run.sweeps  # ONE host read per sweep
    assert got.engine_calls == {runner.bucket: got.iterations}


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_runs_stopped_at_every_sweep_equal_the_reference(sampler, guided):
    steps, window = 16, 5
    full = reference(sampler, steps, window, guided, seed=1, tol=TOL[sampler])
    runner, _ = make_runner(sampler, steps, window, guided)  # one runner for every run: nothing may leak between
    for k in range(0, full.iterations + 1):
        ref = reference(sampler, steps, window, guided, seed=1, tol=TOL[sampler], max_iters=k)
        assert_same_result(run(runner, guided, seed=1, tol=TOL[sampler], max_iters=k), ref)


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("steps,window", GRIDS)
@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_tol_zero_returns_the_serial_sample(sampler, steps, window, guided):
    ts, ac = grid(steps)
    model = classifier_free_guidance(cond_model, LABELS, NULL, SCALE) if guided else conditional(cond_model, LABELS)
    serial = serial_sample(model, x_T(2), ts, ac)
    runner, _ = make_runner(sampler, steps, window, guided)
    got = run(runner, guided, seed=2, tol=0.0)
    assert got.converged
    torch.testing.assert_close(got.sample, serial, rtol=0, atol=1e-12)
    if sampler == "paradigms":  # the same arithmetic as the reference: the same slides
        assert_same_result(got, reference(sampler, steps, window, guided, seed=2, tol=0.0))
    # eps-Picard's runner evaluates the recurrence linear in d = x - e (window_runner.py), equal to the reference to
    # rounding; at tol = 0 a point slides only when bit-for-bit unchanged, so rounding decides the slides (the
    # sample is still the serial one, asserted above, and short of convergence the sweeps are compared exactly in
    # test_every_sweep_equals_the_reference)


def _flipped_options() -> list[dict]:
    """Every eps-Picard option of the reference moved off its default, one at a time."""
    flips = []
    for name in MECHANISMS:
        default = getattr(EpsPicardOptions(), name)
        if isinstance(default, bool):
            flips.append({name: not default})
        elif name == "extrapolate":
            flips += [{name: k} for k in (0, 1, 2) if k != default]
        elif name == "coord":
            flips += [{name: c} for c in ("lambda", "sigma", "index", "t") if c != default]
    return flips


@pytest.mark.parametrize("options", _flipped_options(), ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_eps_picard_option_follows_the_reference(options):
    steps, window = 16, 5
    for guided in (True, False):
        ref = reference("eps-picard", steps, window, guided, seed=3, tol=TOL["eps-picard"], **options)
        runner, _ = make_runner("eps-picard", steps, window, guided, **options)
        assert_same_result(run(runner, guided, seed=3, tol=TOL["eps-picard"]), ref)


def test_the_runner_mirrors_every_option_of_the_reference():
    """An option added to EpsPicardOptions is either a mechanism the runner mirrors (MECHANISMS: flipped one at a
    time above against the reference) or research the runner refuses, never silently ignored."""
    research = {"extrapolate_span", "extrapolate_fit", "jvp"}
    assert {f.name for f in fields(EpsPicardOptions)} == set(MECHANISMS) | research
    for name in research:
        value = {"extrapolate_span": 2, "extrapolate_fit": "lsq", "jvp": (lambda x, t, d: d)}[name]
        assert EpsPicardOptions(**{name: value}).research() == [name]


def test_defaults_are_the_references():
    """A runner built without options runs what eps_picard_sample runs by default, window and tol included."""
    runner, _ = make_runner("eps-picard", 17, None, True)
    assert runner.window == 8 and runner.options == EpsPicardOptions()
    assert_same_result(run(runner, True, seed=4), reference("eps-picard", 17, None, True, seed=4))
    runner, _ = make_runner("paradigms", 17, None, False)
    assert runner.window == 4
    assert_same_result(run(runner, False, seed=4), reference("paradigms", 17, None, False, seed=4))


def test_host_reads_are_counted_and_timed():
    runner, _ = make_runner("eps-picard", 16, 5, True)
    got = run(runner, True, seed=0, tol=TOL["eps-picard"])
    stats = runner.last_run
    assert stats.sweeps == stats.host_reads == got.iterations == len(stats.begins)
    assert stats.host_read_s > 0 and stats.host_read_ms_per_sweep > 0
    assert stats.begins == [sum(got.slides[:k]) for k in range(got.iterations)]  # the host saw every slide


class NoHostSync:
    """A dispatch mode that fails on every op that reads a tensor's value on the host (.item(), bool(), .tolist():
    aten._local_scalar_dense) or makes a shape from data (nonzero, masked_select): what breaks CUDA-graph capture
    and stalls the GPU, caught on the CPU."""

    FORBIDDEN = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
                 "aten::_unique2", "aten::repeat_interleave"}

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            ops: list[str] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(func._schema.name)
                if func._schema.name in cls.FORBIDDEN:
                    raise AssertionError(f"host read inside the sweep program: {func._schema.name}")
                return func(*args, **(kwargs or {}))

        return Mode()


@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_the_sweep_program_never_reads_the_device(sampler):
    """Everything data-dependent (the slide, the tail mask, the entering points) stays on the device inside the
    sweep; the host's one read per sweep is outside it. And one engine call per sweep."""
    runner, engine_calls = make_runner(sampler, 17, None, True)
    runner.capture()
    sweep, modes = runner.sweep_program.fn, []

    def guarded():
        mode = NoHostSync()
        modes.append(mode)
        with mode:
            sweep()

    runner.sweep_program.fn = guarded
    got = run(runner, True, seed=0, tol=TOL[sampler])
    assert len(modes) == got.iterations == len(engine_calls) and all(m.ops for m in modes)
    assert_same_result(got, reference(sampler, 17, None, True, seed=0, tol=TOL[sampler]))


def test_dlpack_inputs_and_a_host_stream_handle():
    """What a host service hands over (runtime/host.py): DLPack tensors (NumPy here) and a stream handle, checked on
    the CPU too; the result equals torch inputs."""
    runner, _ = make_runner("eps-picard", 16, 5, True)
    expected = run(runner, True, seed=5, tol=TOL["eps-picard"])
    got = runner.run(x_T(5).numpy(), LABELS.numpy(), NULL.numpy(), guidance_scale=SCALE, tol=TOL["eps-picard"], stream=0)
    assert_same_result(got, expected, atol=0)
    with pytest.raises(TypeError, match="stream"):
        runner.run(x_T(5), LABELS, NULL, guidance_scale=SCALE, stream=True)
    with pytest.raises(TypeError, match="DLPack"):
        runner.run([[0.0]], LABELS, NULL, guidance_scale=SCALE)


def test_refusals():
    with pytest.raises(EngineError, match="engine rows"):
        make_runner("eps-picard", 16, 8, True, max_rows=16)  # 8 points x 2 images x 2 = 32 rows
    with pytest.raises(TypeError):
        make_runner("eps-picard", 16, 5, True, anderson=True)
    with pytest.raises(ValueError, match=r"research-only eps-Picard options \['extrapolate_fit'\]"):
        make_runner("eps-picard", 16, 5, True, extrapolate_fit="lsq")
    make_runner("eps-picard", 16, 5, True, extrapolate_fit="nodes")  # the reference's default: accepted
    with pytest.raises(ValueError, match=r"research-only eps-Picard options \['jvp'\]"):  # sequential derivatives
        make_runner("eps-picard", 16, 5, True, jvp=lambda x, t, d: d)
    with pytest.raises(ValueError, match="no algorithm options"):
        make_runner("paradigms", 16, 5, True, secant=False)
    with pytest.raises(ValueError, match="sliding-window sampler must be one of"):
        make_runner("srds", 16, 5, True)
    assert window_rows("eps-picard", 100, None, 3, True) == 20 * 3 * 2
    assert window_rows("paradigms", 100, None, 3, False) == 10 * 3


def test_nan_in_the_state_is_an_error():
    ts, ac = grid(16)

    def nan_model(x, t, c):
        return torch.where(t[:, None, None, None] < 500, torch.nan, cond_model(x, t, c))

    engine = TorchEngine(nan_model, SPEC, max_rows=64)
    runner = WindowRunner(engine, sampler="eps-picard", batch=BATCH, timesteps=ts, alphas_cumprod=ac, window=5,
                          guided=False, state_dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="eps-picard sweep"):
        runner.run(x_T(0), LABELS, tol=0.0)


@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_pipeline_runtime_path_equals_reference_path(sampler):
    """SRDSPipeline(sampler=...) through RuntimeSampler and the torch engine (the GPU glue, on the CPU)."""
    from srds_trt import SRDSPipeline
    from srds_trt.runtime.executor import RuntimeSampler

    reference_pipe = _digits()
    fast = SRDSPipeline(reference_pipe.loaded, default_guidance_scale=reference_pipe.default_guidance_scale)
    fast.runtime = RuntimeSampler("torch", fast.loaded, device=torch.device("cpu"), dtype=torch.float32)
    kwargs = dict(num_inference_steps=10, generator=3, tol=1e-2, progress_bar=False, sampler=sampler)
    a = reference_pipe(["1", "8"], **kwargs)
    b = fast(["1", "8"], **kwargs)
    for key in ("iterations", "sequential_calls", "model_evals", "converged"):
        assert a.stats[key] == b.stats[key], key
    assert b.stats["engine"] == "torch" and b.stats["slides"] and b.stats["host_reads"] == b.stats["iterations"]
    assert b.stats["host_read_ms"] >= 0
    torch.testing.assert_close(b.samples, a.samples, rtol=0, atol=1e-4)
    again = fast(["1", "8"], **kwargs)  # the cached runner: no second build
    assert again.stats["first_call"] is False and fast.runtime.runner_builds == 1
    torch.testing.assert_close(again.samples, b.samples, rtol=0, atol=0)


@functools.lru_cache(maxsize=None)
def _digits():
    from srds_trt import SRDSPipeline

    return SRDSPipeline.from_pretrained("digits")


def test_fused_chains_are_gpu_only_and_off_on_a_cpu():
    """The Triton chains (runtime/fused.py) run on CUDA float32 only: off by default here, refused when forced;
    the torch loops they replace are what every other test in this file compares with the reference."""
    runner, _ = make_runner("eps-picard", 16, 5, True)
    assert runner.fused is False
    with pytest.raises(ValueError, match="fused_chains=True needs CUDA"):
        make_runner("eps-picard", 16, 5, True, fused_chains=True)
