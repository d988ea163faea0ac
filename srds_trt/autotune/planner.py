"""The planner behind `sampler="auto"`: what the pipeline calls (choose, observe), and the state it keeps per
pipeline: measured latency curves, all-gather times, cached choices and the iterations past runs needed.

Pricing itself is pure (pricing.py); this module measures and remembers. Every cache is bounded: one entry per
settings (replaced when observations change), curves per engine, at most pricing.OBSERVED_RUNS runs per candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from . import pricing
from .latency import bucketed


class AutoPlanner:
    """sampler="auto" for one pipeline. `rows_per_image(sampler, options)` sizes a candidate's image chunks as the
    pipeline would run them."""

    def __init__(self, pipeline):
        self.pipe = pipeline
        self.cache: dict[tuple, Any] = {}  # curves, all-gather times, choices (per pipeline)
        # (steps, tol, guided, pricing.candidate_key) -> iterations / sweeps per chunk of converged runs, newest last
        self.observed: dict[tuple, list[int]] = {}

    def choose(self, steps: int, images: int, scale: float, tol: float, max_rows: int, max_iters: int | None,
               rows_per_image: Callable[[str, dict], int]) -> dict:
        """autotune's choice for this model, engine, device, world size, N and tol, as the stats record it:
        Choice.as_dict() (every candidate's predicted ms, the reason, any fallback) plus where the latency curve
        came from and what a tick's all-gather costs. Every rank of a process group gets rank 0's curve and
        all-gather time, so all ranks choose the same sampler (they must run the same schedule)."""
        pipe = self.pipe
        guided = scale != 1.0
        widest = pricing.widest_rows(steps=steps, images=images, guided=guided)
        world = pipe.world_size
        curve, source, buckets, capacity = self.latency_curve(widest, world)
        allgather_ms, allgather = self.allgather_cost(widest, world)
        if pipe.process_group is not None and world > 1:  # agree on rank 0's numbers
            import torch.distributed as dist

            shared = [curve, source, allgather_ms]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(pipe.process_group, 0), group=pipe.process_group)
            curve, source, allgather_ms = shared
        if source == "engine warm-up":  # after every rank has read the manifest: none sees it change mid-decision
            self.record_curve(curve)
        latency = bucketed(curve, buckets) if buckets else curve  # a call pads to its bucket: price it there
        overhead = pricing.GPU_SWEEP_OVERHEAD_MS if pipe.device.type == "cuda" else None
        observed = {cand: pricing.observed_iterations(history) for (n, t, g, cand), history in self.observed.items()
                    if (n, t, g) == (steps, tol, guided)}
        key = ("choice", steps, images, guided, world, allgather_ms, tuple(sorted(curve.items())), buckets, tol,
               max_rows, max_iters)
        seen = tuple(sorted(observed.items()))
        cached = self.cache.get(key)
        if cached is None or cached[0] != seen:  # one entry per settings, replaced when the observations change
            self.cache[key] = (seen, pricing.choose(steps=steps, images=images, guided=guided, latency_ms=latency,
                                                    world_size=world, allgather_ms=allgather_ms,
                                                    sweep_overhead_ms=overhead, tol=tol, max_rows=max_rows,
                                                    rows_per_image=rows_per_image, observed=observed))
        choice = self.cache[key][1]
        runnable = pipe.runnable_samplers()

        def why_not(candidate) -> str | None:
            if capacity is not None and candidate.rows_per_call > capacity:
                return f"its widest call needs {candidate.rows_per_call} rows, the export holds {capacity}"
            if candidate.sampler not in runnable:
                return f"this path ({pipe.backend} on {pipe.device.type}) runs {', '.join(runnable)}"
            return None

        choice = pricing.runnable_choice(choice, why_not)
        return {**choice.as_dict(), "tol": tol, "curve_source": source,
                "latency_per_rows_ms": {int(r): round(float(ms), 4) for r, ms in curve.items()},
                "world_size": world, "allgather_ms": allgather_ms, "allgather": allgather,
                "curve_recorded": self.cache.get(("recorded", str(getattr(pipe.runtime, "artifacts", None))))}

    def observe(self, sampler: str, steps: int, tol: float, guided: bool, pipelined: bool, max_iters: int | None,
                chunks: list[dict]) -> None:
        """Remember what a run's chunks needed (SRDS: Parareal iterations; windows: sweeps), for the next choice at
        the same (N, tol, guidance). Only complete runs count: converged, not cut by max_iters."""
        if sampler not in pricing.CANDIDATES or sampler == "serial" or max_iters is not None:
            return
        for part in chunks:
            if not part.get("converged") or part.get("iterations") is None:
                continue
            options = {"num_blocks": part["blocks"], "pipelined": pipelined} if sampler == "srds" \
                else {"window": part["window"]}
            history = self.observed.setdefault((steps, tol, guided, pricing.candidate_key(sampler, options)), [])
            history.append(int(part["iterations"]))
            del history[:-pricing.OBSERVED_RUNS]

    def latency_curve(self, widest: int, world: int = 1):
        """(curve {rows: ms}, source, the engine's buckets or None, rows the export can hold or None); cached per
        pipeline and engine. Sources, first that applies: "manifest" (the export's latency_per_rows, measured on
        the GPU that serves its plan); "engine warm-up" (the runtime's engine, every bucket); "reference model"
        (the PyTorch model this pipeline samples with on a CPU). Rows are per rank."""
        pipe = self.pipe
        per_rank = -(-widest // world)
        if pipe.runtime is None:  # a curve measured as wide or wider serves (measured once per width it grows to)
            wide = [k for k in self.cache if k[0] == "reference" and k[1] >= min(per_rank, 64)]
            key = min(wide, key=lambda k: k[1]) if wide else ("reference", per_rank)
            if key not in self.cache:
                self.cache[key] = self.measure_reference_curve(per_rank)
            return self.cache[key], "reference model", None, None
        capacity = None
        if pipe.runtime.artifacts is not None:  # an export: its manifest may hold the curve, its profile bounds rows
            max_batch, stored = self.manifest_curve()
            capacity = max_batch * world
            if stored:
                return stored, "manifest", None, capacity
        engine = pipe.runtime.engine_for(min(widest, capacity or widest))  # built as a run would build it, then kept
        local = getattr(engine, "inner", engine)  # a ShardedEngine's own engine: one rank's share of a call
        key = ("engine", id(local), local.buckets)
        if key not in self.cache:
            self.cache[key] = self.measure_engine_curve(local)
        return self.cache[key], "engine warm-up", local.buckets, capacity

    def manifest_curve(self) -> tuple[int, dict[int, float] | None]:
        """(the export's max_batch, its latency_per_rows or None), read once per manifest version."""
        from ..export.artifacts import MANIFEST_NAME, read_manifest

        path = Path(self.pipe.runtime.artifacts)
        key = ("manifest", str(path), (path / MANIFEST_NAME).stat().st_mtime_ns)
        if key not in self.cache:
            manifest = read_manifest(path)
            stored = manifest.get("latency_per_rows")
            self.cache[key] = (int(manifest["request"]["max_batch"]),
                               {int(r): float(ms) for r, ms in stored.items()} if stored else None)
        return self.cache[key]

    def measure_reference_curve(self, widest: int) -> dict[int, float]:
        """ms per conditional model call of this rank's model vs rows: 1, 2, 4, ... below `widest`, and `widest`
        (at most 64: wider calls extrapolate with the last slope); interleaved rounds, best of three."""
        from .latency import best_ms_interleaved

        pipe = self.pipe
        model = pipe.cond_model.model if pipe.process_group is not None else pipe.cond_model  # unsharded
        top = min(widest, 64)
        calls = {}
        for r in sorted({*(2**k for k in range(7) if 2**k < top), top}):
            x = torch.zeros((r, *pipe.loaded.sample_shape), device=pipe.device, dtype=pipe.dtype)
            t = torch.full((r,), 500, device=pipe.device)
            cond, _ = pipe.encode(["0" if pipe.family == "digits" else ""] * r)
            calls[r] = lambda x=x, t=t, cond=cond: model(x, t, cond)
        return best_ms_interleaved(calls, pipe.device, 3)

    def measure_engine_curve(self, engine) -> dict[int, float]:
        from .latency import measure_engine_curve

        return measure_engine_curve(engine)

    def record_curve(self, curve: dict[int, float]) -> None:
        """Store a measured engine curve in the export's manifest when it has none (rank 0 only; atomic). Only a
        TensorRT plan's: a plan is built for one GPU target, so its curve belongs to it; an ONNX export serves
        CPUs of any size and load."""
        pipe = self.pipe
        folder = getattr(pipe.runtime, "artifacts", None)
        key = ("recorded", str(folder))
        if folder is None or key in self.cache:
            return
        if pipe.backend != "tensorrt":
            self.cache[key] = f"not recorded: an {pipe.backend} export is not tied to one device"
            return
        if pipe.process_group is not None:
            import torch.distributed as dist

            if dist.get_rank(pipe.process_group) != 0:
                return
        from ..export.artifacts import ArtifactError, record_latency

        try:
            record_latency(folder, curve)
            self.cache[key] = f"recorded in {folder}/manifest.json"
        except (ArtifactError, OSError) as exc:  # a read-only export still runs: say why, go on
            self.cache[key] = f"not recorded: {exc}"

    def allgather_cost(self, widest: int, world: int) -> tuple[float, str | None]:
        """ms of one all-gather of a tick's state on the pipeline's group, measured once; (0, None) on one rank."""
        if world == 1:
            return 0.0, None
        from .latency import measure_allgather_ms

        pipe = self.pipe
        per_rank = -(-widest // world)
        key = ("allgather", per_rank)
        if key not in self.cache:
            ms = measure_allgather_ms(pipe.process_group, per_rank, pipe.loaded.sample_shape, pipe.dtype, pipe.device)
            self.cache[key] = (ms, f"measured at warm-up: one all-gather of {per_rank} rows x "
                                   f"{tuple(pipe.loaded.sample_shape)} per rank, best of 3")
        return self.cache[key]
