"""`python -m benchmarks.stopping`: does the stopping rule stop at the right iteration?

For every case (model, N, images, blocks) the Parareal iterates U[p][b] are computed ONCE (batched over blocks,
`parareal_iterates`), together with the serial sample. Then, for each tol and schedule (plain / pipelined):

- the oracle: the first iteration k whose final sample U[k][B] is within tol (max-abs) of the serial sample;
- the rule: stopping.StoppingRule fed the same per-boundary changes srds_sample feeds it, iteration by iteration;
- sequential calls of either from schedule.build_tick_plan (hardware-free latency);
- the returned error: max-abs distance of U[rule's iteration][B] to the serial sample.

Gaussian-mixture cases are run row by row (each image its own run: the hardest setting, no batch max to hide
in); the table reports the WORST row of each case (latest stop relative to the oracle, largest error).
`--batched`: BATCHED, the pipeline's setting (benchmarks/cases.py's mixtures, 64-256 images judged as ONE run:
the rule sees the batch max, whose final boundary can stall while some image's interior still moves).
`--variants [--tols ...]`: the candidate rules of VARIANTS replayed on the full suite and BATCHED (misses, worst
error / tol, summed pipelined calls).
Iterates are cached under /tmp/srds-stopping-cache (digits at N=1024 takes minutes on a shared CPU core).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from srds_trt.samplers.plan import block_bounds, build_tick_plan
from srds_trt.samplers.ddim import alphas_at, ddim_coefficients, ddim_update
from srds_trt.samplers.stopping import StoppingRule

CACHE = Path("/tmp/srds-stopping-cache")
RESULTS = Path(__file__).resolve().parent / "results"
SD_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 set_alpha_to_one=True, clip_sample=False, steps_offset=1)


@dataclass(frozen=True)
class Iterates:
    """Per image row r: changes[p-1][r][b-1] = max|U[p][b] - U[p-1][b]| (b = 1..B), errors[p][r] = max|U[p][B] - serial|."""

    bounds: tuple[int, ...]
    changes: list[list[list[float]]]  # [iteration 1..K][row][boundary 1..B]
    errors: list[list[float]]  # [iteration 0..K][row]


def parareal_iterates(model, x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, bounds, iters: int,
                      prediction_type: str = "epsilon") -> Iterates:
    """Textbook Parareal with every block's fine solve batched; iterates are identical to srds_sample's (same
    DDIM coefficients, same correction), the schedule aside."""
    rows, blocks = x.shape[0], len(bounds) - 1
    alphas = alphas_at(timesteps, alphas_cumprod)
    fcx, fco = ddim_coefficients(alphas[:-1], alphas[1:], prediction_type)
    starts, ends = list(bounds[:-1]), list(bounds[1:])
    gcx, gco = ddim_coefficients(alphas[starts], alphas[ends], prediction_type)

    def call(state: Tensor, t_idx: list[int], cx: Tensor, co: Tensor) -> Tensor:
        t = timesteps[t_idx].repeat_interleave(rows)
        return ddim_update(state, model(state, t), cx.repeat_interleave(rows), co.repeat_interleave(rows))

    def coarse(states: list[Tensor], which: list[int]) -> list[Tensor]:
        out = call(torch.cat(states), [bounds[b] for b in which], gcx[which], gco[which])
        return list(out.split(rows))

    def fine(states: list[Tensor]) -> list[Tensor]:
        states = list(states)
        for j in range(max(ends[b] - starts[b] for b in range(blocks))):
            live = [b for b in range(blocks) if starts[b] + j < ends[b]]
            steps = [starts[b] + j for b in live]
            new = call(torch.cat([states[b] for b in live]), steps, fcx[steps], fco[steps]).split(rows)
            for b, s in zip(live, new):
                states[b] = s
        return states

    serial = x.clone()
    for i in range(len(timesteps) - 1):
        serial = call(serial, [i], fcx[i: i + 1], fco[i: i + 1])
    U = [x]
    for b in range(blocks):
        U.append(coarse([U[b]], [b])[0])

    def row_max(d: Tensor) -> list[float]:
        return d.abs().reshape(rows, -1).max(1).values.tolist()

    errors, changes = [row_max(U[blocks] - serial)], []
    for p in range(1, iters + 1):
        f_old, g_old = fine(U[:blocks]), coarse(U[:blocks], list(range(blocks)))
        new = [x]
        for b in range(blocks):
            new.append(coarse([new[b]], [b])[0] + (f_old[b] - g_old[b]))
        per_b = [row_max(new[b] - U[b]) for b in range(1, blocks + 1)]
        changes.append([[per_b[b][r] for b in range(blocks)] for r in range(rows)])
        U = new
        errors.append(row_max(U[blocks] - serial))
    return Iterates(tuple(bounds), changes, errors)


# ---------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str  # gmm-d{dim}-m{modes}-s{std}-seed{seed} | digits | digits-cfg4
    steps: int
    images: int
    per_row: bool  # each image row is its own run (GMM) or the batch is one run (digits)
    blocks: int | None = None  # None: schedule.default_num_blocks
    iters: int = 8  # iterates computed (the rule stops before this on every case of the suite)


def _gmm(case: Case):
    from srds_trt.models.analytic import GaussianMixture
    from srds_trt.samplers.timesteps import ddim_grid

    _, dim, modes, std, seed = case.name.split("-")
    dim, modes, std, seed = int(dim[1:]), int(modes[1:]), float(std[1:]), int(seed[4:])
    timesteps, alphas = ddim_grid(SD_CONFIG, case.steps)
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=gen, dtype=torch.float64) * 2.0
    model = GaussianMixture(means=means, stds=torch.full((modes,), std, dtype=torch.float64),
                            weights=torch.full((modes,), 1.0 / modes, dtype=torch.float64), alphas_cumprod=alphas)
    x = torch.randn(case.images, dim, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    return model, x, timesteps, alphas, "epsilon"


def _digits(case: Case):
    from srds_trt.samplers.guidance import classifier_free_guidance
    from srds_trt.models import load_unet, unet_model_fn
    from srds_trt.samplers.timesteps import ddim_grid

    loaded = load_unet("digits")
    cond = torch.arange(case.images) % 10
    scale = 4.0 if case.name.endswith("cfg4") else 1.0
    model = classifier_free_guidance(unet_model_fn(loaded), cond, torch.full_like(cond, loaded.null_class), scale)
    timesteps, alphas = ddim_grid(loaded.scheduler_config, case.steps)
    x = torch.randn((case.images, *loaded.sample_shape), generator=torch.Generator().manual_seed(0))
    pred = loaded.scheduler_config.get("prediction_type", loaded.spec.prediction_type)
    return model, x, timesteps, alphas, pred


def _mixture(case: Case):
    """benchmarks/cases.py's mixtures ("batch-gmm", "batch-hard2-seed1", ...): the pipeline's cases; the noise
    seed is the optional -seed suffix (default 0, the pipeline's)."""
    from benchmarks.cases import build_case, mixture_case

    parts = case.name.split("-")
    name, seed = parts[1], int(parts[2][4:]) if len(parts) > 2 else 0
    cpu = torch.device("cpu")
    built = (build_case(name, images=case.images, device=cpu, seed=seed) if name == "gmm"
             else mixture_case(name, images=case.images, device=cpu, seed=seed))
    timesteps, alphas, _ = built.grid(case.steps)
    return built.model, built.x, timesteps, alphas, built.prediction_type


def iterates(case: Case) -> Iterates:
    bounds = block_bounds(case.steps, case.blocks)
    key = hashlib.sha1(json.dumps([asdict(case), bounds, _rule_free_version()]).encode()).hexdigest()[:16]
    path = CACHE / f"{case.name}-N{case.steps}-{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return Iterates(tuple(data["bounds"]), data["changes"], data["errors"])
    build = _digits if case.name.startswith("digits") else _mixture if case.name.startswith("batch-") else _gmm
    model, x, timesteps, alphas, pred = build(case)
    with torch.inference_mode():
        its = parareal_iterates(model, x, timesteps, alphas, bounds, min(case.iters, len(bounds) - 1), pred)
    if not case.per_row:  # one run over the batch: the rule sees the max over images
        its = Iterates(its.bounds, [[[max(c[r][b] for r in range(len(c))) for b in range(len(c[0]))]] for c in its.changes],
                       [[max(e)] for e in its.errors])
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(its)))
    return its


def _rule_free_version() -> int:
    return 1  # bump when parareal_iterates or the cases change (the cache must not outlive them)


# ---------------------------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Row:
    case: str
    steps: int
    tol: float
    pipelined: bool
    blocks: int
    rule_iters: int | None  # None: not stopped within the computed iterates
    rule_calls: int | None
    oracle_iters: int | None
    oracle_calls: int | None
    error: float | None  # returned error (worst row)
    images: int
    late: int  # worst (rule - max(1, settled oracle)) iterations over rows
    settled_iters: int | None = None  # first k with EVERY iterate from k on within tol (worst row)

    @property
    def ok(self) -> bool:
        """The returned sample is within tol (the promise). Lateness > 1 is reported in the table, not failed:
        the worst of 32 images at N = 25 is sometimes 2-4 iterations late (see stopping.py)."""
        return self.rule_iters is not None and self.error is not None and self.error <= self.tol


def replay(changes: list[list[float]], tol: float, blocks: int, bounds=None, variant=None) -> int | None:
    """The iteration at which StoppingRule (or `variant`: history, tol -> stop?, see VARIANTS) stops on these
    per-boundary changes (None: not within them)."""
    if variant is not None:
        for p in range(1, len(changes) + 1):
            if p >= blocks or variant(changes[:p], tol):
                return p
        return None
    rule = StoppingRule(tol, blocks)
    for p, c in enumerate(changes, start=1):
        if rule.observe(p, c):
            return p
    return None


def evaluate(case: Case, tol: float, pipelined: bool, its: Iterates | None = None) -> Row:
    its = its or iterates(case)
    blocks = len(its.bounds) - 1
    plan = build_tick_plan(case.steps, blocks, min(case.iters, blocks), pipelined)
    rows = len(its.errors[0])
    worst = None
    for r in range(rows):
        errs = [e[r] for e in its.errors]
        oracle = next((k for k, e in enumerate(errs) if e <= tol), None)
        # An iterate can be within tol by accident and the next one not (Parareal is not monotone): no rule that
        # sees only changes can know that, so lateness counts from the iterate after which the error STAYS
        # within tol, and from iteration 1 (iteration 0 has no change to judge it by).
        settled = next((k for k in range(len(errs)) if all(e <= tol for e in errs[k:])), None)
        rule = replay([c[r] for c in its.changes], tol, blocks, its.bounds)
        if rule is None and len(its.changes) == blocks:
            rule = blocks
        err = errs[rule] if rule is not None else math.inf
        late = (rule - max(1, settled)) if (rule is not None and settled is not None) else 99
        key = (err > tol, late, err)
        if worst is None or key > worst[0]:
            worst = (key, rule, oracle, settled)
    (_, late, err), rule, oracle, settled = worst
    calls = lambda k: None if k is None else plan.ticks_until(k)  # noqa: E731
    return Row(case.name, case.steps, tol, pipelined, blocks, rule, calls(rule), oracle, calls(oracle),
               None if not math.isfinite(err) else err, rows if case.per_row else 1, late, settled)


# ---------------------------------------------------------------------------------------------------- variants
# Candidate rules, replayed on the same changes (`--variants`). Each: (history of change vectors, tol) -> stop?
# "+ ...": the previous rule (error_estimate before INTERIOR_WEIGHT: _estimate below) with one more condition.
# history[q - 1] = iteration q's per-boundary changes; c_q = its last entry (the final sample's change), i_q =
# the max over the boundaries not yet exact (b > q, the final one included) as in stopping.error_estimate.


def _estimate(history, contraction: float = 0.25) -> float:
    """stopping.error_estimate (FAST_CONTRACTION off) with its interior contraction as a parameter."""
    last, p = history[-1], len(history)
    if max(last) == 0.0:
        return 0.0
    if p < 2:
        return math.inf
    prev = history[-2]
    c, c_prev = last[-1], prev[-1]
    if c_prev == 0.0 or c >= c_prev or max(last[p:], default=0.0) > contraction * max(prev[p - 1:], default=0.0):
        return math.inf
    rho = c / c_prev
    return max(c, c * rho / (1.0 - rho))


def _interior(history, q: int) -> float:
    return max(history[q - 1][q:], default=0.0)


def _transfer(history) -> float:
    """The largest observed ratio c_{q+1} / i_q (how much of the interior's move reached the final sample one
    iteration later), q = 1..p-1."""
    return max((history[q][-1] / _interior(history, q) for q in range(1, len(history)) if _interior(history, q) > 0),
               default=math.inf)


def _accept(est: float, tol: float, factor: float = 1.0) -> bool:
    return est == 0.0 or (tol > 0 and est <= factor * tol)


def _abs_guard(k: float):
    def stop(h, tol):
        est = _estimate(h)
        return est == 0.0 or (_accept(est, tol) and _interior(h, len(h)) <= k * tol)
    return stop


def _two_contractions(h, tol):
    est = _estimate(h)
    return est == 0.0 or (_accept(est, tol) and len(h) >= 3 and h[-2][-1] < h[-3][-1])


def _transfer_guard(h, tol):
    est = _estimate(h)
    return est == 0.0 or (_accept(est, tol) and _interior(h, len(h)) * _transfer(h) <= tol)


VARIANTS = {
    "StoppingRule now (interior <= tol, adopted)": None,
    "previous rule (2026-11-27)": lambda h, tol: _accept(_estimate(h), tol),
    "interior contraction 0.1": lambda h, tol: _accept(_estimate(h, 0.1), tol),
    **{f"+ interior <= {k:g} tol": _abs_guard(k) for k in (1, 2, 3, 5, 10, 20)},
    "+ interior x transfer <= tol": _transfer_guard,
    "+ final contracted twice": _two_contractions,
    "estimate <= tol / 2": lambda h, tol: _accept(_estimate(h), tol, 0.5),
}

# Batched cases: several images judged as ONE run (the max over the batch), as the pipeline runs them
# (benchmarks/cases.py's mixtures, `-seedK`: the noise seed). batch-gmm N=1024 256 images seed 0 is the measured miss.
BATCHED = ([Case("batch-gmm", 1024, 256, False, iters=12), Case("batch-gmm-seed1", 1024, 256, False, iters=12)]
           + [Case(f"batch-{m}{'' if s == 0 else f'-seed{s}'}", n, 64, False, iters=12)
              for s in (0, 1, 2) for n in (196, 1024) for m in ("hard2", "wide2", "mix16", "mix64")])


@dataclass(frozen=True)
class VariantRow:
    variant: str
    group: str  # per-image suite | batched
    runs: int
    misses: int
    worst_error_over_tol: float
    calls: int  # pipelined sequential calls, summed over runs
    oracle_calls: int  # the first iterate within tol, summed
    unstopped: int  # runs not stopped within the computed iterates (counted at the last one)
    miss_list: tuple = ()


def judge_variants(cases: list[Case], group: str, tols=(1e-2, 1e-3)) -> list[VariantRow]:
    out = []
    loaded = [(case, iterates(case)) for case in cases]
    for name, variant in VARIANTS.items():
        runs = misses = calls = oracle_calls = unstopped = 0
        worst, miss_list = 0.0, []
        for case, its in loaded:
            blocks = len(its.bounds) - 1
            plan = build_tick_plan(case.steps, blocks, min(case.iters, blocks), True)
            for tol in tols:
                for r in range(len(its.errors[0])):
                    errs = [e[r] for e in its.errors]
                    k = replay([c[r] for c in its.changes], tol, blocks, its.bounds, variant)
                    if k is None:
                        unstopped, k = unstopped + 1, len(its.changes)
                    oracle = next((q for q, e in enumerate(errs) if e <= tol), len(errs) - 1)
                    runs += 1
                    calls += plan.ticks_until(k)
                    oracle_calls += plan.ticks_until(oracle)
                    worst = max(worst, errs[k] / tol)
                    if errs[k] > tol:
                        misses += 1
                        miss_list.append((case.name, case.steps, tol, r, k, errs[k]))
        out.append(VariantRow(name, group, runs, misses, worst, calls, oracle_calls, unstopped, tuple(miss_list)))
    return out


def variants_markdown(rows: list[VariantRow]) -> str:
    base = {(r.group): r.calls for r in rows if r.variant.startswith("previous")}
    head = ("| variant | runs | misses | worst error / tol | calls (pipelined) | vs previous | vs oracle | unstopped |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = ""
    for group in dict.fromkeys(r.group for r in rows):
        body += f"| **{group}** | | | | | | | |\n"
        for r in (r for r in rows if r.group == group):
            body += (f"| {r.variant} | {r.runs} | {r.misses} | {r.worst_error_over_tol:.3g} | {r.calls} | "
                     f"{r.calls / base[group]:.3f}x | {r.calls / r.oracle_calls:.2f}x | {r.unstopped} |\n")
    misses = "".join(f"- {r.variant} ({r.group}): {', '.join(f'{c} N={n} tol {t:g} row {row} stop {k} err {e:.2e}' for c, n, t, row, k, e in r.miss_list[:6])}"
                     f"{' ...' if len(r.miss_list) > 6 else ''}\n" for r in rows if r.miss_list)
    return head + body + ("\nMisses (case, N, tol, row, stopping iteration, true error):\n\n" + misses if misses else "")


# ---------------------------------------------------------------------------------------------------- suite

GMM_HARD = [(2, 8, 0.02, 0), (3, 8, 0.02, 0), (4, 8, 0.02, 0), (4, 8, 0.02, 1), (4, 8, 0.02, 3), (4, 8, 0.02, 2),
            (1, 8, 0.02, 2), (3, 8, 0.02, 2)]
GMM_MORE = [(2, 3, 0.1, 5), (8, 16, 0.05, 4), (16, 4, 0.3, 6), (64, 8, 0.02, 7)]


def suite(quick: bool) -> list[Case]:
    """Quick: the hard mixtures at N = 25, 100, image by image. Full: more mixtures, N up to 1024, the digits UNet
    with and without guidance (N = 1024 with 3 images: a minute per iterate on a shared CPU core), and the
    old block count round(sqrt(N)) beside the new default, to show what the block count buys."""
    cases = []
    gmm = GMM_HARD[:5] if quick else GMM_HARD + GMM_MORE
    for n in ([25, 100] if quick else [25, 100, 400]):
        for dim, modes, std, seed in gmm:
            cases.append(Case(f"gmm-d{dim}-m{modes}-s{std}-seed{seed}", n, 32, True, iters=12))
    if not quick:
        for dim, modes, std, seed in GMM_HARD[:3]:
            for blocks in (None, 32):
                cases.append(Case(f"gmm-d{dim}-m{modes}-s{std}-seed{seed}", 1024, 16, True, blocks, iters=8))
        for n, images in ((25, 10), (100, 10), (1024, 3)):
            for name in ("digits", "digits-cfg4"):
                cases.append(Case(name, n, images, False, iters=5 if n == 1024 else 8))
        cases.append(Case("digits-cfg4", 1024, 3, False, 32, iters=5))
    return cases


def run(quick: bool, tols=(1e-2, 1e-3)) -> list[Row]:
    out = []
    for case in suite(quick):
        its = iterates(case)
        for tol in tols:
            for pipelined in (False, True):
                out.append(evaluate(case, tol, pipelined, its))
    return out


def run_batched(tols=(1e-2, 1e-3)) -> list[Row]:
    """BATCHED, pipelined only (the schedule does not change where the rule stops, only the calls)."""
    return [evaluate(case, tol, True, its) for case in BATCHED for its in [iterates(case)] for tol in tols]


def markdown(rows: list[Row]) -> str:
    head = ("| case | N | tol | schedule | blocks | images | rule: iters / calls | first-good: iters / calls | settled | "
            "returned error | late |\n|---|---|---|---|---|---|---|---|---|---|---|\n")

    def fmt(k, c):
        return "—" if k is None else f"{k} / {c}"

    legend = ("\nCalls: sequential model calls (schedule.build_tick_plan). GMM rows: each of `images` images run alone, "
              "the WORST image shown (latest stop, then largest error). first-good: the first iterate within tol; "
              "settled: the first from which every later iterate stays within tol; late = rule - max(1, settled).\n")
    return head + "".join(
        f"| {r.case} | {r.steps} | {r.tol:g} | {'pipelined' if r.pipelined else 'plain'} | {r.blocks} | {r.images} | "
        f"{fmt(r.rule_iters, r.rule_calls)} | {fmt(r.oracle_iters, r.oracle_calls)} | {r.settled_iters} | "
        f"{'—' if r.error is None else f'{r.error:.2e}'} | {r.late}{' (late)' if r.late > 1 else ''}{'' if r.ok else ' FAIL'} |\n" for r in rows) + legend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stopping", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Gaussian mixtures at N=25, 100 only (< 60 s, one core)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/stopping: the latest run)")
    parser.add_argument("--batched", action="store_true", help="the batched mixture cases only (BATCHED: several "
                        "images judged as one run, as the pipeline runs them)")
    parser.add_argument("--variants", action="store_true", help="replay the candidate rules (VARIANTS) on the suite "
                        "and the batched cases; writes variants.md / variants.json")
    parser.add_argument("--tols", default="0.01,0.001", help="with --variants: the tols (comma-separated)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = args.out or RESULTS / "stopping"
    out.mkdir(parents=True, exist_ok=True)
    if args.variants:
        tols = tuple(float(t) for t in args.tols.split(","))
        vrows = (judge_variants(suite(args.quick), "per-image suite" + (" (quick)" if args.quick else ""), tols)
                 + judge_variants(BATCHED, "batched", tols))
        table = f"tols: {', '.join(f'{t:g}' for t in tols)}; pipelined calls\n\n" + variants_markdown(vrows)
        print(table)
        stem = "variants" if args.tols == "0.01,0.001" else f"variants-{len(tols)}tols"
        (out / f"{stem}.md").write_text(table)
        (out / f"{stem}.json").write_text(json.dumps([asdict(r) | {"tols": tols} for r in vrows], indent=1))
        print(f"{time.perf_counter() - start:.1f} s; written to {out}")
        return 0
    rows = run_batched() if args.batched else run(args.quick)
    table = markdown(rows)
    print(table)
    stem = "batched" if args.batched else "quick" if args.quick else "full"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in rows], indent=1))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows)} rows, {len(bad)} failing, {time.perf_counter() - start:.1f} s; written to {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
