"""Benchmark: the first video against the later ones, each preset in fresh processes, on the upstream layout.

    python3 bench/bench_cold_start.py     # on the GPU machine: writes bench/results/<date>-<gpu>-cold-start.json
    python3 bench/bench_cold_start.py --tiny --out /tmp/c.json   # the same code on a CPU, tiny model

It builds a full-size random snapshot stored as `Wan-AI/Wan2.2-TI2V-5B-Diffusers` stores it (transformer and VAE in
float32, UMT5 in bf16, sharded; bench_gpu.build_snapshot), then for each preset runs fresh processes that import no
PyTorch, as users run the engine:
  first-ever  empty caches (no converted weights, no compiled kernels): opening the engine and the first video, with
              its stages: what the very first run on a machine costs (converting and keeping the weights included);
  fresh       the caches the first one left: the app's launch (opening the engine, the warm-up run), then the first
              video (a new prompt), a second new prompt and a cached prompt (the same prompt again), each with its
              stages, MLX peak and the process's peak RSS; and the whole process's MLX peak + max RSS. After the
              warm-up and each video, what the app does while no run waits (Engine.prepare_next: the low-RAM preset
              loads its transformer again), timed apart (the launch includes the one after the warm-up). Last,
              an image-to-video video with the cached prompt (not part of the goals, which are text to video).
Each process also reports what raised its max RSS (`ResidentSetWatch`: `resident_set_highs`, `max_rss_rises`)
and whether it imported PyTorch.
The previous preset's converted weights and kernels are removed before the next preset's first-ever process, so
each preset is measured from scratch (and the full-size snapshot, 33 GiB, and one preset's copies fit the disk).
Goals (issue #14): fresh first video <= 1.5x the new-prompt video; low-RAM later videos load in <= 2 s; whole
process <= 10 GiB low-RAM, <= 30 GiB normal.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {"full": dict(width=1280, height=704, frames=17, steps=20),
         "tiny": dict(width=128, height=64, frames=17, steps=4)}
PROMPTS = ["A corgi surfing a wave at sunset, cinematic", "A paper boat drifting down a rainy street",
           "A lighthouse in a storm, waves crashing"]
NEGATIVE = "blurry, low quality, static"
GOALS = {"first_over_new_prompt": 1.5, "low-ram_later_load_s": 2.0, "whole_process_gib": {"low-ram": 10, "normal": 30}}


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def gib(value: float) -> float:
    return round(value / 2**30, 3)


# -- one fresh process ----------------------------------------------------------------------------------------------
class ResidentSetWatch(threading.Thread):
    """What raised the process's max RSS. The thread samples the resident set (Linux /proc) every 10 ms and notes
    each new high by STEP: when, how much (anonymous and file-backed), what the run was doing (`label`) and where
    the main thread was (`marks`). A native call that holds the GIL hides from the thread, so `note` also reads the
    kernel's high-water mark at each progress event: a rise is charged to the events between which it happened
    (`rises`)."""

    STEP = 2**27

    def __init__(self):
        super().__init__(daemon=True)
        self.label, self.marks, self.rises, self.main = "import", [], [], threading.main_thread().ident
        self.high = 0.0

    def note(self, label: str) -> None:
        from wan_engine.record import process_peak_rss_gib

        high = process_peak_rss_gib()
        if high >= self.high + self.STEP / 2**30:
            self.rises.append({"max_rss_gib": high, "after": self.label, "by": label})
            self.high = high
        self.label = label

    def run(self):
        high, start = 0, time.perf_counter()
        while True:
            fields = {}
            for line in Path("/proc/self/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile"):
                    fields[name] = int(value.split()[0]) * 1024
            if fields.get("VmRSS", 0) >= high + self.STEP:
                high = fields["VmRSS"]
                frames = traceback.extract_stack(sys._current_frames()[self.main])
                ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames
                        if "wan_engine" in f.filename or "transformers" in f.filename][-3:]
                self.marks.append({"t_s": round(time.perf_counter() - start, 2), "label": self.label,
                                   **{name: gib(value) for name, value in fields.items()}, "where": ours})
            time.sleep(0.01)


def child(args) -> None:
    """One measured process (no PyTorch): `args.phase` of `args.preset`, its report as JSON to `args.out`."""
    start = time.perf_counter()
    watch = ResidentSetWatch()
    if Path("/proc/self/status").exists():
        watch.start()
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    import numpy as np
    from PIL import Image

    from wan_engine import Engine, GenerationRequest, Result, warm_up
    from wan_engine.record import process_peak_rss_gib
    from wan_engine.model_files.prompt_cache import PromptEmbeddingCache

    report = {"import_s": round(time.perf_counter() - start, 3)}
    case = CASES["tiny" if args.tiny else "full"]
    folder = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    opened = time.perf_counter()
    watch.note("open")
    engine = Engine(args.snapshot, preset=args.preset, output_dir=folder,
                    prompt_cache=PromptEmbeddingCache(folder / "prompts"))  # every prompt is new to this process
    report["open_s"] = round(time.perf_counter() - opened, 3)

    def watched(name: str, events):
        """Drain `events`, labelling the watch with each one; returns the Result (yielded last, or returned)."""
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            if isinstance(event, Result):
                return event
            watch.note(f"{name}: {event.stage} {event.message[:80]}")

    def prepare_next(name: str) -> dict:
        """What the app does when no run waits (Engine.prepare_next): its seconds and MLX peak, which no video waits
        for (a click meanwhile waits for the rest of it)."""
        mx.reset_peak_memory()
        start = time.perf_counter()
        watched(f"{name}: prepare_next", engine.prepare_next())
        return {"prepare_next_s": round(time.perf_counter() - start, 3),
                "prepare_next_peak_gib": round(mx.get_peak_memory() / 2**30, 3)}

    def video(name: str, prompt: str, image=None) -> None:
        log(f"  {args.preset} {args.phase}: {name}")
        request = GenerationRequest(prompt=prompt, negative_prompt=NEGATIVE, guidance=5.0, seed=0, image=image,
                                    **case)
        result = watched(name, engine.generate(request))
        sidecar = json.loads(result.sidecar_path.read_text())
        report[name] = {key: sidecar[key] for key in ("timings", "peak_memory_gib", "stage_peak_memory_gib",
                                                      "process_peak_rss_gib", "stage_process_peak_rss_gib")}
        report[name].update(prepare_next(name))

    if args.phase == "fresh":
        warming = time.perf_counter()
        warm_result = watched("warm-up", warm_up(engine))
        report["warm_up_s"] = round(time.perf_counter() - warming, 3)
        report["warm_up"] = {"timings": warm_result.timings, "peak_memory_gib": warm_result.peak_memory_gib,
                             **prepare_next("warm-up")}
        report["launch_s"] = round(report["import_s"] + report["open_s"] + report["warm_up_s"]
                                   + report["warm_up"]["prepare_next_s"], 3)
        video("first_video", PROMPTS[1])
        video("new_prompt", PROMPTS[2])
        video("cached_prompt", PROMPTS[2])
        picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (case["height"], case["width"], 3),
                                                                    dtype=np.uint8))
        video("image_cached_prompt", PROMPTS[2], picture)  # image to video: the first frame's VAE encode too
    else:
        video("first_video", PROMPTS[0])
    peaks = [entry[key] for entry in report.values() if isinstance(entry, dict)
             for key in ("peak_memory_gib", "prepare_next_peak_gib") if key in entry]
    report["mlx_peak_gib"] = max(peaks)
    report["process_peak_rss_gib"] = process_peak_rss_gib()
    report["whole_process_gib"] = round(report["mlx_peak_gib"] + report["process_peak_rss_gib"], 3)
    report["wall_s"] = round(time.perf_counter() - start, 3)
    report["mlx"] = mx.__version__
    watch.note("end")
    report["resident_set_highs"] = watch.marks
    report["max_rss_rises"] = watch.rises
    report["imported_torch"] = "torch" in sys.modules
    shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


def run_child(args, preset: str, phase: str, cache: Path) -> dict:
    """Run one measured process; its report, or the error that ended it."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, __file__, "--child", "--preset", preset, "--phase", phase, "--snapshot", args.snapshot,
               "--out", str(out)] + (["--tiny"] if args.tiny else [])
    env = {**os.environ, "WAN_STUDIO_CACHE": str(cache)}  # the kernels too: kernel_cache.py keeps them there
    env.pop("MLX_PTX_CACHE_DIR", None)
    proc = subprocess.run(command, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": f"the {phase} process of {preset} exited with {proc.returncode}"}
    return json.loads(out.read_text())


def folder_gib(folder: Path) -> float:
    return gib(sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())) if folder.is_dir() else 0.0


def goals(preset: str, fresh: dict) -> dict:
    """The issue's goals against the fresh process's figures."""
    if "error" in fresh:
        return {}
    first, new = fresh["first_video"]["timings"]["total_s"], fresh["new_prompt"]["timings"]["total_s"]
    later_load = max(fresh[name]["timings"].get("load_s", 0.0) for name in ("new_prompt", "cached_prompt"))
    result = {
        "first_over_new_prompt": round(first / new, 3),
        "first_over_new_prompt_ok": first / new <= GOALS["first_over_new_prompt"],
        "later_load_s": later_load,
        "whole_process_gib": fresh["whole_process_gib"],
        "whole_process_ok": fresh["whole_process_gib"] <= GOALS["whole_process_gib"].get(preset, float("inf")),
    }
    if preset == "low-ram":
        result["later_load_ok"] = later_load <= GOALS["low-ram_later_load_s"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on this machine (a test of the script)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/<date>-<gpu>-cold-start.json)")
    parser.add_argument("--snapshot", default="/tmp/wan-bench-upstream",
                        help="where to build the upstream-layout snapshot (reused when it is there)")
    parser.add_argument("--cache", default="/tmp/wan-bench-cold-cache", help="the cache root the processes use")
    parser.add_argument("--presets", default="normal,low-ram")
    parser.add_argument("--timeout", type=int, default=400, help="seconds one process may take")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu import FULL, TINY, UPSTREAM_LAYOUT, build_snapshot

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    snapshot = Path(args.snapshot)
    if not (snapshot / "model_index.json").exists():
        log(f"building the upstream-layout snapshot in {snapshot} on {device}")
        build_snapshot(snapshot, TINY if args.tiny else FULL, device, UPSTREAM_LAYOUT)
        torch.cuda.empty_cache() if device == "cuda" else None
    report = {"device": gpu, "date": date.today().isoformat(), "case": CASES["tiny" if args.tiny else "full"],
              "snapshot_gib": folder_gib(snapshot), "layout": "upstream: transformer and VAE float32, UMT5 bf16",
              "presets": {}}
    out = Path(args.out or ROOT / "bench" / "results" / f"{report['date']}-{gpu.replace(' ', '-')}-cold-start.json")
    cache = Path(args.cache)
    for preset in args.presets.split(","):
        shutil.rmtree(cache, ignore_errors=True)  # from scratch: no converted weights, no compiled kernels
        log(f"{preset}: first-ever process ({shutil.disk_usage(snapshot).free / 2**30:.0f} GiB free on disk)")
        first_ever = run_child(args, preset, "first-ever", cache)
        first_ever["converted_gib"] = folder_gib(cache / "converted")
        log(f"{preset}: fresh process")
        fresh = run_child(args, preset, "fresh", cache)
        report["presets"][preset] = {"first_ever": first_ever, "fresh": fresh, "goals": goals(preset, fresh)}
        log(json.dumps(report["presets"][preset]["goals"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        log(f"wrote {out}")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
