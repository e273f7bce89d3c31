"""Benchmark: LoRA adapters and 3-step distilled (DMD) generation at the real TI2V-5B sizes, random weights.

    python3 bench/bench_fast.py                # on the GPU machine: writes bench/results/<date>-<gpu>-fast.json
    python3 bench/bench_fast.py --tiny --out /tmp/f.json   # the same code on a CPU, tiny model

Uses the full-size random snapshot of bench_gpu.py (built there if missing, bf16). Two cases:
  lora  1280x704, 17 frames, guidance 5 (the seed profile): seconds per step without and with a rank-128 LoRA on
        every attention and feed-forward linear of the 30 blocks (fused at load), for the normal and the low-RAM
        preset (q8: the LoRA is fused into quantized layers), the time fusing takes, and the low-RAM preset's MLX
        peak over a whole 20-step seed-profile video with the LoRA.
  dmd   1280x704, 121 and 17 frames, the dmd sampler (3 steps, no guidance), normal preset: the whole video end to end
        in a warm process (text, 3 steps, decode, MP4), `--repeats` videos with new prompts and `--repeats` with a
        cached one (median, min, max), and the UniPC step with guidance 5 beside the dmd step. The 50-step video
        itself is measured whole by bench_magcache.py (Quality), not derived from a step time here.
Every figure is ours on one GPU: FastVideo is not run here (its published figure is 16 s for a 5-second 720p video on
one H200).
"""

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from bench_gpu import PROMPTS, guarded, log, setup, spread  # noqa: E402
from wan_engine import Engine, GenerationRequest  # noqa: E402
from wan_engine.model_files.lora import transformer_shapes  # noqa: E402
from wan_engine.model_files.loading import Snapshot  # noqa: E402
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache  # noqa: E402

LORA_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")

def write_lora(path: Path, root: Path, rank: int) -> Path:
    """A random diffusers/PEFT LoRA of `rank` on every block's attention and feed-forward linears (float16)."""
    shapes = transformer_shapes(Snapshot.open(root).transformer_config)
    rng = np.random.default_rng(0)
    tensors = {}
    for key, shape in shapes.items():
        layer = key.removesuffix(".weight")
        if key.startswith("blocks.") and key.endswith(".weight") and layer.split(".", 2)[2] in LORA_LAYERS:
            out_dim, in_dim = shape
            tensors[f"transformer.{layer}.lora_A.weight"] = (rng.standard_normal((rank, in_dim)) / in_dim).astype(np.float16)
            tensors[f"transformer.{layer}.lora_B.weight"] = (rng.standard_normal((out_dim, rank)) / rank).astype(np.float16)
    save_file(tensors, str(path))
    log(f"LoRA of rank {rank} on {len(tensors) // 2} layers: {path.stat().st_size / 2**30:.2f} GiB")
    return path


def generate(engine, case: dict, prompt: str, **request):
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry, static", width=case["width"],
                                height=case["height"], frames=case["frames"], seed=0, **request)
    *_, result = engine.generate(request)
    return result


def bench_lora(root: Path, case: dict, preset: str, dtype: str, lora: Path, out_dir: Path) -> dict:
    engine = Engine(root, dtype=dtype, preset=preset, output_dir=out_dir,
                    prompt_cache=PromptEmbeddingCache(tempfile.mkdtemp(prefix="bench-prompts-")))
    steps = case["lora_steps"]
    generate(engine, case, PROMPTS[0], steps=2)  # warm-up: loads, compiles
    plain = generate(engine, case, PROMPTS[0], steps=steps)
    with_lora = generate(engine, case, PROMPTS[0], steps=2, loras=[(str(lora), 1.0)])  # fuses, compiles again
    fused = generate(engine, case, PROMPTS[0], steps=steps, loras=[(str(lora), 1.0)])
    result = {
        "steps_timed": steps,
        "no_lora_s_per_step": plain.timings["denoise_s_per_step"],
        "lora_s_per_step": fused.timings["denoise_s_per_step"],
        "fuse_and_load_s": with_lora.timings.get("load_s", 0.0),
        "no_lora_peak_gib": plain.peak_memory_gib,
        "lora_peak_gib": fused.peak_memory_gib,
    }
    result["lora_step_ratio"] = round(result["lora_s_per_step"] / result["no_lora_s_per_step"], 4)
    if preset == "low-ram":
        whole = generate(engine, case, PROMPTS[1], steps=case["steps"], loras=[(str(lora), 1.0)])
        result["seed_profile_with_lora"] = {"steps": case["steps"], "peak_gib": whole.peak_memory_gib,
                                            "stage_peak_gib": json.loads(whole.sidecar_path.read_text())[
                                                "stage_peak_memory_gib"], "total_s": whole.timings["total_s"]}
    engine.release()
    return result


def bench_dmd(root: Path, case: dict, dtype: str, out_dir: Path, repeats: int) -> dict:
    engine = Engine(root, dtype=dtype, preset="normal", output_dir=out_dir,
                    prompt_cache=PromptEmbeddingCache(tempfile.mkdtemp(prefix="bench-prompts-")))
    generate(engine, case, PROMPTS[0], sampler="dmd")  # warm-up: loads, compiles
    new = [generate(engine, case, PROMPTS[1 + i], sampler="dmd") for i in range(repeats)]  # prompts not seen
    cached = [generate(engine, case, PROMPTS[1], sampler="dmd") for _ in range(repeats)]
    unipc = generate(engine, case, PROMPTS[1], sampler="unipc", steps=2, guidance=5.0)
    result = {
        "total_cached_prompt_s": spread([run.timings["total_s"] for run in cached]),
        "total_new_prompt_s": spread([run.timings["total_s"] for run in new]),
        "timings_cached_prompt": cached[-1].timings, "timings_new_prompt": new[-1].timings,
        "text_encoder": new[-1].record.text_encoder,
        "peak_gib": max(run.peak_memory_gib for run in new + cached),
        "dmd_s_per_step": cached[-1].timings["denoise_s_per_step"],
        "unipc_guidance_s_per_step": unipc.timings["denoise_s_per_step"],
    }
    engine.release()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/<date>-<gpu>-fast.json)")
    parser.add_argument("--snapshot", default="/tmp/wan-bench-snapshot", help="the random snapshot (built if missing)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--parts", default="lora,dmd", help="which to run: lora, dmd")
    parser.add_argument("--repeats", type=int, default=3, help="dmd videos of each kind (median, min, max)")
    args = parser.parse_args()

    sizes, _, dtype, gpu, root = setup(args.tiny, args.snapshot)
    seed = next(case for case in sizes["cases"] if case["name"] == "seed-17f")
    lora_case = {**seed, "lora_steps": 6}
    dmd_cases = [{**seed, "name": "dmd-17f"}, {**seed, "name": "dmd-121f", "frames": 121 if not args.tiny else 33}]
    out_dir = Path(tempfile.mkdtemp(prefix="bench-videos-"))
    if "lora" in args.parts:
        lora = write_lora(out_dir / "lora.safetensors", root, args.rank if not args.tiny else 8)
    report = {"device": gpu, "date": date.today().isoformat(), "mlx": mx.__version__, "dtype": dtype,
              "lora_rank": args.rank if not args.tiny else 8, "repeats": args.repeats, "lora": {}, "dmd": {}}
    out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-{gpu.replace(' ', '-')}-fast.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for preset in ("normal", "low-ram") if "lora" in args.parts else ():
        log(f"lora: {preset}")
        report["lora"][preset] = guarded(lambda: bench_lora(root, lora_case, preset, dtype, lora, out_dir))
        log(json.dumps(report["lora"][preset]))
        out.write_text(json.dumps(report, indent=2))
    for case in dmd_cases if "dmd" in args.parts else ():
        log(f"dmd: {case['name']}")
        report["dmd"][case["name"]] = guarded(lambda: bench_dmd(root, case, dtype, out_dir, args.repeats))
        log(json.dumps(report["dmd"][case["name"]]))
        out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
