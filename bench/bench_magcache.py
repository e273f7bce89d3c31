"""Benchmark: Balanced (MagCache) against Quality, ours and diffusers', on the 50-step 121-frame 720p video.

    python3 bench/bench_magcache.py                      # one GPU: both presets, then diffusers; bench/results/
    mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 -- python3 bench/bench_magcache.py --presets normal \
        --skip-diffusers                                  # two GPUs sharing each video (rank 0 measures)
    python3 bench/bench_magcache.py --tiny --out /tmp/m.json   # the same code on a CPU, tiny model

The random full-size snapshot is bench_gpu.py's (built if missing). Each video is measured end to end (`total_s`:
text, denoising, decode, MP4) with the prompt's embeddings cached (the text encoder is not loaded; said in the
report), after a warm-up video of the same size, `--repeats` times per mode: median and spread. Balanced is the
authors' TI2V-5B setting (threshold 0.06, K 2, retention 0.2, the published text-to-video ratios), as the app's
speed choice runs it; diffusers runs `transformer.enable_cache(MagCacheConfig(...))` with the same settings and
ratios, in the same process. The goal: Balanced <= 0.55x Quality on one H200.
"""

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from bench_gpu import NEGATIVE, PROMPTS, log, setup, spread, sync, torch_peak_gib, reset_torch_peak  # noqa: E402
from wan_engine import Engine, Follower, GenerationRequest, MAGCACHE_SETTING, join_group  # noqa: E402
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache  # noqa: E402
from wan_engine.sampling.magcache import TI2V_5B_TEXT_TO_VIDEO  # noqa: E402

GOAL = 0.55  # Balanced's time over Quality's, end to end, on one H200
FULL_CASE = dict(width=1280, height=704, frames=121, steps=50)
TINY_CASE = dict(width=128, height=64, frames=17, steps=20)
# the published ratios given explicitly: the built-in ones of the full model, and the tiny model's too
BALANCED = dict(cache="magcache", cache_threshold=MAGCACHE_SETTING["threshold"],
                cache_max_skip=MAGCACHE_SETTING["max_skip"], cache_retention=MAGCACHE_SETTING["retention"],
                cache_ratios=TI2V_5B_TEXT_TO_VIDEO)


def measure_ours(engine: Engine, case: dict, repeats: int, **mode) -> dict:
    """End-to-end seconds of `repeats` videos, the prompt's embeddings cached (the warm-up video encoded it)."""
    request = GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVE, guidance=5.0, seed=0, **case, **mode)
    totals, last = [], None
    for _ in range(repeats):
        *_, last = engine.generate(request)
        totals.append(last.timings["total_s"])
    return {**spread(totals), "per_step_s": last.timings["denoise_s_per_step"], "cache": last.record.cache,
            "peak_memory_gib": last.peak_memory_gib, "parallel": last.parallel, "prompt": "cached"}


def bench_ours(root: Path, case: dict, preset: str, dtype: str, repeats: int, group, modes: list) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix="bench-magcache-"))
    engine = Engine(root, dtype=dtype, preset=preset, output_dir=out_dir, group=group,
                    prompt_cache=PromptEmbeddingCache(out_dir / "prompts"))
    warm = GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVE, guidance=5.0, seed=0,
                             **{**case, "steps": 2})
    *_, _ = engine.generate(warm)  # kernels, compiled graphs, and the prompt's embeddings cached
    result = {mode: measure_ours(engine, case, repeats, **(BALANCED if mode == "balanced" else {})) for mode in modes}
    engine.release()
    if len(result) == 2:
        result["balanced_over_quality"] = round(result["balanced"]["median_s"] / result["quality"]["median_s"], 3)
    return result


def bench_diffusers(root: Path, case: dict, device: str, repeats: int) -> dict:
    from diffusers import WanPipeline
    from diffusers.hooks import MagCacheConfig

    pipe = WanPipeline.from_pretrained(str(root), dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # the prompt encoded once, as our cached prompt
        embeds, negative = pipe.encode_prompt(PROMPTS[0], NEGATIVE, device=device)

    def video(steps: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, width=case["width"], height=case["height"],
                 num_frames=case["frames"], num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator(device).manual_seed(0))
        sync(device)
        return time.perf_counter() - start

    video(2)  # warm-up
    reset_torch_peak(device)
    quality = spread([video(case["steps"]) for _ in range(repeats)])
    pipe.transformer.enable_cache(MagCacheConfig(
        threshold=MAGCACHE_SETTING["threshold"], max_skip_steps=MAGCACHE_SETTING["max_skip"],
        retention_ratio=MAGCACHE_SETTING["retention"], num_inference_steps=case["steps"],
        mag_ratios=TI2V_5B_TEXT_TO_VIDEO))
    balanced = spread([video(case["steps"]) for _ in range(repeats)])
    return {"quality": quality, "balanced": balanced, "peak_gib": torch_peak_gib(device), "prompt": "encoded once",
            "balanced_over_quality": round(balanced["median_s"] / quality["median_s"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/<date>-<gpu>-magcache.json)")
    parser.add_argument("--snapshot", default="/tmp/wan-bench-snapshot", help="where the random snapshot is (built)")
    parser.add_argument("--presets", default="normal,low-ram")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--modes", default="quality,balanced",
                        help="our modes to measure (one of them: a run that fits a shorter time limit)")
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    if not set(modes) <= {"quality", "balanced"}:
        parser.error(f"--modes takes quality and / or balanced, not {args.modes!r}")

    presets = [preset for preset in args.presets.split(",") if preset]  # none: diffusers alone
    group = join_group()
    if group is not None and not group.is_owner:
        Follower(group).serve(args.snapshot, presets[0], None)
        return
    sizes, device, dtype, gpu, root = setup(args.tiny, args.snapshot)
    case = TINY_CASE if args.tiny else FULL_CASE
    report = {"device": gpu, "date": date.today().isoformat(), "mlx": mx.__version__, "dtype": dtype, **case,
              "processes": 1 if group is None else group.size, "goal_balanced_over_quality": GOAL}
    kind = "magcache" if group is None else f"magcache-{group.size}"
    kind += "" if len(modes) == 2 else f"-{modes[0]}"
    out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-{gpu.replace(' ', '-')}-{kind}.json")
    if group is not None:
        group.wait_for_all()  # the others opened their engine in Follower.serve
    for preset in presets:
        log(f"ours, {preset}")
        report[f"ours_{preset}"] = bench_ours(root, case, preset, dtype, args.repeats, group, modes)
        log(json.dumps(report[f"ours_{preset}"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    if group is not None:
        group.release_followers()
    elif not args.skip_diffusers:
        log("diffusers")
        report["diffusers"] = bench_diffusers(root, case, device, args.repeats)
        log(json.dumps(report["diffusers"]))
    out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
