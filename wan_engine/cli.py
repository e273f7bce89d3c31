"""Command line: `python -m wan_engine generate ...`, alone or in a group: `mlx.launch -n 2 -- python -m wan_engine
generate ...` shares the video among the processes, and rank 0 writes it (wan_engine.parallel).

Errors a user can fix (bad sizes, missing files, ...) end with one line on stderr and exit code 1, never a
traceback.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import (
    DEFAULT_MODEL, Cancelled, Engine, Follower, GenerationRequest, ProgressEvent, Result, Stage, WanError, convert,
    IMAGE_MODEL, TEXT_MODEL, PromptWriter, extras_missing, join_group, parse_lora, read_cache_ratios, read_draft_record,
    resolve_model, warm_up,
)


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a Hugging Face repo id (default {DEFAULT_MODEL}), a local snapshot or package folder, "
                        "or 'demo' (a tiny random model, offline)")


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """What a request is made of, for generate and calibrate-cache alike."""
    add_model_argument(p)
    p.add_argument("--prompt", required=True, action="append",
                   help="what happens; given again, one more segment per prompt, each continuing the video so far")
    p.add_argument("--negative-prompt", default=None,
                   help="what to avoid; default: Wan's official negative prompt ('' for none)")
    p.add_argument("--image", default=None, help="first frame for image-to-video")
    p.add_argument("--width", type=int, default=1280, help="multiple of 32 (default 1280)")
    p.add_argument("--height", type=int, default=704, help="multiple of 32 (default 704)")
    p.add_argument("--frames", type=int, default=121, help="4n+1 (default 121: 5 s at 24 fps)")
    # steps, guidance, shift, sampler: left unset, the model's recommended ones (Engine.defaults)
    p.add_argument("--steps", type=int, default=None,
                   help="default: 50, or 3 with the dmd sampler (FastVideo's 1000, 757, 522; other counts: evenly "
                        "spaced timesteps)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance; <= 1 turns it off; default: 5.0, off with the dmd sampler")
    p.add_argument("--shift", type=float, default=None,
                   help="flow shift; default: the scheduler config's, 8.0 (FastVideo's) with the dmd sampler")
    p.add_argument("--seed", type=int, default=None, help="random when absent (printed)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--latents", default=None, help="initial noise .npy (1 x C x F x H/16 x W/16, float32)")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_request_arguments(p)
    p.add_argument("--sampler", default=None,
                   help="unipc, euler or dmd (few-step distilled models); default: dmd for FastVideo's FastWan "
                        "checkpoints, else unipc")
    p.add_argument("--fps", type=int, default=None, help="default: the continued video's, else 24")
    p.add_argument("--extend", default=None, metavar="VIDEO",
                   help="continue this video (any file ffmpeg reads): the written video holds its frames, then new ones")
    p.add_argument("--overlap-frames", type=int, default=1, metavar="K",
                   help="the last K frames of the video so far condition each continuing segment: 1, 5, 9, ... "
                        "(default 1; more keeps motion going across the seam)")
    p.add_argument("--preset", default="normal", help="memory preset: normal, low-ram, or a .json path")
    p.add_argument("--output", default=None, help="the MP4 to write (default: outputs/wan-<time>-<seed>.mp4)")
    p.add_argument("--save-frames", default=None, help="also save the decoded frames as .npy (F x H x W x 3, [0, 1])")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_REPO_FILE[:STRENGTH]",
                   help="fuse a LoRA (.safetensors) into the transformer: a local file or a Hub file written "
                        "owner/repo/path/in/repo.safetensors, and its strength (default 1.0); repeatable")
    p.add_argument("--cache", default=None,
                   help="magcache: skip the transformer's blocks on steps whose residual is predictable (about 2x "
                        "faster with the authors' TI2V-5B setting: --cache-max-skip 2); default none")
    p.add_argument("--cache-threshold", type=float, default=0.06, help="MagCache's error threshold (default 0.06)")
    p.add_argument("--cache-max-skip", type=int, default=3, help="most steps skipped in a row (default 3)")
    p.add_argument("--cache-retention", type=float, default=0.2,
                   help="share of the first steps always computed (default 0.2)")
    p.add_argument("--cache-ratios", default=None, metavar="FILE.json",
                   help="MagCache's ratios as calibrate-cache writes them; default: the published TI2V-5B ones")
    p.add_argument("--improve-prompt", action="store_true",
                   help="have the prompt writer rewrite the (first) prompt first, as Wan's --use_prompt_extend does; "
                        "the sidecar keeps the original")
    add_prompt_writer_arguments(p)
    p.add_argument("--decoder", default="full",
                   help="full (default), or tiny: a draft decoded by the tiny decoder TAEW2.2 in a fraction of the "
                        "time, its latents kept beside it for `finish`")
    add_tiny_decoder_argument(p)


def add_prompt_writer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-model", default=None,
                   help=f"the prompt writer's model (default {TEXT_MODEL}; with --image {IMAGE_MODEL})")
    p.add_argument("--prompt-seed", type=int, default=None, help="sample the writing with this seed (default greedy)")
    p.add_argument("--prompt-language", default="en", help="the written prompt's language: en (default) or zh")


def write_prompt(args, prompt: str) -> str:
    """`prompt` rewritten by the prompt writer (then released: the video model needs the memory)."""
    if message := extras_missing(image=args.image is not None):
        raise WanError(message)
    writer = PromptWriter(model=args.prompt_model, image_model=args.prompt_model)
    print("writing the prompt ...", file=sys.stderr, flush=True)
    try:
        return writer.write(prompt, image=args.image, language=args.prompt_language, seed=args.prompt_seed)
    finally:
        writer.release()


def add_improve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="a few words")
    p.add_argument("--image", default=None, help="the first frame (image to video): the writer looks at it")
    add_prompt_writer_arguments(p)


def run_improve(args) -> int:
    print(write_prompt(args, args.prompt))
    return 0


def add_tiny_decoder_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny-decoder", default=None, metavar="FILE_OR_FOLDER",
                   help="TAEW2.2's taew2_2.safetensors (default: the model's own, the cache's, or downloaded once from "
                        "the madebyollin/taehv repository)")


def request_from(args, **more) -> GenerationRequest:
    """The request of generate's or calibrate-cache's arguments."""
    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents)
        except (OSError, ValueError) as e:
            raise WanError(f"could not read --latents {args.latents}: {e}") from None
    return GenerationRequest(
        prompt=args.prompt[0], negative_prompt=args.negative_prompt, image=args.image, width=args.width,
        height=args.height, frames=args.frames, steps=args.steps, guidance=args.guidance, shift=args.shift,
        seed=args.seed, latents=latents, **more)


class ProgressBar:
    """One self-rewriting line on stderr per stage."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.stage = None

    def update(self, event) -> None:
        if event.stage != self.stage and self.stage is not None:
            self.stream.write("\n")
        self.stage = event.stage
        line = f"[{event.stage}] {event.message}"
        if event.total:
            width = 30
            filled = int(width * event.step / event.total)
            line = f"[{event.stage}] |{'#' * filled}{'.' * (width - filled)}| {event.message}"
            if event.step_s is not None:
                line += f"  {event.step_s:.2f} s/step  ETA {event.eta_s:.0f} s"
            if event.memory_gib:
                line += f"  {event.memory_gib:.1f} GiB"
        self.stream.write("\r" + line.ljust(90))
        self.stream.flush()

    def download(self, done: int, total: int, description: str) -> None:
        self.update(ProgressEvent(Stage.DOWNLOAD, description, done, total))

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")


def run_generate(args) -> int:
    group = join_group()  # under mlx.launch: this process's place in its group; None alone
    if group is not None and not group.is_owner:
        Follower(group).serve(args.model, args.preset, args.dtype)
        return 0

    cache = None if args.cache in (None, "none") else args.cache
    if args.improve_prompt:
        model = args.prompt_model or (IMAGE_MODEL if args.image else TEXT_MODEL)
        written_from = {"original": args.prompt[0], "model": model, "seed": args.prompt_seed}
        args.prompt[0] = write_prompt(args, args.prompt[0])
    request = request_from(
        args, sampler=args.sampler, fps=args.fps, output=args.output, keep_frames=bool(args.save_frames),
        loras=[parse_lora(argument) for argument in args.lora], cache=cache, cache_threshold=args.cache_threshold,
        cache_max_skip=args.cache_max_skip, cache_retention=args.cache_retention,
        cache_ratios=read_cache_ratios(args.cache_ratios) if cache and args.cache_ratios else None,
        decoder=args.decoder, extend=args.extend, continuations=args.prompt[1:], overlap_frames=args.overlap_frames,
        prompt_writer=written_from if args.improve_prompt else None)
    bar = ProgressBar()
    engine = Engine(args.model, dtype=args.dtype, preset=args.preset, download_progress=bar.download, group=group,
                    tiny_decoder=args.tiny_decoder)
    if engine.notice:
        print(f"note: {engine.notice}", file=sys.stderr)
    result = None
    try:
        if group is not None:
            group.wait_for_all()  # every process has opened the model
        for item in engine.generate(request):
            if isinstance(item, Result):
                result = item
            else:
                bar.update(item)
    finally:
        bar.close()  # an error message then starts on a line of its own
        if group is not None:
            group.release_followers()
    if args.save_frames:
        Path(args.save_frames).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_frames, result.frames.astype(np.float32))
    tokens = result.prompt_tokens
    if tokens["total"] > tokens["limit"]:
        print(f"note: the prompt has {tokens['total']} tokens; the model read the first {tokens['used']}",
              file=sys.stderr)
    print(f"seed {result.seed}")
    print(f"wrote {result.video_path} ({result.timings['total_s']:.1f} s, MLX peak {result.peak_memory_gib:.2f} GiB, "
          f"process peak {result.process_peak_rss_gib:.2f} GiB)")
    if result.parallel:
        print(f"shared by {result.parallel['ranks']} processes (guidance x{result.parallel['guidance']}, "
              f"sequence x{result.parallel['sequence']})")
    return 0


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--output", required=True, help="the package folder to create")
    p.add_argument("--quantize", default="q8",
                   help="q8 (default) or q4: the transformer's attention and feed-forward linears; bf16: none")
    p.add_argument("--quantize-text-encoder", action="store_true",
                   help="quantize the text encoder too (smaller and lighter on memory, slightly less exact)")


def run_convert(args) -> int:
    bar = ProgressBar()
    source = resolve_model(args.model, bar.download)

    def progress(stage: str, done: int, total: int) -> None:
        bar.update(ProgressEvent(stage, "", done, total))  # the package's own stages: reading, quantizing, writing

    try:
        package = convert(source, args.output, args.quantize, args.quantize_text_encoder, progress,
                          source_name=args.model)
    finally:
        bar.close()  # an error message then starts on a line of its own
    print(f"wrote {package}")
    return 0


def add_finish_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="a draft's MP4 (made with --decoder tiny), its settings and latents beside it")
    p.add_argument("--output", default=None, help="the MP4 to write (default: <draft>-full.mp4 beside the draft)")
    p.add_argument("--preset", default="normal", help="memory preset of the decode: normal, low-ram, or a .json path")


def run_finish(args) -> int:
    record = read_draft_record(args.video)
    bar = ProgressBar()
    engine = Engine(record.settings.model, dtype=record.settings.dtype, preset=args.preset,
                    download_progress=bar.download)
    try:
        result = yield_progress(engine.finish(args.video, args.output), bar)
    finally:
        bar.close()
    print(f"wrote {result.video_path} (the draft {Path(args.video).name} in full quality, "
          f"{result.timings['total_s']:.1f} s)")
    return 0


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    add_request_arguments(p)
    p.add_argument("--output", required=True, metavar="FILE.json", help="where the ratios go, a JSON list")


def run_calibrate(args) -> int:
    bar = ProgressBar()
    engine = Engine(args.model, dtype=args.dtype, download_progress=bar.download)
    try:
        ratios = yield_progress(engine.calibrate_cache(request_from(args)), bar)
    finally:
        bar.close()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(ratios) + "\n")
    print(f"wrote {len(ratios)} ratios to {output}: use them with generate --cache magcache --cache-ratios {output}")
    return 0


def yield_progress(events, bar: ProgressBar):
    """Show a generator's progress events on `bar`; what it returns, or the Result it ends with."""
    while True:
        try:
            item = next(events)
        except StopIteration as end:
            return end.value
        if isinstance(item, Result):
            return item
        bar.update(item)


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--preset", action="append", default=[],
                   help="also prepare this memory preset (normal, low-ram or a .json path; repeatable): convert the "
                        "weights as it loads them, kept on disk, and compile the GPU kernels with a short warm-up run")
    p.add_argument("--dtype", default=None, help="the dtype to prepare for (default: as generate's)")


def run_download(args) -> int:
    bar = ProgressBar()
    try:
        path = resolve_model(args.model, bar.download)
        for preset in args.preset:
            engine = Engine(args.model, dtype=args.dtype, preset=preset)
            for event in warm_up(engine):
                bar.update(event)
            engine.release()
    finally:
        bar.close()  # an error message then starts on a line of its own
    print(f"{args.model} is ready in {path}" + (f", prepared for {', '.join(args.preset)}" if args.preset else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_engine", description="Wan2.2 TI2V-5B on MLX")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(commands.add_parser("generate", help="text or image to video"))
    add_download_arguments(commands.add_parser("download", help="fetch a model from the Hugging Face Hub (and prepare "
                                                                "presets) ahead of time"))
    add_convert_arguments(commands.add_parser("convert", help="write a bf16 / q8 / q4 package that generate loads"))
    add_calibrate_arguments(commands.add_parser("calibrate-cache", help="measure MagCache's ratios for a model (a "
                                                                        "JSON list for --cache-ratios)"))
    add_finish_arguments(commands.add_parser("finish", help="decode a draft (--decoder tiny) in full quality"))
    add_improve_arguments(commands.add_parser("improve-prompt", help="rewrite a short prompt as Wan's prompt "
                                                                     "extension does (prints it)"))
    args = parser.parse_args(argv)
    # transformers (tokenizer only here) warns at import that PyTorch is absent, which is how we run
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        commands = {"generate": run_generate, "download": run_download, "convert": run_convert,
                    "calibrate-cache": run_calibrate, "finish": run_finish, "improve-prompt": run_improve}
        return commands[args.command](args)
    except WanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Cancelled:
        print("cancelled: nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ...
        print(f"error: {e.strerror or e} ({e.filename or 'while writing'})", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, unless WAN_DEBUG asks for the traceback
        if os.environ.get("WAN_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set WAN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
