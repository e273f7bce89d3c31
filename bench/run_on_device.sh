#!/usr/bin/env bash
# The GPU measurements of bench/README.md, in parts that each fit one device call (at most 10 minutes on one H200),
# the most wanted first. Run from the project root once MLX's CUDA build is installed (../shared/device/install.sh):
#     bash bench/run_on_device.sh a "$OUT"     # then b, c, d, e, f, on the same machine (the snapshot stays in /tmp)
#     bash bench/run_on_device.sh g "$OUT"     # issue #25's goals alone: a, then the 3-step 121-frame video
#     bash bench/run_on_device.sh h "$OUT"     # the 17-frame step under MLX's CUDA graph settings
# Each part writes its JSON results and one log into the folder given (at most 8 files: what a call brings back).
set -uo pipefail
part=$1
out=${2:?the folder for the results}
mkdir -p "$out"
export WAN_STUDIO_CACHE=/tmp/wan-studio-cache PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
exec > >(tee -a "$out/part-$part.log") 2>&1
stamp() { echo "$(date +%T) $*"; }
case $part in
  a)  # issue #25: the seed profile, new and cached prompt, against diffusers eager and compiled
    stamp "bench_gpu seed-17f"
    python3 bench/bench_gpu.py --cases seed-17f --variants ours,diffusers,diffusers_compiled --compile-vae \
      --out "$out/gpu-seed-17f.json" ;;
  g)  # issue #25's goals in one call (about 8 minutes): part a, then the 3-step 121-frame video, new and cached prompt
    bash "$0" a "$out"
    stamp "bench_fast dmd"
    python3 bench/bench_fast.py --parts dmd --out "$out/fast-dmd.json" ;;
  b)  # the 50-step video whole, Quality, three times (about 6 minutes with the warm-up)
    stamp "bench_magcache normal quality"
    python3 bench/bench_magcache.py --presets normal --skip-diffusers --modes quality \
      --out "$out/magcache-normal-quality.json" ;;
  f)  # the same with Balanced, three times; the low-RAM preset: click to first step, decode peak
    stamp "bench_magcache normal balanced"
    python3 bench/bench_magcache.py --presets normal --skip-diffusers --modes balanced \
      --out "$out/magcache-normal-balanced.json"
    stamp "bench_gpu seed-17f low-ram"
    python3 bench/bench_gpu.py --cases seed-17f --variants ours_low_ram --out "$out/gpu-seed-17f-low-ram.json" ;;
  c)  # the 3-step 121-frame video, new and cached prompt; the 121-frame step and decode; where a 17-frame step goes
    stamp "bench_fast dmd"
    python3 bench/bench_fast.py --parts dmd --out "$out/fast-dmd.json"
    stamp "bench_gpu 121f ours"
    python3 bench/bench_gpu.py --cases 121f --variants ours --out "$out/gpu-121f.json"
    stamp "profile_gpu step, block"
    python3 bench/profile_gpu.py --part step --out "$out/profile-step.json"
    python3 bench/profile_gpu.py --part block --out "$out/profile-block.json" ;;
  d)  # the prompt writer, the tiny decoder and drafts, stories
    stamp "bench_prompt_writer"
    python3 bench/bench_prompt_writer.py --out "$out/prompt-writer.json"
    stamp "bench_tiny_decoder"
    python3 bench/bench_tiny_decoder.py --out "$out/tiny-decoder.json"
    stamp "bench_story"
    python3 bench/bench_story.py --out "$out/story.json" ;;
  e)  # the one-kernel norms (tested against MLX's operations, then timed); what a 17-frame step costs beyond the
      # transformer (the loop, MLX's cache limit), RoPE / adaLN variants; the MP4's tail with x264 threaded three ways
    stamp "tests/test_fused_kernels.py (pytest from the wheels)"
    python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_fused_kernels.py
    stamp "profile_gpu step, kernels"
    python3 bench/profile_gpu.py --part step --out "$out/profile-step.json"
    python3 bench/profile_gpu.py --part kernels --out "$out/profile-kernels.json"
    stamp "bench_mp4"
    python3 bench/bench_mp4.py --out "$out/mp4.json" ;;
  h)  # the 17-frame step under MLX's CUDA graph settings, a process each (about 4 minutes): its defaults for this card
      # (H100 and H200: 100 operations or 1000 MB a graph), larger graphs, no graphs, the defaults again
    n=0
    for setting in "" "MLX_MAX_MB_PER_BUFFER=4000" "MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=16000" \
                   "MLX_MAX_OPS_PER_BUFFER=25 MLX_MAX_MB_PER_BUFFER=250" "MLX_USE_CUDA_GRAPHS=0" ""; do
      n=$((n + 1))
      stamp "profile_gpu step-alone ${setting:-(defaults)}"
      env $setting python3 bench/profile_gpu.py --part step-alone --out "$out/step-alone-$n.json"
    done ;;
  *) echo "parts: a, b, c, d, e, f, g, h"; exit 2 ;;
esac
stamp "part $part done"
