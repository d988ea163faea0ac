"""Real-shape exports on this machine: `python -m srds_trt.export` run as users run it, timed stage by stage, its
peak memory measured, the artifacts described, then removed (an SD3-medium fp32 export is 16 GB).

    python -m benchmarks.export_real_shapes --model sd3 [--height 512 --width 512] [--dtype fp32] [--max-batch 2]
                                            [--out benchmarks/results/export-real-shapes] [--keep DIR]

Writes OUT/<model>-<dtype>-<H>x<W>.json (machine, torch, date, the command, wall seconds, peak RSS of the export
process, the manifest's stage seconds, parity errors, plan build seconds, file sizes) and OUT/results.md (a row
per JSON in the folder). Plans are built, not executed: TensorRT-RTX builds on a CPU, and cannot run on H100/H200.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_export(args) -> dict:
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="export-real-"))
    cmd = [sys.executable, "-m", "srds_trt.export", "--model", args.model, "--random-weights", "--dtype", args.dtype,
           "--max-batch", str(args.max_batch), "--out", str(work)]
    if args.height:
        cmd += ["--height", str(args.height), "--width", str(args.width or args.height)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child's peak
    record = {"command": " ".join(["python -m srds_trt.export", *cmd[3:-2], "--out", "engines"]),
              "returncode": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
              "log": [line for line in proc.stderr.splitlines() if line.startswith("[export]")],
              "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None}
    manifests = sorted(work.glob(f"{args.model}/*/manifest.json"))
    if proc.returncode == 0 and manifests:
        manifest = json.loads(manifests[-1].read_text())
        request = manifest["request"]
        record.update(
            height=request["height"], width=request["width"], dtype=request["dtype"], max_batch=request["max_batch"],
            stage_seconds=manifest["stage_seconds"], parity=manifest["parity"],
            plan={"flavour": manifest["tensorrt"]["flavour"], "version": manifest["tensorrt"]["version"],
                  "build_seconds": manifest["tensorrt"]["build_seconds"],
                  "target": manifest["tensorrt"]["target"]["compute_capabilities"], "executed": False},
            files_mib={name: round(entry["bytes"] / 2**20, 1) for name, entry in manifest["files"].items()})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return record


def write_table(out: Path) -> None:
    rows = ["| model | dtype | image | rows | wall | reference | ONNX | parity (max abs) | plan build | ONNX + data | plan | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("returncode"):
            rows.append(f"| {r['model']} | {r.get('dtype_flag')} | {r.get('image')} | | failed: {r.get('error')} | | | | | | | "
                        f"{r['peak_rss_gib']} GiB |")
            continue
        stage = lambda prefix: next((f"{v:.0f} s" for k, v in r["stage_seconds"].items() if k.startswith(prefix)), "")  # noqa: E731
        onnx_mib = sum(v for k, v in r["files_mib"].items() if k.startswith("unet.onnx"))
        rows.append(f"| {r['model']} | {r['dtype']} | {r['height']}x{r['width']} | 1..{r['max_batch']} | {r['wall_s']:.0f} s "
                    f"| {stage('reference')} | {stage('onnx')} | {stage('parity')} ({r['parity']['max_abs']:.1e}) "
                    f"| {r['plan']['build_seconds']:.0f} s | {onnx_mib / 1024:.1f} GiB | {r['files_mib'].get('unet.plan', 0) / 1024:.1f} GiB "
                    f"| {r['peak_rss_gib']} GiB |")
    (out / "results.md").write_text("Real-shape exports (random weights), built on this CPU, plans not executed.\n\n"
                                    + "\n".join(rows) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd3")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/export-real-shapes")
    parser.add_argument("--keep", default=None, help="export into this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    record = {"model": args.model, "dtype_flag": args.dtype,
              "image": f"{args.height}x{args.width or args.height}" if args.height else "default",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"device": "cpu", "cpu": cpu_name(),
                          "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                          "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)}}
    record.update(run_export(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "height" in record:
        record["image"] = f"{record['height']}x{record['width']}"
    name = f"{args.model}-{args.dtype}-{record['image']}.json"
    (out / name).write_text(json.dumps(record, indent=1) + "\n")
    write_table(out)
    print((out / "results.md").read_text())
    return 0 if record["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
