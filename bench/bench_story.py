"""Benchmark: a 3-segment 15-second 720p story with the 3-step (dmd) sampler, end to end, on one GPU.

    python3 bench/bench_story.py                        # on the GPU machine: bench/results/<date>-<gpu>-story.json
    python3 bench/bench_story.py --tiny --out /tmp/s.json   # the same code on a CPU, tiny sizes

Three 121-frame segments at 1280x704, each continuing the last from its last frame (overlap 1: 361 frames, 15 s at
24 fps), with bench_gpu.py's random snapshot and a cached prompt, `--repeats` times (median, min, max), against one
121-frame segment alone: the story's MLX peak is to equal one segment's (frames stream into the MP4; only the
overlap is kept between segments).
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

from bench_gpu import NEGATIVE, log, setup, spread  # noqa: E402
from wan_engine import Engine, GenerationRequest  # noqa: E402
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache  # noqa: E402

FULL = dict(width=1280, height=704, frames=121)
TINY = dict(width=128, height=64, frames=17)
STORY = ["A kite rises over a green hill", "The kite loops through the clouds", "The kite lands in the grass"]


def measure(engine: Engine, case: dict, repeats: int, prompts: list) -> dict:
    request = GenerationRequest(prompt=prompts[0], continuations=prompts[1:], negative_prompt=NEGATIVE, sampler="dmd",
                                seed=0, **case)
    *_, result = engine.generate(request)  # warm-up, the prompts cached
    totals = []
    for _ in range(repeats):
        *_, result = engine.generate(request)
        totals.append(result.timings["total_s"])
    return {**spread(totals), "timings": result.timings, "peak_memory_gib": result.peak_memory_gib,
            "stage_peak_memory_gib": result.record.stage_peak_memory_gib, "prompt": "cached"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--snapshot", default="/tmp/wan-bench-snapshot")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, _, dtype, gpu, root = setup(args.tiny, args.snapshot)
    case = TINY if args.tiny else FULL
    work = Path(tempfile.mkdtemp(prefix="bench-story-"))
    engine = Engine(root, dtype=dtype, output_dir=work, prompt_cache=PromptEmbeddingCache(work / "prompts"))
    report = {"device": gpu, "date": date.today().isoformat(), "mlx": mx.__version__, "dtype": dtype, **case,
              "segments": len(STORY), "sampler": "dmd"}
    log("one segment")
    report["one_segment"] = measure(engine, case, args.repeats, STORY[:1])
    log("the story")
    report["story"] = measure(engine, case, args.repeats, STORY)
    report["story_peak_over_one_segment"] = round(report["story"]["peak_memory_gib"]
                                                  / report["one_segment"]["peak_memory_gib"], 3)
    out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-{gpu.replace(' ', '-')}-story.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    log(json.dumps(report))


if __name__ == "__main__":
    main()
