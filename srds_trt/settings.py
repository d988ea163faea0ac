"""One validated description of a generation request, shared by the Python API, the CLI and the server.

Errors are SettingError (a ValueError) whose message names the setting ("steps must be ..."); the CLI maps the
setting to its flag (--steps), the server to a 400 naming the field. Validation is cheap and runs before any
model work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .samplers import SAMPLERS as REFERENCE_SAMPLERS
from .samplers.stopping import DEFAULT_TOL

SAMPLERS = (*REFERENCE_SAMPLERS, "auto")  # "auto": srds_trt.autotune chooses from the measured latency curve
DEFAULT_STEPS = 100  # 10 blocks of 10 steps: enough fine work per block for SRDS's parallelism to show
FAMILY_STEPS = {"sd3": 28, "flux": 28}  # StableDiffusion3Pipeline's and FluxPipeline's own defaults
MAX_STEPS = 8192  # grids finer than the training schedule use fractional timesteps (samplers.ddim.alphas_at)
MAX_GUIDANCE = 1e3  # far beyond any useful scale; larger ones overflow fp16 (and soon fp32) outright
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_IMAGES = 2**31 - 1  # per prompt; images are sampled and written in chunks, so memory does not grow with this


def default_steps(family: str) -> int:
    """The steps a run of this model family takes when none are given: 100, or the flow pipelines' 28."""
    return FAMILY_STEPS.get(family, DEFAULT_STEPS)


class SettingError(ValueError):
    """A bad setting; .setting names it (the CLI's flag is --setting with '_' as '-')."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting} {message}")
        self.setting = setting


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationSettings:
    """What a caller sets for one generation (per prompt list). Defaults are the product's defaults."""

    steps: int = DEFAULT_STEPS
    sampler: str = "srds"
    tol: float = DEFAULT_TOL
    blocks: int | None = None
    window: int | None = None
    num_images: int = 1
    guidance_scale: float | None = None
    seed: int | None = None

    def validate(self) -> "GenerationSettings":
        if self.sampler not in SAMPLERS:
            raise SettingError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not _integer(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise SettingError("steps", f"must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not (
                math.isfinite(self.tol) and self.tol >= 0):
            raise SettingError("tol", f"must be a finite number >= 0, got {self.tol!r}")
        if self.blocks is not None and (not _integer(self.blocks) or not 1 <= self.blocks <= self.steps):
            raise SettingError("blocks", f"must be in [1, steps={self.steps}], got {self.blocks!r}")
        if self.window is not None and (not _integer(self.window) or self.window < 1):
            raise SettingError("window", f"must be an integer >= 1, got {self.window!r}")
        if not _integer(self.num_images) or not 1 <= self.num_images <= MAX_IMAGES:
            raise SettingError("num_images", f"must be an integer in [1, {MAX_IMAGES}], got {self.num_images!r}")
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)
        if self.seed is not None:
            check_seed(self.seed)
        return self


def check_guidance_scale(scale) -> float:
    """A finite scale in [0, MAX_GUIDANCE]: NaN/Inf/1e30 make overflow certain, negative ones invert guidance."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise SettingError("guidance_scale", f"must be a number, got {scale!r}") from None
    if isinstance(scale, bool) or not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise SettingError("guidance_scale", f"must be a finite number in [0, {MAX_GUIDANCE:g}], got {scale!r}")
    return value


def check_seed(seed) -> int:
    if not _integer(seed) or not 0 <= seed <= MAX_SEED:
        raise SettingError("seed", f"must be an integer in [0, 2^64 - 1], got {seed!r}")
    return seed


def check_run_args(steps: int, tol: float, num_blocks: int | None, sampler: str, per_prompt: int) -> None:
    """The settings a run is checked by before any model work (the CLI and the server call this too)."""
    GenerationSettings(steps=steps, sampler=sampler, tol=tol, blocks=num_blocks, num_images=per_prompt).validate()
