"""What `generate` writes and prints: the output folder (atomic, chunk by chunk) and the summary table."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


class OutputWriter:
    """Writes a run into a temporary folder beside --out, chunk by chunk (memory stays bounded whatever the image
    count), and renames it into place at the end: --out holds either the whole of one run or what it held before
    (never a mix, never half a run). abort() removes the temporary folder."""

    GRID_IMAGES = 100  # grid.png shows the first images

    def __init__(self, out_dir: Path, overwrite: bool):
        self.out_dir, self.overwrite = out_dir.absolute(), overwrite
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self.names: list[str] = []
        self.grid: list = []

    def add(self, images: list) -> None:
        for image in images:
            name = f"{len(self.names):03d}.png"
            image.save(self.tmp / name)
            self.names.append(name)
            if len(self.grid) < self.GRID_IMAGES:
                self.grid.append(image)

    def finish(self, stats: dict) -> None:
        from ..images import make_grid

        stats = {**stats, "files": self.names + ["grid.png"]}
        text = json.dumps(stats, indent=2, allow_nan=False) + "\n"  # strict JSON: a NaN here is a bug, not output
        make_grid(self.grid).save(self.tmp / "grid.png")
        (self.tmp / "stats.json").write_text(text)
        os.chmod(self.tmp, 0o777 & ~_umask())
        _replace(self.tmp, self.out_dir, self.overwrite)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _replace(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    if not overwrite:  # appeared during the run
        raise FileExistsError(f"--out {out_dir} was filled by someone else during the run; pass --overwrite")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


STEP_NAMES = {"ddim": "DDIM", "flow-euler": "flow-Euler"}


def summary_table(stats: dict) -> str:
    """Serial vs the sampler: iterations, blocks, model evaluations, sequential calls, first-call and setup time,
    wall time, max difference."""
    images = stats["images"]
    header = ("sampler", "iterations", "blocks/window", "model evals/image", "sequential calls", "speedup (calls)",
              "setup s", "wall time s", "max |diff| vs serial")
    rows = []
    serial = stats.get("serial") if stats["sampler"] != "serial" else stats
    if serial is not None:
        rows.append(("serial", "-", "1", f"{serial['model_evals'] / images:.0f}", str(serial["sequential_calls"]),
                     "1.00x", f"{serial.get('setup_s', 0.0):.3f}", f"{serial['wall_time_s']:.3f}", "0"))
    if stats["sampler"] != "serial":
        diff = stats.get("max_abs_diff_vs_serial")
        name = stats["sampler"].upper() if stats["sampler"] == "srds" else stats["sampler"]
        unit = "" if stats["sampler"] == "srds" else " sweeps"
        serial_calls = stats["steps"] * stats.get("chunks", 1)
        rows.append((name + (" pipelined" if stats.get("pipelined") else ""), f"{stats['iterations']}{unit}",
                     _width(stats), f"{stats['model_evals'] / images:.0f}", str(stats["sequential_calls"]),
                     f"{serial_calls / max(1, stats['sequential_calls']):.2f}x",
                     f"{stats.get('setup_s', 0.0):.3f}", f"{stats['wall_time_s']:.3f}",
                     "-" if diff is None else f"{diff:.2e}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    title = (f"{stats['model']}: {images} image(s), {stats['steps']} {STEP_NAMES.get(stats.get('solver'), 'DDIM')} steps, guidance {stats['guidance_scale']}, "
             f"{stats['device']} {stats.get('engine_dtype', stats['dtype'])}"
             + (f", {stats['engine']}" if stats.get("engine") else ""))
    notes = ["(setup: engine, buffers and graph capture of a first call; a cached runner's later calls skip it)"]
    if stats["device"] == "cpu":
        notes.append("(CPU wall time is throughput-bound: a parallel sampler does more model work, so on a CPU it is "
                     "rarely faster than serial; sequential calls are what a GPU with idle parallel capacity turns into "
                     "latency; measured GPU times: docs/results.md)")
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows), *notes])


def _width(stats: dict) -> str:
    """SRDS's blocks, or a sliding-window sampler's points per sweep ("w=..")."""
    if stats.get("blocks") is not None:
        return str(stats["blocks"])
    return f"w={stats['window']}" if stats.get("window") is not None else "-"


def auto_line(auto: dict) -> str:
    """--sampler auto's one line: what it chose, from which latency curve, and why (stats.json "auto" has it all)."""
    options = ", ".join(f"{k}={v}" for k, v in auto["options"].items())
    world = f", {auto['world_size']} ranks" if auto.get("world_size", 1) > 1 else ""
    return (f"auto: chose {auto['sampler']}{f'({options})' if options else ''} (curve: {auto['curve_source']}{world}); "
            f"{auto['reason']}")
