"""Benchmark: the prompt writer's time to a written prompt and its memory, at the default model's size.

    python3 bench/bench_prompt_writer.py                 # on the GPU machine: bench/results/<date>-<gpu>-writer.json
    python3 bench/bench_prompt_writer.py --tiny --out /tmp/w.json   # the same code on a CPU, a tiny model

The GPU machine reaches no model hub, so the default model (Qwen2.5-3B-Instruct in 4 bits) is built with random
weights from its published config and quantized as mlx-community's conversion is (4 bits, group 64); the prompt is
Wan's English text-to-video system prompt and a short user prompt, tokenized at its length (about one token per 4
characters). Measured, `--repeats` times: the system prompt's prefill and the 512 new tokens Wan's extender allows
(a random model never stops early: the longest writing), greedy, with MLX's peak.
"""

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.qwen2 import Model, ModelArgs  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from wan_engine.prompting.writer import MAX_NEW_TOKENS, system_prompt  # noqa: E402

QWEN25_3B = dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, intermediate_size=11008,
                 num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=151936,
                 rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768)
TINY = dict(QWEN25_3B, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = TINY if args.tiny else QWEN25_3B
    model = Model(ModelArgs.from_dict(config))
    # bfloat16 around the 4-bit weights, as mlx-community's conversion stores them (the GPU run of 2026-12-05 was in
    # float32: an upper bound); the CPU check stays in float32
    if not args.tiny:
        model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    weights_gib = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters())) / 2**30
    prompt_tokens = len(system_prompt(False, "en")) // 4 + 20
    prompt = mx.random.randint(0, config["vocab_size"], (prompt_tokens,))
    times, prefill = [], []
    mx.reset_peak_memory()
    for _ in range(args.repeats + 1):  # the first: warm-up
        start = time.perf_counter()
        for n, (token, _) in enumerate(generate_step(prompt, model, max_tokens=MAX_NEW_TOKENS,
                                                     sampler=make_sampler(temp=0.0))):
            if n == 0:
                prefill.append(time.perf_counter() - start)  # the system prompt read, the first token out
        times.append(time.perf_counter() - start)
    times, prefill = times[1:], prefill[1:]
    device = str(mx.default_device())
    report = {"date": date.today().isoformat(), "mlx": mx.__version__, "device": device, "tiny": args.tiny,
              "model": "Qwen2.5-3B-Instruct at 4 bits, random weights", "weights_gib": round(weights_gib, 3),
              "prompt_tokens": prompt_tokens, "new_tokens": MAX_NEW_TOKENS,
              "written_s": {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                            "max": round(max(times), 3)},
              "prefill_s_median": round(statistics.median(prefill), 3),
              "peak_memory_gib": round(mx.get_peak_memory() / 2**30, 3)}
    out = Path(args.out or Path(__file__).parent / "results" / f"{report['date']}-writer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
