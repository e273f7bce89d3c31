"""Tiny random Wan2.2 TI2V snapshots in the exact Diffusers layout, and diffusers' own output on them.

`build_snapshot` saves a `WanPipeline` (UMT5 text encoder, TI2V transformer, Wan2.2 VAE, flow UniPC scheduler,
an offline tokenizer) with `save_pretrained` and a small `max_shard_size`, so loading meets sharded safetensors
with an index file, as the real `Wan-AI/Wan2.2-TI2V-5B-Diffusers` snapshot has.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from wan_engine.model_files.demo import build_tokenizer


@dataclass(frozen=True)
class TinySpec:
    heads: int = 2
    head_dim: int = 16
    layers: int = 2
    ffn_dim: int = 64
    freq_dim: int = 32
    z_dim: int = 12
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    vocab_size: int = 160
    vae_base_dim: int = 16
    vae_decoder_base_dim: int = 24
    vae_dim_mult: tuple = (1, 2, 2, 2)
    vae_res_blocks: int = 1
    flow_shift: float = 5.0
    seed: int = 0
    dtype: str = "float32"  # dtype of the saved weights (bfloat16 like the published snapshot, or float32)
    max_shard_size: str = "30KB"
    extra: dict = field(default_factory=dict)


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Default init leaves some parameters constant (norm weights of 1, zero biases): perturb those so every
    path of the model is exercised by the parity tests."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() == 1 or float(p.std()) == 0.0:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def build_pipeline(spec: TinySpec, tokenizer) -> WanPipeline:
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=spec.vocab_size, d_model=spec.text_dim, d_kv=spec.text_dim // spec.text_heads,
        d_ff=2 * spec.text_dim, num_layers=spec.text_layers, num_heads=spec.text_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=spec.z_dim, out_channels=spec.z_dim, text_dim=spec.text_dim, freq_dim=spec.freq_dim,
        ffn_dim=spec.ffn_dim, num_layers=spec.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024,
    )
    rng = np.random.default_rng(spec.seed)
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim, decoder_base_dim=spec.vae_decoder_base_dim, z_dim=spec.z_dim,
        dim_mult=list(spec.vae_dim_mult), num_res_blocks=spec.vae_res_blocks, temperal_downsample=[False, True, True],
        is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
        scale_factor_temporal=4, latents_mean=[round(float(v), 4) for v in rng.normal(0, 0.5, spec.z_dim)],
        latents_std=[round(float(v), 4) for v in rng.uniform(0.8, 2.5, spec.z_dim)],
    )
    for module in (text_encoder, transformer, vae):
        _randomize(module, generator)
        module.eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=spec.flow_shift,
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, expand_timesteps=True)


def build_snapshot(path, spec: TinySpec = TinySpec()) -> Path:
    """Save a tiny random TI2V snapshot to `path` in the Diffusers layout and return the path."""
    path = Path(path)
    tokenizer = build_tokenizer(spec.vocab_size)
    pipe = build_pipeline(spec, tokenizer)
    if spec.dtype == "bfloat16":
        pipe.to(torch.bfloat16)
    pipe.save_pretrained(path, safe_serialization=True, max_shard_size=spec.max_shard_size)
    return path


def sample_image(width: int = 120, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth synthetic picture (gradients and a disc), so resizing and encoding see real structure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.clip(x / width * 255, 0, 255)
    g = np.clip(y / height * 255, 0, 255)
    b = np.where((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.3) ** 2, 230, 40)
    return Image.fromarray(np.stack([r, g, b + seed % 20], -1).astype(np.uint8))


def reference_frames(snapshot, prompt, negative_prompt, width, height, frames, steps, guidance, latents,
                     image=None, shift=None, loras=(), cache=None, blocks_ran: list | None = None) -> np.ndarray:
    """diffusers' float32 frames (F, H, W, 3) in [0, 1] for the same snapshot and initial noise; `loras`:
    (file, strength) pairs loaded with `load_lora_weights` and weighted with `set_adapters`; `cache`: a config for
    `transformer.enable_cache` (MagCacheConfig); `blocks_ran` gets, per transformer call, whether its blocks ran."""
    pipe = WanPipeline.from_pretrained(str(snapshot), dtype=torch.float32)
    if shift is not None:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    kwargs = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, num_frames=frames,
                  num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                  output_type="np")
    if image is not None:
        pipe = WanImageToVideoPipeline(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
            transformer=pipe.transformer, expand_timesteps=True,
        )
        kwargs["image"] = image
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        # low_cpu_mem_usage=False: with it, peft leaves the lora_B biases the file lacks on the meta device (a file
        # with diff_b for some layers only fails to run); without, they are zeros
        pipe.load_lora_weights(str(path), adapter_name=name, low_cpu_mem_usage=False)
    if loras:
        pipe.set_adapters(names, adapter_weights=[strength for _, strength in loras])
    if cache is not None:
        pipe.transformer.enable_cache(cache)
    if blocks_ran is not None:  # block 0's attention runs only when the cache lets the blocks run
        pipe.transformer.register_forward_pre_hook(lambda *_: blocks_ran.append(False))
        pipe.transformer.blocks[0].attn1.register_forward_pre_hook(lambda *_: blocks_ran.__setitem__(-1, True))
    with torch.no_grad():
        return pipe(**kwargs).frames[0].astype(np.float32)


__all__ = ["TinySpec", "build_snapshot", "reference_frames", "sample_image", "replace"]
