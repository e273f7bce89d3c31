"""What a video waits for after its last decoded frame: the MP4's tail (x264 finishing the frames it holds, the
container written, its structure checked, the file on disk), with x264's threading as the engine sets it and other
ways, fed at the decoder's pace. It runs on the CPU alone: run it on the machine whose figures you want (the GPU
machine's cores encode there).

    python3 bench/bench_mp4.py                          # 121 frames of 1280x704, 4 frames every 0.13 s
    python3 bench/bench_mp4.py --frames 17 --repeats 3 --out /tmp/mp4.json

Each variant is an x264 parameter string beside the engine's `X264_LATENCY`, with a preset, at a pace; the frames
are a smooth moving picture with a little noise (what a decoded video compresses like, roughly), the same for every
variant. Reported per variant: the median (min, max) of the tail, the time feeding the frames took (at the pace,
unless the encoder falls behind), the two together, and the file's size. A draft's frames come at the tiny
decoder's pace, nearly at once, so for the `draft` variants feed and tail together are its wait.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan_engine.outputs import video  # noqa: E402

FRAME_THREADS = "rc-lookahead=4:sync-lookahead=0"  # the engine's setting before sliced threads: a frame per thread
DRAFT_PACE_S = 0.0035  # the tiny decoder's 4 frames at 1280x704 (0.108 s for 121 frames on an H100)
# name: (x264 parameters, preset, seconds between chunks; None: --pace, the full decoder's)
VARIANTS = {
    "engine": (video.X264_LATENCY, video.X264_PRESET, None),  # each frame split across the threads
    "frame_threads": (FRAME_THREADS, video.X264_PRESET, None),
    "eight_frame_threads": (FRAME_THREADS + ":threads=8", video.X264_PRESET, None),  # fewer frames in flight
    # a draft: the frames come at the tiny decoder's pace, so encoding them all is the wait
    "draft": (video.X264_LATENCY, video.X264_DRAFT_PRESET, DRAFT_PACE_S),
    "draft_with_the_videos_preset": (video.X264_LATENCY, video.X264_PRESET, DRAFT_PACE_S),
}


def moving_picture(frames: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        picture = [np.sin((x + 3 * t) / 61) * np.cos(y / 47), np.sin((x + y - 2 * t) / 83), np.cos((y + t) / 37)]
        noise = rng.normal(0, 0.02, (height, width, 3))
        video[t] = np.clip((np.stack(picture, -1) * 0.45 + 0.5 + noise) * 255, 0, 255)
    return video


def tail(frames: np.ndarray, chunk: int, pace_s: float, params: str, preset: str, folder: Path) -> dict:
    """Feed `frames` `chunk` at a time every `pace_s`, then close and land: the seconds after the last chunk."""
    video.X264_LATENCY = params
    output = video.VideoOutput(folder / "v.mp4", frames.shape[2], frames.shape[1], 24, x264_preset=preset)
    start = time.perf_counter()
    for i in range(0, len(frames), chunk):
        output.add(frames[i : i + chunk])
        time.sleep(max(0.0, start + pace_s * (i // chunk + 1) - time.perf_counter()))
    fed = time.perf_counter()
    output.close()
    closed = time.perf_counter()
    path, _ = output.land(None)
    landed = time.perf_counter()
    size = os.path.getsize(path)
    path.unlink()
    return {"tail_s": landed - fed, "close_s": closed - fed, "feed_s": fed - start, "bytes": size}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=121)
    parser.add_argument("--size", default="1280x704")
    parser.add_argument("--chunk", type=int, default=4, help="frames per decoded chunk")
    parser.add_argument("--pace", type=float, default=0.13, help="seconds between chunks (the decoder's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    frames = moving_picture(args.frames, width, height)
    report = {"cpus": os.cpu_count(), "frames": args.frames, "size": args.size, "chunk": args.chunk,
              "pace_s": args.pace, "repeats": args.repeats, "variants": {}}
    with tempfile.TemporaryDirectory() as folder:
        runs = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):  # variants alternate, so a slow moment of the machine hits all alike
            for name, (params, preset, pace) in VARIANTS.items():
                runs[name].append(tail(frames, args.chunk, args.pace if pace is None else pace, params, preset,
                                       Path(folder)))
    for name, results in runs.items():
        tails = [r["tail_s"] for r in results]
        report["variants"][name] = {
            "x264_params": VARIANTS[name][0], "preset": VARIANTS[name][1],
            "tail_median_s": round(statistics.median(tails), 4),
            "tail_min_s": round(min(tails), 4), "tail_max_s": round(max(tails), 4),
            "close_median_s": round(statistics.median(r["close_s"] for r in results), 4),
            "feed_median_s": round(statistics.median(r["feed_s"] for r in results), 3),
            "feed_and_tail_median_s": round(statistics.median(r["feed_s"] + r["tail_s"] for r in results), 3),
            "megabytes": round(results[0]["bytes"] / 1e6, 2)}
        print(name, json.dumps(report["variants"][name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
