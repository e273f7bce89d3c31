"""Memory presets: plain JSON data in `presets/`, chosen by name (`--preset low-ram`) or path.

A preset says which parts are quantized on load, which are released between stages, how the VAE decodes
(exact strips; blended spatial tiles in latent pixels, with overlap, above a size), and MLX's allocator limits.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx

from .errors import WanError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    transformer_quantization: dict | None = None  # {"bits": 8|4, "group_size": 64}
    text_encoder_quantization: dict | None = None
    release_text_encoder: bool = True  # after encoding; the prompt-embedding cache covers repeats
    keep_resident: bool | None = False  # keep the text encoder loaded between videos anyway (a new prompt then costs
    # what a cached one does); None: when the machine has the memory for it (parts.MemoryPolicy)
    release_transformer_before_decode: bool = False  # and the VAE while the text encoder or transformer works
    reload_transformer_after_video: bool = False  # Engine.prepare_next loads it again between videos (in place of
    # the VAE), so that the next video does not wait for it
    stream_text_encoder: bool = False  # read the text encoder's blocks one at a time as it runs, from its converted
    # copy (streamed_blocks.py): it then fits beside the transformer, which stays loaded
    vae_tile: dict | None = None  # {"min_pixels": decode untiled below this many pixels per frame, "tile", "overlap"}
    vae_strip_width: int | None = None  # decode in vertical strips of at most this many latent columns, one after
    # another (the same numbers, about half the memory with two strips at 1280x704, a little slower)
    vae_frame_by_frame: bool = False  # the VAE's highest resolutions one frame at a time (the same numbers, less
    # memory, slower)
    memory_limit_gib: float | None = None  # mx.set_memory_limit
    cache_limit_gib: float | None = None  # mx.set_cache_limit: how much freed memory MLX may keep for reuse
    clear_cache_between_stages: bool = True
    cfg_batch: bool = True  # the guidance pair as one batch of two (faster) or two passes (half the activations)
    block_lookahead: bool = True  # queue the next transformer block while one runs (faster), or evaluate each
    # residual step of a block on its own (least activation memory)
    compile: bool = True  # run the transformer's blocks as compiled graphs (same numbers, fewer kernels)

    def __post_init__(self):
        width = self.vae_strip_width
        if width is not None and (type(width) is not int or width < 1):
            raise WanError(f"preset {self.name!r}: vae_strip_width must be a whole number of latent columns, 1 or more, "
                           f"or null (no strips), not {width!r}")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> Preset:
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise WanError(f"preset {name_or_path!r} not found: choose one of {', '.join(available_presets())} or a .json path")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WanError(f"preset {path} is not valid JSON: {e}") from None
    known = {f.name for f in fields(Preset)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise WanError(f"preset {path} has unknown settings {unknown}: allowed are {sorted(known)}")
    return Preset(name=path.stem, **data)


def apply_memory_limits(preset: Preset) -> None:
    """MLX's allocator limits of the preset (they hold for the whole process)."""
    if preset.memory_limit_gib:
        mx.set_memory_limit(int(preset.memory_limit_gib * 2**30))
    if preset.cache_limit_gib is not None:
        mx.set_cache_limit(int(preset.cache_limit_gib * 2**30))
