"""The functions behind the buttons, which are also the API: /text_to_video, /image_to_video and /stop; and the
model's warm-up at launch, whose progress each page shows until the model is ready.

The two generation handlers are generators. Each yields (video, seed, settings, progress, preview) over and over:
first with the previous result cleared, then a progress line (and a latent preview) per engine event, and
finally the video, the seed used and the settings. Their parameter names are the API's parameter names.
"""

import functools
import hashlib
import io
import logging
import secrets
import tempfile
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from wan_engine import (
    MAGCACHE_SETTING, Cancelled, GenerationRequest, ProgressEvent, PromptWriter, Result, Stage, WanError,
    extras_missing, read_draft_record, validate, warm_up,
)

from . import history
from .config import MAX_SEED, StudioConfig
from .engine_cache import EngineCache
from .loras import engine_loras
from .pictures import open_picture
from .progress import (
    READY_TEXT, event_text, failed_text, finished_text, left_line_text, ready_text, stopped_text, waiting_text,
    warming_text,
)
from .runs import EngineThread, Run
from .sizes import crop_to_aspect, size_for_aspect

log = logging.getLogger("wan_studio")
STOP_WAIT_S = 30  # Stop reports once the run has ended (within a step), or that it is ending after this long
KEPT_PREVIEW_RUNS = 3  # the latest runs whose previews stay on disk
READINESS_POLL_S = 0.25  # how often a page that opened during the warm-up hears how it goes
WARM_UP_SESSION = "warm-up"  # the warm-up's run belongs to no page, so no page's Stop ends it


def progress_update(text: str, preview=None) -> tuple:
    """An update while running: no result yet (the fields stay empty), the progress line and the preview."""
    return None, None, None, text, preview


def writing_update(text: str) -> tuple:
    """Improve prompt's update: the prompt box as it is, the status line under it."""
    return gr.skip(), text


def refusals_said(update):
    """A streaming handler whose refusals (gr.Error, before or during its run) also stand in its status line, as
    `update(text)` puts them there: Gradio's toast fades after a few seconds, and the line would otherwise keep
    older words."""
    def decorate(handler):
        @functools.wraps(handler)
        def refusing(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except gr.Error as error:
                yield update(failed_text(error.message))
                raise
        return refusing
    return decorate


class Studio:
    def __init__(self, config: StudioConfig):
        self.config = config
        self.engines = EngineCache(config.output_dir, config.group)
        if config.group is not None:  # a process of the group stopped answering: this process keeps serving
            config.group.on_timeout(self.group_broke)
        self.engine_thread = EngineThread(between_runs=self.prepare_next)
        self.first_frames_dir = config.output_dir / "inputs"
        self.previews_dir = Path(tempfile.mkdtemp(prefix="wan-studio-previews-"))
        self.runs_started = 0  # numbers the runs' preview files
        self.prompt_writer = None  # Improve prompt's, opened on first use (on the engine's thread)
        history.remove_partials(config.output_dir)  # what runs killed while saving left behind
        history.make_missing_stills(config.output_dir)  # now, before any engine work (see history.py)
        # The warm-up is the engine thread's first job: a Generate clicked meanwhile waits behind it, and finds the
        # model loaded and its kernels compiled instead of starting a load of its own.
        self.warm_up_run = self.engine_thread.start(WARM_UP_SESSION, self.warm_up, None) if config.warmup else None

    # -- the API ---------------------------------------------------------------------------------------------------
    @refusals_said(progress_update)
    def text_to_video(
        self, prompt, negative_prompt, width, height, frames, steps, guidance, shift, seed, fps, loras, extend=None,
        overlap_frames=1, continuations=(), sampler=None, cache=None, decoder=None, options=None,
        request: gr.Request = None,
    ):  # defaults from `extend` on: an API client may leave the video to continue out (None, as Gradio reads it)
        """Text to video; with `extend` (a video file), a continuation of it; with `continuations` (a list of
        prompts), one more segment per prompt, each continuing the video so far from its last `overlap_frames`. Streams progress updates; ends with the video, the seed used and the settings.
        `loras`: a list of "name:strength" (ui/loras.py); `sampler`: unipc, euler or dmd; `cache`: none or magcache
        (the authors' TI2V-5B setting); `decoder`: full, or tiny (a draft, finished later by /finish)."""
        generation = self.generation_request(
            prompt, negative_prompt, width, height, frames, steps, guidance, shift, seed, fps, loras, sampler, cache,
            decoder, options,
        )
        generation.extend = str(extend) if extend else None
        generation.overlap_frames = whole("overlap frames", overlap_frames)
        if not isinstance(continuations, list) or not all(isinstance(prompt, str) for prompt in continuations):
            raise gr.Error(f"continuations {continuations!r} are not allowed: give a list of prompts")
        generation.continuations = list(continuations)
        try:  # the story's checks, before a model is loaded
            validate(generation, self.config.size_rules)
        except WanError as error:
            raise gr.Error(str(error)) from None
        yield from self.run(lambda engine, token: engine.generate(generation, token), options,
                            request.session_hash or "")

    @refusals_said(progress_update)
    def image_to_video(
        self, image, prompt, negative_prompt, width, height, frames, steps, guidance, shift, seed, fps, loras, sampler,
        cache, decoder, options, request: gr.Request,
    ):
        """Image to video: the video starts from `image`. Width and height 0 take the size from the image's aspect
        at the model's default area; explicit ones are honoured and the image is centre-cropped to their aspect.
        Streams progress updates; ends with the video, the seed used and the settings (with the size used)."""
        picture = open_picture(image)
        width, height = self.image_size(picture, width, height)
        generation = self.generation_request(
            prompt, negative_prompt, width, height, frames, steps, guidance, shift, seed, fps, loras, sampler, cache,
            decoder, options,
        )
        generation.image = str(self.save_first_frame(crop_to_aspect(picture, width, height)))
        yield from self.run(lambda engine, token: engine.generate(generation, token), options,
                            request.session_hash or "")

    @refusals_said(progress_update)
    def finish(self, video, options, request: gr.Request):
        """Finish a draft (a video made with the decoder "tiny"): its kept latents decoded in full quality, no
        denoising repeated; the finished video joins the history beside its draft. `video`: the draft's file name
        in the output folder (or its path there). Streams progress; ends with the video, the seed and the settings."""
        draft = self.output_video(video)
        try:
            read_draft_record(draft)  # not a draft, or its latents gone: said before the run queues
        except WanError as error:
            raise gr.Error(str(error)) from None
        yield from self.run(lambda engine, token: engine.finish(draft, cancel=token), options,
                            request.session_hash or "")

    def stop(self, request: gr.Request):
        """Stop this session's generation within one step; nothing of it is written. Streams "Stopping", then
        what was stopped."""
        left_line = left_line_text()
        runs = self.engine_thread.stop(request.session_hash or "", left_line, progress_update(left_line))
        if not runs:
            gr.Info("Nothing of yours is generating right now.")
            yield gr.skip()
            return
        yield waiting_text("Stopping")
        for run in runs:
            run.finished.wait(STOP_WAIT_S)
        if all(run.finished.is_set() for run in runs):
            yield runs[-1].outcome or stopped_text(runs[-1].last_event)
        else:
            yield waiting_text("Stopping: the current stage is finishing")

    # -- checking and preparing a request ---------------------------------------------------------------------------
    def generation_request(
        self, prompt, negative_prompt, width, height, frames, steps, guidance, shift, seed, fps, loras, sampler, cache,
        decoder, options,
    ) -> GenerationRequest:
        """The engine request for these form values; gr.Error (saying what is allowed) when one is wrong."""
        if seed is None or seed == -1:
            seed = None  # the engine picks one and reports it
        elif not 0 <= seed <= MAX_SEED:
            raise gr.Error(f"seed {seed} is not allowed: use -1 for a random seed, or 0 to {MAX_SEED}")
        generation = GenerationRequest(
            prompt=prompt or "", negative_prompt=negative_prompt, width=whole("width", width),
            height=whole("height", height), frames=whole("frames", frames), steps=whole("steps", steps),
            guidance=number("guidance", guidance), shift=shift, sampler=sampler, seed=seed,
            fps=whole("fps", fps), preview=options["preview"], loras=engine_loras(loras, self.config.output_dir),
            decoder=decoder or "full", **cache_settings(cache),
        )
        try:  # the engine's own checks, before a model is loaded; it checks again with the model's constraints
            validate(generation, self.config.size_rules)
        except WanError as error:
            raise gr.Error(str(error)) from None
        return generation

    def image_size(self, picture: Image.Image, width, height) -> tuple[int, int]:
        if width and height:
            return whole("width", width), whole("height", height)
        if width or height:
            raise gr.Error("give both width and height, or leave both at 0 to take the size from the image")
        default_width, default_height = self.config.sizes[0]
        return size_for_aspect(picture.width / picture.height, default_width * default_height, self.config.size_rules)

    def save_first_frame(self, picture: Image.Image):
        """Keep the (cropped) first frame beside the videos, so the history can put it back. Named by its content,
        so a picture used for many runs is stored once."""
        png = io.BytesIO()
        picture.save(png, format="PNG")
        path = self.first_frames_dir / f"{hashlib.sha256(png.getvalue()).hexdigest()[:16]}.png"
        if not path.exists():
            self.first_frames_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png.getvalue())
        return path

    # -- running ---------------------------------------------------------------------------------------------------
    @refusals_said(writing_update)
    def improve_prompt(self, prompt, image=None, language="en", seed=-1, options=None, request: gr.Request = None):
        """Improve prompt: `prompt` rewritten by the prompt writer (Wan's prompt extension: a small instruct model
        and Wan's system prompt) for editing before Generate; with `image` (image to video) the writer looks at the
        picture. `language`: en or zh; `seed` -1: greedy, else sampled with it. Streams (prompt, status): the
        status while the writer's model loads, then the written prompt."""
        if message := extras_missing(image=bool(image)):
            raise gr.Error(message)
        if not prompt or not prompt.strip():
            raise gr.Error("the prompt is empty: write a few words for the writer to build on")
        yield writing_update(waiting_text("Starting"))
        run = self.engine_thread.start(
            request.session_hash if request else "", lambda run: self.write_prompt(prompt, image, language, seed, options),
            lambda ahead: writing_update(waiting_text(f"Waiting for {ahead} run{'s' * (ahead > 1)} ahead of yours")))
        yield from run.stream()

    def write_prompt(self, prompt, image, language, seed, options):
        """On the engine's thread (MLX): the writer is kept between prompts, and released after each under the
        low-RAM preset, before the video model needs the memory."""
        yield writing_update(waiting_text("Writing: loading the prompt writer's model (downloaded once)"))
        writer = self.prompt_writer = self.prompt_writer or PromptWriter(self.config.prompt_model,
                                                                         self.config.prompt_model)
        try:
            written = writer.write(prompt, image or None, language, None if seed in (None, -1) else int(seed))
        except WanError as error:
            raise gr.Error(str(error)) from None
        finally:
            if (options or {}).get("preset", self.config.preset) == "low-ram":
                writer.release()
        yield written, "**Written**: edit it if you like, then Generate."

    def output_video(self, video) -> Path:
        """A video of the output folder, by name or by its path there; gr.Error for anything else."""
        name = Path(str(video or "")).name
        path = self.config.output_dir / name
        if not name.endswith(".mp4") or not path.is_file():
            raise gr.Error(f"the video {video!r} is not in the output folder: give the file name of one of its videos")
        return path

    def run(self, work, options: dict, session: str):
        """Queue `work(engine, cancel_token)`, the engine's events of one run, on the engine's thread and stream its
        updates (see runs.py: it outlives the page)."""
        group = self.config.group
        if group is not None and group.broken:  # its engine's thread may be stuck in a collective for good
            raise gr.Error(group.broken_message())
        yield progress_update(waiting_text("Starting"))
        def waiting(ahead: int) -> tuple:
            if self.warm_up_run is not None and not self.warm_up_run.finished.is_set():
                others = f" and {ahead - 1} other run{'s' * (ahead > 2)}" if ahead > 1 else ""
                return progress_update(waiting_text(f"Getting the model ready: your run starts right after{others}"))
            if ahead == 0:  # the engine is getting ready for the next video (Engine.prepare_next)
                return progress_update(waiting_text("Getting the model ready for your run"))
            return progress_update(waiting_text(f"Waiting for {ahead} run{'s' * (ahead > 1)} ahead of yours "
                                                "(Stop leaves the line)"))

        run = self.engine_thread.start(session, lambda run: self.generate(work, options, run), waiting)
        yield from run.stream()

    def warm_up(self, run: Run):
        """The warm-up, on the engine's thread: open the engine of the app's model and preset and run
        wan_engine.warm_up, keeping its latest event in `run.last_event` for `readiness`. A failure is said on the
        page and in the log; the first Generate then tries again and says what is wrong."""
        start = time.perf_counter()
        try:
            engine = self.engines.get(self.config.model, self.config.preset,
                                      report=lambda line: setattr(run, "last_event", ProgressEvent(Stage.LOAD, line)))
            for event in warm_up(engine):
                run.last_event = event
                yield event
            run.outcome = ready_text(time.perf_counter() - start)
        except Exception as error:  # the app keeps serving: a run shows the error again with its own message
            log.exception("getting the model ready failed")
            run.outcome = failed_text(f"getting the model ready: {error}. Generate tries again.")

    def prepare_next(self) -> None:
        """Between runs, on the engine's thread: the open engine gets ready for the next video (the low-RAM preset
        loads its transformer again, Engine.prepare_next); a run asked for meanwhile starts right after."""
        if self.engines.engine is not None:
            for event in self.engines.engine.prepare_next():
                log.info("between runs: %s", event.message)

    def readiness(self):
        """The page's progress line from the moment it opens: the warm-up's progress while it runs, then how it
        ended (streamed, so a page opened during the warm-up shows when the model is ready)."""
        run = self.warm_up_run
        while run is not None and not run.finished.wait(READINESS_POLL_S):
            yield warming_text(run.last_event)
        yield run.outcome if run is not None and run.outcome else READY_TEXT

    def generate(self, work, options: dict, run: Run):
        """The run itself, on the engine's thread: open the engine if needed, then `work` it, as output tuples."""
        # Each new latent preview goes out as a PNG of its own, sent again unchanged with the following updates:
        # Gradio copies a file into its cache once, while an image array would be rewritten there on every update,
        # under a client that may still be downloading it.
        # Runs' previews are kept a little while: a client may still be fetching a finished run's last one when the
        # next run starts.
        self.runs_started += 1
        for stale in self.previews_dir.glob("*.png"):
            if int(stale.name.split("-")[0]) < self.runs_started - KEPT_PREVIEW_RUNS:
                stale.unlink()
        preview = None
        try:
            engine = self.engines.get(self.config.model, options["preset"],
                                      report=lambda line: run.send(progress_update(waiting_text(line))))
            for number, item in enumerate(work(engine, run.token)):
                if isinstance(item, Result):
                    history.make_still(item.video_path)
                    run.outcome = finished_text(item)
                    yield str(item.video_path), item.seed, shown_settings(item), run.outcome, preview
                else:
                    run.last_event = item
                    if item.preview is not None:
                        preview = str(self.previews_dir / f"{self.runs_started}-{number}.png")
                        Image.fromarray(item.preview).save(preview)
                    yield progress_update(event_text(item), preview)
        except Cancelled:
            run.outcome = stopped_text(run.last_event)
            yield progress_update(run.outcome, preview)
        except WanError as error:
            run.outcome = failed_text(str(error))
            yield progress_update(run.outcome, preview)
            raise gr.Error(str(error)) from None
        except Exception as error:  # a bug: said on the page and logged in full; the app keeps serving
            log.exception("the run failed")
            message = f"{type(error).__name__}: {error} (the app's log has the details)"
            run.outcome = failed_text(message)
            yield progress_update(run.outcome, preview)
            raise gr.Error(message) from None

    def group_broke(self, message: str) -> None:
        """From the group's watchdog: the engine's thread waits for a process that stopped answering, for good."""
        log.error(message)
        self.engine_thread.abandon(progress_update(failed_text(message)), gr.Error(message))

    # -- the page's helpers (not part of the API) -----------------------------------------------------------------
    def history(self):
        runs = history.load_history(self.config.output_dir)
        return history.gallery_items(runs), runs


def shown_settings(result: Result) -> dict:
    """The settings a finished run shows (and the API returns): the request's, its step cache's record, and for a
    draft or a finished one its decoder and where it was finished from."""
    record = result.record
    shown = {**result.settings, "decoder": record.decoder}
    extra = {"cache": record.cache, "finished_from": record.finished_from}
    return {**shown, **{key: value for key, value in extra.items() if value is not None}}


def cache_settings(cache) -> dict:
    """A request's step cache from the page's choice: none, or MagCache at its authors' TI2V-5B setting."""
    if cache in (None, "none"):
        return {}
    return {"cache": cache, "cache_threshold": MAGCACHE_SETTING["threshold"],
            "cache_max_skip": MAGCACHE_SETTING["max_skip"], "cache_retention": MAGCACHE_SETTING["retention"]}


def whole(name: str, value) -> int:
    if value is None:
        raise gr.Error(f"{name} is missing: give a whole number")
    if value != int(value):
        raise gr.Error(f"{name} {value} is not allowed: it must be a whole number")
    return int(value)


def number(name: str, value) -> float:
    if value is None:
        raise gr.Error(f"{name} is missing: give a number")
    return float(value)


def random_seed() -> int:
    return secrets.randbelow(2**32)
