"""The serial baseline on the same runtime: one engine call per DDIM step, each step one CUDA graph.

SRDS speedups are quoted against this, not against eager PyTorch: the baseline gets the same static buffers,
the same graph per step (engine call + guidance + DDIM update) and the same engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engines.base import Engine
from ..solvers import alphas_at, as_grid, check_solver, ddim_coefficients, ddim_update
from .engine_call import guided_call, load_conditioning


class SerialRunner:
    def __init__(
        self,
        engine: Engine,
        *,
        batch: int,
        timesteps: Tensor,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        guided: bool = True,
        cuda_graphs: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ):
        check_solver("ddim", prediction_type)
        self.engine, self.batch, self.guided = engine, batch, guided
        self.device = engine.device
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        timesteps = as_grid(timesteps)
        alphas = alphas_at(timesteps, alphas_cumprod)
        c_x, c_out = ddim_coefficients(alphas[:-1], alphas[1:], prediction_type)
        # Per-step meta rows: (timestep, c_x, c_out), copied into the static buffer before each replay.
        self._table = torch.stack([timesteps[:-1].to(torch.float64), c_x, c_out], 1).to(self.device)
        self.bucket = engine.bucket_for(batch * (2 if guided else 1))
        self.state = torch.zeros(batch, *engine.spec.sample_shape, dtype=state_dtype, device=self.device)
        self.meta = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.scale = torch.ones((), dtype=state_dtype, device=self.device)
        self.graph = None
        self.steps = len(timesteps) - 1

    def _step(self) -> None:
        rows = self.meta[0].expand(self.batch)
        out = guided_call(self.engine, self.bucket, 0, self.state, rows, self.scale if self.guided else None)
        self.state.copy_(ddim_update(self.state, out, self.meta[1].expand(self.batch), self.meta[2].expand(self.batch)))

    def capture(self) -> None:
        if self.graph is not None or not self.cuda_graphs:
            return
        self.meta.copy_(self._table[0])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step()  # warm-up
        side.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self._step()
        torch.cuda.synchronize(self.device)

    def run(self, x: Tensor, cond: Tensor, uncond: Tensor | None = None, *, guidance_scale: float = 1.0) -> Tensor:
        self.capture()
        self.scale.fill_(guidance_scale)
        load_conditioning(self.engine, self.bucket, 0, self.batch, self.batch, [uncond, cond] if self.guided else [cond])
        self.state.copy_(x)
        for i in range(self.steps):
            self.meta.copy_(self._table[i], non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        return self.state.clone().to(x.dtype)
