"""Wan Studio's MLX engine for Wan2.2 TI2V-5B.

    from wan_engine import Engine, GenerationRequest, Result
    engine = Engine("demo")
    for item in engine.generate(GenerationRequest(prompt="a red kite", width=96, height=64, frames=9, steps=4)):
        print(item)  # ProgressEvents, then the Result

Four layers, imports running downward only (tests/test_architecture.py checks it):

- `models/`: the networks (the Wan transformer, UMT5, the Wan VAE) and their configs, plain MLX modules;
- `model_files/`: finding, reading, converting and caching model files, LoRA files and the tokenizer;
- `sampling/`: the samplers, pure functions of latents and steps;
- the runs, at this top: the request and its record (`request.py`, `record.py`), the loaded parts and their memory
  policy (`parts.py`), the numbers of a run (`pipeline.py`), the engine that walks its stages (`engine.py`), a group
  of processes (`parallel/`, `follower.py`), outputs (`video.py`, `preview.py`), the warm-up and the CLI.

The UI, the app and the CLI use only the names exported here.
"""

from .version import __version__  # noqa: F401
from .engine import Engine
from .errors import Cancelled, WanError
from .follower import Follower
from .images import open_image
from .model_files.cache_files import partial_name
from .model_files.demo import DEMO_NOTICE
from .model_files.hub import DEFAULT_MODEL, resolve_model
from .model_files.lora import parse_lora
from .model_files.packages import convert
from .parallel.group import ParallelGroup, join as join_group
from .pipeline import DEFAULT_NEGATIVE_PROMPT
from .presets import available_presets, load_preset
from .prompting.writer import IMAGE_MODEL, TEXT_MODEL, PromptWriter, extras_missing
from .record import RunRecord, Stage
from .request import (
    CancelToken, GenerationRequest, ProgressEvent, Result, SizeRules, recommended_settings, validate,
)
from .sampling.magcache import AUTHORS_SETTING as MAGCACHE_SETTING, read_cache_ratios
from .sampling.samplers import SAMPLERS
from .outputs.drafts import read_draft_record
from .outputs.video import remove_stale_partials
from .warmup import warm_up

__all__ = [
    "CancelToken", "Cancelled", "DEFAULT_MODEL", "DEFAULT_NEGATIVE_PROMPT", "DEMO_NOTICE", "Engine", "Follower",
    "GenerationRequest", "ParallelGroup", "ProgressEvent", "Result", "RunRecord", "SAMPLERS",
    "SizeRules", "Stage", "WanError", "available_presets", "convert", "join_group", "load_preset", "open_image",
    "parse_lora", "partial_name", "read_cache_ratios", "read_draft_record", "recommended_settings", "remove_stale_partials",
    "resolve_model", "validate", "warm_up", "MAGCACHE_SETTING", "IMAGE_MODEL", "TEXT_MODEL", "PromptWriter",
    "extras_missing",
]
