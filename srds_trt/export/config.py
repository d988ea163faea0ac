"""What an export is asked to do: one frozen dataclass, validated before any weights are loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPES = ("fp16", "fp32")
EXPORTERS = ("legacy", "dynamo")
# Opset 17 is accepted by the TorchScript ("legacy") exporter of torch 2.11 and 2.13 and by TensorRT's ONNX
# parser; the dynamo exporter upgrades it to 18 itself (its minimum), so one default serves both.
DEFAULT_OPSET = 17
# Relative parity error (max |onnx - torch| / max |torch|) allowed per dtype. fp16 is compared against the fp32
# PyTorch model, so its bound covers half-precision rounding through the whole UNet, not just exporter bugs.
DEFAULT_PARITY_TOL = {"fp32": 1e-3, "fp16": 3e-2}


class ExportConfigError(ValueError):
    """An invalid combination of export options."""


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: Path = Path("engines")
    dtype: str = "fp16"
    min_batch: int = 1
    opt_batch: int | None = None  # None: the middle of the range, rounded to a power of two
    max_batch: int = 32
    height: int | None = None  # None: the model's native resolution (pixels for digits, latents ×8 for SD)
    width: int | None = None
    opset: int = DEFAULT_OPSET
    exporter: str = "legacy"
    profiles: int = 1
    random_weights: bool = False
    seed: int = 0
    parity_tol: float | None = None  # None: DEFAULT_PARITY_TOL[dtype]
    aoti: bool = False  # also write the AOTInductor package + sampler.json for the C/C++ runtime (export/aoti.py)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.exporter not in EXPORTERS:
            raise ExportConfigError(f"--exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.min_batch < 1:
            raise ExportConfigError(f"--min-batch must be >= 1, got {self.min_batch}")
        if self.max_batch < self.min_batch:
            raise ExportConfigError(f"--max-batch ({self.max_batch}) < --min-batch ({self.min_batch})")
        if self.opt_batch is not None and not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportConfigError(
                f"--opt-batch ({self.opt_batch}) must lie in [{self.min_batch}, {self.max_batch}]"
            )
        if (self.height is None) != (self.width is None):
            raise ExportConfigError("give both --height and --width, or neither")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ExportConfigError(f"--{name} must be a positive multiple of 8, got {value}")
        if self.profiles < 1:
            raise ExportConfigError(f"--profiles must be >= 1, got {self.profiles}")
        if self.opset < 14:
            raise ExportConfigError(f"--opset must be >= 14 (TensorRT's ONNX parser), got {self.opset}")
        if self.parity_tol is not None and not self.parity_tol > 0:
            raise ExportConfigError(f"--parity-tol must be > 0, got {self.parity_tol}")

    @property
    def batch_range(self) -> tuple[int, int, int]:
        """(min, opt, max) rows of the optimization profile."""
        opt = self.opt_batch
        if opt is None:
            opt = 1
            while opt * 2 <= (self.min_batch + self.max_batch) // 2:
                opt *= 2
            opt = max(opt, self.min_batch)
        return self.min_batch, opt, self.max_batch

    @property
    def onnx_opset(self) -> int:
        """The opset actually written: the dynamo exporter cannot go below 18."""
        return self.opset if self.exporter == "legacy" else max(self.opset, 18)

    @property
    def tolerance(self) -> float:
        return self.parity_tol if self.parity_tol is not None else DEFAULT_PARITY_TOL[self.dtype]
