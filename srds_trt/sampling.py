"""Kept for callers of `srds_trt.sampling`: the samplers live in srds_trt.samplers."""

from .samplers import *  # noqa: F401,F403
from .samplers import __all__  # noqa: F401
