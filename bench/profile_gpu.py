"""Where the time and memory go, part by part, at the real TI2V-5B sizes (random weights, no snapshot needed).

    python3 bench/profile_gpu.py              # on the GPU machine (bf16): both parts
    python3 bench/profile_gpu.py --part vae   # or --part block, --part vae-ledger
    python3 bench/profile_gpu.py --tiny       # a quick run of the same code on a CPU

block: one transformer block's pieces (self-attention and its projections, cross-attention, feed-forward, norms and
modulation) timed apart, for the CFG pair at 1280x704 with 17 and 121 frames, and the q/k/v projections as three
matmuls against one of the three weights stacked.
step: the whole 30-block transformer's evaluation for the CFG pair at 1280x704x17 (the seed profile's step), as the
engine runs it (compiled blocks, one queued ahead), and with each residual step evaluated on its own (low-RAM's way);
then the engine's denoising loop itself (pipeline.generate_latents: UniPC, guidance 5, the pair as one batch) per
step, with MLX's cache of freed buffers limited as the normal preset limits it and unlimited: what a step costs
beyond the transformer's evaluation, and whether the limit costs time.
step-alone: the same evaluation and loop without the other variants, to compare MLX settings read when it starts
(MLX_MAX_OPS_PER_BUFFER, MLX_MAX_MB_PER_BUFFER: how much work goes into one CUDA graph; MLX_USE_CUDA_GRAPHS), a
process each (run_on_device.sh part h).
kernels: the elementwise work around the block's matmuls (GELU, RoPE, RMS norm) against a plain copy, and RoPE
computed three other ways (same numbers) beside the engine's, the adaLN modulation inside the layer norm kernel, and
(on CUDA) the engine's one-kernel norms (wan_engine/models/fused.py) against the MLX operations they replace.
vae: VAE decode of 17 and 121 frames at 1280x704, whole chunks and frame by frame, whole frames and in strips, and
whole chunks with each piece waited for (the engine keeps the next one queued): time and MLX peak.
vae-ledger: where the frame-by-frame decode's peak happens (not part of "all").
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from wan_engine.models import fused  # noqa: E402
from wan_engine.models.config import TransformerConfig, VAEConfig  # noqa: E402
from wan_engine.models.rope import apply_rope, rope_tables  # noqa: E402
from wan_engine.models.transformer import WanTransformer, WanTransformerBlock, gelu_tanh  # noqa: E402
from wan_engine.models.vae import WanVAE  # noqa: E402
from wan_engine.models.vae_layers import FeatureCache  # noqa: E402
from wan_engine.models.config import SchedulerConfig  # noqa: E402
from wan_engine.pipeline import generate_latents  # noqa: E402
from wan_engine.presets import load_preset  # noqa: E402
from wan_engine.sampling.samplers import UniPCSampler  # noqa: E402

GIB = 2**30


def randomize(module: nn.Module, dtype) -> None:
    """Small random weights (keeps activations finite through many layers), in `dtype`."""
    key = iter(mx.random.split(mx.random.key(0), 4096))
    module.update(tree_map(lambda p: (mx.random.normal(p.shape, key=next(key)) * 0.02).astype(dtype),
                           module.parameters()))
    mx.eval(module.parameters())


def timed(fn, repeats=5) -> float:
    """Median seconds of fn() after two warm-up calls (compilation, allocator)."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2] * 1000, 3)


def peak_over_live(fn) -> float:
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    fn()
    mx.synchronize()
    return round((mx.get_peak_memory() - base) / GIB, 3)


def block_memory(block, x, tproj, kv, rope) -> dict:
    """Activation memory of one block for one sample (as the low-RAM preset runs it): the whole block as one graph,
    against its three residual steps evaluated one at a time."""
    steps = [mx.compile(step) for step in block.steps()]

    def stepwise():
        y = x
        for step in steps:
            y = step(y, tproj, kv, rope)
            mx.eval(y)

    whole = mx.compile(block)
    for _ in range(2):  # warm-up
        mx.eval(whole(x, tproj, kv, rope))
        stepwise()
    return {"batch1_whole_block_peak_gib": peak_over_live(lambda: mx.eval(whole(x, tproj, kv, rope))),
            "batch1_stepwise_peak_gib": peak_over_live(stepwise)}


def profile_block(dim, heads, ffn, grids, dtype) -> dict:
    block = WanTransformerBlock(dim, ffn, heads, cross_attn_norm=True, eps=1e-6)
    randomize(block, dtype)
    compiled = mx.compile(block)
    report = {}
    for name, grid in grids.items():
        tokens = grid[0] * grid[1] * grid[2]
        x = mx.random.normal((2, grid[0], tokens // grid[0], dim)).astype(dtype)
        tproj = mx.random.normal((2, grid[0], 6, dim)).astype(dtype)
        modulation = block.modulation(tproj, 0)  # (shift, scale, gate) of self-attention
        text = mx.random.normal((2, 512, dim)).astype(dtype)
        kv = block.attn2.key_value(text)
        rope = rope_tables(dim // heads, grid)
        flat = x.reshape(2, tokens, dim)
        q = block.attn1._heads(flat).transpose(0, 2, 1, 3)
        hidden = mx.random.normal((2, tokens, ffn)).astype(dtype)
        attn = block.attn1
        qkv_weight = mx.concatenate([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        mx.eval(x, tproj, modulation, kv, rope, q, hidden, qkv_weight)
        row = {
            "block_compiled_ms": timed(lambda: compiled(x, tproj, kv, rope)),
            "block_eager_ms": timed(lambda: block(x, tproj, kv, rope)),
            "self_attention_ms": timed(lambda: block.attn1(flat, rope=rope)),
            "sdpa_self_ms": timed(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.088)),
            "qkv_out_linears_ms": timed(lambda: [block.attn1.to_q(flat), block.attn1.to_k(flat),
                                                 block.attn1.to_v(flat), block.attn1.to_out[0](flat)]),
            "qkv_three_matmuls_ms": timed(lambda: [flat @ attn.to_q.weight.T, flat @ attn.to_k.weight.T,
                                                   flat @ attn.to_v.weight.T]),
            "qkv_one_stacked_matmul_ms": timed(lambda: flat @ qkv_weight.T),
            "qk_norm_rope_ms": timed(lambda: [apply_rope(block.attn1._heads(block.attn1.norm_q(flat)), *rope),
                                              apply_rope(block.attn1._heads(block.attn1.norm_k(flat)), *rope)]),
            "cross_attention_ms": timed(lambda: block.attn2(flat, kv=kv)),
            "ffn_ms": timed(lambda: block.ffn(flat)),
            "ffn_gelu_only_ms": timed(lambda: gelu_tanh(hidden)),
            "layer_norm_modulate_ms": timed(lambda: fused.modulated_layer_norm(x, modulation[1], modulation[0], 1e-6)),
        }
        row["tokens"] = tokens
        row.update(block_memory(block, x[:1], tproj[:1], [a[:1] for a in kv], rope))
        report[name] = row
        print(name, json.dumps(row), flush=True)
        mx.clear_cache()
    return report


def profile_step(config: TransformerConfig, grids: dict, dtype, variants: bool = True) -> dict:
    """The whole transformer's evaluation for the CFG pair (batch of two, one timestep per latent frame, the first
    frame's at 0 as in image-to-video), as the engine runs it and (`variants`) residual step by residual step,
    without the CUDA kernels, and with MLX's cache unlimited."""
    model = WanTransformer(config)
    randomize(model, dtype)
    report = {}
    for name, (f, h, w) in grids.items():
        latents = mx.random.normal((2, f, 2 * h, 2 * w, config.in_channels)).astype(dtype)
        timestep = mx.concatenate([mx.zeros((2, 1)), mx.full((2, f - 1), 500.0)], axis=1)
        text = mx.random.normal((2, 512, config.text_dim)).astype(dtype)
        context = model.cross_attention_kv(model.embed_text(text))
        rope = model.rope(f, 2 * h, 2 * w)
        mx.eval(latents, timestep, context, rope)
        row = {}
        for lookahead in (True, False) if variants else (True,):
            model.block_lookahead = lookahead
            model.compile()
            key = "step_ms" if lookahead else "step_each_residual_step_evaluated_ms"
            row[key] = timed(lambda: model(latents, timestep, context, rope))
        if variants and mx.cuda.is_available():  # the blocks' norms as MLX operations instead of one CUDA kernel each
            fused.USE_CUDA_KERNELS = False
            model.block_lookahead = True
            model.compile()
            row["step_without_fused_kernels_ms"] = timed(lambda: model(latents, timestep, context, rope))
            fused.USE_CUDA_KERNELS = True
        row["per_block_ms"] = round(row["step_ms"] / len(model.blocks), 3)
        model.block_lookahead = True
        model.compile()
        noise = mx.random.normal((1, f, 2 * h, 2 * w, config.in_channels))
        mlx_default = mx.set_cache_limit(int(load_preset("normal").cache_limit_gib * GIB))  # returns the old limit
        row["engine_loop_step_ms_cache_limit_normal_preset"] = loop_step_ms(model, noise, text)
        mx.set_cache_limit(mlx_default)
        if variants:
            row["engine_loop_step_ms_cache_limit_mlx_default"] = loop_step_ms(model, noise, text)
        report[name] = row
        print(name, json.dumps(row), flush=True)
    return report


def loop_step_ms(model: WanTransformer, noise: mx.array, text: mx.array, steps: int = 8) -> dict:
    """The engine's denoising loop (generate_latents, UniPC with Wan's shift, guidance 5) on `noise` with the text
    states `text` (prompt, negative): each step's milliseconds, timed from one finished step to the next, the first
    (kernels for the loop's shapes) left out of the median."""
    sampler = UniPCSampler(steps, 5.0, SchedulerConfig())
    times, last = [], time.perf_counter()
    for _ in generate_latents(model, sampler, noise, text, guidance=5.0):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    measured = sorted(times[1:])
    return {"median_ms": round(measured[len(measured) // 2] * 1000, 3), "min_ms": round(measured[0] * 1000, 3),
            "max_ms": round(measured[-1] * 1000, 3), "first_ms": round(times[0] * 1000, 3)}


def profile_kernels(dim, heads, ffn, grids, dtype) -> dict:
    """The elementwise work around the block's matmuls against a plain copy of the same tensor (memory-bound)."""
    report = {}
    for name, grid in grids.items():
        tokens = grid[0] * grid[1] * grid[2]
        hidden = mx.random.normal((2, tokens, ffn)).astype(dtype)
        x = mx.random.normal((2, tokens, dim)).astype(dtype)
        rope = rope_tables(dim // heads, grid)
        weight = mx.ones((dim,), dtype)
        heads_view = x.reshape(2, tokens, heads, -1)
        mx.eval(hidden, x, rope)
        row = {
            "copy_ffn_hidden_ms": timed(lambda: hidden * 2),
            "gelu_ms": timed(lambda: gelu_tanh(hidden)),
            "copy_q_ms": timed(lambda: x * 2),
            "rms_norm_ms": timed(lambda: mx.fast.rms_norm(x, weight, 1e-6)),
            "rope_ms": timed(lambda: apply_rope(heads_view, *rope)),
        }
        row.update(rope_variants(heads_view, rope))
        row.update(modulated_norm_variants(x))
        if mx.cuda.is_available():
            row.update(fused_variants(x, heads, rope, grid[0]))
        report[name] = row
        print(name, json.dumps(row), flush=True)
        mx.clear_cache()
    return report


def rope_variants(x: mx.array, rope: tuple) -> dict:
    """Other ways to compute apply_rope(x, *rope) with the same products and sums, timed, each with its largest
    difference from apply_rope (0: the same numbers): the channel pair swap as a matmul by a signed permutation
    (exact: one nonzero term per output) instead of a reversed view's copy, and the two halves of each pair computed
    apart and interleaved again."""
    cos, sin_signed = rope
    head_dim = x.shape[-1]
    signed_swap = np.zeros((head_dim, head_dim), np.float32)  # x @ signed_swap = [-x1, x0, -x3, x2, ...]
    signed_swap[np.arange(1, head_dim, 2), np.arange(0, head_dim, 2)] = -1
    signed_swap[np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)] = 1
    signed_swap = mx.array(signed_swap).astype(x.dtype)
    cos_half, sin_half = cos[..., ::2], sin_signed[..., 1::2]  # sin_signed is [-s0, s0, -s1, s1, ...]
    sin = mx.repeat(sin_half, 2, axis=-1)
    mx.eval(signed_swap, sin, cos_half, sin_half)

    @mx.compile
    def swap_by_matmul(x):
        return (x * cos + (x @ signed_swap) * sin).astype(x.dtype)

    @mx.compile
    def pair_view(x):  # the swap as a reversed view of the pair axis, read by the kernel: no copy of x
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        out = pairs * cos.reshape(*cos.shape[:-1], -1, 2) + pairs[..., ::-1] * sin_signed.reshape(*cos.shape[:-1], -1, 2)
        return out.reshape(x.shape).astype(x.dtype)

    @mx.compile
    def pairs_apart(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = mx.stack([x1 * cos_half - x2 * sin_half, x1 * sin_half + x2 * cos_half], axis=-1)
        return out.reshape(x.shape).astype(x.dtype)

    reference = apply_rope(x, *rope)
    row = {}
    for name, fn in (("rope_swap_by_matmul", swap_by_matmul), ("rope_pairs_apart", pairs_apart),
                     ("rope_pair_view", pair_view)):
        row[f"{name}_ms"] = timed(lambda: fn(x))
        difference = mx.abs(fn(x).astype(mx.float32) - reference.astype(mx.float32)).max()
        row[f"{name}_max_difference"] = difference.item()
    return row


def fused_variants(x: mx.array, heads: int, rope: tuple, frames: int) -> dict:
    """The query's RMS norm and RoPE, and the adaLN norm (one timestep group per latent frame): wan_engine's one CUDA
    kernel each (models/fused.py) against the MLX operations they replace, timed, with the largest difference."""
    weight = (1 + 0.1 * mx.random.normal((x.shape[-1],))).astype(x.dtype)
    grouped = x.reshape(x.shape[0], frames, -1, x.shape[-1])
    scale, shift = (0.1 * mx.random.normal((*grouped.shape[:2], 1, x.shape[-1])) for _ in range(2))
    mx.eval(weight, scale, shift)
    row = {}
    for name, fn in (("rms_norm_rope", lambda: fused.rms_norm_rope(x, weight, 1e-6, rope, heads)),
                     ("modulated_layer_norm", lambda: fused.modulated_layer_norm(grouped, scale, shift, 1e-6))):
        results = {}
        for kernels in (False, True):
            fused.USE_CUDA_KERNELS = kernels
            results[kernels] = fn()
            row[f"{name}_{'one_cuda_kernel' if kernels else 'mlx_operations'}_ms"] = timed(fn)
        row[f"{name}_max_difference"] = mx.abs(results[True].astype(mx.float32) - results[False].astype(mx.float32)).max().item()
    return row


def modulated_norm_variants(x: mx.array) -> dict:
    """The block's adaLN norm, (layer_norm(x) * (1 + scale) + shift) in float32 cast back, compiled as the block
    compiles it, against the modulation handed to the layer norm kernel as its weight and bias (possible where one
    timestep holds for every token of the batch), with the largest difference between the two."""
    key = iter(mx.random.split(mx.random.key(1), 2))
    scale, shift = (mx.random.normal((x.shape[-1],), key=next(key)) * 0.1 for _ in range(2))
    mx.eval(scale, shift)

    @mx.compile
    def modulate_after(x):
        return (mx.fast.layer_norm(x.astype(mx.float32), None, None, 1e-6) * (1 + scale) + shift).astype(x.dtype)

    @mx.compile
    def modulate_in_kernel(x):
        return mx.fast.layer_norm(x.astype(mx.float32), 1 + scale, shift, 1e-6).astype(x.dtype)

    difference = mx.abs(modulate_after(x).astype(mx.float32) - modulate_in_kernel(x).astype(mx.float32)).max()
    return {"layer_norm_modulate_compiled_ms": timed(lambda: modulate_after(x)),
            "layer_norm_modulation_as_weight_ms": timed(lambda: modulate_in_kernel(x)),
            "layer_norm_modulation_as_weight_max_difference": difference.item()}


def profile_vae(config: VAEConfig, latent_shapes, dtype, modes, repeats: int = 2) -> dict:
    """Decode latents of each shape (t, h, w) in each mode (frame_by_frame, strip_width, queued: whether the
    whole-chunk decode keeps its next piece queued, as the engine does): time and MLX peak of each of `repeats`
    decodes, with each decoded chunk dropped (as the app streams it to the video writer), and the largest
    difference against the first mode (from one more run per mode that copies the chunks to the host, outside
    MLX's memory)."""
    vae = WanVAE(config)
    randomize(vae, dtype)
    report = {"weights_gib": round(sum(v.nbytes for _, v in tree_flatten(vae.parameters())) / GIB, 3)}
    for shape in latent_shapes:
        z = mx.random.normal((1, *shape, config.z_dim)).astype(dtype)
        mx.eval(z)
        first = None
        for frame_by_frame, strip_width, queued in modes:
            for _ in vae.decode_chunks(z[:, :2], frame_by_frame, strip_width, queued_ahead=queued):  # warm-up
                pass
            row = {"s": [], "peak_gib": []}
            for _ in range(repeats):
                mx.clear_cache()
                mx.reset_peak_memory()
                start = time.perf_counter()
                for _ in vae.decode_chunks(z, frame_by_frame, strip_width, queued_ahead=queued):
                    pass
                mx.synchronize()  # the last chunk is handed to the device, not waited for
                row["s"].append(round(time.perf_counter() - start, 3))
                row["peak_gib"].append(round(mx.get_peak_memory() / GIB, 3))
            chunks = vae.decode_chunks(z, frame_by_frame, strip_width, queued_ahead=queued)
            output = np.concatenate([np.array(c.astype(mx.float32)) for _, _, c in chunks if c is not None], axis=1)
            if first is None:
                first = output
            row["max_difference"] = float(np.abs(output - first).max())
            name = f"{shape} frame_by_frame={frame_by_frame} strip_width={strip_width}" + ("" if queued else " waited")
            report[name] = row
            print("vae decode", name, json.dumps(row), flush=True)
            del output
        del first
        mx.clear_cache()
    return report


def ledger_vae(config: VAEConfig, latent_shape, dtype, top: int = 12) -> dict:
    """The frame-by-frame decode's largest evaluations: MLX's peak within each FeatureCache.settle, the memory in use
    when it began, and the lines that asked for it. Nothing is synchronized for the measurement, so a GPU backend
    that returns finished work's buffers late shows as it does in the app."""
    vae = WanVAE(config)
    randomize(vae, dtype)
    z = mx.random.normal((1, *latent_shape, config.z_dim)).astype(dtype)
    mx.eval(z)
    records = []
    settle = FeatureCache.settle

    def recorded_settle(cache, x):
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = settle(cache, x)
        where = " < ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_stack(limit=6)[-2::-1])
        records.append({"peak_gib": round(mx.get_peak_memory() / GIB, 3), "before_gib": round(before / GIB, 3),
                        "where": where})
        return out

    for _ in vae.decode_chunks(z[:, :2], True):  # warm-up
        pass
    FeatureCache.settle = recorded_settle
    try:
        for _ in vae.decode_chunks(z, True):
            pass
    finally:
        FeatureCache.settle = settle
    largest = sorted(records, key=lambda r: -r["peak_gib"])[:top]
    for row in largest:
        print("vae ledger", json.dumps(row), flush=True)
    return {"latent_shape": list(latent_shape), "evaluations": len(records), "largest": largest}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["block", "step", "step-alone", "kernels", "vae", "vae-ledger", "all"],
                        default="all")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--strip-widths", nargs="*", default=["40", "27"],
                        help="VAE decode: strip widths (latent pixels) to try beside the unstriped decode, with whole chunks (and the first "
                             "frame by frame)")
    parser.add_argument("--cache-limit-gib", type=float, default=None, help="mx.set_cache_limit for the run")
    args = parser.parse_args()
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    report = {"device": str(mx.default_device()), "mlx": mx.__version__}
    if args.part in ("block", "all"):
        if args.tiny:
            report["block"] = profile_block(64, 2, 128, {"17f": (5, 4, 8), "121f": (31, 4, 8)}, dtype)
        else:
            report["block"] = profile_block(3072, 24, 14336, {"17f": (5, 22, 40), "121f": (31, 22, 40)}, dtype)
    if args.part in ("step", "step-alone", "all"):
        config = TransformerConfig.from_file(Path(__file__).resolve().parent.parent / "wan_engine/models/configs/transformer.json")
        if args.tiny:
            config.num_layers, config.num_attention_heads, config.attention_head_dim = 2, 2, 32
            config.ffn_dim, config.text_dim, config.freq_dim = 128, 64, 64
        report["step"] = profile_step(config, {"17f": (5, 4, 8) if args.tiny else (5, 22, 40)}, dtype,
                                      variants=args.part != "step-alone")
        report["mlx_environment"] = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    if args.part in ("kernels", "all"):
        if args.tiny:
            report["kernels"] = profile_kernels(64, 2, 128, {"121f": (31, 4, 8)}, dtype)
        else:
            report["kernels"] = profile_kernels(3072, 24, 14336, {"17f": (5, 22, 40), "121f": (31, 22, 40)}, dtype)
    config = VAEConfig.from_file(Path(__file__).resolve().parent.parent / "wan_engine/models/configs/vae.json")
    if args.tiny:
        config.decoder_base_dim = 16
    if args.cache_limit_gib is not None:
        mx.set_cache_limit(int(args.cache_limit_gib * GIB))
    if args.part in ("vae", "all"):
        widths = [int(w) for w in args.strip_widths]
        modes = [(False, None, True), (False, None, False), (True, None, True)]
        modes += [(False, w, True) for w in widths] + [(True, w, True) for w in widths[:1]]
        report["vae"] = profile_vae(config, [(3, 4, 8)] if args.tiny else [(5, 44, 80), (31, 44, 80)], dtype, modes)
    if args.part == "vae-ledger":
        report["vae_ledger"] = ledger_vae(config, (3, 4, 8) if args.tiny else (5, 44, 80), dtype)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
