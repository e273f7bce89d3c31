"""Benchmark: the exchange sequence-parallel attention needs, keys and values gathered against heads exchanged
(Ulysses), at TI2V-5B's real sizes (issue #12: which is faster at 17 and 121 frames, and why).

    mlx.launch -n 2 --backend ring -- python3 bench/bench_sequence_exchange.py --out /tmp/x.json   # as Macs talk
    mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 -- python3 bench/bench_sequence_exchange.py --out x.json

In every block each process holds its share of the video's tokens (T/n of T tokens, width 3072 = 24 heads x 128, in
bf16) and needs exact attention over all of them. The attention's arithmetic is the same whichever way (each process
does 1/n of it), so only the exchange differs; this times one transformer pass of it (30 blocks):
  kv-gather        wan_engine/parallel/share.py's way: an all_gather of keys and values; each process then attends its
                   own queries over all keys.
  ulysses-gather   a head exchange from the collectives every backend has: queries, keys and values gathered whole,
                   each process keeps its heads, attends them over all tokens, and the outputs are gathered back.
  ulysses-a2a      a true all-to-all from send / recv (ring and JACCL; MLX's NCCL has neither): each process sends
                   the other the other's heads of its tokens, and the outputs come back the same way. Two processes.
The bytes each process receives per pass: kv-gather 2 T (n-1)/n x 3072 x 2; ulysses-gather twice that; ulysses-a2a
4 T (n-1)/n^2 x 3072 x 2 (the same as kv-gather at n = 2, half at 4).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

WIDTH, HEADS, BLOCKS = 3072, 24, 30
FRAMES = {"17f": 17, "121f": 121}


def tokens(frames: int) -> int:
    """Tokens of a 1280x704 video: latent frames x (704 / 32) x (1280 / 32) (VAE 16x, patch 2x2)."""
    return ((frames - 1) // 4 + 1) * (704 // 32) * (1280 // 32)


def kv_gather(q, k, v, group):
    return [mx.distributed.all_gather(k, group=group), mx.distributed.all_gather(v, group=group)]


def ulysses_gather(q, k, v, group):
    n, rank = group.size(), group.rank()
    heads = slice(rank * WIDTH // n, (rank + 1) * WIDTH // n)
    mine = [mx.distributed.all_gather(x, group=group)[:, heads] for x in (q, k, v)]
    out = mine[0]  # stands in for the attention output of this process's heads over all tokens
    back = mx.distributed.all_gather(out, group=group)  # every process's heads for all tokens
    rows = q.shape[0]
    return mine + [back.reshape(n, n * rows, -1)[:, rank * rows:(rank + 1) * rows]]


def ulysses_a2a(q, k, v, group):
    """Two processes: the lower rank sends first, so two blocking sends never wait on each other."""
    other = 1 - group.rank()
    half = WIDTH // 2
    keep, give = (slice(0, half), slice(half, WIDTH)) if group.rank() == 0 else (slice(half, WIDTH), slice(0, half))

    def swap(x):
        send = lambda: mx.eval(mx.distributed.send(x, other, group=group))  # noqa: E731
        recv = lambda: mx.distributed.recv(x.shape, x.dtype, other, group=group)  # noqa: E731
        if group.rank() == 0:
            send()
            got = recv()
        else:
            got = recv()
            mx.eval(got)
            send()
        mx.eval(got)
        return got

    mine = [swap(mx.contiguous(x[:, give])) for x in (q, k, v)]  # the other's heads of my tokens, out; mine in
    out = mx.contiguous(q[:, keep])  # stands in for my heads' output for the other's tokens
    return mine + [swap(out)]


WAYS = {"kv-gather": kv_gather, "ulysses-gather": ulysses_gather, "ulysses-a2a": ulysses_a2a}


def received_bytes(way: str, total_tokens: int, n: int) -> int:
    per_row = WIDTH * 2
    rows = total_tokens * (n - 1) // n
    return BLOCKS * per_row * {"kv-gather": 2 * rows, "ulysses-gather": 4 * rows, "ulysses-a2a": 4 * rows // n}[way]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", type=int, default=BLOCKS, help="blocks timed (the per-pass figures scale to 30)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    group = mx.distributed.init(strict=True)
    n = group.size()
    report = {"processes": n, "device": str(mx.default_device()), "mlx": mx.__version__, "cases": {}}
    for name, frames in FRAMES.items():
        total = tokens(frames)
        rows = total // n  # the engine pads an uneven split; these sizes divide evenly at 2 and 4
        q, k, v = (mx.random.normal((rows, WIDTH)).astype(mx.bfloat16) for _ in range(3))
        mx.eval(q, k, v)
        report["cases"][name] = {"tokens": total}
        for way, exchange in WAYS.items():
            if way == "ulysses-a2a" and n != 2:
                continue
            mx.eval(exchange(q, k, v, group))  # connections and buffers, untimed
            times = []
            for _ in range(args.repeats):
                mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))  # start together
                start = time.perf_counter()
                for _ in range(args.blocks):
                    mx.eval(exchange(q, k, v, group))
                times.append((time.perf_counter() - start) * BLOCKS / args.blocks)
            seconds = min(times)
            got = received_bytes(way, total, n)
            report["cases"][name][way] = {"s_per_pass": round(seconds, 4), "received_gb_per_pass": round(got / 1e9, 3),
                                          "gb_per_s": round(got / 1e9 / seconds, 2)}
            if group.rank() == 0:
                print(name, way, json.dumps(report["cases"][name][way]), flush=True)
    if group.rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
