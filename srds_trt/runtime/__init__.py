"""The runtime: walks a sampler's tick plan on an engine with static buffers, CUDA graphs and streams.

Layout (one idea per module, in the order data flows):

    engines/         one Engine interface over PyTorch, ONNX Runtime and TensorRT: static buffers per bucket
    tables.py        the plan as device-ready data: state slots, stacked per-program call/formation tables (pure)
    engine_call.py   the guided engine call every runner makes (rows in, one enqueue, guided output out)
    programs.py      call and formation programs: fixed-shape tick work walking its tables by a device counter
    cuda_graphs.py   capture_graph: the one CUDA-graph capture recipe (warm-up, shared pool, eager fallback)
    host.py          what a host hands over: its CUDA stream (int, __cuda_stream__, torch) and DLPack tensors
    srds_runner.py   SRDSRunner: SRDS ticks as programs, CUDA graphs, a second stream, async residuals, early exit
    serial_runner.py SerialRunner: the serial sampler on the same engine and graphs (the speedup baseline)
    window_runner.py WindowRunner: eps-Picard and ParaDiGMS sweeps as one captured program, one host read per sweep
    sampler.py       RuntimeSampler: what the pipeline calls; one engine and cached runners per pipeline

The runtime owns device state (streams, graphs, buffers); samplers (srds_trt.samplers.srds) stay pure functions.
"""

from .engines import BucketIO, Engine, EngineError, EngineSpec, TorchEngine
from .serial_runner import SerialRunner
from ..samplers.stopping import NonFiniteError
from .srds.runner import COARSE_MODES, RunResult, SRDSRunner
from ..samplers.window import WINDOW_SAMPLERS
from .window.runner import WindowRunner

__all__ = [
    "COARSE_MODES", "BucketIO", "Engine", "EngineError", "EngineSpec", "NonFiniteError", "RunResult", "SRDSRunner",
    "SerialRunner", "TorchEngine", "WINDOW_SAMPLERS", "WindowRunner",
]
