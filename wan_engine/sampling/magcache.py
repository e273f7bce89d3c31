"""MagCache (Ma et al., 2025, `Zehong-Ma/MagCache`): skip the transformer's blocks on steps where the residual they
add is predictable from the last one, as diffusers 0.42.1's hook does it (`diffusers/hooks/mag_cache.py`).

The blocks' residual (the last block's output minus block 0's input) shrinks from step to step by a ratio that
depends on the step and hardly on the video: `ratios`, calibrated once per checkpoint and sampler. A step may reuse
the residual kept from the last computed step while the accumulated error of doing so, the sum over the skipped
steps of |1 - product of their ratios|, stays at most `threshold`, and for at most `max_skip` steps in a row; the first
`int(retention * steps + 0.5)` steps are always computed. A skipped step adds the kept residual to block 0's input and
runs everything outside the blocks (patch embedding, timestep conditioning, the head) as usual.

The decisions depend on the step index alone (diffusers' per-branch states see the same ratios, so the prompt's and
the negative prompt's branches skip the same steps): `plan` computes them before the loop, the same on every
process of a group, with no host sync. The arithmetic is float32, as the hook's on its torch tensor of ratios.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import WanError

KIND = "magcache"
# Wan2.2 TI2V-5B's ratios for UniPC at 50 steps, from MagCache4Wan2.2's magcache_generate.py: its published lists
# alternate the conditional and the unconditional branch's ratio after a padding of [1.0] * 2; diffusers takes one
# list, the conditional branch's (as `calibrate-cache` measures it), so these are [1.0] + published[0::2].
TI2V_5B_TEXT_TO_VIDEO = [
    1.0, 0.99505, 0.99441, 0.99558, 0.99499, 0.99534, 0.99468, 0.99463, 0.9946, 0.99408, 0.9945, 0.99409, 0.99403,
    0.99382, 0.99349, 0.99377, 0.9933, 0.99303, 0.99217, 0.992, 0.99201, 0.99133, 0.99112, 0.99155, 0.98958,
    0.98959, 0.98838, 0.98826, 0.9883, 0.98711, 0.98562, 0.98511, 0.98414, 0.98284, 0.98104, 0.97981, 0.97849,
    0.97557, 0.97398, 0.97171, 0.96917, 0.96511, 0.96263, 0.95839, 0.95483, 0.94942, 0.9468, 0.94583, 0.94843,
    0.96949,
]
TI2V_5B_IMAGE_TO_VIDEO = [
    1.0, 0.99512, 0.99559, 0.99595, 0.99512, 0.99546, 0.99543, 0.99496, 0.99504, 0.99444, 0.99481, 0.99435, 0.9943,
    0.99411, 0.99373, 0.99413, 0.99363, 0.99335, 0.99244, 0.99229, 0.99239, 0.99163, 0.99149, 0.99191, 0.9898,
    0.9899, 0.98849, 0.98846, 0.98861, 0.9874, 0.98588, 0.98539, 0.98444, 0.9831, 0.98119, 0.98001, 0.97862,
    0.97555, 0.97392, 0.97152, 0.96871, 0.96435, 0.96129, 0.95639, 0.95176, 0.94446, 0.93972, 0.93575, 0.93537,
    0.96655,
]
# The authors' TI2V-5B setting (E006K2R02), which the app's Balanced speed uses
AUTHORS_SETTING = {"threshold": 0.06, "max_skip": 2, "retention": 0.2}


@dataclass(frozen=True)
class MagCache:
    """A MagCache setting: diffusers' MagCacheConfig(threshold, max_skip_steps, retention_ratio, mag_ratios)."""
    ratios: tuple  # one per step of the run the ratios were measured on (resampled to the run's steps)
    threshold: float = 0.06
    max_skip: int = 3  # diffusers' default
    retention: float = 0.2

    def __post_init__(self):
        check_settings(self.threshold, self.max_skip, self.retention)
        check_ratios(self.ratios, "the cache's ratios")

    def plan(self, steps: int) -> list[bool]:
        """For each of `steps` steps, whether it runs the blocks (True) or adds the kept residual (False)."""
        ratios = nearest_interp(np.asarray(self.ratios, np.float32), steps)
        retention_steps = int(self.retention * steps + 0.5)
        accumulated_ratio, accumulated_err, accumulated_steps = np.float32(1.0), np.float32(0.0), 0
        computed, kept = [], False  # kept: a residual from an earlier computed step
        for step in range(steps):
            compute = True
            if step >= retention_steps:
                accumulated_ratio = np.float32(accumulated_ratio * ratios[step])
                accumulated_steps += 1
                accumulated_err = np.float32(accumulated_err + abs(np.float32(1.0) - accumulated_ratio))
                if kept and accumulated_err <= np.float32(self.threshold) and accumulated_steps <= self.max_skip:
                    compute = False
                else:
                    accumulated_ratio, accumulated_err, accumulated_steps = np.float32(1.0), np.float32(0.0), 0
            computed.append(compute)
            kept = kept or compute
        return computed

    def record(self, plan: list[bool]) -> dict:
        """What a video's sidecar says of its cache."""
        return {"kind": KIND, "threshold": self.threshold, "max_skip": self.max_skip, "retention": self.retention,
                "computed_steps": sum(plan), "skipped_steps": len(plan) - sum(plan)}


def magnitude_ratio(residual: mx.array, previous: mx.array | None) -> float:
    """Calibration: the mean over tokens of |residual| / |previous residual| (1.0 at the first step), in float32,
    as diffusers' `_perform_calibration_step`."""
    if previous is None:
        return 1.0
    current = mx.linalg.norm(residual.astype(mx.float32), axis=-1)
    before = mx.linalg.norm(previous.astype(mx.float32), axis=-1)
    return (current / (before + 1e-8)).mean().item()


def nearest_interp(ratios: np.ndarray, length: int) -> np.ndarray:
    """diffusers' `nearest_interp`: `ratios` resampled to `length` by the nearest index (rounded half to even, as
    torch.round)."""
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    indices = np.round(np.arange(length, dtype=np.float32) * np.float32(scale)).astype(np.int64)
    return ratios[indices]


def check_settings(threshold: float, max_skip: int, retention: float) -> None:
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise WanError(f"cache threshold {threshold} is not allowed: it must be a number, 0 or more (0.06: the "
                       "authors' setting; higher skips more steps)")
    if not (isinstance(max_skip, int) and max_skip >= 1):
        raise WanError(f"cache max skip {max_skip} is not allowed: it must be a whole number of steps, 1 or more")
    if not (isinstance(retention, (int, float)) and 0 <= retention <= 1):
        raise WanError(f"cache retention {retention} is not allowed: it must be between 0 and 1 (the share of the "
                       "first steps that are always computed)")


def check_ratios(ratios, what: str) -> None:
    valid = isinstance(ratios, (list, tuple)) and len(ratios) > 0 and all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and np.isfinite(r) and r > 0 for r in ratios)
    if not valid:
        raise WanError(f"{what} are not allowed: give a list of positive numbers, one per step (as `python -m "
                       "wan_engine calibrate-cache` writes)")


def read_cache_ratios(path) -> list[float]:
    """A JSON list of ratios, as `calibrate-cache` writes it."""
    try:
        ratios = json.loads(Path(path).read_text())
    except OSError as error:
        raise WanError(f"cannot read the cache ratios {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise WanError(f"the cache ratios {path} are not JSON: {error}") from None
    check_ratios(ratios, f"the cache ratios in {path}")
    return [float(r) for r in ratios]


def builtin_ratios(image_to_video: bool) -> list[float]:
    """MagCache's published TI2V-5B ratios of the task."""
    return TI2V_5B_IMAGE_TO_VIDEO if image_to_video else TI2V_5B_TEXT_TO_VIDEO
