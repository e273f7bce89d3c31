"""One run as the engine's stages fill it in (`Run`), and what its progress says: the time of each denoising step
and what is left (`StepTimer`, which knows the steps a step cache skips), the decode's pieces.
"""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx

from .parallel.share import ALONE
from .pipeline import initial_noise
from .record import RunSettings, StageClock
from .request import GenerationRequest, Result
from .sampling.magcache import MagCache, builtin_ratios


def decode_message(done: int, total: int, tiled: bool, latent_frames: int) -> str:
    """Progress of the decode: tiles, latent frames, or strips of latent frames (WanVAE.decode_chunks)."""
    if tiled:
        return f"decoded tile {done}/{total}"
    strips = total // latent_frames
    if strips == 1:
        return f"decoded latent frame {done}/{total}"
    strip, frame = divmod(done - 1, latent_frames)
    return f"decoded strip {strip + 1}/{strips}, latent frame {frame + 1}/{latent_frames}"


def drain(events):
    """Run a generator of progress events to its end, unheard; what it returns."""
    while True:
        try:
            next(events)
        except StopIteration as end:
            return end.value


@dataclass
class Run:
    """One generation, as its stages fill it in."""
    request: GenerationRequest  # with the model's defaults filled in
    seed: int
    negative_prompt: str
    loras: list  # model_files.lora.Lora, read and checked
    noise: mx.array | None
    image: mx.array | None = None  # the first frame's pixels (image to video)
    video_path: Path | None = None  # rank 0's
    use_prompt_cache: bool = True
    clock: StageClock = field(default_factory=StageClock)
    handed_over: bool = False  # a group's other process: rank 0 encoded the text and the first frame
    share: object = ALONE  # this process's share of the work (parallel/share.py)
    context: mx.array | None = None  # text embeddings (1 or 2, 512, D)
    prompt_tokens: dict | None = None
    condition: mx.array | None = None  # the first frame's latent
    latents: mx.array | None = None  # denoised
    calibration: list | None = None  # a step cache's calibration: each step's magnitude ratio (no video is made)
    cache_record: dict | None = None  # what the sidecar says of the step cache
    tiny_previews: bool = False  # live previews through the tiny decoder
    settings: RunSettings | None = None  # what the video is made with (a finished draft's: the draft's)
    finished_from: str | None = None  # a finished draft's: the draft video's name
    # A video of several segments, or continuing one: the prompts, the segment under way, the video continued
    prompts: list = field(default_factory=lambda: [""])
    segment: int = 0
    source: object = None  # images.SourceVideo
    base_request: GenerationRequest | None = None  # the request of every segment, but its prompt and seed
    segments: list = field(default_factory=list)  # what the sidecar says of each segment
    writer: object = None  # rank 0's outputs.writer.VideoWriter
    result: Result | None = None

    def segment_label(self) -> str:
        """"segment 2 of 3, " in a video of several segments; nothing in one of one."""
        return f"segment {self.segment + 1} of {len(self.prompts)}, " if len(self.prompts) > 1 else ""

    def begin_segment(self, index: int, latent_shape: tuple) -> None:
        """Segment `index`: its prompt and seed (the run's + index), its noise (the first segment's is the run's), and
        its given frames: a first frame (image to video), or the video's last frames when it continues one."""
        request = self.request = replace(self.base_request, prompt=self.prompts[index], seed=self.seed + index)
        self.segment, self.context, self.condition, self.latents = index, None, None, None
        continues = index > 0 or self.source is not None
        if index > 0:
            self.noise = initial_noise(request.seed, latent_shape)
        if continues:
            self.image = self.writer.given_frames()
        self.writer.begin_segment(continues)
        if continues or len(self.prompts) > 1:
            self.segments.append({"prompt": request.prompt, "seed": request.seed, "frames": request.frames,
                                  "overlap": request.overlap_frames if continues else 0})

    def step_cache(self) -> MagCache | None:
        """The request's step cache, with the ratios it gives or MagCache's published ones for this model's task."""
        request = self.request
        if request.cache is None:
            return None
        ratios = request.cache_ratios
        if ratios is None:
            ratios = builtin_ratios(image_to_video=self.condition is not None)
        return MagCache(tuple(ratios), request.cache_threshold, request.cache_max_skip, request.cache_retention)

    def make_settings(self, model: str, dtype: str, preset: str) -> RunSettings:
        """What the video is made with: the request with the model's defaults, the seed, the engine's model, dtype
        and preset, the LoRAs' records."""
        request = self.request
        return RunSettings(
            prompt=request.prompt, negative_prompt=self.negative_prompt,
            image=None if request.image is None else str(getattr(request.image, "filename", "") or request.image),
            width=request.width, height=request.height, frames=request.frames, steps=request.steps,
            guidance=request.guidance, shift=request.shift, sampler=request.sampler, seed=self.seed, fps=request.fps,
            dtype=dtype, model=model, preset=preset,
            loras=[lora.record() for lora in self.loras],
        )


class StepTimer:
    """Seconds per denoising step and the time left. With a step cache's `plan` (True: the step runs the blocks),
    steps that run the blocks and steps that skip them are timed apart, and the time left counts each kind."""

    def __init__(self, plan: list[bool]):
        self.plan = plan
        self.start = self.last = time.perf_counter()
        self.spent = {True: [], False: []}  # computed / skipped steps' seconds

    def step_done(self, step: int) -> tuple[float, float, float]:
        """After step `step` (1-based): (seconds since the first began, seconds per step so far, seconds left)."""
        now = time.perf_counter()
        self.spent[self.plan[step - 1]].append(now - self.last)
        self.last = now
        elapsed = now - self.start
        per_kind = {kind: sum(times) / len(times) for kind, times in self.spent.items() if times}
        computed = per_kind.get(True, elapsed / step)
        skipped = per_kind.get(False, 0.0)  # a skipped step runs only what lies outside the blocks
        left = sum(computed if kind else skipped for kind in self.plan[step:])
        return elapsed, elapsed / step, left
