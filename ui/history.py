"""Past runs: the engine writes `wan-<time>-<seed>.mp4` and a JSON sidecar beside it for every video, so the
output folder is the history; the only other thing kept there is a small still of each video for the gallery."""

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import imageio_ffmpeg
import numpy as np
from PIL import Image

from wan_engine import RunRecord, partial_name, remove_stale_partials

from .loras import lora_items
from .sizes import CUSTOM, matching_choice
from .story import story_values

HISTORY_LIMIT = 60  # newest runs shown in the gallery
CAPTION_CHARS = 60
THUMBNAIL_PIXELS = 320  # the longer side of a gallery still


@dataclass
class PastRun:
    """A video of the history and its record (its sidecar, read back)."""
    record: RunRecord
    video_path: str

    def shown(self) -> dict:
        """What the page shows of it: the sidecar, and where the video is."""
        return {**self.record.to_dict(), "video_path": self.video_path}


def load_history(output_dir: Path) -> list[PastRun]:
    """The newest runs whose video still exists, newest first."""
    runs = []
    for sidecar in output_dir.glob("wan-*.json"):
        try:
            record = RunRecord.from_dict(json.loads(sidecar.read_text()))
            video = output_dir / record.video
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a foreign or damaged file is not a run
            continue
        if video.is_file():
            runs.append(PastRun(record, str(video)))
    runs.sort(key=lambda run: (run.record.created, run.video_path), reverse=True)
    return runs[:HISTORY_LIMIT]


def caption(run: PastRun) -> str:
    prompt = run.record.settings.prompt
    if len(prompt) > CAPTION_CHARS:
        prompt = prompt[:CAPTION_CHARS - 1] + "…"
    source = " · from a picture" if run.record.settings.image else ""
    return f"{prompt}{source} · seed {run.record.seed}"


def gallery_items(runs: list[PastRun]) -> list[tuple[str, str]]:
    return [(still_or_video(Path(run.video_path)), caption(run)) for run in runs]


# Stills are made by ffmpeg in a child process, and on Linux a fork while the engine's CPU BLAS (OpenBLAS) is in
# the middle of a call can hang the engine for good. So they are made only where no engine work runs alongside:
# at startup, and on the engine's own thread right after it saves a video. Listing the history never forks.
def still_path(video: Path) -> Path:
    return video.parent / "thumbnails" / f"{video.stem}.png"


def still_or_video(video: Path) -> str:
    """The video's still for the gallery, or the video itself (shown as a video) when it has none."""
    still = still_path(video)
    return str(still if still.exists() else video)


def readable_still(still: Path) -> bool:
    """Whether a still is a whole PNG (a damaged one is made again)."""
    try:
        with Image.open(still) as picture:
            picture.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def make_still(video: Path) -> None:
    """Save a small still of the video's first frame into the output folder's thumbnails/ (unless it is there or
    the video cannot be read)."""
    still = still_path(video)
    if still.exists() and readable_still(still):
        return
    try:
        frames = imageio_ffmpeg.read_frames(str(video))
        width, height = next(frames)["size"]
        picture = Image.fromarray(np.frombuffer(next(frames), np.uint8).reshape(height, width, 3))
        frames.close()
    except (OSError, RuntimeError, StopIteration):
        return
    picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    still.parent.mkdir(exist_ok=True)
    partial = partial_name(still)  # a crash never leaves half a still behind
    picture.save(partial, format="PNG")
    partial.replace(still)


def remove_partials(output_dir: Path) -> None:
    """Remove the partial videos, sidecars and stills of runs whose process was killed while writing them."""
    for folder in (output_dir, output_dir / "thumbnails"):
        remove_stale_partials(folder)


def make_missing_stills(output_dir: Path) -> None:
    """Stills for the runs the gallery shows that have none (made by the command line, or before stills existed)."""
    for run in load_history(output_dir):
        make_still(Path(run.video_path))


def input_picture(record: RunRecord) -> str | None:
    """The image an image-to-video run started from, when it is still on disk."""
    image = record.settings.image
    return image if image and Path(image).is_file() else None


def form_values(record: RunRecord, sizes: list[tuple[int, int]], for_image: bool, output_dir: Path) -> list:
    """A past run's settings in the order of Form.restorable: resolution, [image], prompt, negative prompt, width,
    height, frames, steps, guidance, shift, seed, fps, LoRAs, [the story's: the video continued, overlap, Story mode,
    the next prompts]. Image-to-video sizes come back as Custom, exactly as used."""
    settings = record.settings
    resolution = CUSTOM if for_image else matching_choice(settings.width, settings.height, sizes)
    values = [
        settings.prompt, settings.negative_prompt, settings.width, settings.height, settings.frames, settings.steps,
        settings.guidance, settings.shift, record.seed, settings.fps, lora_items(settings.loras, output_dir),
    ]
    if for_image:
        return [resolution, input_picture(record) or gr.skip(), *values]
    return [resolution, *values, *story_values(record, output_dir)]
