"""The engine: one object per (model, dtype) that loads its parts lazily and runs generations.

`Engine.generate(request)` is a generator of `ProgressEvent`s ending with a `Result`, so a CLI progress bar and a
web UI can both stream every stage (loading, text encoding, image encoding, each denoising step, each decoded
chunk, saving). A `CancelToken` stops a run within one step; a cancelled run writes nothing.
"""

import gc
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import __version__
from .errors import WanError
from .loading import Snapshot
from .pipeline import (
    DEFAULT_NEGATIVE_PROMPT, LatentNormalizer, check_video_size, decode_frames, encode_image, from_diffusers_layout,
    generate_latents, initial_noise, latent_shape, load_image,
)
from .scheduler import SAMPLERS, make_scheduler
from .text_encoder import encode_prompts
from .video import to_uint8, write_sidecar, write_video

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_dtype() -> str:
    """bfloat16 on a GPU; float32 on the CPU, where MLX's bfloat16 kernels are slow."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def memory_gib(value: int) -> float:
    return round(value / 2**30, 3)


class CancelToken:
    """Set from any thread; the running generation checks it every step and between decoded chunks."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None  # None: Wan's official default; "" means no negative prompt
    image: object = None  # a path or PIL image: image-to-video with this first frame
    width: int = 1280
    height: int = 704
    frames: int = 121
    steps: int = 50
    guidance: float = 5.0
    shift: float | None = None  # None: the scheduler config's flow_shift
    sampler: str = "unipc"
    seed: int | None = None  # None: a random seed, reported in the result
    fps: int = 24
    latents: np.ndarray | None = None  # initial noise (1, C, F, H, W) used instead of the seed's
    output: str | None = None  # the MP4 path; None: a timestamped name under the engine's output folder
    keep_frames: bool = False  # return the float frames in the result (for --save-frames and tests)


@dataclass
class ProgressEvent:
    stage: str  # load | text | image | denoise | decode | save
    message: str
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    step_s: float | None = None
    eta_s: float | None = None
    memory_gib: float = 0.0
    latents: object = field(default=None, repr=False)  # the current latents while denoising (for previews)


@dataclass
class Result:
    video_path: Path
    sidecar_path: Path
    seed: int
    settings: dict
    timings: dict
    peak_memory_gib: float
    frames: np.ndarray | None = field(default=None, repr=False)


def validate(request: GenerationRequest, size_multiple: int, frame_step: int) -> None:
    """Every check that needs no model, with messages that say what is allowed."""
    if not request.prompt or not request.prompt.strip():
        raise WanError("the prompt is empty: describe the video you want")
    check_video_size(request.width, request.height, request.frames, size_multiple, frame_step)
    if request.sampler not in SAMPLERS:
        raise WanError(f"sampler {request.sampler!r} is not allowed: choose one of {', '.join(SAMPLERS)}")
    if not 1 <= request.steps <= 1000:
        raise WanError(f"steps {request.steps} is not allowed: it must be between 1 and 1000")
    if not 0 <= request.guidance <= 50:
        raise WanError(f"guidance {request.guidance} is not allowed: it must be between 0 and 50 (1 turns it off)")
    if request.shift is not None and not 0 < request.shift <= 100:
        raise WanError(f"shift {request.shift} is not allowed: it must be above 0 and at most 100")
    if not 1 <= request.fps <= 120:
        raise WanError(f"fps {request.fps} is not allowed: it must be between 1 and 120")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise WanError(f"seed {request.seed} is not allowed: it must be between 0 and 2^63-1")


class Engine:
    def __init__(self, model, dtype: str | None = None, output_dir="outputs"):
        dtype = dtype or default_dtype()
        if dtype not in DTYPES:
            raise WanError(f"dtype {dtype!r} is not allowed: choose one of {', '.join(DTYPES)}")
        self.model = str(model)
        self.snapshot = Snapshot.open(model)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.output_dir = Path(output_dir)
        self.transformer_config = self.snapshot.transformer_config
        self.vae_config = self.snapshot.vae_config
        self.scheduler_config = self.snapshot.scheduler_config
        self.size_multiple = self.vae_config.scale_factor_spatial * self.transformer_config.patch_size[1]
        self.frame_step = self.vae_config.scale_factor_temporal
        self.parts = {}  # name -> loaded module (tokenizer, text_encoder, transformer, vae)

    # -- loading ---------------------------------------------------------------------------------------------------
    def _load(self, name: str):
        """Load one part if it is not loaded yet; yields progress events while it loads."""
        if name in self.parts:
            return
        start = time.perf_counter()
        yield ProgressEvent("load", f"loading {name.replace('_', ' ')}")
        loaders = {
            "tokenizer": self.snapshot.load_tokenizer,
            "text_encoder": lambda: self.snapshot.load_text_encoder(self.dtype),
            "transformer": lambda: self.snapshot.load_transformer(self.dtype),
            "vae": lambda: self.snapshot.load_vae(self.dtype),
        }
        self.parts[name] = loaders[name]()
        elapsed = time.perf_counter() - start
        yield ProgressEvent("load", f"loaded {name.replace('_', ' ')} in {elapsed:.1f}s", elapsed_s=elapsed)

    def release(self, *names: str) -> None:
        """Drop loaded parts (all when no name is given) and return their memory to the system."""
        for name in names or list(self.parts):
            self.parts.pop(name, None)
        gc.collect()
        mx.clear_cache()

    # -- generation ------------------------------------------------------------------------------------------------
    def settings(self, request: GenerationRequest, seed: int, negative: str) -> dict:
        return {
            "prompt": request.prompt, "negative_prompt": negative,
            "image": None if request.image is None else str(getattr(request.image, "filename", request.image)),
            "width": request.width, "height": request.height, "frames": request.frames, "steps": request.steps,
            "guidance": request.guidance, "shift": self.shift(request), "sampler": request.sampler, "seed": seed,
            "fps": request.fps, "dtype": self.dtype_name, "model": self.model,
        }

    def shift(self, request: GenerationRequest) -> float:
        return request.shift if request.shift is not None else self.scheduler_config.flow_shift

    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None):
        """Run one generation: yields ProgressEvents, then the Result. Raises WanError on bad input and
        errors.Cancelled when `cancel` was set (nothing is written then)."""
        validate(request, self.size_multiple, self.frame_step)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        negative = DEFAULT_NEGATIVE_PROMPT if request.negative_prompt is None else request.negative_prompt
        shape = latent_shape(self.vae_config, self.transformer_config, request.width, request.height, request.frames)
        if request.latents is not None:
            noise = from_diffusers_layout(request.latents, shape)
        else:
            noise = initial_noise(seed, shape)
        image = None if request.image is None else load_image(request.image, request.width, request.height)
        use_cfg = request.guidance > 1.0

        mx.reset_peak_memory()
        timings = {}
        run_start = stage_start = time.perf_counter()

        def lap(name):
            nonlocal stage_start
            now = time.perf_counter()
            timings[name] = round(now - stage_start, 4)
            stage_start = now

        for part in ("tokenizer", "text_encoder", "transformer", "vae"):
            yield from self._load(part)
        lap("load_s")

        yield ProgressEvent("text", "encoding the prompt" + (" and the negative prompt" if use_cfg else ""))
        prompts = [request.prompt, negative] if use_cfg else [request.prompt]
        context = encode_prompts(self.parts["text_encoder"], self.parts["tokenizer"], prompts)
        mx.eval(context)
        lap("text_s")

        normalizer = LatentNormalizer(self.vae_config)
        condition = None
        if image is not None:
            yield ProgressEvent("image", "encoding the first frame")
            condition = encode_image(self.parts["vae"], normalizer, image)
            mx.eval(condition)
            lap("image_s")

        scheduler = make_scheduler(request.sampler, request.steps, self.shift(request), self.scheduler_config)
        steps = generate_latents(
            self.parts["transformer"], scheduler, noise, context, request.guidance, condition, cancel
        )
        denoise_start = time.perf_counter()
        for i, latents in enumerate(steps, start=1):
            elapsed = time.perf_counter() - denoise_start
            per_step = elapsed / i
            yield ProgressEvent(
                "denoise", f"step {i}/{request.steps}", i, request.steps, elapsed, per_step,
                per_step * (request.steps - i), memory_gib(mx.get_active_memory()), latents,
            )
        lap("denoise_s")
        timings["denoise_s_per_step"] = round(timings["denoise_s"] / request.steps, 4)
        del noise, context, condition

        chunks = []
        frames_float = [] if request.keep_frames else None
        total_chunks = latents.shape[1]
        for i, frames in enumerate(decode_frames(self.parts["vae"], normalizer, latents, cancel), start=1):
            chunks.append(to_uint8(frames))
            if frames_float is not None:
                frames_float.append(frames)
            yield ProgressEvent("decode", f"decoded {i}/{total_chunks}", i, total_chunks,
                                memory_gib=memory_gib(mx.get_active_memory()))
        lap("decode_s")

        yield ProgressEvent("save", "writing the video")
        settings = self.settings(request, seed, negative)
        video_path = self.output_path(request, seed)
        write_video(video_path, np.concatenate(chunks), request.fps, {"title": request.prompt, "comment": settings})
        lap("save_s")
        timings["total_s"] = round(time.perf_counter() - run_start, 4)
        peak = memory_gib(mx.get_peak_memory())
        record = {
            "seed": seed, "settings": settings, "timings": timings, "peak_memory_gib": peak,
            "engine_version": __version__, "video": video_path.name, "created": datetime.now().isoformat(timespec="seconds"),
        }
        sidecar = write_sidecar(video_path.with_suffix(".json"), record)
        yield Result(video_path, sidecar, seed, settings, timings, peak,
                     np.concatenate(frames_float) if frames_float is not None else None)

    def output_path(self, request: GenerationRequest, seed: int) -> Path:
        if request.output:
            return Path(request.output)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return self.output_dir / f"wan-{stamp}-{seed}.mp4"
