"""Longer videos on the text tab: a video to continue (set by "Continue this video" under a result or on a past run,
or uploaded), its last frame shown, the overlap frames that carry the motion across the seam, and Story mode, one
prompt per line for the segments after the first. Their values are the API's `extend`, `overlap_frames` and
`continuations` of /text_to_video.
"""

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import imageio_ffmpeg
import numpy as np

OVERLAPS = [1, 5, 9, 13, 17]
OVERLAP_HELP = ("How many of the video's last frames the next segment starts from: 1 is image to video from the last "
                "frame; more keeps the motion going across the seam.")
STORY_HELP = "One prompt per line: each line is one more segment, continuing the video so far."


@dataclass
class StoryInputs:
    section: gr.Accordion
    extend: gr.Video  # the video to continue (API: extend)
    last_frame: gr.Image  # its last frame, shown
    overlap: gr.Dropdown  # API: overlap_frames
    story: gr.Checkbox  # Story mode
    next_prompts: gr.Textbox  # one prompt per line, in Story mode
    continuations: gr.JSON  # hidden: the next prompts as a list (API: continuations)

    @property
    def api_inputs(self) -> list:
        return [self.extend, self.overlap, self.continuations]

    @property
    def restorable(self) -> list:
        """What "Use these settings" fills, in story_values' order."""
        return [self.section, self.extend, self.overlap, self.story, self.next_prompts]


def last_frame(video) -> np.ndarray | None:
    """The last frame of a video file, or None when there is none or it cannot be read."""
    if not video:
        return None
    try:
        reader = imageio_ffmpeg.read_frames(str(video))
        width, height = next(reader)["size"]
        frame = None
        for frame in reader:
            pass
    except (OSError, RuntimeError, StopIteration):
        return None
    return None if frame is None else np.frombuffer(frame, np.uint8).reshape(height, width, 3)


def prompt_lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def build_story() -> StoryInputs:
    with gr.Accordion("Longer video: continue a video, or a story of several prompts", open=False) as section:
        with gr.Row(equal_height=False):
            extend = gr.Video(label="Video to continue", sources=["upload"], height=160, elem_id="extend-video")
            preview = gr.Image(label="Its last frame: the next segment starts here", interactive=False, height=160,
                               elem_id="extend-last-frame", buttons=[])
        overlap = gr.Dropdown(OVERLAPS, value=1, label="Overlap frames", info=OVERLAP_HELP)
        story = gr.Checkbox(False, label="Story", info=STORY_HELP)
        next_prompts = gr.Textbox(label="Next segments", lines=3, visible=False, elem_id="next-segments",
                                  placeholder="The kite climbs into the clouds\nIt dives towards the sea")
    continuations = gr.JSON([], visible=False)
    inputs = StoryInputs(section, extend, preview, overlap, story, next_prompts, continuations)
    extend.change(last_frame, extend, preview, queue=False, api_visibility="private")
    story.change(lambda on: gr.Textbox(visible=on), story, next_prompts, queue=False, api_visibility="private")
    gr.on([story.change, next_prompts.change], lambda on, text: prompt_lines(text) if on else [],
          [story, next_prompts], continuations, queue=False, api_visibility="private")
    return inputs


def continue_values(video) -> tuple:
    """A finished video as the text tab's next source: the text tab shown, the section open, the video set, the prompt
    emptied for the next segment."""
    return gr.Tabs(selected="text"), gr.Accordion(open=True), str(video), ""


def story_values(record, output_dir: Path) -> list:
    """A past run's story in StoryInputs.restorable's order: the section (open for a story), the video it continued
    (when still on disk), its overlap, Story mode and the prompts after the first."""
    segments = record.segments or []
    source = (record.source or {}).get("path")
    source = source if source and Path(source).is_file() else None
    overlap = max([segment["overlap"] for segment in segments] + [1])
    later = [segment["prompt"] for segment in segments[1:]]
    return [gr.Accordion(open=bool(segments)), source, overlap, bool(later),
            gr.Textbox(value="\n".join(later), visible=bool(later))]
