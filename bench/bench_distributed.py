"""Benchmark: one GPU against two on one video (wan_engine.parallel), at the real TI2V-5B sizes, random weights.

    mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 -- python3 bench/bench_distributed.py
    mlx.launch -n 2 --backend ring -- python3 bench/bench_distributed.py --tiny --out /tmp/d.json   # CPU, tiny

Rank 0 builds the full-size random snapshot (bench_gpu.build_snapshot, FULL) while the other waits. Then, in the
same launch:
  one GPU   each process runs its share of the baselines alone, side by side on its own GPU (Engine without a
            group): rank 0 the whole 50-step 121-frame video, rank 1 the rest;
  two GPUs  rank 0's engine shares every run with rank 1 (guidance-parallel with guidance 5, sequence-parallel
            without guidance).
Cases: seed-17f (1280x704, 17 frames, 20 steps, guidance 5) end to end (warm: text from the prompt cache, all steps,
decode, MP4) and per step; 17f and 121f without guidance, per step; 121f with guidance, one whole 50-step video end
to end and per step. Per-step times leave the first step out (kernels compile there) and come from a few steps
where no whole video is timed (the run is closed after its last step: no decode). Each case records every
process's MLX peak and the bytes each process receives per step. Output: a JSON in bench/results, progress on
stdout.
"""

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_gpu import FULL, TINY, build_snapshot, log  # noqa: E402
from wan_engine import Engine, Follower, GenerationRequest, Result, join_group  # noqa: E402
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache  # noqa: E402

PROMPT, NEGATIVE = "A corgi surfing a wave at sunset, cinematic", "blurry, low quality, static"
GOALS = {  # (case, measure): the speed-up of two GPUs over one asked for (issue #12)
    ("121f", "per_step"): 1.85, ("seed-17f", "per_step"): 1.6, ("121f-no-guidance", "per_step"): 1.7,
    ("121f", "total"): 1.75,
}


def cases(sizes: dict, tiny: bool) -> list[dict]:
    """The cases, each: name, size, steps, guidance, whole (timed end to end, else per step from a few steps),
    and which process runs it alone (`alone_on`)."""
    seventeen, long = sizes["cases"]
    size = lambda case: {key: case[key] for key in ("width", "height", "frames")}  # noqa: E731
    few = 3 if tiny else 4
    return [
        dict(name="seed-17f", **size(seventeen), steps=seventeen["steps"], guidance=5.0, whole=True, alone_on=1),
        dict(name="seed-17f-no-guidance", **size(seventeen), steps=few, guidance=1.0, whole=False, alone_on=1),
        dict(name="121f-no-guidance", **size(long), steps=few, guidance=1.0, whole=False, alone_on=1),
        dict(name="121f", **size(long), steps=4 if tiny else 50, guidance=5.0, whole=True, alone_on=0),
    ]


def request_for(case: dict, steps: int) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=case["width"], height=case["height"],
                             frames=case["frames"], steps=steps, guidance=case["guidance"], seed=0)


def per_step(engine: Engine, case: dict) -> dict:
    """Seconds per step from steps 2.. of a run closed after its last step."""
    events = engine.generate(request_for(case, case["steps"]))
    first = last = None
    for event in events:
        if event.stage == "denoise":
            first = event.elapsed_s if event.step == 1 else first
            last = event.elapsed_s
            if event.step == case["steps"]:
                events.close()
                break
    return {"s_per_step": round((last - first) / (case["steps"] - 1), 4), "steps_timed": case["steps"] - 1}


def whole_video(engine: Engine, case: dict) -> dict:
    """A warm-up run of 2 steps (kernels, the prompt into the cache), then the timed run end to end."""
    *_, warm_up = engine.generate(request_for(case, 2))
    *events, result = engine.generate(request_for(case, case["steps"]))
    assert isinstance(result, Result)
    steps = [e.elapsed_s for e in events if e.stage == "denoise"]
    return {"s_per_step": round((steps[-1] - steps[0]) / (len(steps) - 1), 4), "total_s": result.timings["total_s"],
            "timings": result.timings, "rank0_stage_peak_gib": json.loads(result.sidecar_path.read_text())[
                "stage_peak_memory_gib"], "parallel": result.parallel}


def measure(engine: Engine, case: dict) -> dict:
    mx.reset_peak_memory()
    start = time.perf_counter()
    result = whole_video(engine, case) if case["whole"] else per_step(engine, case)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def gather_json(group, value) -> list:
    """Every process's `value` (JSON), on every process."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = group.all_gather(mx.array([len(data)], mx.int32))
    longest = int(mx.max(lengths).item())
    everyone = np.array(group.all_gather(mx.array(np.pad(data, (0, longest - len(data)))))).reshape(group.size, -1)
    return [json.loads(bytes(row[:length])) for row, length in zip(everyone, np.array(lengths))]


def peak_gib(result: dict | None = None) -> float:
    """This process's MLX peak since the case began: the engine restarts MLX's count at each stage of a whole
    video, so that one's stage peaks (`result`, rank 0's sidecar) count too."""
    stages = (result or {}).get("rank0_stage_peak_gib", {}).values()
    return round(max([mx.get_peak_memory() / 2**30, *stages]), 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/<date>-distributed-<n>.json)")
    parser.add_argument("--snapshot", default="/tmp/wan-bench-snapshot", help="where to build the random snapshot")
    args = parser.parse_args()

    group = join_group()
    if group is None:
        sys.exit("run it under mlx.launch with 2 processes (see the top of this file)")
    sizes, root = (TINY if args.tiny else FULL), Path(args.snapshot)
    dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    if group.is_owner and not (root / "model_index.json").exists():
        import torch

        build_snapshot(root, sizes, "cuda" if torch.cuda.is_available() else "cpu")
    group.wait_for_all()
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-distributed-{group.rank}-"))
    prompts = PromptEmbeddingCache(out_dir / "prompts")
    all_cases = cases(sizes, args.tiny)

    log(f"process {group.rank}: one GPU, alone")
    alone = Engine(root, dtype=dtype, output_dir=out_dir / "alone", prompt_cache=prompts)
    results = {}
    for case in all_cases:
        if case["alone_on"] == group.rank:
            result = measure(alone, case)
            results[case["name"]] = {**result, "peak_gib": peak_gib(result)}
            log(f"process {group.rank}: {case['name']} alone: {json.dumps(results[case['name']])}")
    alone.release()
    del alone
    mx.clear_cache()
    one_gpu = {name: result for everyone in gather_json(group, results) for name, result in everyone.items()}

    log(f"process {group.rank}: two GPUs")
    two_gpus = {}
    shared, follower = None, Follower(group)
    if group.is_owner:
        shared = Engine(root, dtype=dtype, output_dir=out_dir / "shared", prompt_cache=prompts, group=group)
        group.wait_for_all()  # the others open theirs in their first `Follower.serve`
    out = Path(args.out or Path(__file__).parent / "results" / f"{date.today().isoformat()}-distributed-{group.size}.json")
    for case in all_cases:
        mx.reset_peak_memory()
        if group.is_owner:
            result = measure(shared, case)
            group.release_followers()
        else:
            follower.serve(str(root), "normal", dtype)
        peaks = gather_json(group, peak_gib(result if group.is_owner else None))
        if group.is_owner:
            two_gpus[case["name"]] = {**result, "peak_gib_per_process": peaks}
            log(f"{case['name']} on two: {json.dumps(two_gpus[case['name']])}")
            write_report(out, group.size, args.tiny, dtype, [c for c in all_cases if c["name"] in two_gpus], one_gpu,
                         two_gpus)


def write_report(out: Path, processes: int, tiny: bool, dtype: str, done: list, one_gpu: dict, two_gpus: dict) -> None:
    """The cases measured so far on two GPUs, against one, with the speed-ups and the goals."""
    report = {"date": date.today().isoformat(), "mlx": mx.__version__, "dtype": dtype,
              "device": str(mx.default_device()), "processes": processes, "tiny": tiny, "cases": []}
    for case in done:
        one, two = one_gpu[case["name"]], two_gpus[case["name"]]
        entry = {**{k: case[k] for k in ("name", "width", "height", "frames", "steps", "guidance")},
                 "one_gpu": one, "two_gpus": two, "speedup_per_step": round(one["s_per_step"] / two["s_per_step"], 3)}
        if case["whole"]:
            entry["speedup_total"] = round(one["total_s"] / two["total_s"], 3)
        entry["goals"] = {measure_name: {"asked": goal, "reached": entry[f"speedup_{measure_name}"] >= goal}
                          for (name, measure_name), goal in GOALS.items() if name == case["name"]}
        report["cases"].append(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    last = report["cases"][-1]
    log(f"{last['name']}: x{last['speedup_per_step']} per step"
        + (f", x{last['speedup_total']} end to end" if "speedup_total" in last else "") + f" (written to {out})")


if __name__ == "__main__":
    main()
