"""The settings form of one tab (text to video, or image to video with its picture) and the events that keep it
consistent: resolution choices fill width and height, the duration follows frames and fps, a button picks a seed,
and for image to video the size follows the picture's aspect."""

from dataclasses import dataclass

import gradio as gr

from wan_engine import DEFAULT_NEGATIVE_PROMPT, extras_missing

from .config import StudioConfig
from .handlers import random_seed
from .loras import HELP as LORA_HELP
from .loras import lora_choices
from .pictures import PictureInput, open_picture, readable_picture
from .story import StoryInputs, build_story
from .sizes import crop_to_aspect, duration_text, parse_size, resolution_choices, size_for_aspect, size_label

MAX_FRAMES = 241  # 10 s at 24 fps; the model was trained on 121
UPLOAD_NOTE = "Upload a picture: the video starts from it, at its aspect."
IMPROVE_HELP = "A few words are enough: Improve prompt writes them out as Wan's prompt extension does, for you to edit."
NEGATIVE_PROMPT_HELP = "What the video should not show. The default is Wan's official one (in Chinese); empty for none."


class BoundedSlider(gr.Slider):
    """gr.Slider whose out-of-range values (from the API) get an error naming the setting and its range."""

    is_template = True  # the browser draws it as a plain gr.Slider

    def preprocess(self, payload):
        allowed = f"between {self.minimum:g} and {self.maximum:g}"
        if payload is None:
            raise gr.Error(f"{self.label.lower()} is missing: give a number {allowed}")
        if not self.minimum <= payload <= self.maximum:
            raise gr.Error(f"{self.label.lower()} {payload} is not allowed: it must be {allowed}")
        return super().preprocess(payload)


@dataclass
class Form:
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    resolution: gr.Dropdown
    width: gr.Number
    height: gr.Number
    frames: BoundedSlider
    steps: BoundedSlider
    guidance: BoundedSlider
    shift: BoundedSlider
    seed: gr.Number
    fps: BoundedSlider
    loras: gr.Dropdown
    generate: gr.Button
    stop: gr.Button
    image: gr.Image | None = None  # image to video only
    story: StoryInputs | None = None  # text to video only: a video continued, several segments
    improve: gr.Button | None = None  # Improve prompt (when the prompt writer is installed)
    improve_status: gr.Markdown | None = None

    @property
    def api_inputs(self) -> list:
        """The inputs of /text_to_video or /image_to_video, in the handlers' parameter order."""
        settings = [self.prompt, self.negative_prompt, self.width, self.height, self.frames, self.steps,
                    self.guidance, self.shift, self.seed, self.fps, self.loras]
        if self.story is not None:
            return [*settings, *self.story.api_inputs]
        return settings if self.image is None else [self.image, *settings]

    @property
    def restorable(self) -> list:
        """What the history's "Use these settings" fills, in history.form_values' order."""
        settings = [self.prompt, self.negative_prompt, self.width, self.height, self.frames, self.steps,
                    self.guidance, self.shift, self.seed, self.fps, self.loras]
        if self.story is not None:
            return [self.resolution, *settings, *self.story.restorable]
        return [self.resolution, self.image, *settings]


def build_form(config: StudioConfig, examples: list[str], for_image: bool) -> Form:
    defaults = config.defaults
    image = None
    if for_image:
        image = PictureInput(label="First frame", type="filepath", sources=["upload", "clipboard"], height=260)
        size_note = gr.Markdown(UPLOAD_NOTE)
    prompt = gr.Textbox(
        label="Prompt", lines=3, value=None, elem_classes="no-error-cover",  # Improve prompt's refusals: its line
        placeholder="What happens in the video" if for_image else "Describe the video: subject, action, place, light",
    )
    with gr.Row():  # right under the prompt: on a phone it stays in the first screen
        generate = gr.Button("Generate", variant="primary", scale=3)
        stop = gr.Button("Stop", variant="stop", scale=1)
    with gr.Row(equal_height=True):
        missing = extras_missing(image=for_image)
        improve = gr.Button("Improve prompt", size="sm", scale=1, visible=missing is None)
        improve_status = gr.Markdown(IMPROVE_HELP if missing is None else f"Improve prompt: {missing}.",
                                     elem_classes="no-error-cover")
    gr.Examples(examples, inputs=[prompt], label="Example prompts")
    story = None if for_image else build_story()

    resolution, custom_size, width, height, frames = build_size_fields(config, for_image)
    duration = gr.Markdown(duration_text(defaults["frames"], defaults["fps"]))
    with gr.Accordion("Negative prompt", open=False):
        negative_prompt = gr.Textbox(value=DEFAULT_NEGATIVE_PROMPT, label="Things to avoid", lines=3, info=NEGATIVE_PROMPT_HELP)
    with gr.Accordion("LoRA adapters", open=False):
        loras = gr.Dropdown(lora_choices(config.output_dir), value=[], multiselect=True, allow_custom_value=True,
                            label="LoRAs", info=LORA_HELP)
    with gr.Accordion("Advanced: steps, guidance, shift, seed, fps", open=False):
        steps = BoundedSlider(1, 100, value=defaults["steps"], step=1, precision=0, label="Steps",
                              info="Denoising steps: more are slower and finer (Wan uses 50).")
        guidance = BoundedSlider(0, 20, value=defaults["guidance"], step=0.5, label="Guidance",
                                 info="How closely to follow the prompt. 1 or less turns it off (twice as fast).")
        shift = BoundedSlider(0.5, 20, value=defaults["shift"], step=0.5, label="Shift",
                              info="Flow shift of the noise schedule (Wan uses 5).")
        seed = gr.Number(defaults["seed"], label="Seed", precision=0,
                         info="-1: a new random seed each run. The same seed and settings give the same video.")
        pick_seed = gr.Button("Pick a random seed", size="sm")
        fps = BoundedSlider(1, 60, value=defaults["fps"], step=1, precision=0, label="Frames per second",
                            info="Playback speed of the saved video (Wan uses 24).")

    pick_seed.click(random_seed, None, seed, queue=False, api_visibility="private")
    gr.on([frames.change, fps.change], duration_text, [frames, fps], duration, queue=False, api_visibility="private")
    if for_image:
        def size_fields(image, resolution, width, height):
            return image_size_fields(image, resolution, width, height, config.size_rules)

        gr.on([image.change, resolution.change], size_fields, [image, resolution, width, height],
              [width, height, custom_size, size_note], queue=False, api_visibility="private")
        gr.on([width.input, height.input], size_note_text, [image, width, height], size_note, queue=False,
              api_visibility="private")
    else:
        resolution.change(text_size_fields, resolution, [width, height, custom_size], queue=False,
                          api_visibility="private")
    return Form(prompt, negative_prompt, resolution, width, height, frames, steps, guidance, shift, seed, fps,
                loras, generate, stop, image, story, improve, improve_status)


def build_size_fields(config: StudioConfig, for_image: bool) -> tuple:
    """The resolution choice, the custom width and height (in their row) and the frames: sizes the model makes."""
    defaults, rules = config.defaults, config.size_rules
    multiple, frame_step = rules.multiple, rules.frame_step
    resolution = gr.Dropdown(
        resolution_choices(config.sizes), value=size_label(defaults["width"], defaults["height"]), label="Resolution",
        info=("Area of the video; its shape follows the picture's. " if for_image else "Width x height. ")
        + f"Smaller is faster; Custom takes any multiples of {multiple}.",
    )
    with gr.Row(visible=False) as custom_size:
        # Image to video starts at 0 x 0: "take the size from the picture" (API callers may leave them so).
        width = gr.Number(0 if for_image else defaults["width"], label="Width", precision=0, step=multiple,
                          info=f"A multiple of {multiple}" + ("; 0: from the picture" if for_image else ""))
        height = gr.Number(0 if for_image else defaults["height"], label="Height", precision=0, step=multiple,
                           info=f"A multiple of {multiple}" + ("; 0: from the picture" if for_image else ""))
    frames = BoundedSlider(1, MAX_FRAMES, value=defaults["frames"], step=frame_step, precision=0, label="Frames",
                           info=f"{frame_step}n+1: 1, {1 + frame_step}, {1 + 2 * frame_step}, ... More frames make a "
                                "longer video and take longer.")
    return resolution, custom_size, width, height, frames


def text_size_fields(resolution: str):
    """Width, height and the custom row's visibility for a resolution choice."""
    size = parse_size(resolution)
    if size is None:
        return gr.skip(), gr.skip(), gr.Row(visible=True)
    return size[0], size[1], gr.Row(visible=False)


def image_size_fields(image, resolution: str, width, height, rules):
    """Image to video: the size the run will take, shown before generating. A resolution choice is an area and
    the picture gives the aspect; Custom keeps the width and height typed in."""
    area_size = parse_size(resolution)
    if area_size is None:
        return gr.skip(), gr.skip(), gr.Row(visible=True), size_note_text(image, width, height)
    picture = readable_picture(image)
    if picture is None:
        return 0, 0, gr.Row(visible=False), size_note_text(image, 0, 0)
    width, height = size_for_aspect(picture.width / picture.height, area_size[0] * area_size[1], rules)
    return width, height, gr.Row(visible=False), size_note_text(image, width, height)


def size_note_text(image, width, height) -> str:
    """The line under the picture: the video size and which part of the picture it shows."""
    if not image:
        return UPLOAD_NOTE
    try:
        picture = open_picture(image)
    except gr.Error as error:
        return f"**This picture cannot be used**: {error.message}."
    if not width or not height:
        return f"Picture {picture.width}x{picture.height}: give both width and height, or 0 for both."
    kept = crop_to_aspect(picture, int(width), int(height)).size
    used = "all of it is used" if kept == picture.size else f"its centre {kept[0]}x{kept[1]} is used"
    return f"Video size **{int(width)}x{int(height)}** · picture {picture.width}x{picture.height}, {used}."
