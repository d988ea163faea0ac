"""The pipelined SRDS runtime: static state pool, one program per bucket, CUDA graphs, two streams."""

from .runner import COARSE_MODES, NonFiniteError, RunResult, SRDSRunner
from .serial import SerialRunner

__all__ = ["COARSE_MODES", "NonFiniteError", "RunResult", "SRDSRunner", "SerialRunner"]
