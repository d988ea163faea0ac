"""PyTorch UNet → ONNX with a dynamic `rows` axis and static spatial size.

fp16 is exported from the half model itself: TensorRT 11 networks are strongly typed, so the ONNX graph decides
the precision, not a builder flag.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from .io_contract import ROWS, IOContract

ONNX_NAME = "unet.onnx"
DATA_NAME = "unet.onnx.data"
# protobuf cannot serialise a message over 2 GiB; stay well clear so graph structure fits beside the weights.
EXTERNAL_DATA_BYTES = 1_800_000_000


class UNetForExport(torch.nn.Module):
    """The diffusers UNet behind the pinned signature (sample, timestep, conditioning) -> model_output."""

    def __init__(self, unet: torch.nn.Module, conditioning: str) -> None:
        super().__init__()
        self.unet = unet
        self.cond_kwarg = {"class": "class_labels", "text": "encoder_hidden_states"}[conditioning]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, **{self.cond_kwarg: cond}, return_dict=False)[0]


class ModelFnForExport(torch.nn.Module):
    """A flow model (digits-flow's UNet, an SD3 / Flux transformer) behind the same pinned signature, through the
    model wrapper the samplers call (models.unet_model_fn): the timestep input is sigma, the conversion to the
    network's timestep (and Flux's token packing, the text / pooled split of cond) is inside the graph."""

    def __init__(self, loaded) -> None:
        super().__init__()
        self.loaded = loaded
        self.unet = loaded.unet  # registered: .half() / .float() reach the weights

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        from ..models import unet_model_fn

        return unet_model_fn(self.loaded)(sample, timestep, cond)  # built per call: it reads the current dtype


def export_module(loaded) -> torch.nn.Module:
    """What is exported for a loaded model: the raw UNet (DDIM models) or the flow wrapper."""
    if loaded.spec.prediction_type == "flow":
        return ModelFnForExport(loaded).eval()
    return UNetForExport(loaded.unet, loaded.conditioning).eval()


class _DecomposedRMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm in plain ops: the legacy ONNX exporter has no symbolic for aten::rms_norm at opset 17
    (Flux's q/k norms use it); same arithmetic, checked by the parity gate."""

    def __init__(self, norm: torch.nn.RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return out * self.weight if self.weight is not None else out


def decompose_rms_norm(module: torch.nn.Module) -> None:
    """Replace every torch.nn.RMSNorm under `module` by _DecomposedRMSNorm (in place)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.RMSNorm):
                setattr(parent, name, _DecomposedRMSNorm(child))


def use_upcasting_attention(unet: torch.nn.Module) -> None:
    """Make attention compute QK^T and softmax in fp32.

    SD2.1's attention overflows fp16 (NaN latents, black images: TensorRT #2667, diffusers #1614). The fused SDPA
    processor ignores `upcast_attention`; the classic processor honours it, and exports to plain MatMul/Softmax
    that TensorRT fuses again.
    """
    from diffusers.models.attention_processor import Attention

    if hasattr(unet, "set_default_attn_processor"):
        unet.set_default_attn_processor()
    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = True
            module.upcast_softmax = True


def parameter_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(
    module: UNetForExport,
    contract: IOContract,
    example: dict[str, torch.Tensor],
    folder: Path,
    *,
    opset: int,
    exporter: str,
) -> list[Path]:
    """Write `folder/unet.onnx` (+ `unet.onnx.data` when large); return the files written."""
    names = [spec.name for spec in contract.inputs]
    args = tuple(example[name] for name in names)
    output_names = [spec.name for spec in contract.outputs]
    with tempfile.TemporaryDirectory(dir=folder, prefix=".raw-") as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # Tracer warnings about shape asserts in diffusers are expected: spatial size is static by design.
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                torch.onnx.export(
                    module, args, str(raw), input_names=names, output_names=output_names,
                    dynamic_axes={name: {0: ROWS} for name in names + output_names},
                    opset_version=opset, do_constant_folding=True, dynamo=False,
                )
            else:
                rows = torch.export.Dim(ROWS, min=1, max=4096)
                program = torch.onnx.export(
                    module, args, input_names=names, output_names=output_names,
                    dynamic_shapes={"sample": {0: rows}, "timestep": {0: rows}, "cond": {0: rows}},
                    opset_version=opset, dynamo=True, verbose=False,
                )
                program.save(str(raw), external_data=True)
        model = onnx.load(str(raw), load_external_data=True)
    external = parameter_bytes(module) > EXTERNAL_DATA_BYTES
    path = folder / ONNX_NAME
    onnx.save_model(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
        location=DATA_NAME, size_threshold=1024,
    )
    onnx.checker.check_model(str(path))  # the path form also checks >2 GiB models with external data
    return [path, folder / DATA_NAME] if external else [path]
