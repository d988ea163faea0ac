"""Mutation check of the runtime's tests: break the code on purpose and watch the tests fail.

    python scripts/mutants.py [--list] [--only NAME[,NAME]] [--tests PATH ...]

Each mutant is a one-place source substitution that models a real bug (a halved Parareal correction, the
coarse step of the neighbouring block, two boundaries sharing a slot, the formation running before the coarse
call it must wait for, ...). The script copies the package and the tests into a temporary directory, applies
one mutant at a time THERE, runs the relevant fast tests with PYTHONPATH pointing at the copy, and reports
killed (tests failed) or survived. The working tree is never written, so Ctrl-C cannot leave it modified; the
temporary copy is removed on exit. A baseline run of the unmutated copy must pass first.

Exit status: 0 when every mutant is killed, 1 when one survives, 2 on a usage or setup error.
In the spirit of mutmut, hand-picked: a handful of meaningful mutants run in about a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_TESTS = ("tests/runtime/test_runtime_iterates.py",)
WINDOW_TESTS = ("tests/runtime/test_runtime_window.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    why: str
    tests: tuple[str, ...] = FAST_TESTS


MUTANTS = (
    Mutant("halved-correction", "srds_trt/samplers/ddim.py",
           "return g_new + (f_old - g_old)", "return g_new + (f_old - g_old) * 0.5",
           "the Parareal correction U = G_new + (F - G_old) halved"),
    Mutant("coarse-coefficients-of-next-block", "srds_trt/runtime/srds/tables.py",
           "steps_to.append(bounds[r.block + 1])", "steps_to.append(bounds[min(r.block + 2, len(bounds) - 1)])",
           "coarse rows get the DDIM coefficients of a step over the neighbouring block's end"),
    Mutant("slot-map-shared-boundary", "srds_trt/runtime/srds/tables.py",
           "U[(p, b)], next_slot = next_slot, next_slot + 1", "U[(p, b)], next_slot = next_slot, next_slot + (b != 1)",
           "slot map off by one: U[p][1] and U[p][2] share a slot"),
    Mutant("formation-before-coarse-event", "srds_trt/runtime/srds/runner.py",
           "            coarse_done = self._call(step.get(\"coarse\"), i)\n"
           "            self._call(step.get(\"fine\"), i)\n"
           "            self._form(step[\"form\"], i, after=coarse_done)\n",
           "            self._form(step[\"form\"], i, after=None)\n"
           "            coarse_done = self._call(step.get(\"coarse\"), i)\n"
           "            self._call(step.get(\"fine\"), i)\n",
           "event order: the formation no longer waits for the coarse call (on CPU: runs before it in the tick)"),
    Mutant("residual-against-wrong-iterate", "srds_trt/runtime/srds/tables.py",
           "old = rows_of(tuple(slots.U[(p - 1, b)] if p else ZERO for b in bs), batch)",
           "old = rows_of(tuple(slots.U[(max(p - 2, 0), b)] if p else ZERO for b in bs), batch)",
           "the residual compares U[p] with U[p-2]"),
    Mutant("formation-counter-stuck", "srds_trt/runtime/srds/programs.py",
           "        form_boundaries(self.pool, self.formation, self.counter)\n        self.counter.add_(1)\n",
           "        form_boundaries(self.pool, self.formation, self.counter)\n",
           "the formation program's device-side tick counter never advances"),
    Mutant("exit-waits-for-speculative-ticks", "srds_trt/runtime/srds/runner.py",
           "done = self._iteration_done[stop]", "done = self._tick_done",
           "the host waits for the last launched tick, not the one that completed the accepted iteration"),
    Mutant("window-warm-start-off", "srds_trt/runtime/window/runner.py",
           'if self.warm_start:\n            # outputs extrapolated',
           'if False:\n            # outputs extrapolated',
           "eps-Picard's warm start off in the runner: entering points copy x[old_end] (ParaDiGMS's start)",
           WINDOW_TESTS),
    Mutant("window-entering-off-by-one", "srds_trt/runtime/window/runner.py",
           "entering = (nidx >= old_end) & (nidx < self.steps)", "entering = (nidx > old_end) & (nidx < self.steps)",
           "off by one in the window index: the first point entering the window is not initialised",
           WINDOW_TESTS),
    Mutant("window-tail-not-masked", "srds_trt/runtime/window/runner.py",
           "residual = torch.where(valid, change, torch.zeros_like(change)).amax()", "residual = change.amax()",
           "the padding rows past N count in the residual (the tail of the grid)",
           WINDOW_TESTS),
    Mutant("window-slope-not-inherited", "srds_trt/runtime/window/runner.py",
           "if self.inherit_slope:\n                before", "if False:\n                before",
           "a point evaluated for the first time gets no secant slope instead of its predecessor's",
           WINDOW_TESTS),
    Mutant("window-slope-inherited-from-inside", "srds_trt/runtime/window/runner.py",
           "slopes = torch.cat([behind, slope]).index_select(0, nearest + 1)",
           "slopes = torch.cat([behind, slope]).index_select(0, nearest.clamp(min=0) + 1)",
           "a point evaluated for the first time with no evaluated point before it in the window inherits the first "
           "point's slope instead of the slope behind the window",
           WINDOW_TESTS),
    Mutant("window-prior-slope-off", "srds_trt/runtime/window/runner.py",
           "if self.prior_slope:  # the first sweep", "if False:  # the first sweep",
           "the runner's first sweep propagates the outputs unmoved instead of along the prior slope",
           WINDOW_TESTS),
    Mutant("eps-picard-prior-slope-off", "srds_trt/samplers/eps_picard.py",
           "if secant and prior_slope and iterations == 0:", "if secant and prior_slope and iterations < 0:",
           "the reference's first sweep propagates the outputs unmoved (the textbook loops and the Gaussian-data "
           "case must see it; the runner mirrors the reference, so the runner tests cannot)",
           ("tests/samplers/test_eps_picard.py",)),
    Mutant("window-slide-one-too-far", "srds_trt/runtime/window/runner.py",
           "slide = torch.minimum(self._first_moved(moved, valid) + 1, span)",
           "slide = torch.minimum(self._first_moved(moved, valid) + 2, span)",
           "eps-Picard slides past the first moved point and the one after it",
           WINDOW_TESTS),
    Mutant("window-host-read-in-sweep", "srds_trt/runtime/window/runner.py",
           "slide = torch.minimum(self._first_moved(moved, valid) + 1, span)",
           "slide = torch.minimum(self._first_moved(moved, valid) + 1, span) + 0 * int(moved.any())",
           "a host read inside the sweep program (same results; breaks CUDA-graph capture, stalls the GPU)",
           WINDOW_TESTS),
    Mutant("window-tol-as-threshold", "srds_trt/samplers/stopping.py",
           "return min(fraction * check_tol(tol), cap)", "return check_tol(tol)",
           "the sliding-window samplers accept points at tol itself (the measured misses: eps-Picard 70x tol, "
           "ParaDiGMS 1.9x)",
           ("tests/samplers/test_window_tol.py",)),
    Mutant("srds-interior-not-within-tol", "srds_trt/samplers/stopping.py", "INTERIOR_WEIGHT = 1.0", "INTERIOR_WEIGHT = 0.0",
           "SRDS's rule drops the interior-within-tol term (the batched gmm N=1024 false stop: 2.3e-3 at tol 1e-3)",
           ("tests/samplers/test_stopping_rule.py",)),
    Mutant("auto-prices-the-default-tol", "srds_trt/autotune/planner.py",
           "sweep_overhead_ms=overhead, tol=tol, max_rows=max_rows,", "sweep_overhead_ms=overhead, max_rows=max_rows,",
           "--sampler auto prices the window samplers at the default tol whatever the caller asked",
           ("tests/autotune/test_planner.py",)),
    Mutant("auto-srds-iterations-from-blocks", "srds_trt/autotune/pricing.py",
           "expected_srds_iterations(blocks, tol), blocks)", "max(1, min(blocks, math.ceil(0.5 * blocks))), blocks)",
           "--sampler auto prices SRDS at half its blocks whatever the tol (27 iterations at N = 1024, the old model)",
           ("tests/autotune/test_pricing.py",)),
    Mutant("auto-serial-on-one-device", "srds_trt/autotune/pricing.py",
           "tick_ms(latency_ms, p * k * per_point, world_size, allgather_ms)",
           "tick_ms(latency_ms, p * k * per_point, *((world_size, allgather_ms) if sampler != 'serial' else (1, 0.0)))",
           "--sampler auto prices serial unsharded on a process group (1.24x too slow on SD2; picks a slower sampler)",
           ("tests/autotune/test_pricing.py",)),
    Mutant("auto-prices-one-chunk", "srds_trt/autotune/pricing.py",
           "chunk = images if max_rows is None else max(1, min(images, max_rows // widest))", "chunk = images",
           "--sampler auto prices all images as one chunk where the pipeline runs several, one after the other",
           ("tests/autotune/test_pricing.py",)),
    Mutant("cancel-not-polled-per-iteration", "srds_trt/execution.py",
           'check_cancel(cancel, f"{unit} {iteration}")', "None",
           "a cancelled request keeps its parallel sampler running to the end (a timed-out request blinds the server)",
           ("tests/test_pipeline.py",)),
    Mutant("chunk-noise-reseeded", "srds_trt/pipeline.py",
           "torch.randn((len(part), *self.loaded.sample_shape), generator=generator,",
           "torch.randn((len(part), *self.loaded.sample_shape), generator=torch.Generator().manual_seed(start),",
           "each image chunk draws its noise from a fresh seed: the images depend on how many images a chunk holds",
           ("tests/test_pipeline.py",)),
    Mutant("auto-ignores-observations", "srds_trt/autotune/pricing.py",
           "seen = (observed or {}).get(candidate_key(sampler, options))", "seen = None",
           "--sampler auto prices every candidate at the table's expectation whatever this model's runs took",
           ("tests/autotune/test_pricing.py",)),
    Mutant("flow-euler-half-step", "srds_trt/samplers/flow.py",
           "return torch.ones_like(s_from), s_to - s_from", "return torch.ones_like(s_from), 0.5 * (s_to - s_from)",
           "the flow Euler step moves half as far: every sampler, the runtime tables and diffusers' step disagree",
           ("tests/samplers/test_flow_samplers.py", "tests/runtime/test_flow_runtime.py")),
    Mutant("flow-prior-slope-shifted", "srds_trt/samplers/flow.py",
           "return (2 * s - 1) / ((1 - s) ** 2 + s**2)", "return (2 * s - 1.1) / ((1 - s) ** 2 + s**2)",
           "eps-Picard's flow prior slope off the Gaussian-data derivative (textbook iterates, Gaussian case)",
           ("tests/samplers/test_flow_samplers.py", "tests/samplers/test_flow.py")),
    Mutant("flow-paradigms-variance-wrong-point", "srds_trt/samplers/flow.py",
           "var = (1 - a_to) / (1 - a_from) * (1 - a_from / a_to) * r2[1:]",
           "var = (1 - a_to) / (1 - a_from) * (1 - a_from / a_to) * r2[:-1]",
           "ParaDiGMS's flow thresholds scaled at the wrong point (its slides across tolerances)",
           ("tests/samplers/test_flow_samplers.py",)),
    Mutant("flow-model-timestep-unscaled", "srds_trt/samplers/flow.py",
           "return torch.as_tensor(sigmas).to(torch.float32) * num_train_timesteps",
           "return torch.as_tensor(sigmas).to(torch.float32)",
           "the transformer sees sigma instead of diffusers' timestep sigma * 1000",
           ("tests/samplers/test_flow_samplers.py", "tests/samplers/test_flow.py")),
    Mutant("flux-scheduler-default-grid", "srds_trt/samplers/solver.py",
           'sigmas = flux_sigmas(steps) if family == "flux" else None',
           "sigmas = None",
           "Flux sampled on the scheduler's default grid, not FluxPipeline's linspace(1, 1/N, N) (samplers agree)",
           ("tests/models/test_flow_folders.py",)),
    Mutant("flow-pooled-text-dropped", "srds_trt/models/text.py",
           "return pack_cond(text, pooled)",
           "return pack_cond(text, pooled * 0)",
           "SD3 / Flux real-weight conditioning loses the pooled CLIP embedding",
           ("tests/models/test_flow_folders.py",)),
    Mutant("runner-cache-evicts-most-recent", "srds_trt/runtime/cache.py",
           "for key in list(self._entries):",
           "for key in reversed(list(self._entries)):",
           "the server's --cache-mb trim drops the runner just used instead of the least recently used",
           ("tests/serve/test_serve_memory.py::test_lru_budget_evicts_least_recently_used_runner",
            "tests/serve/test_serve_memory.py::test_server_budget_trims_the_runtime_after_each_job")),
)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1", HYPOTHESIS_PROFILE="default")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, "timeout"
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.perf_counter() - start, tail[-1] if tail else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--tests", nargs="*", help="test paths to run instead of each mutant's own")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:36s} {m.path}: {m.why}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTANTS}
    if unknown:
        print(f"error: --only: unknown mutants {sorted(unknown)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="srds-mutants-") as tmp:
        copy = Path(tmp)
        shutil.copytree(ROOT / "srds_trt", copy / "srds_trt", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "benchmarks", copy / "benchmarks",  # some tests build the benchmark cases
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
        shutil.copytree(ROOT / "benchmarks" / "results" / "stopping",  # auto's SRDS pricing test reads it
                        copy / "benchmarks" / "results" / "stopping")
        shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
        probe = subprocess.run([sys.executable, "-c", "import srds_trt; print(srds_trt.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            print(f"error: the copy is not what gets imported ({probe.stdout.strip() or probe.stderr.strip()})",
                  file=sys.stderr)
            return 2
        tests = tuple(args.tests) if args.tests else tuple(sorted({t for m in chosen for t in m.tests}))
        rc, seconds, tail = run_tests(copy, tests, args.timeout)
        print(f"{'baseline (no mutant)':36s} {'pass' if rc == 0 else 'FAIL'}  {seconds:5.1f} s  {tail}", flush=True)
        if rc != 0:
            print("error: the unmutated tests fail; fix them before judging mutants", file=sys.stderr)
            return 2
        survived = []
        for m in chosen:
            target = copy / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"error: mutant {m.name}: its text occurs {original.count(m.old)} times in {m.path} "
                      "(the code moved: update the mutant)", file=sys.stderr)
                return 2
            target.write_text(original.replace(m.old, m.new))
            try:
                rc, seconds, tail = run_tests(copy, tuple(args.tests) if args.tests else m.tests, args.timeout)
            finally:
                target.write_text(original)
            verdict = "killed" if rc == 1 else ("SURVIVED" if rc == 0 else f"error rc={rc}")
            if rc == 0:
                survived.append(m.name)
            print(f"{m.name:36s} {verdict:8s} {seconds:5.1f} s  {m.why}  [{tail}]", flush=True)
    print(f"{len(chosen) - len(survived)}/{len(chosen)} mutants killed" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
