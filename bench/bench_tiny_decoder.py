"""Benchmark: the tiny decoder (TAEW2.2) against the full Wan2.2 VAE, and drafts end to end, on one GPU.

    python3 bench/bench_tiny_decoder.py                    # on the GPU machine: bench/results/<date>-<gpu>-tiny.json
    python3 bench/bench_tiny_decoder.py --tiny --out /tmp/t.json   # the same code on a CPU, tiny sizes

The random full-size snapshot is bench_gpu.py's (built if missing); the tiny decoder gets random weights at
TAEW2.2's real widths (256, 128, 64, 64) in the published layout, since its file cannot be fetched here. Measured,
`--repeats` times each (median, min, max):
  decode     the 121-frame 1280x704 latents decoded by the full VAE (the normal preset's way) and by the tiny one,
             each alone with its MLX peak; the goal: tiny <= 0.1x full;
  preview    a live preview through the tiny decoder against one 17-frame denoising step with guidance; the goal:
             <= 5% of the step;
  draft      the 3-step (dmd) 121-frame video end to end with a cached prompt, tiny decoder, against the same with
             the full one; the goal: the draft <= 3.5 s on one H200.
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
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from bench_gpu import NEGATIVE, PROMPTS, log, setup, spread  # noqa: E402
from wan_engine import Engine, GenerationRequest  # noqa: E402
from wan_engine.model_files.demo import random_weights  # noqa: E402
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache  # noqa: E402
from wan_engine.model_files.tiny_decoder import load_tiny_decoder  # noqa: E402
from wan_engine.models.taehv import WEIGHTS_FILE, TAEHVConfig, TAEHVDecoder  # noqa: E402
from wan_engine.outputs.preview import tiny_preview  # noqa: E402
from wan_engine.pipeline import decode_frames  # noqa: E402
from wan_engine.run import drain  # noqa: E402

GOALS = {"tiny_over_full_decode": 0.1, "preview_over_step": 0.05, "draft_total_s": 3.5}
FULL = dict(width=1280, height=704, frames=121, preview_frames=17)
TINY = dict(width=128, height=64, frames=17, preview_frames=9)


def timed(work, repeats: int) -> dict:
    """`work()` once to warm up, then `repeats` times: seconds and MLX's peak."""
    work()
    times = []
    mx.reset_peak_memory()
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        mx.synchronize()  # a decode hands its last chunk to the device without waiting for it
        times.append(time.perf_counter() - start)
    return {**spread(times), "peak_gib": round(mx.get_peak_memory() / 2**30, 3)}


def random_taew2_2(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    weights = random_weights(TAEHVDecoder(TAEHVConfig()), np.random.default_rng(0))
    save_file({key: np.ascontiguousarray(value) for key, value in weights.items()}, str(path))
    return path


def bench_decoders(engine: Engine, tiny_path: Path, case: dict, repeats: int) -> dict:
    shape = (1, (case["frames"] - 1) // 4 + 1, case["height"] // 16, case["width"] // 16, 48)
    latents = mx.random.normal(shape, key=mx.random.key(0))
    vae = drain(engine.parts.load("vae"))
    preset = engine.preset

    def full():
        for _ in decode_frames(vae, engine.normalizer, latents, None, None, preset.vae_frame_by_frame,
                               preset.vae_strip_width):
            pass

    result = {"full": timed(full, repeats)}
    engine.release()
    mx.clear_cache()
    tiny = load_tiny_decoder(tiny_path, engine.dtype)
    result["tiny"] = timed(lambda: list(tiny.decode_chunks(latents)), repeats)
    preview_latents = latents[:, : (case["preview_frames"] - 1) // 4 + 1]
    result["preview"] = timed(lambda: tiny_preview(tiny, preview_latents), repeats)
    result["tiny_over_full_decode"] = round(result["tiny"]["median_s"] / result["full"]["median_s"], 4)
    return result


def bench_step(engine: Engine, case: dict) -> float:
    """Seconds per 17-frame denoising step with guidance (UniPC), warm, cached prompt."""
    request = GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVE, width=case["width"],
                                height=case["height"], frames=case["preview_frames"], steps=6, guidance=5.0, seed=0)
    *_, result = engine.generate(request)
    *_, result = engine.generate(request)
    return result.timings["denoise_s_per_step"]


def bench_drafts(engine: Engine, case: dict, repeats: int) -> dict:
    request = dict(prompt=PROMPTS[0], negative_prompt=NEGATIVE, width=case["width"], height=case["height"],
                   frames=case["frames"], sampler="dmd", seed=0)
    out = {}
    for decoder in ("tiny", "full"):
        *_, result = engine.generate(GenerationRequest(**request, decoder=decoder))  # warm, the prompt cached
        totals = []
        for _ in range(repeats):
            *_, result = engine.generate(GenerationRequest(**request, decoder=decoder))
            totals.append(result.timings["total_s"])
        out[decoder] = {**spread(totals), "timings": result.timings, "peak_gib": result.peak_memory_gib,
                        "stage_peak_memory_gib": result.record.stage_peak_memory_gib, "prompt": "cached"}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/<date>-<gpu>-tiny.json)")
    parser.add_argument("--snapshot", default="/tmp/wan-bench-snapshot", help="where the random snapshot is (built)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, _, dtype, gpu, root = setup(args.tiny, args.snapshot)
    case = TINY if args.tiny else FULL
    work = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    tiny_path = random_taew2_2(work)
    report = {"device": gpu, "date": date.today().isoformat(), "mlx": mx.__version__, "dtype": dtype, **case,
              "goals": GOALS, "tiny_decoder": "random weights at TAEW2.2's widths"}
    out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-{gpu.replace(' ', '-')}-tiny.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def engine():
        return Engine(root, dtype=dtype, output_dir=work, tiny_decoder=str(tiny_path),
                      prompt_cache=PromptEmbeddingCache(work / "prompts"))

    log("decoders alone")
    report["decode"] = bench_decoders(engine(), tiny_path, case, args.repeats)
    log(json.dumps(report["decode"]))
    log("a denoising step against a preview")
    step_s = bench_step(engine(), case)
    report["preview_over_step"] = round(report["decode"]["preview"]["median_s"] / step_s, 4)
    report["step_s_17f"] = step_s
    log("drafts end to end")
    report["drafts"] = bench_drafts(engine(), case, args.repeats)
    log(json.dumps(report["drafts"]))
    out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
