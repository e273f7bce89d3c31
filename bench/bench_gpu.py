"""Benchmark: Wan Studio's MLX engine against diffusers on one GPU, at the real TI2V-5B sizes, random weights.

    python3 bench/bench_gpu.py                # on the GPU machine: writes bench/results/<date>-<gpu>.json
    python3 bench/bench_gpu.py --tiny --out /tmp/b.json   # a quick run of the same code on a CPU, tiny model

It builds a full-size random snapshot (UMT5-XXL text encoder, the 5B transformer, the Wan2.2 VAE) in the Diffusers
layout with diffusers/transformers on the GPU, then in one process times diffusers (bf16, `WanPipeline`) and ours
(the `normal` and `low-ram` presets) on two cases:
  seed-17f  1280x704, 17 frames, 20 steps, guidance 5: whole videos end to end (text, denoising, VAE decode, MP4),
            each step, the VAE decode alone, peak memory;
  121f      1280x704, 121 frames, guidance 5 (3 steps): each step, the VAE decode alone, peak memory.
Every figure is the median of `--repeats` runs (min, max and each run beside it), after a warm-up.
  diffusers  `eager` as it ships, and `compiled`: the transformer's blocks compiled with `torch.compile`
             (`compile_repeated_blocks(fullgraph=True)`, diffusers' regional compilation), its fastest attention
             backend on the machine (each one diffusers offers without extra packages, timed on the case's own
             attention shape), and with `--compile-vae` the VAE decoder compiled too. diffusers keeps its text
             encoder loaded and encodes the prompt in every call: each video is a new prompt.
  ours       the app's cached engine: a cold first video (kernels compile), then `--repeats` videos with prompts it
             has not seen (`new prompt`: the text encoder runs; with the preset's `keep_resident` decision, which the
             report records) and `--repeats` with one it has (`cached prompt`: the embeddings come from the prompt
             cache). Then the click: what the app does between videos (`Engine.prepare_next`) and a video asked for
             at once, which waits for it, timed to its first finished denoising step; and the same for a click made
             later (nothing to wait for).
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from wan_engine.model_files.demo import build_tokenizer  # noqa: E402
from wan_engine import CancelToken, Cancelled, Engine, GenerationRequest, Result, Stage  # noqa: E402
from wan_engine.presets import apply_memory_limits  # noqa: E402
from wan_engine.model_files.loading import Snapshot  # noqa: E402
from wan_engine.pipeline import LatentNormalizer, decode_frames  # noqa: E402
from wan_engine.presets import load_preset  # noqa: E402
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache  # noqa: E402
from wan_engine.outputs.video import to_uint8, write_video  # noqa: E402

FULL = dict(
    text=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128),
    transformer=dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, text_dim=4096,
                     freq_dim=256, ffn_dim=14336, num_layers=30),
    vae=dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    cases=[dict(name="seed-17f", width=1280, height=704, frames=17, steps=20),
           dict(name="121f", width=1280, height=704, frames=121, steps=3)],
)
TINY = dict(
    text=dict(vocab_size=800, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              relative_attention_num_buckets=32, relative_attention_max_distance=128),
    transformer=dict(num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48, text_dim=64,
                     freq_dim=64, ffn_dim=128, num_layers=2),
    vae=dict(base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    cases=[dict(name="seed-17f", width=128, height=64, frames=17, steps=4),
           dict(name="121f", width=128, height=64, frames=33, steps=3)],
)
PROMPTS = ["A corgi surfing a wave at sunset, cinematic", "A paper boat drifting down a rainy street",
           "A lighthouse in a storm, waves crashing", "Fireworks over a quiet lake at night",
           "A red fox trotting through fresh snow", "Lanterns floating up from a river at dusk",
           "A hummingbird hovering at a purple flower", "Rain on a neon-lit street in Tokyo"]
NEGATIVE = "blurry, low quality, static"
# dtypes of the saved components: bf16 throughout, or as `Wan-AI/Wan2.2-TI2V-5B-Diffusers` stores them
BF16_LAYOUT = {"text_encoder": torch.bfloat16, "transformer": torch.bfloat16, "vae": torch.bfloat16}
UPSTREAM_LAYOUT = {"text_encoder": torch.bfloat16, "transformer": torch.float32, "vae": torch.float32}


def log(*args):
    print(*args, flush=True)


def spread(times: list) -> dict:
    """The median of repeated runs, their min and max, and each run."""
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "runs_s": [round(t, 4) for t in times]}


def each_step(step_lists: list) -> dict:
    """Every step after the first of each run, pooled: their median, min, max and mean (the per-step figures above
    are means, in which a few slow steps weigh; the median says how fast a step usually is)."""
    steps = [t for times in step_lists for t in times[1:]]
    return {"median_s": round(statistics.median(steps), 4), "min_s": round(min(steps), 4),
            "max_s": round(max(steps), 4), "mean_s": round(statistics.fmean(steps), 4), "steps": len(steps)}


def build_snapshot(root: Path, sizes: dict, device: str, dtypes: dict = BF16_LAYOUT) -> None:
    """A random TI2V snapshot saved by diffusers in the Diffusers layout (sharded), built on `device`; `dtypes`:
    each component's stored dtype (BF16_LAYOUT or UPSTREAM_LAYOUT)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    start = time.perf_counter()
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(feed_forward_proj="gated-gelu", **sizes["text"]))
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), **sizes["transformer"])
        vae = AutoencoderKLWan(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                               scale_factor_temporal=4, temperal_downsample=[False, True, True],
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48, **sizes["vae"])
    text_encoder, transformer, vae = (module.to(dtypes[name]) for name, module in
                                      (("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae)))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=build_tokenizer(800), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, expand_timesteps=True)
    pipe.save_pretrained(root, max_shard_size="5GB")
    del pipe, text_encoder, transformer, vae
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    log(f"snapshot written in {time.perf_counter() - start:.0f} s")


# -- diffusers ------------------------------------------------------------------------------------------------------
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def torch_peak_gib(device) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else 0.0


def reset_torch_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient")  # no extra packages needed


def best_attention_backend(case: dict, sizes: dict, device: str) -> dict:
    """Each attention backend of diffusers' dispatcher that runs here, timed on the case's self-attention (a batch
    of two, all latent tokens): the fastest one's name, and every time (or why it failed)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    heads, head_dim = sizes["transformer"]["num_attention_heads"], sizes["transformer"]["attention_head_dim"]
    tokens = ((case["frames"] - 1) // 4 + 1) * (case["height"] // 32) * (case["width"] // 32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(2, tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    times = {}
    for name in ATTENTION_BACKENDS:
        try:
            with torch.no_grad():
                dispatch_attention_fn(q, k, v, backend=name)
                sync(device)
                start = time.perf_counter()
                for _ in range(5):
                    dispatch_attention_fn(q, k, v, backend=name)
                sync(device)
            times[name] = round((time.perf_counter() - start) / 5 * 1000, 3)
        except Exception as e:  # noqa: BLE001 - a backend this machine lacks is left out, with its reason
            times[name] = f"{type(e).__name__}: {str(e)[:120]}"
    timed = {name: ms for name, ms in times.items() if isinstance(ms, float)}
    return {"backend": min(timed, key=timed.get), "attention_ms": times}


def compile_diffusers(pipe, case: dict, sizes: dict, device: str, compile_vae: bool) -> dict:
    """diffusers at its best here: the fastest attention backend, the transformer's blocks compiled (regional
    compilation, as diffusers' docs advise for Wan), the VAE decoder too when asked and when it compiles."""
    setting = best_attention_backend(case, sizes, device)
    pipe.transformer.set_attention_backend(setting["backend"])
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    setting["transformer"] = "compile_repeated_blocks(fullgraph=True)"
    if compile_vae:
        pipe.vae.decoder.compile()
        setting["vae_decoder"] = "torch.compile"
    return setting


def bench_diffusers(root: Path, case: dict, sizes: dict, device: str, out_dir: Path, mode: str, repeats: int,
                    compile_vae: bool = False) -> dict:
    """diffusers' WanPipeline in `mode` ("eager" or "compiled"): `repeats` videos after a warm-up (the compile)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(root), dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    result = {"mode": mode, "prompt": "new each video (diffusers keeps its text encoder and encodes every call)"}
    if mode == "compiled":
        result["setting"] = compile_diffusers(pipe, case, sizes, device, compile_vae)
    width, height, frames, steps = case["width"], case["height"], case["frames"], case["steps"]

    def run(prompt, num_steps, output_type="np"):
        step_times = []
        last = [time.perf_counter()]

        def on_step(pipeline, i, t, kwargs):
            sync(device)
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            return kwargs

        with torch.no_grad():
            sync(device)
            last[0] = time.perf_counter()
            out = pipe(prompt=prompt, negative_prompt=NEGATIVE, width=width, height=height, num_frames=frames,
                       num_inference_steps=num_steps, guidance_scale=5.0, output_type=output_type,
                       generator=torch.Generator(device).manual_seed(0), callback_on_step_end=on_step)
        return out.frames, step_times

    with torch.no_grad():  # text encoding: prompt + negative prompt, as one pipeline call encodes them
        pipe.encode_prompt(PROMPTS[0], NEGATIVE, device=device)  # warm-up
        sync(device)
        start = time.perf_counter()
        pipe.encode_prompt(PROMPTS[1], NEGATIVE, device=device)
        sync(device)
        result["text_encode_s"] = round(time.perf_counter() - start, 4)

    warming = time.perf_counter()
    # kernels, allocator, the compile; compiled, twice: with the VAE decoder compiled, torch recompiled it (dynamic
    # shapes) on the second call, and that first timed video took 49.8 s (H100, 2026-12-05)
    for _ in range(2 if mode == "compiled" else 1):
        run(PROMPTS[0], 2, "np" if case["name"] == "seed-17f" else "latent")
    result["warm_up_s"] = round(time.perf_counter() - warming, 3)
    reset_torch_peak(device)
    totals, mp4, per_step, step_lists = [], [], [], []
    for i in range(repeats):
        sync(device)
        start = time.perf_counter()
        if case["name"] == "seed-17f":
            frames_out, step_times = run(PROMPTS[2 + i], steps)
            write_start = time.perf_counter()
            write_video(out_dir / "diffusers.mp4", to_uint8(frames_out[0]), 24)
            mp4.append(time.perf_counter() - write_start)
            totals.append(time.perf_counter() - start)
        else:
            _, step_times = run(PROMPTS[2 + i], steps, "latent")
        per_step.append(float(np.mean(step_times[1:] if len(step_times) > 1 else step_times)))
        step_lists.append(step_times)
    result["denoise_s_per_step"] = round(statistics.median(per_step), 4)
    result["denoise_s_per_step_runs"] = [round(t, 4) for t in per_step]
    result["denoise_s_each_step"] = each_step(step_lists)
    if totals:
        result["total_s"] = spread(totals)
        result["mp4_s"] = round(statistics.median(mp4), 4)
    result["peak_gib"] = torch_peak_gib(device)
    result.update(diffusers_decode(pipe, case, device, repeats))
    return result  # the pipeline goes with this frame; main() empties torch's cache


def diffusers_decode(pipe, case: dict, device: str, repeats: int) -> dict:
    """The VAE decode alone: only the VAE on the device, from the case's latent size."""
    width, height, frames = case["width"], case["height"], case["frames"]
    latents = torch.randn(1, 48, (frames - 1) // 4 + 1, height // 16, width // 16, device=device, dtype=torch.bfloat16)
    pipe.transformer, pipe.text_encoder = None, None
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    times = []
    with torch.no_grad():
        pipe.vae.decode(latents[:, :, :2]).sample  # warm-up
        reset_torch_peak(device)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            pipe.vae.decode(latents).sample
            sync(device)
            times.append(time.perf_counter() - start)
    return {"decode_s": round(statistics.median(times), 4), "decode_s_runs": [round(t, 4) for t in times],
            "decode_peak_gib": torch_peak_gib(device)}


# -- ours -----------------------------------------------------------------------------------------------------------
def request_for(case, prompt, steps=None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt=NEGATIVE, width=case["width"], height=case["height"],
                             frames=case["frames"], steps=steps or case["steps"], guidance=5.0, seed=0)


def run_ours(engine, case, prompt, steps=None) -> tuple[Result, list]:
    """The video's Result, and the seconds between its finished denoising steps as the app sees them (the first
    counted from the start of the run)."""
    step_times, last = [], time.perf_counter()
    for item in engine.generate(request_for(case, prompt, steps)):
        if getattr(item, "stage", None) == Stage.DENOISE:
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
    return item, step_times


def to_first_step(engine, case, prompt) -> float:
    """Seconds from asking for a video to its first finished denoising step; the rest of the video is cancelled."""
    cancel = CancelToken()
    start = time.perf_counter()
    seconds = None
    try:
        for event in engine.generate(request_for(case, prompt), cancel=cancel):
            if getattr(event, "stage", None) == Stage.DENOISE and event.step >= 1 and seconds is None:
                seconds = time.perf_counter() - start
                cancel.cancel()
    except Cancelled:
        pass
    return round(seconds, 4)


def click(engine, case: dict) -> dict:
    """What the app does right after a video (prepare_next, on the engine's thread) and a click made at once, which
    waits for it; and a click made later, when prepare_next is long done. Cached prompt."""
    start = time.perf_counter()
    for _ in engine.prepare_next():
        pass
    prepare = time.perf_counter() - start
    at_once = prepare + to_first_step(engine, case, PROMPTS[1])
    later = to_first_step(engine, case, PROMPTS[1])
    return {"prepare_next_s": round(prepare, 4), "click_at_once_to_first_step_s": round(at_once, 4),
            "click_later_to_first_step_s": later, "prompt": "cached"}


def bench_ours(root: Path, case: dict, preset: str, dtype: str, out_dir: Path, repeats: int) -> dict:
    cache = PromptEmbeddingCache(tempfile.mkdtemp(prefix="bench-prompts-"))
    engine = Engine(root, dtype=dtype, preset=preset, output_dir=out_dir, prompt_cache=cache)
    start = time.perf_counter()
    run_ours(engine, case, PROMPTS[0])  # cold: the first run compiles the kernels
    cold_total = time.perf_counter() - start
    new = [run_ours(engine, case, PROMPTS[2 + i])[0] for i in range(repeats)]  # warm, prompts the cache has not seen
    cached, step_lists = zip(*[run_ours(engine, case, PROMPTS[1]) for _ in range(repeats)])  # re-run, another seed

    def median(runs, key):
        return round(statistics.median(run.timings.get(key, 0.0) for run in runs), 4)

    def per_step(run):  # the steps after the first, as diffusers' are timed above (its first holds its set-up)
        timings = run.timings
        return round((timings["denoise_s"] - timings["denoise_first_step_s"]) / (case["steps"] - 1), 4)

    result = {
        "total_new_prompt_s": spread([run.timings["total_s"] for run in new]),
        "total_cached_prompt_s": spread([run.timings["total_s"] for run in cached]),
        "text_encode_new_prompt_s": median(new, "text_s"),
        "load_s_new_prompt": median(new, "load_s"),
        "denoise_s_per_step": statistics.median(per_step(run) for run in cached),
        "denoise_s_per_step_runs": [per_step(run) for run in cached],
        "denoise_s_per_step_with_the_first": median(cached, "denoise_s_per_step"),
        "denoise_s_each_step": each_step(step_lists),
        "decode_s": median(cached, "decode_s"),
        "mp4_s": median(cached, "save_s"),
        "peak_gib": max(run.peak_memory_gib for run in new + list(cached)),
        "cold_total_s": round(cold_total, 3),
        "text_encoder": new[-1].record.text_encoder,
        "stage_peak_gib_cached_prompt": cached[-1].record.stage_peak_memory_gib,
        "stage_peak_gib_new_prompt": new[-1].record.stage_peak_memory_gib,
        "timings_cached_prompt": cached[-1].timings,
        "timings_new_prompt": new[-1].timings,
        "click": click(engine, case),
    }
    engine.release()
    del engine
    gc.collect()
    mx.clear_cache()
    return result


def bench_our_decode(root: Path, case: dict, dtype: str, preset, repeats: int) -> dict:
    """The VAE decode alone (only the VAE loaded), as for diffusers, as the preset decodes: its tiling rule, strips,
    frame by frame or not, and its MLX allocator limits (the low-RAM preset keeps no freed buffers for reuse)."""
    apply_memory_limits(preset)
    tile = preset.vae_tile
    tile = tile if tile and case["width"] * case["height"] >= tile.get("min_pixels", 0) else None
    options = {"tile": tile, "frame_by_frame": preset.vae_frame_by_frame, "strip_width": preset.vae_strip_width}
    snapshot = Snapshot.open(root)
    vae = snapshot.load_vae({"bfloat16": mx.bfloat16, "float32": mx.float32}[dtype])
    normalizer = LatentNormalizer(snapshot.vae_config)
    shape = (1, (case["frames"] - 1) // 4 + 1, case["height"] // 16, case["width"] // 16, 48)
    latents = mx.random.normal(shape, key=mx.random.key(0))
    for _ in decode_frames(vae, normalizer, latents[:, :2], **options):  # warm-up
        pass
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in decode_frames(vae, normalizer, latents, **options):
            pass
        mx.synchronize()  # the last chunk is handed to the device, not waited for
        times.append(time.perf_counter() - start)
    result = {"decode_s": round(statistics.median(times), 4), "decode_s_runs": [round(t, 4) for t in times],
              "decode_peak_gib": round(mx.get_peak_memory() / 2**30, 3)}
    del vae
    gc.collect()
    mx.clear_cache()
    return result


def ratios(entry: dict) -> dict:
    """Diffusers against ours, same run: speedups (diffusers time / ours; above 1: ours is faster), our share of
    diffusers' decode peak, and our whole video's time over diffusers' (new and cached prompt), per preset and per
    diffusers mode."""
    result = {}
    for mode in ("diffusers", "diffusers_compiled"):
        d = entry.get(mode, {})
        for key, prefix in (("ours", ""), ("ours_low_ram", "low_ram_")):
            o = entry.get(key, {})
            if "denoise_s_per_step" not in d or "denoise_s_per_step" not in o:
                continue
            name = f"{prefix}vs_{mode}"
            result[f"{name}_denoise_speedup"] = round(d["denoise_s_per_step"] / o["denoise_s_per_step"], 3)
            result[f"{name}_decode_speedup"] = round(d["decode_s"] / o["vae_only_decode_s"], 3)
            if d.get("decode_peak_gib"):
                result[f"{name}_decode_peak_fraction"] = round(o["vae_only_decode_peak_gib"] / d["decode_peak_gib"], 3)
            if "total_s" in d:
                for prompt in ("new_prompt", "cached_prompt"):
                    ours_total = o[f"total_{prompt}_s"]["median_s"]
                    result[f"{name}_total_{prompt}_fraction"] = round(ours_total / d["total_s"]["median_s"], 3)
    return result


def guarded(measure) -> dict:
    """Run one measurement; a failure is recorded in the report instead of losing the whole run."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - any failure of one variant must not stop the others
        import traceback

        traceback.print_exc()
        gc.collect()
        mx.clear_cache()
        return {"error": f"{type(e).__name__}: {e}"}


def setup(tiny: bool, snapshot: str) -> tuple:
    """(sizes, torch device, our dtype, GPU name, snapshot folder) of a run; the random snapshot built if missing."""
    sizes = TINY if tiny else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    root = Path(snapshot)
    if not (root / "model_index.json").exists():
        build_snapshot(root, sizes, device)
    return sizes, device, dtype, gpu, root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/<date>-<gpu>.json)")
    parser.add_argument("--snapshot", default="/tmp/wan-bench-snapshot", help="where to build the random snapshot")
    parser.add_argument("--cases", default="seed-17f,121f")
    parser.add_argument("--variants", default="ours,ours_low_ram,diffusers,diffusers_compiled",
                        help="which to run, of ours, ours_low_ram, diffusers, diffusers_compiled")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each variant (median, min, max)")
    parser.add_argument("--compile-vae", action="store_true", help="diffusers_compiled compiles the VAE decoder too")
    args = parser.parse_args()

    sizes, device, dtype, gpu, root = setup(args.tiny, args.snapshot)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-videos-"))
    report = {"device": gpu, "date": date.today().isoformat(), "mlx": mx.__version__, "torch": torch.__version__,
              "dtype": dtype, "repeats": args.repeats, "cases": []}
    out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-{gpu.replace(' ', '-')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    for case in sizes["cases"]:
        if case["name"] not in args.cases.split(","):
            continue
        entry = {k: case[k] for k in ("name", "width", "height", "frames", "steps")}
        report["cases"].append(entry)
        for preset, key in (("normal", "ours"), ("low-ram", "ours_low_ram")):
            if key in variants:
                log(f"{case['name']}: ours ({preset})")
                entry[key] = guarded(lambda: {
                    **bench_ours(root, case, preset, dtype, out_dir, args.repeats),
                    **{f"vae_only_{k}": v for k, v in
                       bench_our_decode(root, case, dtype, load_preset(preset), args.repeats).items()},
                })
                log(json.dumps(entry[key]))
                out.write_text(json.dumps(report, indent=2))
        for mode, key in (("eager", "diffusers"), ("compiled", "diffusers_compiled")):
            if key in variants:
                log(f"{case['name']}: diffusers ({mode})")
                entry[key] = guarded(lambda: bench_diffusers(root, case, sizes, device, out_dir, mode, args.repeats,
                                                             args.compile_vae))
                gc.collect()
                torch.cuda.empty_cache() if device == "cuda" else None
                torch._dynamo.reset()  # the next pipeline compiles its own graphs
                log(json.dumps(entry[key]))
        entry["ratios"] = ratios(entry)
        log(json.dumps(entry["ratios"]))
        out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
