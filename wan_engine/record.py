"""A run's record: what a video was made with and what it cost, built in one place (`RunRecord`).

The sidecar JSON beside each video is `RunRecord.to_dict()`; the app's history and its "Use these settings" read
sidecars back with `RunRecord.from_dict`. `StageClock` measures a run as it goes: each stage's seconds, MLX's peak
since the stage before, and the process's own peak physical memory so far.

MLX's peak (mx.get_peak_memory) counts the arrays it allocates; the process also holds Python, the libraries, the
tokenizer, file buffers and, on a GPU, the driver's share. On a Mac all of it comes out of the same unified memory,
so a user sees about the sum of the two.
"""

import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import mlx.core as mx

STATUS = Path("/proc/self/status")


class Stage(str, Enum):
    """The stages of a run, in order, as its progress events name them (a str: "denoise" == Stage.DENOISE)."""
    DOWNLOAD = "download"
    LOAD = "load"
    TEXT = "text"
    IMAGE = "image"
    DENOISE = "denoise"
    DECODE = "decode"
    SAVE = "save"

    def __str__(self) -> str:
        return self.value


def process_peak_rss_gib() -> float:
    """The most physical memory this process has held at once so far, in GiB.

    On Linux: the kernel's high-water mark of this process's resident set (VmHWM). Not getrusage's ru_maxrss, which
    Linux carries over from the parent through fork and exec: a process started by one that held 5.8 GiB reports at
    least 5.8 GiB (bench_cold_start's child processes did, started by the bench that built the model with PyTorch).
    Elsewhere getrusage's (macOS gives it in bytes).
    """
    if STATUS.is_file():
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


def gib(value: int) -> float:
    return round(value / 2**30, 3)


def _known(cls, data: dict) -> dict:
    """The items of `data` that are fields of the dataclass `cls` (a sidecar of another version may have more)."""
    names = {f.name for f in fields(cls)}
    return {name: value for name, value in data.items() if name in names}


@dataclass
class RunSettings:
    """Everything a video was made with: a request with the model's defaults filled in, and the seed used."""
    prompt: str
    negative_prompt: str
    image: str | None  # the first frame's path (image to video), or None
    width: int
    height: int
    frames: int
    steps: int
    guidance: float
    shift: float
    sampler: str
    seed: int
    fps: int
    dtype: str
    model: str
    preset: str
    loras: list = field(default_factory=list)  # {"name", "sha256", "strength"} of each LoRA fused, in order

    @classmethod
    def from_dict(cls, data: dict) -> "RunSettings":
        return cls(**_known(cls, data))


OPTIONAL = ("notice", "parallel", "cache", "finished_from", "source", "segments", "prompt_writer", "text_encoder")  # in a sidecar when they say something


@dataclass
class RunRecord:
    """One finished video: its sidecar, field for field."""
    seed: int
    settings: RunSettings
    timings: dict  # seconds: load_s, text_s, image_s, denoise_s, denoise_first_step_s, denoise_s_per_step, ...
    peak_memory_gib: float  # MLX's peak over the run
    stage_peak_memory_gib: dict  # stage -> MLX's peak during it
    process_peak_rss_gib: float  # the process's own peak physical memory so far
    stage_process_peak_rss_gib: dict
    prompt_tokens: dict  # {"used", "total", "limit"}: the model reads the first `limit` tokens of the prompt
    engine_version: str
    video: str  # the MP4's file name, beside the sidecar
    created: str  # ISO time, to the second
    notice: str | None = None  # what the user must know of the model (the demo model's videos are noise-like)
    parallel: dict | None = None  # a group's run: {"ranks", "guidance", "sequence", "exchanged_mib_per_step"}
    cache: dict | None = None  # a step cache's: {"kind", "threshold", "max_skip", "retention", "computed_steps",
    # "skipped_steps"}
    decoder: str = "full"  # "tiny": a draft, whose latents are kept beside it for `finish`
    finished_from: str | None = None  # a finished draft's: the draft video's file name
    source: dict | None = None  # a continued video's: {"path", "sha256", "frame_count"}
    segments: list | None = None  # a story's or a continuation's: {"prompt", "seed", "frames", "overlap"} each
    prompt_writer: dict | None = None  # a written prompt's: {"original", "model", "seed"} (prompting/)
    text_encoder: dict | None = None  # {"kept_between_videos", "why"}: the memory policy's decision (parts.py)

    def stage_seconds(self) -> dict:
        """Stage -> its seconds, for the stages the run went through (loading counted apart from the others)."""
        return {stage: self.timings[f"{stage}_s"] for stage in Stage if f"{stage}_s" in self.timings}

    @property
    def seconds_per_step(self) -> float:
        return self.timings["denoise_s_per_step"]

    @property
    def total_seconds(self) -> float:
        return self.timings["total_s"]

    def to_dict(self) -> dict:
        """The sidecar's JSON object (notice, parallel and cache only when they say something)."""
        record = asdict(self)
        return {name: value for name, value in record.items()
                if value is not None or name not in OPTIONAL}

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        """A sidecar read back; raises KeyError or TypeError when it is not one."""
        known = _known(cls, data)
        return cls(**{**known, "settings": RunSettings.from_dict(data["settings"])})


class StageClock:
    """A run's timings as it goes: `lap(stage)` closes a stage (its seconds, MLX's peak since the previous lap, the
    process's peak so far); `loading(seconds)` counts time spent loading parts, which stages report apart."""

    def __init__(self):
        self.timings: dict = {}
        self.stage_peaks: dict = {}
        self.stage_rss: dict = {}
        self.started = self.since = time.perf_counter()
        mx.reset_peak_memory()

    def start(self) -> None:
        """A stage begins now."""
        self.since = time.perf_counter()

    def lap(self, stage: Stage) -> float:
        """Close `stage`, begun at the last `start` (a stage met again, in the next segment, adds up); returns its
        seconds."""
        stage = str(stage)
        seconds = time.perf_counter() - self.since
        self.timings[f"{stage}_s"] = round(self.timings.get(f"{stage}_s", 0.0) + seconds, 4)
        self.stage_peaks[stage] = max(self.stage_peaks.get(stage, 0.0), gib(mx.get_peak_memory()))
        self.stage_rss[stage] = process_peak_rss_gib()
        mx.reset_peak_memory()
        return seconds

    def loading(self, seconds: float) -> None:
        self.timings["load_s"] = round(self.timings.get("load_s", 0.0) + seconds, 4)

    def total(self) -> None:
        self.timings["total_s"] = round(time.perf_counter() - self.started, 4)

    @property
    def peak_memory_gib(self) -> float:
        return max(self.stage_peaks.values())
