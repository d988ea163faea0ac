"""The sampler model of a Triton repository (srds_trt.serve.triton.repo): Triton's Python backend loads the repository's
model.py, which re-exports TritonPythonModel from here.

Inputs and outputs are the server's (srds_trt.serve.protocol): prompt BYTES [n] and optional seed, steps,
guidance_scale, sampler, tol -> image UINT8 [n, H, W, C], stats BYTES [1]. Each UNet call of the sampler is one
BLS request to the `<name>_unet` tensorrt_plan model with all live rows (classifier-free guidance's doubled rows
included), so the sampler here is the pure reference sampler and Triton owns the engine. The pipeline (CPU,
torch backend) supplies the schedule, conditioning, noise and the PNG pixel conversion, so a seed gives what
`generate --seed` gives; its own UNet is only a shape/metadata source and is never called.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..batching import pil_to_array
from ..protocol import ProtocolError, read_tensors


def bls_unet(pb_utils, unet_model: str, dtype: str):
    """cond_model(x, t, cond) -> model_output through a BLS request to the UNet model (inputs of the export's
    I/O contract: sample, timestep float32, class_labels int64 or encoder_hidden_states)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32

    def cond_model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond_name = "class_labels" if cond.dtype == torch.long else "encoder_hidden_states"
        rows = x.shape[0]
        inputs = [pb_utils.Tensor("sample", x.detach().cpu().numpy().astype(np_dtype)),
                  pb_utils.Tensor("timestep", t.detach().cpu().float().reshape(-1).expand(rows).contiguous().numpy()),
                  pb_utils.Tensor(cond_name, cond.detach().cpu().numpy() if cond.dtype == torch.long
                                  else cond.detach().cpu().numpy().astype(np_dtype))]
        response = pb_utils.InferenceRequest(model_name=unet_model, inputs=inputs,
                                             requested_output_names=["model_output"]).exec()
        if response.has_error():
            raise RuntimeError(f"UNet model {unet_model}: {response.error().message()}")
        out = pb_utils.get_output_tensor_by_name(response, "model_output").as_numpy()
        return torch.from_numpy(np.array(out, dtype=np.float32)).to(x.dtype)

    return cond_model


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from ...pipeline import SRDSPipeline

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.pb_utils = pb_utils
        self.max_rows = int(params["max_rows"])
        self.pipe = SRDSPipeline.from_pretrained(params["registry_model"], device="cpu")
        dtype = params.get("unet_dtype", "float32")
        # the reference path calls pipe.cond_model for every UNet evaluation: route it to Triton's engine
        self.pipe.cond_model = bls_unet(pb_utils, params["unet_model"], dtype)

    def execute(self, requests):
        responses = []
        for request in requests:
            responses.append(self._one(request))
        return responses

    def _one(self, request):
        pb = self.pb_utils
        names = ("prompt", "seed", "steps", "guidance_scale", "sampler", "tol")
        tensors = {}
        for name in names:
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy()
        try:
            prompts, seed, s = read_tensors(tensors, default_steps=self.pipe.default_steps, max_images=self.max_rows)
            output = self.pipe(list(prompts), num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                               sampler=s.sampler, tol=s.tol, generator=seed, max_rows=self.max_rows,
                               progress_bar=False)
        except (ProtocolError, ValueError) as exc:
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
        image = pil_to_array(output.images)
        stats = np.array([json.dumps({**output.stats, "seed": seed}).encode()], dtype=object)
        return pb.InferenceResponse(output_tensors=[pb.Tensor("image", image), pb.Tensor("stats", stats)])

    def finalize(self):
        self.pipe = None
