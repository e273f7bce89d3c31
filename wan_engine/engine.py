"""The engine: one object per (model, dtype, preset) that loads its parts lazily and runs generations.

`Engine.generate(request)` is a generator of `ProgressEvent`s ending with a `Result`, so a CLI progress bar and a
web UI can both stream every stage (loading, text encoding, image encoding, each denoising step, decoding, saving).
A `CancelToken` stops a run within one step; a cancelled run frees its arrays and writes nothing. The memory
preset decides what is quantized, what is released between stages, and how the VAE decodes.
"""

import dataclasses
import functools
import gc
import secrets
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np

from .version import __version__
from .model_files.demo import DEMO_NOTICE, cache_root
from .errors import Cancelled, WanError
from .models.config import SchedulerConfig
from .model_files.converted import ConvertedWeights
from .model_files.hub import find_local_model, resolve_model
from .model_files.kernel_cache import keep_compiled_kernels
from .model_files.loading import Snapshot
from .model_files.lora import AdapterSet, adapter_set, fuse, read_lora, transformer_shapes
from .memory import process_peak_rss_gib
from .pipeline import (
    DEFAULT_NEGATIVE_PROMPT, LatentNormalizer, check_video_size, decode_frames, encode_image, frames_to_uint8,
    from_diffusers_layout, generate_latents, initial_noise, latent_shape, load_image, step_noise_key,
)
from .presets import Preset, load_preset
from .preview import calibrate, latent_preview
from .model_files.prompt_cache import PromptEmbeddingCache, encoder_identity
from .sampling.samplers import SAMPLERS, make_scheduler, sampler_defaults
from .model_files.streamed_blocks import StreamedBlocks
from .models.text_encoder import count_tokens, encode_prompts, prompt_clean
from .model_files.tokenizer import load_prompt_tokenizer
from .video import VideoOutput, prepare_folder, remove_stale_partials

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
WAN22_FLOW_SHIFT = 5.0  # Wan-AI/Wan2.2-TI2V-5B-Diffusers' scheduler config
TEXT_LENGTH = 512  # Wan's text length: prompts are padded (with zeros past their end) to 512 tokens


def default_dtype() -> str:
    """bfloat16 on a GPU; float32 on the CPU, where MLX's bfloat16 kernels are slow."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def gib(value: int) -> float:
    return round(value / 2**30, 3)


def decode_message(done: int, total: int, tiled: bool, latent_frames: int) -> str:
    """Progress of the decode: tiles, latent frames, or strips of latent frames (WanVAE.decode_chunks)."""
    if tiled:
        return f"decoded tile {done}/{total}"
    strips = total // latent_frames
    if strips == 1:
        return f"decoded latent frame {done}/{total}"
    strip, frame = divmod(done - 1, latent_frames)
    return f"decoded strip {strip + 1}/{strips}, latent frame {frame + 1}/{latent_frames}"


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
    # None for steps, guidance, shift, sampler: the model's recommended settings (Engine.defaults)
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    seed: int | None = None  # None: a random seed, reported in the result
    fps: int = 24
    latents: np.ndarray | None = None  # initial noise (1, C, F, H, W) used instead of the seed's
    output: str | None = None  # the MP4 path; None: a timestamped name under the engine's output folder
    keep_frames: bool = False  # return the float frames in the result (for --save-frames and tests)
    preview: bool = False  # attach a small RGB preview of the latents to each denoising event
    # LoRAs fused into the transformer, in order: (reference, strength), the reference a local .safetensors path or a
    # Hub file written owner/repo/path/in/repo.safetensors; strength as diffusers' adapter weight (1.0: as trained)
    loras: list = field(default_factory=list)


@dataclass
class ProgressEvent:
    stage: str  # download | load | text | image | denoise | decode | save
    message: str
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    step_s: float | None = None
    eta_s: float | None = None
    memory_gib: float = 0.0
    preview: np.ndarray | None = field(default=None, repr=False)  # uint8 (H, W, 3), when asked for


@dataclass
class Result:
    video_path: Path
    sidecar_path: Path
    seed: int
    settings: dict
    timings: dict
    peak_memory_gib: float
    prompt_tokens: dict  # {"used", "total", "limit"}: the model reads the first `limit` tokens of the prompt
    frames: np.ndarray | None = field(default=None, repr=False)
    process_peak_rss_gib: float = 0.0  # the whole process's peak physical memory so far (memory.py)
    parallel: dict | None = None  # a group's run: {"ranks", "guidance", "sequence", ...} (wan_engine.parallel.group)


def validate(request: GenerationRequest, size_multiple: int, frame_step: int) -> None:
    """Every check that needs no model, with messages that say what is allowed (settings left unset are the
    model's, and not checked)."""
    if not request.prompt or not request.prompt.strip():
        raise WanError("the prompt is empty: describe the video you want")
    check_video_size(request.width, request.height, request.frames, size_multiple, frame_step)
    if request.sampler is not None and request.sampler not in SAMPLERS:
        raise WanError(f"sampler {request.sampler!r} is not allowed: choose one of {', '.join(SAMPLERS)}")
    if request.steps is not None and not 1 <= request.steps <= 1000:
        raise WanError(f"steps {request.steps} is not allowed: it must be between 1 and 1000")
    if request.guidance is not None and not 0 <= request.guidance <= 50:
        raise WanError(f"guidance {request.guidance} is not allowed: it must be between 0 and 50 (1 turns it off)")
    if request.sampler == "dmd" and request.guidance is not None and request.guidance > 1:
        raise WanError(f"guidance {request.guidance} is not allowed with the dmd sampler: distilled few-step "
                       "sampling runs without guidance (1 or less, or leave it unset)")
    if request.shift is not None and not 0 < request.shift <= 100:
        raise WanError(f"shift {request.shift} is not allowed: it must be above 0 and at most 100")
    if not 1 <= request.fps <= 120:
        raise WanError(f"fps {request.fps} is not allowed: it must be between 1 and 120")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise WanError(f"seed {request.seed} is not allowed: it must be between 0 and 2^63-1")


def drain(events):
    """Run a generator of progress events to its end, unheard; what it returns."""
    while True:
        try:
            next(events)
        except StopIteration as end:
            return end.value


def model_sampler(snapshot: Snapshot) -> str:
    """The sampler a model is made for. FastVideo's DMD-distilled checkpoints (FastWan2.2-TI2V-5B) name its
    `WanDMDPipeline` in model_index.json: they default to the dmd sampler, 3 steps, no guidance."""
    return "dmd" if snapshot.pipeline_class == "WanDMDPipeline" else "unipc"


def recommended_settings(model: str) -> dict:
    """For a form filled before any engine is opened: {"sampler": the model's own sampler, "by_sampler": {name:
    {sampler, steps, guidance, shift}}}, read from the model's files when they are on this machine (nothing is
    downloaded), else those of Wan2.2 TI2V-5B (UniPC, flow shift 5)."""
    snapshot = None
    if root := find_local_model(model):
        try:
            snapshot = Snapshot.open(root)
        except WanError:  # a broken folder: the engine says what is wrong when a run opens it
            pass
    config = snapshot.scheduler_config if snapshot else SchedulerConfig(flow_shift=WAN22_FLOW_SHIFT)
    return {"sampler": model_sampler(snapshot) if snapshot else "unipc",
            "by_sampler": {name: sampler_defaults(name, config) for name in SAMPLERS}}


def apply_memory_limits(preset: Preset) -> None:
    """MLX's allocator limits of the preset (they hold for the whole process)."""
    if preset.memory_limit_gib:
        mx.set_memory_limit(int(preset.memory_limit_gib * 2**30))
    if preset.cache_limit_gib is not None:
        mx.set_cache_limit(int(preset.cache_limit_gib * 2**30))


class Engine:
    """Create and use an engine on one thread: MLX streams belong to the thread that made them (MLX >= 0.31.2)."""

    def __init__(self, model, dtype: str | None = None, preset: str = "normal", output_dir="outputs",
                 download_progress=None, prompt_cache: PromptEmbeddingCache | None = None, group=None):
        keep_compiled_kernels()  # before anything compiles
        dtype = dtype or default_dtype()
        if dtype not in DTYPES:
            raise WanError(f"dtype {dtype!r} is not allowed: choose one of {', '.join(DTYPES)}")
        self.model = str(model)
        self.root = resolve_model(self.model, download_progress)
        self.snapshot = Snapshot.open(self.root)
        self.is_demo = (self.root / "DEMO.txt").is_file()
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.preset = load_preset(preset)
        self.preset_source = str(preset)  # a name or a path, which the other processes of a group open too
        self.group = group  # wan_engine.parallel.group.ParallelGroup of rank 0, whose runs this engine shares; or None
        self.output_dir = Path(output_dir)
        self.transformer_config = self.snapshot.transformer_config
        self.vae_config = self.snapshot.vae_config
        self.scheduler_config = self.snapshot.scheduler_config
        self.size_multiple = self.vae_config.scale_factor_spatial * self.transformer_config.patch_size[1]
        self.frame_step = self.vae_config.scale_factor_temporal
        self.normalizer = LatentNormalizer(self.vae_config)
        self.prompt_cache = prompt_cache or PromptEmbeddingCache(cache_root() / "prompt-embeddings")
        self.text_identity = encoder_identity(self.root, dtype, self.preset.text_encoder_quantization)
        self.converted = ConvertedWeights(self.snapshot, cache_root() / "converted")  # converted once, kept on disk
        self.parts = {}  # name -> loaded module: tokenizer, text_encoder, transformer, vae
        self.preview_map = None  # latent -> RGB map, calibrated on the first run that asks for previews
        self.download_progress = download_progress  # Hub LoRAs are fetched when a request names them
        self.fused = AdapterSet()  # the LoRAs the loaded transformer holds
        apply_memory_limits(self.preset)

    @property
    def notice(self) -> str | None:
        """What the user must know about this model (the demo model's videos are noise-like)."""
        return DEMO_NOTICE if self.is_demo else None

    # -- loading and releasing -------------------------------------------------------------------------------------
    def part(self, name: str):
        """A part, loaded if it is not (no progress events): for the other processes of a group."""
        drain(self._load(name, {}))
        return self.parts[name]

    def _load(self, name: str, timings: dict):
        """Load one part unless it is loaded; yields progress events while it loads."""
        if name in self.parts:
            return
        label = name.replace("_", " ")
        start = time.perf_counter()
        yield ProgressEvent("load", f"loading the {label}")
        preset, origin = self.preset, "its files"
        if name == "tokenizer":
            part = load_prompt_tokenizer(self.root / "tokenizer", cache_root() / "tokenizers")
        elif name == "text_encoder":
            # Streamed, it fits beside the transformer; loaded whole (the first time: converted), it may not.
            whole_needs_room = preset.release_transformer_before_decode
            make_room = partial(self.release, "vae", "transformer") if whole_needs_room else None
            part, origin = self.converted.load(name, self.dtype, preset.text_encoder_quantization,
                                               stream_blocks=preset.stream_text_encoder, make_room=make_room)
        elif name == "transformer":
            part, origin = self.converted.load(name, self.dtype, preset.transformer_quantization)
            self.fused = AdapterSet()  # a fresh transformer holds the snapshot's weights
            part.block_lookahead = preset.block_lookahead
            if preset.compile:
                part.compile()
        else:
            part, origin = self.converted.load(name, self.dtype)
        self.parts[name] = part
        elapsed = time.perf_counter() - start
        timings["load_s"] = round(timings.get("load_s", 0.0) + elapsed, 4)
        yield ProgressEvent("load", f"loaded the {label} from {origin} in {elapsed:.1f} s", elapsed_s=elapsed,
                            memory_gib=gib(mx.get_active_memory()))

    def release(self, *names: str) -> None:
        """Drop loaded parts (all when no name is given) and return their memory to the system."""
        dropped = [self.parts.pop(name) for name in names or list(self.parts) if name in self.parts]
        if dropped:
            del dropped
            gc.collect()  # a part's compiled graphs may hold it in reference cycles
            mx.clear_cache()

    def _end_stage(self, cancel: CancelToken | None) -> None:
        """Between stages: return the memory the stage left behind (its arrays are freed as they are dropped), and
        stop here if the run was cancelled."""
        if self.preset.clear_cache_between_stages:
            mx.clear_cache()
        if cancel is not None and cancel.cancelled:
            raise Cancelled()

    # -- stages ----------------------------------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str], timings: dict, tokens: list):
        """Embeddings (len(prompts), 512, D) as the text encoder's dtype; the cache first, UMT5 for misses.
        Each prompt is encoded on its own, so a cached and a fresh embedding are the same numbers. Appends each
        prompt's token count (before the model's cut to 512) to `tokens`."""
        rows = []
        for prompt in prompts:
            cleaned = prompt_clean(prompt)
            key = self.prompt_cache.key(self.text_identity, cleaned, TEXT_LENGTH)
            cached = self.prompt_cache.get(key, TEXT_LENGTH)
            if cached is None:
                if self.preset.release_transformer_before_decode and not self.preset.stream_text_encoder:
                    self.release("vae", "transformer")  # one large part in memory at a time
                yield from self._load("tokenizer", timings)
                yield from self._load("text_encoder", timings)
                embedding = encode_prompts(self.parts["text_encoder"], self.parts["tokenizer"], [prompt], TEXT_LENGTH)
                self._count_streamed_reads(timings)
                cached = np.array(embedding[0].astype(mx.float32)), count_tokens(self.parts["tokenizer"], prompt)
                self.prompt_cache.put(key, *cached)
            rows.append(cached[0])
            tokens.append(cached[1])
        if self.preset.release_text_encoder:
            self.release("text_encoder")
        return mx.array(np.stack(rows)).astype(self.dtype)

    def _count_streamed_reads(self, timings: dict) -> None:
        """A streamed text encoder reads its blocks while it encodes: that time is loading, as a whole load's is."""
        blocks = self.parts["text_encoder"].encoder.block
        if isinstance(blocks, StreamedBlocks):
            timings["load_s"] = round(timings.get("load_s", 0.0) + blocks.read_s, 4)
            blocks.read_s = 0.0

    def prepare_next(self):
        """Between videos, while nobody waits (the app calls it when no run is waiting): a preset that releases the
        transformer before decoding loads it again now, in place of the VAE, so that the next video does not wait
        for it (the text encoder then streams beside it, and a cached prompt loads only the VAE). Yields the
        loading's progress events."""
        if self.preset.reload_transformer_after_video and self.group is None and "transformer" not in self.parts:
            self.release("vae")
            yield from self._load("transformer", {})

    def _calibrate_preview(self, timings: dict):
        yield from self._load("vae", timings)
        self.preview_map = calibrate(self.parts["vae"], self.normalizer, self.vae_config.scale_factor_spatial)

    # -- LoRA adapters (lora.py) -----------------------------------------------------------------------------------
    @functools.cached_property
    def transformer_shapes(self) -> dict:
        return transformer_shapes(self.transformer_config)

    def _read_loras(self, pairs: list):
        """A request's LoRAs ((reference, strength) pairs), read and checked against the transformer before anything
        is loaded or fused, so a bad file changes nothing."""
        loras = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise WanError(f"LoRA {item!r} is not allowed: give (path or owner/repo/file.safetensors, strength)")
            yield ProgressEvent("load", f"reading the LoRA {item[0]}")
            loras.append(read_lora(item[0], item[1], self.transformer_shapes, self.download_progress))
        return loras

    def _fuse_loras(self, loras: list, timings: dict):
        """Make the loaded transformer hold exactly `loras` (reloading the layers an earlier set changed); nothing
        to do when it holds them already."""
        wanted = adapter_set(loras)
        if wanted.identity == self.fused.identity:
            return
        start = time.perf_counter()
        model = self.parts["transformer"]
        # until done, a failure leaves every layer either set touches to be reloaded by the next run
        self.fused = AdapterSet(None, self.fused.layers | wanted.layers)
        reloaded = 0
        for reloaded, total in fuse(self.snapshot, model, self.dtype, loras, self.fused):
            yield ProgressEvent("load", "fusing LoRAs", reloaded, total, memory_gib=gib(mx.get_active_memory()))
        self.fused = wanted
        if self.preset.compile:
            model.compile()  # compiled blocks hold the weights they were traced with
        elapsed = time.perf_counter() - start
        timings["load_s"] = round(timings.get("load_s", 0.0) + elapsed, 4)
        ignored = sum(len(lora.ignored) for lora in loras)
        yield ProgressEvent("load", f"the transformer holds {len(loras)} LoRAs: {reloaded} layers reloaded in "
                            f"{elapsed:.1f} s" + (f", {ignored} keys ignored as diffusers ignores them" if ignored else ""),
                            elapsed_s=elapsed, memory_gib=gib(mx.get_active_memory()))

    def hold_loras(self, pairs: list) -> None:
        """The loaded transformer fused with `pairs`, without progress events: for the other processes of a group,
        which take rank 0's LoRAs."""
        drain(self._fuse_loras(drain(self._read_loras(pairs)), {}))

    def vae_tile(self, width: int, height: int):
        tile = self.preset.vae_tile
        return tile if tile is not None and width * height >= tile.get("min_pixels", 0) else None

    # -- generation ------------------------------------------------------------------------------------------------
    def settings(self, request: GenerationRequest, seed: int, negative: str, loras: list = ()) -> dict:
        return {
            "prompt": request.prompt, "negative_prompt": negative,
            "image": None if request.image is None else str(getattr(request.image, "filename", "") or request.image),
            "width": request.width, "height": request.height, "frames": request.frames, "steps": request.steps,
            "guidance": request.guidance, "shift": self.shift(request), "sampler": request.sampler, "seed": seed,
            "fps": request.fps, "dtype": self.dtype_name, "model": self.model, "preset": self.preset.name,
            "loras": [lora.record() for lora in loras],
        }

    def shift(self, request: GenerationRequest) -> float:
        return request.shift if request.shift is not None else self.defaults(request.sampler)["shift"]

    def defaults(self, sampler: str | None = None) -> dict:
        """The recommended {sampler, steps, guidance, shift} of this model (of `sampler` on it, when given), which
        a request's unset settings take (see `model_sampler`)."""
        return sampler_defaults(sampler or model_sampler(self.snapshot), self.scheduler_config)

    def with_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its unset sampler, steps, guidance and shift taken from `defaults`."""
        unset = {name: value for name, value in self.defaults(request.sampler).items()
                 if getattr(request, name) is None}
        return dataclasses.replace(request, **unset)

    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None):
        """Run one generation: yields ProgressEvents, then the Result. Raises WanError on bad input and
        errors.Cancelled when `cancel` was set (its memory freed, nothing written)."""
        try:
            yield from self._generate(request, cancel)
        except BaseException as error:
            if self.group is not None and (replacement := self.group.leave(error)) is not None:
                raise replacement from error
            if isinstance(error, Cancelled):
                gc.collect()
                mx.clear_cache()
            raise

    def _generate(self, request: GenerationRequest, cancel: CancelToken | None):
        request = self.with_defaults(request)
        validate(request, self.size_multiple, self.frame_step)
        if self.group is not None:
            self.group.check_usable()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        negative = DEFAULT_NEGATIVE_PROMPT if request.negative_prompt is None else request.negative_prompt
        shape = latent_shape(self.vae_config, self.transformer_config, request.width, request.height, request.frames)
        noise = from_diffusers_layout(request.latents, shape) if request.latents is not None else initial_noise(seed, shape)
        image = None if request.image is None else load_image(request.image, request.width, request.height)
        video_path = self.output_path(request, seed)
        prepare_folder(video_path, request.width, request.height, request.frames)  # before any work: room, a folder
        remove_stale_partials(video_path.parent)
        use_cfg = request.guidance > 1.0
        preset = self.preset
        loras = yield from self._read_loras(request.loras)

        mx.reset_peak_memory()
        timings = {}
        run_start = time.perf_counter()

        stage_peaks, stage_rss = {}, {}

        def lap(name, since):
            """Close a stage: its time, the MLX peak since the previous stage closed, and the process's peak so far."""
            timings[name] = round(time.perf_counter() - since, 4)
            stage_peaks[name.removesuffix("_s")] = gib(mx.get_peak_memory())
            stage_rss[name.removesuffix("_s")] = process_peak_rss_gib()
            mx.reset_peak_memory()

        yield ProgressEvent("text", "encoding the prompt" + (" and the negative prompt" if use_cfg else ""))
        start = time.perf_counter()
        tokens = []
        context = yield from self._encode_text([request.prompt, negative] if use_cfg else [request.prompt], timings,
                                               tokens)
        mx.eval(context)
        lap("text_s", start)
        timings["text_s"] = round(timings["text_s"] - timings.get("load_s", 0.0), 4)  # loading counted apart
        prompt_tokens = {"used": min(tokens[0], TEXT_LENGTH), "total": tokens[0], "limit": TEXT_LENGTH}
        for name, count in zip(("prompt", "negative prompt"), tokens):
            if count > TEXT_LENGTH:
                yield ProgressEvent("text", f"the {name} has {count} tokens and the model reads {TEXT_LENGTH}: "
                                            f"everything after the first {TEXT_LENGTH} is left out")
        self._end_stage(cancel)

        condition = None
        if image is not None or (request.preview and self.preview_map is None):
            if preset.release_transformer_before_decode:  # the VAE is not kept beside the transformer
                self.release("transformer")
            yield from self._load("vae", timings)
        if image is not None:
            yield ProgressEvent("image", "encoding the first frame")
            start = time.perf_counter()
            condition = encode_image(self.parts["vae"], self.normalizer, image)
            mx.eval(condition)
            lap("image_s", start)
        if request.preview and self.preview_map is None:
            yield from self._calibrate_preview(timings)
        if preset.release_transformer_before_decode:  # low memory: the VAE is not kept beside the transformer
            self.release("vae")
        self._end_stage(cancel)
        # A group's other processes take the run from here (wan_engine.parallel.group), each with its part of the work.
        plan = None if self.group is None else self.group.start_run(self, request, seed, context, noise, condition)

        yield from self._load("transformer", timings)
        yield from self._fuse_loras(loras, timings)
        scheduler = make_scheduler(request.sampler, request.steps, request.shift, self.scheduler_config,
                                   step_noise_key(seed))
        steps = generate_latents(self.parts["transformer"], scheduler, noise, context, request.guidance, condition, cancel,
                                 preset.cfg_batch, plan)
        start = time.perf_counter()
        for i, latents in enumerate(steps, start=1):
            elapsed = time.perf_counter() - start
            per_step = elapsed / i
            if i == 1:  # the first step compiles what the run's shapes need: measured apart
                timings["denoise_first_step_s"] = round(elapsed, 4)
            preview = latent_preview(latents, self.preview_map) if request.preview else None
            yield ProgressEvent("denoise", f"step {i}/{request.steps}", i, request.steps, elapsed, per_step,
                                per_step * (request.steps - i), gib(mx.get_active_memory()), preview)
        lap("denoise_s", start)
        timings["denoise_s_per_step"] = round(timings["denoise_s"] / request.steps, 4)
        del noise, context, condition, steps
        if preset.release_transformer_before_decode:
            self.release("transformer")
        self._end_stage(cancel)

        yield from self._load("vae", timings)
        start = time.perf_counter()
        settings = self.settings(request, seed, negative, loras)
        # ffmpeg encodes each decoded chunk while the next one decodes; the video and its sidecar land together
        # at the end, or nothing does (a cancelled or failed run leaves no file).
        output = VideoOutput(video_path, request.width, request.height, request.fps,
                             {"title": request.prompt, "comment": settings})
        try:
            frames_float = []
            tile = self.vae_tile(request.width, request.height)
            for done, total, frames in decode_frames(self.parts["vae"], self.normalizer, latents, cancel, tile,
                                                     preset.vae_frame_by_frame, preset.vae_strip_width, plan):
                if frames is not None:
                    output.add(frames_to_uint8(frames))
                    if request.keep_frames:
                        frames_float.append(np.array(frames))
                yield ProgressEvent("decode", decode_message(done, total, tile is not None, latents.shape[1]), done,
                                    total, memory_gib=gib(mx.get_active_memory()))
            lap("decode_s", start)
            del latents
            self._end_stage(cancel)

            yield ProgressEvent("save", "writing the video")
            start = time.perf_counter()
            output.close()
            lap("save_s", start)
            timings["total_s"] = round(time.perf_counter() - run_start, 4)
            peak = max(stage_peaks.values())
            record = {
                "seed": seed, "settings": settings, "timings": timings, "peak_memory_gib": peak,
                "stage_peak_memory_gib": stage_peaks, "process_peak_rss_gib": process_peak_rss_gib(),
                "stage_process_peak_rss_gib": stage_rss, "prompt_tokens": prompt_tokens,
                "engine_version": __version__, "video": video_path.name,
                "created": datetime.now().isoformat(timespec="seconds"),
            }
            if self.notice:
                record["notice"] = self.notice
            parallel = None if plan is None else {
                **plan.layout.as_dict(), "exchanged_mib_per_step": round(plan.exchanged_bytes_per_step / 2**20, 3)}
            if parallel:
                record["parallel"] = parallel
            video_path, sidecar = output.land(record)
        except BaseException:
            output.abort()
            raise
        yield Result(video_path, sidecar, seed, settings, timings, peak, prompt_tokens,
                     np.concatenate(frames_float) if request.keep_frames else None, record["process_peak_rss_gib"],
                     parallel)

    def output_path(self, request: GenerationRequest, seed: int) -> Path:
        if request.output:
            return Path(request.output)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]  # milliseconds: runs finishing together differ
        path = self.output_dir / f"wan-{stamp}-{seed}.mp4"
        counter = 1
        while path.exists():
            path, counter = self.output_dir / f"wan-{stamp}-{seed}-{counter}.mp4", counter + 1
        return path
