"""Wan Studio's MLX engine for Wan2.2 TI2V-5B.

    from wan_engine import Engine, GenerationRequest, Result
    engine = Engine("demo")
    for item in engine.generate(GenerationRequest(prompt="a red kite", width=96, height=64, frames=9, steps=4)):
        print(item)  # ProgressEvents, then the Result
"""

from .version import __version__  # noqa: E402

from .engine import (  # noqa: E402
    CancelToken, Engine, GenerationRequest, ProgressEvent, Result, recommended_settings, validate,
)
from .errors import Cancelled, WanError  # noqa: E402
from .model_files.demo import DEMO_NOTICE  # noqa: E402
from .model_files.hub import DEFAULT_MODEL, resolve_model  # noqa: E402
from .images import open_image  # noqa: E402
from .model_files.lora import parse_lora  # noqa: E402
from .model_files.cache_files import partial_name  # noqa: E402
from .model_files.packages import convert  # noqa: E402
from .pipeline import DEFAULT_NEGATIVE_PROMPT  # noqa: E402
from .presets import available_presets, load_preset  # noqa: E402
from .sampling.samplers import SAMPLERS  # noqa: E402
from .video import remove_stale_partials  # noqa: E402
from .parallel.group import ParallelGroup, join as join_group  # noqa: E402
from .warmup import warm_up  # noqa: E402

__all__ = [
    "CancelToken", "Cancelled", "DEFAULT_MODEL", "DEFAULT_NEGATIVE_PROMPT", "DEMO_NOTICE", "Engine",
    "GenerationRequest", "ParallelGroup", "ProgressEvent", "Result", "SAMPLERS", "WanError", "available_presets",
    "convert", "join_group", "load_preset", "open_image", "parse_lora", "partial_name", "recommended_settings",
    "remove_stale_partials", "resolve_model", "validate", "warm_up",
]
