"""The serial baseline on the same runtime: one engine call per DDIM step, each step one CUDA graph.

SRDS speedups are quoted against this, not against eager PyTorch: the baseline gets the same static buffers,
the same graph per step (engine call + guidance + DDIM update), the same capture recipe (cuda_graphs.py) and
the same engine. Per-step timesteps and coefficients are stacked on the device and walked by a device-side
counter, like the SRDS programs: a step is one graph replay, no host-to-device copy.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor

from ..samplers.ddim import as_grid, ddim_update
from ..samplers.solver import resolve_solver
from .cuda_graphs import CapturedGraph, capture_graph
from .engine_call import guided_call, load_conditioning
from .engines.base import Engine
from .host import as_tensor, host_stream


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
        ode = resolve_solver(alphas_cumprod, prediction_type)
        self.engine, self.batch, self.guided = engine, batch, guided
        self.device = engine.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        timesteps = as_grid(timesteps)
        c_x, c_out = ode.coefficients(timesteps[:-1], timesteps[1:])
        # Stacked per-step tables (+ one extra entry so warm-up/capture, which advance the counter, stay in range).
        pad = lambda v: torch.cat([v, v[-1:]])  # noqa: E731
        self._t = pad(timesteps[:-1].to(torch.float64)).to(self.device, engine.spec.timestep_dtype)
        self._c_x, self._c_out = (pad(c).to(self.device, state_dtype) for c in (c_x, c_out))
        self._step_index = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.bucket = engine.bucket_for(batch * (2 if guided else 1))
        self.state = torch.zeros(batch, *engine.spec.sample_shape, dtype=state_dtype, device=self.device)
        self.scale = torch.ones((), dtype=state_dtype, device=self.device)
        self.steps = len(timesteps) - 1
        self.step_program: CapturedGraph | None = None
        self.capture_failures: dict[str, str] = {}

    def _step(self) -> None:
        k, rows = self._step_index, self.batch
        t, c_x, c_out = (v.index_select(0, k).expand(rows) for v in (self._t, self._c_x, self._c_out))
        out = guided_call(self.engine, self.bucket, 0, self.state, t, self.scale if self.guided else None)
        self.state.copy_(ddim_update(self.state, out, c_x, c_out))
        k.add_(1)

    def capture(self) -> None:
        if self.step_program is not None:
            return
        self._step_index.fill_(self.steps)  # the extra entry: warm-up steps a state that run() overwrites
        self.step_program = capture_graph(self._step, device=self.device, enabled=self.cuda_graphs)
        if self.step_program.failure is not None:
            self.capture_failures["step"] = self.step_program.failure

    def run(self, x: Any, cond: Any, uncond: Any = None, *, guidance_scale: float = 1.0, stream: Any = None,
            step: Callable[[], None] | None = None) -> Tensor:
        """The serial sample from x (tensor or DLPack); ordered on the host's `stream` like SRDSRunner.run.
        step() is called on the host after each step is enqueued (no sync: progress, cancellation)."""
        x, cond = as_tensor(x, "x"), as_tensor(cond, "cond")
        uncond = None if uncond is None else as_tensor(uncond, "uncond")
        host = host_stream(stream, self.device)
        self.capture()
        with torch.cuda.stream(host) if host is not None else contextlib.nullcontext():
            self.scale.fill_(guidance_scale)
            load_conditioning(self.engine, self.bucket, 0, self.batch, self.batch,
                              [uncond, cond] if self.guided else [cond])
            self.state.copy_(x)
            self._step_index.zero_()
            for _ in range(self.steps):
                self.step_program.run()
                if step is not None:
                    step()
            return self.state.to(x.dtype, copy=True)
