"""Benchmark: Wan Studio's MLX engine against diffusers on one GPU, at the real TI2V-5B sizes, random weights.

    python3 bench/bench_gpu.py                # on the GPU machine: writes bench/results/<date>-<gpu>.json
    python3 bench/bench_gpu.py --tiny --out /tmp/b.json   # a quick run of the same code on a CPU, tiny model

It builds a full-size random snapshot (UMT5-XXL text encoder, the 5B transformer, the Wan2.2 VAE) in the Diffusers
layout with diffusers/transformers on the GPU, then in one process times diffusers (bf16, `WanPipeline` parts) and
ours (the `normal` and `low-ram` presets) on two cases:
  seed-17f  1280x704, 17 frames, 20 steps, guidance 5: text encoding, denoising per step, VAE decode, MP4, total,
            peak memory;
  121f      1280x704, 121 frames, guidance 5: denoising per step (a few steps after warm-up), VAE decode, peak.
Ours is timed on warm runs (a second generation in the same process, as the app's cached engine sees it); the
first run, kernel compilation included, is reported as `cold_total_s`.
"""

import argparse
import gc
import json
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
from wan_engine import Engine, GenerationRequest, Result  # noqa: E402
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
           "A lighthouse in a storm, waves crashing", "Fireworks over a quiet lake at night"]
NEGATIVE = "blurry, low quality, static"
# dtypes of the saved components: bf16 throughout, or as `Wan-AI/Wan2.2-TI2V-5B-Diffusers` stores them
BF16_LAYOUT = {"text_encoder": torch.bfloat16, "transformer": torch.bfloat16, "vae": torch.bfloat16}
UPSTREAM_LAYOUT = {"text_encoder": torch.bfloat16, "transformer": torch.float32, "vae": torch.float32}


def log(*args):
    print(*args, flush=True)


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


def bench_diffusers(root: Path, case: dict, device: str, out_dir: Path) -> dict:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(root), dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    result = {}
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

    # text encoding: prompt + negative prompt, as one pipeline call encodes them
    with torch.no_grad():
        pipe.encode_prompt(PROMPTS[0], NEGATIVE, device=device)  # warm-up
        sync(device)
        start = time.perf_counter()
        pipe.encode_prompt(PROMPTS[1], NEGATIVE, device=device)
        sync(device)
        result["text_encode_s"] = round(time.perf_counter() - start, 4)

    run(PROMPTS[0], 2, "latent")  # warm-up (kernels, allocator)
    reset_torch_peak(device)
    sync(device)
    start = time.perf_counter()
    if case["name"] == "seed-17f":
        frames_out, step_times = run(PROMPTS[2], steps)
        video = frames_out[0]
        write_start = time.perf_counter()
        write_video(out_dir / "diffusers.mp4", to_uint8(video), 24)
        result["mp4_s"] = round(time.perf_counter() - write_start, 4)
        result["total_s"] = round(time.perf_counter() - start, 4)
    else:
        latents, step_times = run(PROMPTS[2], steps, "latent")
    result["denoise_s_per_step"] = round(float(np.mean(step_times[1:] if len(step_times) > 1 else step_times)), 4)
    result["peak_gib"] = torch_peak_gib(device)

    # VAE decode alone: only the VAE on the device, from the same latent size
    latents = torch.randn(1, 48, (frames - 1) // 4 + 1, height // 16, width // 16, device=device, dtype=torch.bfloat16)
    transformer, text_encoder = pipe.transformer, pipe.text_encoder
    pipe.transformer, pipe.text_encoder = None, None
    del transformer, text_encoder
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    with torch.no_grad():
        pipe.vae.decode(latents[:, :, :2]).sample  # warm-up
        reset_torch_peak(device)
        sync(device)
        start = time.perf_counter()
        pipe.vae.decode(latents).sample
        sync(device)
    result["decode_s"] = round(time.perf_counter() - start, 4)
    result["decode_peak_gib"] = torch_peak_gib(device)
    del pipe
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    return result


# -- ours -----------------------------------------------------------------------------------------------------------
def run_ours(engine, case, prompt, steps=None) -> Result:
    request = GenerationRequest(prompt=prompt, negative_prompt=NEGATIVE, width=case["width"], height=case["height"],
                                frames=case["frames"], steps=steps or case["steps"], guidance=5.0, seed=0)
    *_, result = engine.generate(request)
    return result


def bench_ours(root: Path, case: dict, preset: str, dtype: str, out_dir: Path) -> dict:
    cache = PromptEmbeddingCache(tempfile.mkdtemp(prefix="bench-prompts-"))
    engine = Engine(root, dtype=dtype, preset=preset, output_dir=out_dir, prompt_cache=cache)
    start = time.perf_counter()
    run_ours(engine, case, PROMPTS[0])  # cold: the first run compiles the kernels
    cold_total = time.perf_counter() - start
    new_prompt = run_ours(engine, case, PROMPTS[1])  # warm, but a prompt the cache has not seen
    warm = run_ours(engine, case, PROMPTS[1])  # warm, cached prompt: as a user re-running with another seed
    t_new, t_warm = new_prompt.timings, warm.timings
    result = {
        "text_encode_s": t_new["text_s"],
        "denoise_s_per_step": t_warm["denoise_s_per_step"],
        "decode_s": t_warm["decode_s"],
        "mp4_s": t_warm["save_s"],
        "total_s": t_warm["total_s"],
        "total_new_prompt_s": t_new["total_s"],
        "load_s_new_prompt": t_new.get("load_s", 0.0),
        "peak_gib": max(new_prompt.peak_memory_gib, warm.peak_memory_gib),
        "cold_total_s": round(cold_total, 3),
        "stage_peak_gib": json.loads(warm.sidecar_path.read_text())["stage_peak_memory_gib"],
        "stage_peak_gib_new_prompt": json.loads(new_prompt.sidecar_path.read_text())["stage_peak_memory_gib"],
        "timings_warm": t_warm,
        "timings_new_prompt": t_new,
    }
    engine.release()
    del engine
    gc.collect()
    mx.clear_cache()
    return result


def bench_our_decode(root: Path, case: dict, dtype: str, preset) -> dict:
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
    start = time.perf_counter()
    for _ in decode_frames(vae, normalizer, latents, **options):
        pass
    result = {"decode_s": round(time.perf_counter() - start, 4), "decode_peak_gib": round(mx.get_peak_memory() / 2**30, 3)}
    del vae
    gc.collect()
    mx.clear_cache()
    return result


def ratios(entry: dict) -> dict:
    """Diffusers against ours, same run: speedups (diffusers time / ours) and our share of diffusers' decode peak,
    for each preset (the low-RAM preset decodes in two strips, the normal one whole frames)."""
    d, result = entry.get("diffusers", {}), {}
    for key, prefix in (("ours", ""), ("ours_low_ram", "low_ram_")):
        o = entry.get(key, {})
        if "denoise_s_per_step" not in d or "denoise_s_per_step" not in o:
            continue
        result[f"{prefix}denoise_speedup"] = round(d["denoise_s_per_step"] / o["denoise_s_per_step"], 3)
        result[f"{prefix}decode_speedup"] = round(d["decode_s"] / o["vae_only_decode_s"], 3)
        if d["decode_peak_gib"]:
            result[f"{prefix}decode_peak_fraction"] = round(o["vae_only_decode_peak_gib"] / d["decode_peak_gib"], 3)
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
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--cases", default="seed-17f,121f")
    parser.add_argument("--skip", default="", help="variants to leave out, e.g. 121f:ours_low_ram")
    args = parser.parse_args()

    sizes, device, dtype, gpu, root = setup(args.tiny, args.snapshot)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-videos-"))
    report = {"device": gpu, "date": date.today().isoformat(), "mlx": mx.__version__, "torch": torch.__version__,
              "dtype": dtype, "cases": []}
    for case in sizes["cases"]:
        if case["name"] not in args.cases.split(","):
            continue
        entry = {k: case[k] for k in ("name", "width", "height", "frames", "steps")}
        for preset, key in (("normal", "ours"), ("low-ram", "ours_low_ram")):
            if f"{case['name']}:{key}" in args.skip.split(","):
                entry[key] = {"skipped": "left out of this run (--skip)"}
                continue
            log(f"{case['name']}: ours ({preset})")
            entry[key] = guarded(lambda: {
                **bench_ours(root, case, preset, dtype, out_dir),
                **{f"vae_only_{k}": v for k, v in bench_our_decode(root, case, dtype, load_preset(preset)).items()},
            })
            log(json.dumps(entry[key]))
        if not args.skip_diffusers:
            log(f"{case['name']}: diffusers")
            entry["diffusers"] = guarded(lambda: bench_diffusers(root, case, device, out_dir))
            log(json.dumps(entry["diffusers"]))
        entry["ratios"] = ratios(entry)
        report["cases"].append(entry)
        out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-{gpu.replace(' ', '-')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
