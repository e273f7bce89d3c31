"""The page: a header; the two tabs' forms beside the results; the history below; and the events between them.

The Generate buttons are the API: /text_to_video and /image_to_video take the form's fields (their initial values
are the API's defaults) and stream into the results. The sampler, memory preset and live-preview switch are page
settings kept in the session (a gr.State, which API clients do not see), so the API's parameters stay exactly
the generation settings.
"""

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from wan_engine import DEMO_NOTICE, SAMPLERS, available_presets, load_preset

from . import history
from .config import StudioConfig
from .form import Form, build_form
from .handlers import Studio
from .loras import lora_choices
from .progress import READY_TEXT, warming_text
from .story import continue_values

FULL_SAMPLER = "unipc"  # Wan's own
FEW_STEP_SAMPLER = next(name for name, sampler in SAMPLERS.items() if sampler.few_step)
NO_CACHE, STEP_CACHE = "none", "magcache"
QUALITY, BALANCED, FAST = "Quality (50 steps)", "Balanced (MagCache, about 2x)", "Fast (3 steps)"
SPEEDS = {QUALITY: (FULL_SAMPLER, NO_CACHE), BALANCED: (FULL_SAMPLER, STEP_CACHE), FAST: (FEW_STEP_SAMPLER, NO_CACHE)}
SPEED_HELP = ("Balanced reuses work between Quality's steps (MagCache). Fast: 3 distilled steps, for FastWan models "
              "or a distillation LoRA.")
DRAFT_HELP = "Decode fast with the tiny decoder; finish it in full quality later."
DECODER_HELP = ("full: Wan's VAE. tiny: TAEW2.2, a draft in a fraction of the decode time, its latents kept so "
                "Finish decodes it in full quality without denoising again (Draft).")
CACHE_HELP = ("magcache: skip the transformer's blocks on steps whose work is predictable from the step before "
              "(Balanced). none: every step computes.")
SAMPLER_HELP = (" ".join(f"{name}: {sampler.description}." for name, sampler in SAMPLERS.items())
                + " Picking one sets its steps, guidance and shift.")
TEXT_EXAMPLES = [
    "A corgi runs along a sunny beach as waves roll in, slow motion, golden hour",
    "Time-lapse of clouds drifting over snowy mountain peaks at sunrise",
    "A steaming cup of coffee on a wooden table by a rainy window, soft morning light",
]
IMAGE_EXAMPLES = [
    "The camera slowly pushes in while the leaves sway in the wind",
    "The person turns toward the camera and smiles",
]
CSS = """
.gradio-container { max-width: 1320px !important; }
#live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
/* a landscape video fills its column; a portrait one stays within the screen */
.capped-video video { max-height: 420px; }
/* a refusal stands in the handler's status line itself (handlers.refusals_said): no error cover over that line,
   nor over the prompt box that Improve prompt writes into */
.no-error-cover [data-testid="status-tracker"]:has(.error) { display: none; }
/* two stills a row on a phone, instead of four squeezed ones */
@media (max-width: 640px) { #history-gallery .grid-container { grid-template-columns: repeat(2, 1fr) !important; } }
"""


@dataclass
class Results:
    progress: gr.Markdown
    preview: gr.Image
    video: gr.Video
    seed: gr.Number
    settings: gr.JSON
    download: gr.DownloadButton
    finish: gr.Button  # shown under a draft
    continue_video: gr.Button  # shown under a video
    video_name: gr.Textbox  # hidden: the shown video's file name, which Finish and Continue take

    @property
    def outputs(self) -> list:
        """What the generation handlers yield, in order (API clients get the same tuple)."""
        return [self.video, self.seed, self.settings, self.progress, self.preview]


@dataclass
class History:
    gallery: gr.Gallery
    records: gr.State  # the gallery's runs, in its order
    picked: gr.State  # the run selected in the gallery
    video: gr.Video  # the selected run's video
    settings: gr.JSON  # and its settings
    restore: gr.Button
    refresh: gr.Button
    finish: gr.Button  # shown when the selected run is a draft
    continue_video: gr.Button
    video_name: gr.Textbox  # hidden: the selected run's video file name


def build_app(config: StudioConfig) -> gr.Blocks:
    studio = Studio(config)
    with gr.Blocks(title="Wan Studio", analytics_enabled=False) as app:
        gr.Markdown(header_text(config))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=340):
                with gr.Row(equal_height=True):
                    speed = gr.Radio(list(SPEEDS), value=speed_of(config.sampler, NO_CACHE), label="Speed",
                                     info=SPEED_HELP, scale=4)
                    draft = gr.Checkbox(False, label="Draft", info=DRAFT_HELP, scale=1, min_width=120)
                with gr.Tabs() as tabs:
                    with gr.Tab("Text to video", id="text"):
                        text_form = build_form(config, TEXT_EXAMPLES, for_image=False)
                    with gr.Tab("Image to video", id="image"):
                        image_form = build_form(config, IMAGE_EXAMPLES, for_image=True)
                with gr.Accordion("Sampler, memory and live preview", open=False):
                    sampler = gr.Radio(list(SAMPLERS), value=config.sampler, label="Sampler", info=SAMPLER_HELP)
                    cache = gr.Radio([NO_CACHE, STEP_CACHE], value=NO_CACHE, label="Step cache", info=CACHE_HELP)
                    decoder = gr.Radio(["full", "tiny"], value="full", label="Decoder", info=DECODER_HELP)
                    preset = gr.Radio(available_presets(), value=config.preset, label="Memory preset",
                                      info=preset_help())
                    live_preview = gr.Checkbox(True, label="Live preview",
                                               info="Show a rough picture of the video at each step.")
                options = gr.State(run_options(preset.value, live_preview.value))
            with gr.Column(scale=1, min_width=340):
                results = build_results(warming_text(None) if config.warmup else READY_TEXT)
        past = build_history()

        gr.on([preset.change, live_preview.change], run_options, [preset, live_preview], options, queue=False,
              api_visibility="private")
        live_preview.change(lambda on: gr.Image(visible=on), live_preview, results.preview, queue=False,
                            api_visibility="private")
        wire_speed(config, speed, sampler, cache, text_form, image_form)
        run_inputs = [sampler, cache, decoder, options]  # after the form's: the handlers' last parameters
        draft.input(lambda on: "tiny" if on else "full", draft, decoder, queue=False, api_visibility="private")
        decoder.input(lambda name: name == "tiny", decoder, draft, queue=False, api_visibility="private")
        wire_generation(text_form, studio.text_to_video, "text_to_video", run_inputs, results, past, studio)
        wire_generation(image_form, studio.image_to_video, "image_to_video", run_inputs, results, past, studio)
        # Stop sets the run's cancel token, and the run's own stream ends with "Stopped at step i/N". (Gradio's
        # `cancels` would cut that stream instead, racing its last updates against Stop's message.)
        wire_finish(results, past, options, studio)
        wire_improve(text_form, image_form, options, studio)
        wire_continue(results, past, tabs, text_form, config.output_dir)
        gr.on([text_form.stop.click, image_form.stop.click], studio.stop, None, results.progress, api_name="stop",
              concurrency_limit=None)
        wire_history(past, studio, config, tabs, [speed, sampler, cache], text_form, image_form)
        app.load(studio.history, None, [past.gallery, past.records], api_visibility="private")
        app.load(lambda: [gr.Dropdown(choices=lora_choices(config.output_dir))] * 2, None,
                 [text_form.loras, image_form.loras], queue=False, api_visibility="private")  # files added since
        # every page, however many, follows the warm-up until the model is ready
        app.load(studio.readiness, None, results.progress, api_visibility="private", concurrency_limit=None,
                 show_progress="hidden")
        # The browser draws an empty number as 0 until the server sends it a value; send "none yet".
        app.load(lambda: None, None, results.seed, queue=False, api_visibility="private")
    return app


def header_text(config: StudioConfig) -> str:
    lines = [
        "# Wan Studio",
        "Turn a prompt, or a prompt and a picture, into a short video with Wan2.2 TI2V-5B on Apple's MLX. "
        "Describe what should happen and watch the video take shape step by step; a run can be stopped at any "
        "time. Every video is kept in the history below with its settings.",
    ]
    if config.demo:
        lines.append(f"> {DEMO_NOTICE[:1].upper()}{DEMO_NOTICE[1:]}.")
    return "\n\n".join(lines)


def preset_help() -> str:
    descriptions = " ".join(f"{name}: {load_preset(name).description}" for name in available_presets())
    return f"{descriptions} A change reloads the model on the next run."


def speed_of(sampler: str, cache: str) -> str:
    if SAMPLERS[sampler].few_step:
        return FAST
    return BALANCED if cache == STEP_CACHE else QUALITY


def wire_speed(config: StudioConfig, speed, sampler, cache, text_form: Form, image_form: Form) -> None:
    """A speed picked on the page sets the sampler and the step cache, a sampler or cache picked sets the speed, and
    either sets both tabs' steps, guidance and shift to what goes with the sampler on this model (FastWan's 3 steps
    without guidance for dmd)."""
    fields = [getattr(form, name) for form in (text_form, image_form) for name in ("steps", "guidance", "shift")]

    def settings(name: str) -> list:
        values = config.sampler_settings(name)
        return [values[key] for _ in range(2) for key in ("steps", "guidance", "shift")]

    def pick_speed(choice: str) -> list:
        picked_sampler, picked_cache = SPEEDS[choice]
        return [picked_sampler, picked_cache, *settings(picked_sampler)]

    speed.input(pick_speed, speed, [sampler, cache, *fields], queue=False, api_visibility="private")
    sampler.input(lambda name, kind: [speed_of(name, kind), *settings(name)], [sampler, cache], [speed, *fields],
                  queue=False, api_visibility="private")
    cache.input(speed_of, [sampler, cache], speed, queue=False, api_visibility="private")


def run_options(preset: str, preview: bool) -> dict:
    return {"preset": preset, "preview": preview}


def build_results(progress_text: str) -> Results:
    progress = gr.Markdown(progress_text, label="Progress", elem_id="progress", elem_classes="no-error-cover",
                           container=True, min_height=48)
    preview = gr.Image(label="Live preview", type="numpy", interactive=False, height=180, elem_id="live-preview",
                       buttons=[], placeholder="A rough picture of the video appears here at each step.")
    video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, elem_id="result-video",
                     elem_classes=["capped-video"])
    with gr.Row(equal_height=True):
        seed = gr.Number(label="Seed used", precision=0, interactive=False, scale=2, placeholder="after a run")
        download = gr.DownloadButton("Download MP4", visible=False, scale=1)
    with gr.Row():
        finish = gr.Button("Finish in full quality", visible=False, variant="primary", elem_id="finish-draft")
        continue_video = gr.Button("Continue this video", visible=False, elem_id="continue-video")
    with gr.Accordion("Settings of this video (JSON)", open=False):
        settings = gr.JSON(label="Settings", show_label=False, elem_id="result-settings")
    return Results(progress, preview, video, seed, settings, download, finish, continue_video,
                   gr.Textbox(visible=False))


def build_history() -> History:
    with gr.Accordion("History", open=True):
        gr.Markdown("Every video in the output folder, newest first. Pick one to play it, see its settings and put "
                    "them back into the form.")
        gallery = gr.Gallery(label="Past videos", columns=4, fit_columns=False, height=360, object_fit="contain",
                             allow_preview=False, interactive=False, elem_id="history-gallery")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=300):
                video = gr.Video(label="Selected video", interactive=False, loop=True, visible=False,
                                 elem_classes=["capped-video"])
            with gr.Column(min_width=300):
                settings = gr.JSON(label="Its settings", visible=False)
        with gr.Row():
            restore = gr.Button("Use these settings", interactive=False)
            finish = gr.Button("Finish in full quality", visible=False, variant="primary")
            continue_video = gr.Button("Continue this video", interactive=False)
            refresh = gr.Button("Refresh history")
    return History(gallery, gr.State([]), gr.State(None), video, settings, restore, refresh, finish, continue_video,
                   gr.Textbox(visible=False))


def wire_generation(form: Form, handler, api_name: str, run_inputs: list, results: Results, past: History,
                    studio: Studio) -> None:
    """Generate -> the streaming handler -> download link and history. Up to the queue's size of requests are
    handed on at once: the engine's thread runs them one at a time, in order, across both tabs (runs.py), and tells
    each how many runs are ahead of it, and Stop takes a waiting one out of the line."""

    event = form.generate.click(
        handler, [*form.api_inputs, *run_inputs], results.outputs, api_name=api_name, concurrency_id="generation",
        concurrency_limit=studio.config.queue_size, show_progress_on=[results.progress], scroll_to_output=True,
    )
    after_run(event, results, past, studio)


def after_run(event, results: Results, past: History, studio: Studio) -> None:
    """When a run has ended: its download link, Finish under a draft, and the history with it."""

    def show(video, settings):
        draft = bool(video) and (settings or {}).get("decoder") == "tiny"
        return (gr.DownloadButton(value=video, visible=bool(video)), gr.Button(visible=draft),
                gr.Button(visible=bool(video) and not draft), Path(video).name if video else "", *studio.history())

    event.then(show, [results.video, results.settings],
               [results.download, results.finish, results.continue_video, results.video_name, past.gallery,
                past.records], api_visibility="private")


def wire_continue(results: Results, past: History, tabs, text_form: Form, output_dir: Path) -> None:
    """Continue this video, under a result and on a past run: the text tab with that video to continue."""
    story = text_form.story
    outputs = [tabs, story.section, story.extend, text_form.prompt]
    for button, name in ((results.continue_video, results.video_name), (past.continue_video, past.video_name)):
        button.click(lambda video: continue_values(output_dir / video), name, outputs, queue=False,
                     api_visibility="private")


def wire_improve(text_form: Form, image_form: Form, options, studio: Studio) -> None:
    """Improve prompt beside each prompt box: the written prompt goes into the box, never straight into a run.
    The text tab's is the /improve_prompt endpoint (prompt, image, language, seed)."""
    language, seed, no_image = gr.State("en"), gr.State(-1), gr.State(None)
    # The generation line's limit too: Gradio lowers a concurrency group's limit to that of any event it queues,
    # and the default (one) would leave the line's runs waiting in Gradio's queue, unseen by our line and its Stop.
    common = dict(concurrency_id="generation", concurrency_limit=studio.config.queue_size)
    text_form.improve.click(studio.improve_prompt, [text_form.prompt, no_image, language, seed, options],
                            [text_form.prompt, text_form.improve_status], api_name="improve_prompt", **common)
    image_form.improve.click(studio.improve_prompt, [image_form.prompt, image_form.image, language, seed, options],
                             [image_form.prompt, image_form.improve_status], api_visibility="private", **common)


def wire_finish(results: Results, past: History, options, studio: Studio) -> None:
    """Finish in full quality, under a draft and on a draft of the history: the /finish endpoint."""
    common = dict(concurrency_id="generation", concurrency_limit=studio.config.queue_size,
                  show_progress_on=[results.progress], scroll_to_output=True)
    event = results.finish.click(studio.finish, [results.video_name, options], results.outputs, api_name="finish",
                                 **common)
    after_run(event, results, past, studio)
    event = past.finish.click(studio.finish, [past.video_name, options], results.outputs, api_visibility="private",
                              **common)
    after_run(event, results, past, studio)


def wire_history(past: History, studio: Studio, config: StudioConfig, tabs, speed_choices: list, text_form: Form,
                 image_form: Form) -> None:
    """The gallery: a pick shows a run; "Use these settings" puts its settings back (`speed_choices`: the speed, the
    sampler and the step cache)."""
    past.refresh.click(studio.history, None, [past.gallery, past.records], api_visibility="private")

    def pick(runs: list, selection: gr.SelectData):
        run = runs[selection.index]
        return (run.record, gr.Video(run.video_path, visible=True), gr.JSON(run.shown(), visible=True),
                gr.Button(interactive=True), gr.Button(visible=run.record.decoder == "tiny"),
                gr.Button(interactive=run.record.decoder != "tiny"), run.record.video)

    past.gallery.select(pick, past.records, [past.picked, past.video, past.settings, past.restore, past.finish,
                                             past.continue_video, past.video_name], api_visibility="private")

    def restore(record):
        """The picked run's settings (its wan_engine.RunRecord) into its tab's form (and that tab shown)."""
        for_image = bool(record.settings.image)
        if for_image and history.input_picture(record) is None:
            gr.Warning("That run's first frame is no longer on disk: upload the picture again.")
        filled = history.form_values(record, config.sizes, for_image, config.output_dir)
        other_form = text_form if for_image else image_form
        skipped = [gr.skip()] * len(other_form.restorable)
        forms = [*skipped, *filled] if for_image else [*filled, *skipped]
        sampler_used, cache_used = record.settings.sampler, record.cache["kind"] if record.cache else NO_CACHE
        return (gr.Tabs(selected="image" if for_image else "text"), speed_of(sampler_used, cache_used), sampler_used,
                cache_used, *forms)

    past.restore.click(restore, past.picked, [tabs, *speed_choices, *text_form.restorable, *image_form.restorable],
                       api_visibility="private")
