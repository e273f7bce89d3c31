"""What a caller hands the engine and hears back: a `GenerationRequest`, the `ProgressEvent`s of its `Stage`s, a
`CancelToken` to stop it, and the `Result`; the checks a request passes before any model is loaded; and what a
model recommends for a request (its sampler and settings, its sizes) before any engine is opened.
"""

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import WanError
from .model_files.hub import find_local_model
from .model_files.loading import Snapshot
from .models.config import SHIPPED_CONFIGS, SchedulerConfig, TransformerConfig
from .record import RunRecord, Stage
from .sampling.magcache import KIND as MAGCACHE, check_ratios, check_settings
from .sampling.samplers import SAMPLERS, sampler_defaults

WAN22_FLOW_SHIFT = 5.0  # Wan-AI/Wan2.2-TI2V-5B-Diffusers' scheduler config


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
    fps: int | None = None  # None: a continued video's own, else 24
    latents: np.ndarray | None = None  # initial noise (1, C, F, H, W) used instead of the seed's
    output: str | None = None  # the MP4 path; None: a timestamped name under the engine's output folder
    keep_frames: bool = False  # return the float frames in the result (for --save-frames and tests)
    preview: bool = False  # attach a small RGB preview of the latents to each denoising event
    # LoRAs fused into the transformer, in order: (reference, strength), the reference a local .safetensors path or a
    # Hub file written owner/repo/path/in/repo.safetensors; strength as diffusers' adapter weight (1.0: as trained)
    loras: list = field(default_factory=list)
    # A step cache (sampling/magcache.py), "magcache" or None, and its settings as diffusers' MagCacheConfig's;
    # cache_ratios None: MagCache's published TI2V-5B ratios of the task (text or image to video)
    cache: str | None = None
    cache_threshold: float = 0.06
    cache_max_skip: int = 3
    cache_retention: float = 0.2
    cache_ratios: list | None = None
    decoder: str = "full"  # "tiny": a draft, decoded by the tiny decoder, its latents kept for `Engine.finish`
    # Longer videos: a video to continue (any file ffmpeg reads), and the prompts of more segments, each `frames`
    # long and continuing the video so far; a segment that continues is conditioned on its last `overlap_frames`
    extend: str | None = None
    continuations: list = field(default_factory=list)
    overlap_frames: int = 1
    prompt_writer: dict | None = None  # when the prompt was written by the prompt writer: {"original", "model", "seed"}


DECODERS = ("full", "tiny")


@dataclass
class ProgressEvent:
    stage: Stage
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
    """A finished run: the files written and their record (the sidecar's contents)."""
    video_path: Path
    sidecar_path: Path
    record: RunRecord
    frames: np.ndarray | None = field(default=None, repr=False)  # float frames in [0, 1], when asked for

    @property
    def seed(self) -> int:
        return self.record.seed

    @property
    def settings(self) -> dict:
        return self.record.to_dict()["settings"]

    @property
    def timings(self) -> dict:
        return self.record.timings

    @property
    def peak_memory_gib(self) -> float:
        return self.record.peak_memory_gib

    @property
    def process_peak_rss_gib(self) -> float:
        return self.record.process_peak_rss_gib

    @property
    def prompt_tokens(self) -> dict:
        return self.record.prompt_tokens

    @property
    def parallel(self) -> dict | None:
        return self.record.parallel


@dataclass(frozen=True)
class SizeRules:
    """The sizes a model can make: widths and heights are multiples of `multiple` (the VAE's spatial factor times
    the transformer's patch), frame counts are `frame_step` n + 1 (the VAE's temporal factor). Wan2.2 TI2V-5B's: 32
    and 4."""
    multiple: int = 32
    frame_step: int = 4

    def check(self, width: int, height: int, frames: int) -> None:
        """Refuse sizes the model cannot represent, saying what is allowed (diffusers silently rounds instead)."""
        multiple, step = self.multiple, self.frame_step
        for name, value in (("width", width), ("height", height)):
            if value < multiple or value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise WanError(f"{name} {value} is not allowed: it must be a positive multiple of {multiple} "
                               f"(for example {lower} or {lower + multiple})")
        if frames < 1 or (frames - 1) % step:
            lower = max(1, (frames - 1) // step * step + 1)
            raise WanError(f"frames {frames} is not allowed: it must be {step}n+1 (1, {1 + step}, {1 + 2 * step}, "
                           f"..., for example {lower} or {lower + step})")

    def nearest(self, width: float, height: float) -> tuple[int, int]:
        """The allowed size nearest to width x height."""
        def snap(value):
            return max(self.multiple, round(value / self.multiple) * self.multiple)
        return snap(width), snap(height)


def validate(request: GenerationRequest, sizes: SizeRules) -> None:
    """Every check that needs no model, with messages that say what is allowed (settings left unset are the
    model's, and not checked)."""
    if not request.prompt or not request.prompt.strip():
        raise WanError("the prompt is empty: describe the video you want")
    sizes.check(request.width, request.height, request.frames)
    if request.sampler is not None and request.sampler not in SAMPLERS:
        raise WanError(f"sampler {request.sampler!r} is not allowed: choose one of {', '.join(SAMPLERS)}")
    if request.steps is not None and not 1 <= request.steps <= 1000:
        raise WanError(f"steps {request.steps} is not allowed: it must be between 1 and 1000")
    if request.guidance is not None and not 0 <= request.guidance <= 50:
        raise WanError(f"guidance {request.guidance} is not allowed: it must be between 0 and 50 (1 turns it off)")
    few_step = request.sampler is not None and SAMPLERS[request.sampler].few_step
    if few_step and request.guidance is not None and request.guidance != 1:
        raise WanError(f"guidance {request.guidance} is not allowed with the {request.sampler} sampler: distilled "
                       "few-step sampling runs without guidance (1, or leave it unset)")
    if request.shift is not None and not 0 < request.shift <= 100:
        raise WanError(f"shift {request.shift} is not allowed: it must be above 0 and at most 100")
    if request.fps is not None and not 1 <= request.fps <= 120:
        raise WanError(f"fps {request.fps} is not allowed: it must be between 1 and 120")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise WanError(f"seed {request.seed} is not allowed: it must be between 0 and 2^63-1")
    if request.cache is not None:
        validate_cache(request, few_step)
    if request.decoder not in DECODERS:
        raise WanError(f"decoder {request.decoder!r} is not allowed: choose full, or tiny (a draft, finished later)")
    if request.extend is not None or request.continuations:
        validate_story(request, sizes)


def validate_story(request: GenerationRequest, sizes: SizeRules) -> None:
    """A video continued, or made of several segments."""
    step, overlap = sizes.frame_step, request.overlap_frames
    if request.extend is not None and request.image is not None:
        raise WanError("--extend and --image are not allowed together: a continued video starts from its own last "
                       "frames; give one of them")
    if not isinstance(overlap, int) or overlap < 1 or (overlap - 1) % step or overlap > request.frames - step:
        raise WanError(f"overlap frames {overlap} is not allowed: it must be {step}n+1 (1, {1 + step}, "
                       f"{1 + 2 * step}, ...: whole latent frames) and at most the segment's length minus {step} "
                       f"({request.frames - step})")
    for number, prompt in enumerate(request.continuations, start=2):
        if not isinstance(prompt, str) or not prompt.strip():
            raise WanError(f"the prompt is empty for segment {number}: describe what happens in each segment")
    if request.decoder == "tiny":
        raise WanError("a draft (the tiny decoder) is not allowed for a continued video or a story: its segments "
                       "continue frames the full decoder makes; decode it in full")


def validate_cache(request: GenerationRequest, few_step: bool) -> None:
    if request.cache != MAGCACHE:
        raise WanError(f"cache {request.cache!r} is not allowed: choose {MAGCACHE}, or none")
    if few_step:
        raise WanError(f"the {MAGCACHE} cache is not allowed with the {request.sampler} sampler: a step cache skips "
                       "steps of a long sampler (50 steps), and a few-step distilled sampler has none to spare")
    check_settings(request.cache_threshold, request.cache_max_skip, request.cache_retention)
    if request.cache_ratios is not None:
        check_ratios(request.cache_ratios, "the cache's ratios")


def model_sampler(snapshot: Snapshot) -> str:
    """The sampler a model is made for. FastVideo's DMD-distilled checkpoints (FastWan2.2-TI2V-5B) name its
    `WanDMDPipeline` in model_index.json: they default to the dmd sampler, 3 steps, no guidance."""
    return "dmd" if snapshot.pipeline_class == "WanDMDPipeline" else "unipc"


def is_ti2v_5b(config: TransformerConfig) -> bool:
    """Whether a transformer has Wan2.2 TI2V-5B's architecture (its published MagCache ratios apply)."""
    return config == TransformerConfig.from_file(SHIPPED_CONFIGS / "transformer.json")


def size_rules(snapshot: Snapshot) -> SizeRules:
    """The sizes a model makes: multiples of its VAE's spatial factor times its patch, frames of its temporal one."""
    vae, transformer = snapshot.vae_config, snapshot.transformer_config
    return SizeRules(vae.scale_factor_spatial * transformer.patch_size[1], vae.scale_factor_temporal)


def recommended_settings(model: str) -> dict:
    """For a form filled before any engine is opened: {"sampler": the model's own sampler, "by_sampler": {name:
    {sampler, steps, guidance, shift}}, "sizes": SizeRules}, read from the model's files when they are on this
    machine (nothing is downloaded), else those of Wan2.2 TI2V-5B (UniPC, flow shift 5, multiples of 32, 4n+1)."""
    snapshot = None
    if root := find_local_model(model):
        try:
            snapshot = Snapshot.open(root)
        except WanError:  # a broken folder: the engine says what is wrong when a run opens it
            pass
    config = snapshot.scheduler_config if snapshot else SchedulerConfig(flow_shift=WAN22_FLOW_SHIFT)
    return {"sampler": model_sampler(snapshot) if snapshot else "unipc",
            "by_sampler": {name: sampler_defaults(name, config) for name in SAMPLERS},
            "sizes": size_rules(snapshot) if snapshot else SizeRules()}
