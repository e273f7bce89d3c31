"""The engine: one object per (model, dtype, preset) that loads its parts lazily and runs generations.

`Engine.generate(request)` is a generator of `ProgressEvent`s ending with a `Result`, so a CLI progress bar and a
web UI can both stream every stage (loading, text encoding, image encoding, each denoising step, decoding, saving).
A `CancelToken` stops a run within one step; a cancelled run frees its arrays and writes nothing. The memory
preset decides what is quantized, what stays loaded beside what (parts.py), and how the VAE decodes.

A run walks its stages in order (`_stages`): the text, the first frame, the hand-over to a group's other processes,
denoising, decoding and saving. In a group every process walks the same stages: rank 0 from the start, the others
(`follow`) from the hand-over on, with the text embeddings, the noise and the first frame that rank 0 handed them.
"""

import dataclasses
import gc
import secrets
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import Cancelled, WanError
from .model_files.cache_files import cache_root
from .model_files.converted import ConvertedWeights
from .model_files.demo import DEMO_NOTICE
from .model_files.hub import resolve_model
from .model_files.kernel_cache import keep_compiled_kernels
from .model_files.loading import Snapshot
from .model_files.prompt_cache import PromptEmbeddingCache, encoder_identity
from .models.text_encoder import count_tokens, encode_prompts, prompt_clean
from .parallel.group import ParallelGroup
from .parallel.share import Layout, RankShare
from .parts import LoadedParts
from .outputs.drafts import draft_latents_entry, read_draft
from .pipeline import (
    DEFAULT_NEGATIVE_PROMPT, LatentNormalizer, decode_draft, decode_frames, encode_image, from_diffusers_layout, generate_latents, initial_noise, latent_shape, load_image, step_noise_key,
)
from .presets import apply_memory_limits, load_preset
from .outputs.preview import calibrate, latent_preview, tiny_preview
from .record import RunRecord, Stage, gib, process_peak_rss_gib
from .request import (
    CancelToken, GenerationRequest, ProgressEvent, Result, is_ti2v_5b, model_sampler, size_rules, validate,
)
from .run import Run, StepTimer, decode_message, drain
from .sampling.samplers import make_sampler, sampler_defaults
from .version import __version__
from .images import SourceVideo
from .outputs.video import X264_DRAFT_PRESET, X264_PRESET, prepare_folder, remove_stale_partials
from .outputs.writer import VideoWriter

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
TEXT_LENGTH = 512  # Wan's text length: prompts are padded (with zeros past their end) to 512 tokens
# What rank 0 hands the others of a request (with the seed it drew and the LoRAs)
HANDED_OVER = ("width", "height", "frames", "steps", "guidance", "shift", "sampler", "cache", "cache_threshold",
               "cache_max_skip", "cache_retention", "cache_ratios", "decoder")


def default_dtype() -> str:
    """bfloat16 on a GPU; float32 on the CPU, where MLX's bfloat16 kernels are slow."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


class Engine:
    """Create and use an engine on one thread: MLX streams belong to the thread that made them (MLX >= 0.31.2)."""

    def __init__(self, model, dtype: str | None = None, preset: str = "normal", output_dir="outputs",
                 download_progress=None, prompt_cache: PromptEmbeddingCache | None = None,
                 group: ParallelGroup | None = None, tiny_decoder: str | None = None):
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
        self.group = group  # the group whose runs this engine (on rank 0) shares, or None
        self.output_dir = Path(output_dir)
        self.transformer_config = self.snapshot.transformer_config
        self.vae_config = self.snapshot.vae_config
        self.scheduler_config = self.snapshot.scheduler_config
        self.size_rules = size_rules(self.snapshot)
        self.normalizer = LatentNormalizer(self.vae_config)
        self.prompt_cache = prompt_cache or PromptEmbeddingCache(cache_root() / "prompt-embeddings")
        self.text_identity = encoder_identity(self.root, dtype, self.preset.text_encoder_quantization)
        self.converted = ConvertedWeights(self.snapshot, cache_root() / "converted")  # converted once, kept on disk
        self.parts = LoadedParts(self.snapshot, self.dtype, self.preset, self.converted, cache_root() / "tokenizers",
                                 download_progress, tiny_decoder)
        self.preview_map = None  # latent -> RGB map, calibrated on the first run that asks for previews
        apply_memory_limits(self.preset)

    @property
    def notice(self) -> str | None:
        """What the user must know about this model (the demo model's videos are noise-like)."""
        return DEMO_NOTICE if self.is_demo else None

    def defaults(self, sampler: str | None = None) -> dict:
        """The recommended {sampler, steps, guidance, shift} of this model (of `sampler` on it, when given), which
        a request's unset settings take (see `model_sampler`)."""
        return sampler_defaults(sampler or model_sampler(self.snapshot), self.scheduler_config)

    def with_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its unset sampler, steps, guidance and shift taken from `defaults`."""
        unset = {name: value for name, value in self.defaults(request.sampler).items()
                 if getattr(request, name) is None}
        return dataclasses.replace(request, **unset)

    @property
    def has_published_cache_ratios(self) -> bool:
        """MagCache's published TI2V-5B ratios apply to TI2V-5B's architecture (and the demo model's, a tiny one)."""
        return self.is_demo or is_ti2v_5b(self.transformer_config)

    def vae_tile(self, width: int, height: int) -> dict | None:
        """The preset's VAE tiles for a video of this size, or None (untiled)."""
        tile = self.preset.vae_tile
        return tile if tile is not None and width * height >= tile.get("min_pixels", 0) else None

    def release(self) -> None:
        """Drop every loaded part and return its memory to the system."""
        self.parts.release()

    def prepare_next(self):
        """Between videos, while nobody waits (the app calls it when no run is waiting): a preset that loads the
        transformer between videos loads it now, in place of the VAE, so that the next video does not wait for it
        (the text encoder then streams beside it, and a cached prompt loads only the VAE). Yields the loading's
        progress events."""
        if self.parts.policy.load_transformer_between_videos and self.group is None and "transformer" not in self.parts:
            yield from self.parts.load("transformer")

    # -- a run -----------------------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None, use_prompt_cache: bool = True):
        """Run one generation: yields ProgressEvents, then the Result. Raises WanError on bad input and
        errors.Cancelled when `cancel` was set (its memory freed, nothing written). `use_prompt_cache` False: the
        prompts are encoded by the text encoder and their embeddings not kept (the warm-up)."""
        run = None
        try:
            run = yield from self._start(request, use_prompt_cache)
            for segment in range(len(run.prompts)):
                run.begin_segment(segment, latent_shape(self.vae_config, self.transformer_config, request.width,
                                                        request.height, request.frames))
                yield from self._stages(run, cancel)
            yield from self._save(run)
            yield run.result
        except BaseException as error:
            if run is not None and run.writer is not None:
                run.writer.abort()
            if self.group is not None and (replacement := self.group.leave(error)) is not None:
                raise replacement from error
            if isinstance(error, Cancelled):
                gc.collect()
                mx.clear_cache()
            raise

    def calibrate_cache(self, request: GenerationRequest, cancel: CancelToken | None = None):
        """Measure MagCache's ratios for this model and request as diffusers' `calibrate=True` does: every step runs
        the blocks, and each step's ratio of the prompt branch's residual to the step before's is kept. Yields
        progress events; returns the ratios, one per step (no video is written)."""
        if self.group is not None:
            raise WanError("calibrating a step cache runs in one process: start it without mlx.launch")
        run = yield from self._start(dataclasses.replace(request, cache=None), True, writes_video=False)
        run.calibration = []
        yield from self._stages(run, cancel)
        return run.calibration

    def finish(self, draft, output: str | None = None, cancel: CancelToken | None = None, keep_frames: bool = False):
        """A draft (a video made with the tiny decoder) in full quality: its kept latents decoded by the full VAE,
        no denoising repeated; the video and its sidecar (`finished_from` naming the draft) written beside the
        draft as `<draft>-full.mp4` unless `output` says where. Yields progress events, then the Result."""
        record, latents = read_draft(draft)
        settings = record.settings
        if settings.model != self.model:
            raise WanError(f"the draft was made with the model {settings.model}, not this one ({self.model}): "
                           "finish it with that model")
        draft = Path(draft)
        request = GenerationRequest(
            prompt=settings.prompt, width=settings.width, height=settings.height, frames=settings.frames,
            steps=settings.steps, guidance=settings.guidance, shift=settings.shift, sampler=settings.sampler,
            seed=record.seed, fps=settings.fps, keep_frames=keep_frames)
        video_path = Path(output) if output else draft.with_name(f"{draft.stem}-full.mp4")
        prepare_folder(video_path, request.width, request.height, request.frames)
        run = Run(request, record.seed, settings.negative_prompt, [], None, video_path=video_path,
                  settings=settings, prompt_tokens=record.prompt_tokens, cache_record=record.cache,
                  latents=mx.array(latents), finished_from=draft.name)
        self._open_writer(run)
        try:
            yield from self._decode(run, cancel)
            yield from self._save(run)
        except BaseException:
            run.writer.abort()
            raise
        yield run.result

    def follow(self, group: ParallelGroup, header: dict, arrays: dict) -> None:
        """A group's other process: rank 0's run from its hand-over on (`_hand_over`), the same stages."""
        fields = header["request"]
        request = GenerationRequest(prompt="", seed=fields["seed"], **{name: fields[name] for name in HANDED_OVER})
        loras = drain(self.parts.read_loras(fields["loras"]))  # each process fuses them (the same files there)
        condition = arrays.get("condition")
        run = Run(request, request.seed, "", loras, mx.array(arrays["noise"]), handed_over=True,
                  context=mx.array(arrays["context"]).astype(self.dtype),
                  condition=None if condition is None else mx.array(condition))
        run.share = group.run = self._rank_share(run, group, Layout(**header["layout"]))
        drain(self._stages(run, None))

    def _stages(self, run: Run, cancel: CancelToken | None):
        """The stages of a run, in order, on every process of a group alike."""
        if not run.handed_over:  # rank 0 (or alone): the text and the first frame, then the others take part
            yield from self._encode_text(run, cancel)
            yield from self._encode_image(run, cancel)
            self._hand_over(run)
        yield from self._denoise(run, cancel)
        if run.calibration is None:  # a calibration's run ends with its ratios
            yield from self._decode(run, cancel)

    def _start(self, request: GenerationRequest, use_prompt_cache: bool, writes_video: bool = True):
        """The run of `request`: the model's defaults, every check that needs no part, the seed and its noise, the
        first frame's pixels, the output's name (its folder checked for room) and the LoRAs read."""
        request = self.with_defaults(request)
        validate(request, self.size_rules)
        if request.cache is not None and request.cache_ratios is None and not self.has_published_cache_ratios:
            raise WanError("this model has no built-in MagCache ratios (they are TI2V-5B's): measure them with "
                           "`python -m wan_engine calibrate-cache` and give them with --cache-ratios FILE.json")
        if self.group is not None:
            self.group.check_usable()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        request = dataclasses.replace(request, seed=seed)
        shape = latent_shape(self.vae_config, self.transformer_config, request.width, request.height, request.frames)
        noise = from_diffusers_layout(request.latents, shape) if request.latents is not None else initial_noise(seed, shape)
        image = None if request.image is None else load_image(request.image, request.width, request.height)
        source = None if request.extend is None else SourceVideo(request.extend)
        if source is not None and source.frame_count < request.overlap_frames:
            raise WanError(f"the video {request.extend} has {source.frame_count} frames, fewer than the "
                           f"{request.overlap_frames} overlap frames that condition its continuation")
        request = dataclasses.replace(request, fps=request.fps or (round(source.fps) if source else 24))
        prompts = [request.prompt, *request.continuations]
        video_path = self.output_path(request, seed) if writes_video else None
        if video_path is not None:  # before any work: a folder with room for the whole video
            new_frames = len(prompts) * request.frames - (len(prompts) - (source is None)) * request.overlap_frames
            prepare_folder(video_path, request.width, request.height, new_frames + (source.frame_count if source else 0))
            remove_stale_partials(video_path.parent)
        loras = yield from self.parts.read_loras(request.loras)
        negative = DEFAULT_NEGATIVE_PROMPT if request.negative_prompt is None else request.negative_prompt
        run = Run(request, seed, negative, loras, noise, image, video_path, use_prompt_cache, prompts=prompts,
                  source=source, base_request=request)
        if video_path is not None:
            self._open_writer(run)
            if source is not None:
                yield ProgressEvent(Stage.LOAD, f"reading the video to continue ({source.frame_count} frames)")
                run.writer.add_source(source)
        return run

    def _open_writer(self, run: Run) -> None:
        """The MP4 (rank 0's), tagged with the settings: ffmpeg encodes each decoded chunk while the next one
        decodes; the video and its sidecar land together at the end, or nothing does."""
        request = run.request
        run.settings = run.settings or run.make_settings(self.model, self.dtype_name, self.preset.name)
        run.writer = VideoWriter(run.video_path, request.width, request.height, request.fps,
                                 {"title": request.prompt, "comment": dataclasses.asdict(run.settings)},
                                 request.overlap_frames, request.keep_frames,
                                 X264_DRAFT_PRESET if request.decoder == "tiny" else X264_PRESET)

    def _end_stage(self, cancel: CancelToken | None) -> None:
        """Between stages: return the memory the stage left behind (its arrays are freed as they are dropped), and
        stop here if the run was cancelled."""
        if self.parts.policy.clear_cache_between_stages:
            mx.clear_cache()
        if cancel is not None and cancel.cancelled:
            raise Cancelled()

    # -- the stages ------------------------------------------------------------------------------------------------
    def _encode_text(self, run: Run, cancel: CancelToken | None):
        """The text embeddings (1 or 2, 512, D) in the compute dtype: the prompt's and, with guidance, the negative
        prompt's. Each prompt is encoded on its own, so a cached and a fresh embedding are the same numbers."""
        use_guidance = run.request.guidance > 1.0
        prompts = [run.request.prompt, run.negative_prompt] if use_guidance else [run.request.prompt]
        yield ProgressEvent(Stage.TEXT, "encoding the prompt" + (" and the negative prompt" if use_guidance else ""))
        run.clock.start()
        timings = run.clock.timings
        loaded_before = timings.get("load_s", 0.0)
        embeddings = []
        for prompt in prompts:
            embeddings.append((yield from self._prompt_embedding(prompt, run)))
        if self.parts.policy.release_text_encoder_after_use:
            self.parts.release("text_encoder")
        run.context = mx.array(np.stack([rows for rows, _ in embeddings])).astype(self.dtype)
        mx.eval(run.context)
        run.clock.lap(Stage.TEXT)
        loaded = timings.get("load_s", 0.0) - loaded_before  # loading is counted apart
        timings["text_s"] = round(timings["text_s"] - loaded, 4)
        tokens = [count for _, count in embeddings]
        run.prompt_tokens = {"used": min(tokens[0], TEXT_LENGTH), "total": tokens[0], "limit": TEXT_LENGTH}
        for name, count in zip(("prompt", "negative prompt"), tokens):
            if count > TEXT_LENGTH:
                yield ProgressEvent(Stage.TEXT, f"the {name} has {count} tokens and the model reads {TEXT_LENGTH}: "
                                                f"everything after the first {TEXT_LENGTH} is left out")
        self._end_stage(cancel)

    def _prompt_embedding(self, prompt: str, run: Run):
        """(embedding (512, D) float32 numpy, token count before the model's cut): the cache first, UMT5 on a miss."""
        key = self.prompt_cache.key(self.text_identity, prompt_clean(prompt), TEXT_LENGTH)
        cached = self.prompt_cache.get(key, TEXT_LENGTH) if run.use_prompt_cache else None
        if cached is None:
            tokenizer = yield from self.parts.load("tokenizer", run.clock)
            encoder = yield from self.parts.load("text_encoder", run.clock)
            embedding = encode_prompts(encoder, tokenizer, [prompt], TEXT_LENGTH)
            run.clock.loading(self.parts.streamed_read_s())
            cached = np.array(embedding[0].astype(mx.float32)), count_tokens(tokenizer, prompt)
            if run.use_prompt_cache:
                self.prompt_cache.put(key, *cached)
        return cached

    def _encode_image(self, run: Run, cancel: CancelToken | None):
        """Image to video: the first frame's latent. And the linear preview's colours, calibrated once with the VAE
        (when the tiny decoder, which previews better, is not on this machine)."""
        run.tiny_previews = run.request.preview and self.parts.tiny_decoder_on_disk()
        calibrating = run.request.preview and not run.tiny_previews and self.preview_map is None
        if run.image is not None or calibrating:
            vae = yield from self.parts.load("vae", run.clock)
            if run.image is not None:
                yield ProgressEvent(Stage.IMAGE, "encoding the first frame")
                run.clock.start()
                run.condition = encode_image(vae, self.normalizer, run.image)
                mx.eval(run.condition)
                run.clock.lap(Stage.IMAGE)
            if calibrating:
                self.preview_map = calibrate(vae, self.normalizer, self.vae_config.scale_factor_spatial)
        self._end_stage(cancel)

    def _hand_over(self, run: Run) -> None:
        """In a group, the others take the run from here (`follow`), each with its share of the work."""
        if self.group is None:
            return
        request = run.request
        run.share = self._rank_share(run, self.group, Layout.choose(self.group.size, run.context.shape[0] == 2))
        header = {
            "model": self.model, "preset": self.preset_source, "dtype": self.dtype_name,
            "layout": run.share.layout.as_dict(),
            "request": {**{name: getattr(request, name) for name in HANDED_OVER}, "seed": request.seed,
                        "loras": [list(pair) for pair in request.loras]},
        }
        arrays = {"context": np.array(run.context.astype(mx.float32)), "noise": np.array(run.noise)}
        if run.condition is not None:
            arrays["condition"] = np.array(run.condition)
        self.group.hand_off(header, arrays, run.share)

    def _rank_share(self, run: Run, group: ParallelGroup, layout: Layout) -> RankShare:
        request = run.request
        latent_grid = tuple(run.noise.shape[1:4])
        rank_0_alone = self.vae_tile(request.width, request.height) is not None or request.decoder == "tiny"
        strips = None if rank_0_alone else RankShare.strips(latent_grid[2], self.preset.vae_strip_width, group.size)
        return RankShare(group, layout, latent_grid, self.transformer_config, request.steps, request.guidance, strips,
                         self.vae_config.scale_factor_spatial, self.dtype.size)

    def _denoise(self, run: Run, cancel: CancelToken | None):
        request, timings = run.request, run.clock.timings
        transformer = yield from self.parts.load("transformer", run.clock)
        yield from self.parts.fuse_loras(run.loras, run.clock)
        transformer.shard(run.share.tokens)
        sampler = make_sampler(request.sampler, request.steps, request.shift, self.scheduler_config,
                               step_noise_key(request.seed))
        cache = run.step_cache()
        plan = None if cache is None else cache.plan(request.steps)
        tiny = (yield from self.parts.load("tiny_decoder", run.clock)) if run.tiny_previews else None
        denoising = generate_latents(transformer, sampler, run.noise, run.context, request.guidance, run.condition,
                                     cancel, self.preset.cfg_batch, run.share, plan, run.calibration)
        run.clock.start()
        timer = StepTimer(plan or [True] * request.steps)
        for i, latents in enumerate(denoising, start=1):
            elapsed, per_step, left = timer.step_done(i)
            if i == 1 and run.segment == 0:  # the first step compiles what the run's shapes need: measured apart
                timings["denoise_first_step_s"] = round(elapsed, 4)
            preview = None
            if request.preview:
                preview = tiny_preview(tiny, latents) if tiny else latent_preview(latents, self.preview_map)
            skipped = " · blocks skipped (MagCache)" if plan is not None and not plan[i - 1] else ""
            yield ProgressEvent(Stage.DENOISE, f"{run.segment_label()}step {i}/{request.steps}{skipped}", i,
                                request.steps, elapsed, per_step, left, gib(mx.get_active_memory()), preview)
        run.clock.lap(Stage.DENOISE)
        timings["denoise_s_per_step"] = round(timings["denoise_s"] / (request.steps * (run.segment + 1)), 4)
        run.cache_record = None if cache is None else cache.record(plan)
        run.latents, run.noise, run.context, run.condition = latents, None, None, None
        del denoising, latents
        self._end_stage(cancel)

    def _decode(self, run: Run, cancel: CancelToken | None):
        """Decode the latents and, on rank 0, write the video: ffmpeg encodes each decoded chunk while the next one
        decodes; the video and its sidecar land together at the end, or nothing does (a cancelled or failed run
        leaves no file)."""
        if not run.share.decodes:
            return
        request, preset = run.request, self.preset
        tile = self.vae_tile(request.width, request.height)
        if request.decoder == "tiny":  # a draft: on rank 0 alone (the others have no share of it)
            tiny = yield from self.parts.load("tiny_decoder", run.clock)
            run.clock.start()
            decoding, tile = decode_draft(tiny, run.latents, cancel), None
        else:
            vae = yield from self.parts.load("vae", run.clock)
            run.clock.start()
            decoding = decode_frames(vae, self.normalizer, run.latents, cancel, tile, preset.vae_frame_by_frame,
                                     preset.vae_strip_width, run.share, self.parts.policy.decode_queued_ahead)
        for done, total, frames in decoding:
            if frames is not None:  # on rank 0
                run.writer.add(frames)
            yield ProgressEvent(Stage.DECODE, run.segment_label() + decode_message(
                done, total, tile is not None, run.latents.shape[1]) + (" (tiny decoder)" if request.decoder == "tiny"
                                                                       else ""),
                done, total, memory_gib=gib(mx.get_active_memory()))
        if run.writer is not None:  # rank 0
            run.writer.flush()
        run.clock.lap(Stage.DECODE)
        self._end_stage(cancel)

    def _save(self, run: Run):
        yield ProgressEvent(Stage.SAVE, "writing the video")
        clock, output = run.clock, run.writer.output
        clock.start()
        output.close()
        clock.lap(Stage.SAVE)
        clock.total()
        record = RunRecord(
            seed=run.seed, settings=run.settings, timings=clock.timings, peak_memory_gib=clock.peak_memory_gib,
            stage_peak_memory_gib=clock.stage_peaks, process_peak_rss_gib=process_peak_rss_gib(),
            stage_process_peak_rss_gib=clock.stage_rss, prompt_tokens=run.prompt_tokens, engine_version=__version__,
            video=run.video_path.name, created=datetime.now().isoformat(timespec="seconds"), notice=self.notice,
            parallel=run.share.record(), cache=run.cache_record, decoder=run.request.decoder,
            finished_from=run.finished_from, source=run.source.record() if run.source else None,
            segments=run.segments or None, prompt_writer=run.request.prompt_writer, text_encoder={
                "kept_between_videos": not self.parts.policy.release_text_encoder_after_use,
                "why": self.parts.policy.text_encoder_decision},
        )
        draft = run.request.decoder == "tiny"
        latents = draft_latents_entry(np.array(run.latents), run.video_path) if draft else None
        run.latents = None
        video_path, sidecar = output.land(record.to_dict(), latents)
        run.result = Result(video_path, sidecar, record, run.writer.frames())

    def output_path(self, request: GenerationRequest, seed: int) -> Path:
        if request.output:
            return Path(request.output)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]  # milliseconds: runs finishing together differ
        path = self.output_dir / f"wan-{stamp}-{seed}.mp4"
        counter = 1
        while path.exists():
            path, counter = self.output_dir / f"wan-{stamp}-{seed}-{counter}.mp4", counter + 1
        return path
