"""The parity gate: ONNX Runtime must reproduce PyTorch before anything is built from the ONNX.

The reference is always the fp32 PyTorch model, fed the very inputs the ONNX gets (fp16 inputs are cast up), so
for an fp16 export the error measures what half precision costs end to end and NaN/Inf from fp16 overflow
(SD2.1 attention) fails the gate. ONNX Runtime's CPU provider loads the fp16 graph as is (seen with onnxruntime
1.32 on diffusers UNets); where it lacks an fp16 kernel it computes that node in fp32 (its cast-insertion pass),
so the gate can be slightly kinder than TensorRT's fp16 kernels: the bound is a sanity gate, not a TensorRT
accuracy proof.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch, or produced NaN/Inf."""


@dataclass(frozen=True)
class ParityReport:
    rows: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|, per batch size, worst of them
    tolerance: float

    def as_json(self) -> dict:
        return {"rows": list(self.rows), "max_abs": self.max_abs, "max_rel": self.max_rel, "tolerance": self.tolerance}


def parity_rows(min_batch: int, max_batch: int) -> tuple[int, ...]:
    """Two batch sizes in the profile; an odd second one catches row-broadcasting bugs."""
    return tuple(sorted({min_batch, min(max_batch, min_batch + 2)}))


def reference_outputs(module: Callable, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run the fp32 PyTorch module on each feed (float inputs cast to fp32)."""
    outputs = []
    with torch.no_grad():
        for feed in feeds:
            args = [torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v) for v in feed.values()]
            outputs.append(module(*args).float().numpy())
    return outputs


def check_parity(
    onnx_path: Path, feeds: list[dict[str, np.ndarray]], references: list[np.ndarray], tolerance: float
) -> ParityReport:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's warnings about fp16 casts are noise here
    # no pre-packed second copy of every weight matrix: a one-off gate does not need the faster GEMM layout, and
    # for a real model (SD3-medium: 8 GB of fp32 weights) the copy is what would not fit
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst_abs = worst_rel = 0.0
    for feed, reference in zip(feeds, references):
        (got,) = session.run(None, feed)
        got = got.astype(np.float32)
        rows = next(iter(feed.values())).shape[0]
        if not np.isfinite(got).all() or not np.isfinite(reference).all():
            raise ParityError(
                f"parity: NaN/Inf in outputs at {rows} rows (onnx finite={np.isfinite(got).all()}, "
                f"torch finite={np.isfinite(reference).all()}); fp16 overflow? try --dtype fp32"
            )
        if got.shape != reference.shape:
            raise ParityError(f"parity: ONNX output shape {got.shape} != PyTorch {reference.shape} at {rows} rows")
        abs_err = float(np.abs(got - reference).max())
        rel_err = abs_err / max(float(np.abs(reference).max()), 1e-12)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    report = ParityReport(tuple(f["sample"].shape[0] for f in feeds), worst_abs, worst_rel, tolerance)
    if worst_rel > tolerance:
        raise ParityError(
            f"parity: ONNX Runtime vs PyTorch max abs {worst_abs:.3g}, rel {worst_rel:.3g} > tolerance "
            f"{tolerance:.3g} (rows {list(report.rows)}); nothing built"
        )
    return report
