"""Every checkpoint-key mapping and all weight loading, in one place.

Our MLX modules use the Diffusers / transformers parameter names, so a Diffusers checkpoint needs only layout
changes: convolution weights go from PyTorch's channels-first (O, I, kT, kH, kW) to MLX's channels-last
(O, kT, kH, kW, I). mlx-gen packages use their own module names and are channels-last already
(`sanitize_mlxgen_transformer`, `sanitize_mlxgen_vae`). LoRA files name the transformer's layers either as we do
or as the original Wan code does (`wan_layer_name`, `musubi_layer_name`; lora.py reads the files).
"""

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .quantize import full_precision_shape, is_quantized, quantize_weight


def to_mlx_layout(key: str, value: mx.array) -> mx.array:
    """PyTorch conv kernels (4-D or 5-D `*.weight`) -> MLX channels-last; everything else unchanged."""
    if key.endswith(".weight") and value.ndim == 5:
        return value.transpose(0, 2, 3, 4, 1)
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(0, 2, 3, 1)
    return value


def to_diffusers_layout(key: str, value):
    """Inverse of `to_mlx_layout`: MLX channels-last conv kernels -> PyTorch (O, I, k...); numpy or MLX arrays."""
    if key.endswith(".weight") and value.ndim == 5:
        return value.transpose(0, 4, 1, 2, 3)
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(0, 3, 1, 2)
    return value


# mlx-gen name -> Diffusers name, applied in order (see ../shared/mlxgen-package-layout.md, section 4).
MLXGEN_TRANSFORMER_NAMES = [
    (re.compile(r"\.ffn\.net\.0\."), ".ffn.net.0.proj."),  # diffusers' GELU module holds the input projection
    (re.compile(r"\.ffn\.net\.1\."), ".ffn.net.2."),  # diffusers' net.1 is a parameterless Dropout
]
MLXGEN_VAE_NAMES = [
    (re.compile(r"\.conv3d\.(weight|bias)$"), r".\1"),  # mlx-gen wraps each causal conv's nn.Conv3d
    (re.compile(r"\.resample_conv\."), ".resample.1."),  # diffusers' nn.Sequential(upsample or pad, conv)
    (re.compile(r"(\.norm\d?|\.norm_out)\.weight$"), r"\1.gamma"),  # Wan's RMS norms call their scale gamma
]


# The original Wan code's transformer module names -> ours, as diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`
# maps them: LoRAs made with ComfyUI, Kijai's wrapper, lightx2v or musubi-tuner name layers this way. Per block:
WAN_BLOCK_LAYERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",  # Wan2.1 image-to-video only
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
# ... and outside the blocks:
WAN_TOP_LAYERS = {
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",  # Wan2.1 image-to-video only
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
# musubi-tuner (kohya) writes the same module names with "_" for ".": `blocks_0_self_attn_q`, `head_head`.
MUSUBI_BLOCK_LAYERS = {name.replace(".", "_"): name for name in WAN_BLOCK_LAYERS}
MUSUBI_TOP_LAYERS = {name.replace(".", "_"): name for name in WAN_TOP_LAYERS}

# diffusers' older LoRA layouts -> PEFT's (`convert_unet_state_dict_to_peft`, used by `load_lora_adapter`).
OLD_DIFFUSERS_LORA_NAMES = [
    (re.compile(r"\.processor\."), "."),
    (re.compile(r"\.to_(q|k|v)_lora\.down\."), r".to_\1.lora_A."),
    (re.compile(r"\.to_(q|k|v)_lora\.up\."), r".to_\1.lora_B."),
    (re.compile(r"\.to_out_lora\.down\."), ".to_out.0.lora_A."),
    (re.compile(r"\.to_out_lora\.up\."), ".to_out.0.lora_B."),
    (re.compile(r"\.lora\.down\."), ".lora_A."),
    (re.compile(r"\.lora\.up\."), ".lora_B."),
]


def wan_layer_name(module: str) -> str | None:
    """An original Wan module name (`blocks.3.self_attn.q`) -> our layer (`blocks.3.attn1.to_q`); None if unknown."""
    return look_up_module(module, ".", WAN_BLOCK_LAYERS, WAN_TOP_LAYERS)


def musubi_layer_name(module: str) -> str | None:
    """A musubi-tuner module name (`blocks_3_self_attn_q`) -> the original Wan one (`blocks.3.self_attn.q`)."""
    return look_up_module(module, "_", MUSUBI_BLOCK_LAYERS, MUSUBI_TOP_LAYERS)


def look_up_module(module: str, separator: str, block_names: dict, top_names: dict) -> str | None:
    """`blocks<sep>N<sep>name` through `block_names` (-> `blocks.N.<found>`), any other module through `top_names`."""
    block = re.fullmatch(rf"blocks{re.escape(separator)}(\d+){re.escape(separator)}(.+)", module)
    if block:
        name = block_names.get(block[2])
        return name and f"blocks.{block[1]}.{name}"
    return top_names.get(module)


def rename_key(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


def rename(weights: dict, rules: list) -> dict:
    return {rename_key(key, rules): value for key, value in weights.items()}


def sanitize_mlxgen_transformer(weights: dict) -> dict:
    """mlx-gen transformer package keys -> ours. `rope.freqs_cos/sin` are tables mlx-gen saves because they are
    module attributes; we compute them for each video (`WanTransformer.rope`)."""
    return rename({k: v for k, v in weights.items() if not k.startswith("rope.")}, MLXGEN_TRANSFORMER_NAMES)


def sanitize_mlxgen_vae(weights: dict) -> dict:
    """mlx-gen VAE package keys -> ours (shapes are already ours: channels-last convs, gamma kept (C, 1, 1[, 1]))."""
    return rename(weights, MLXGEN_VAE_NAMES)


def check_shape(key: str, value: mx.array, shape: tuple) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"weight {key} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")


# transformers ties `encoder.embed_tokens` to `shared` (checkpoints may hold both); our encoder reads `shared`.
TIED_COPIES = ("encoder.embed_tokens.weight",)


def running_dtype(key: str, dtype, keep_fp32: tuple):
    """The dtype parameter `key` runs in: float32 when its name contains one of `keep_fp32`, else `dtype`."""
    return mx.float32 if any(p in key for p in keep_fp32) else dtype


def runs_as_stored(weights: dict, dtype, keep_fp32: tuple) -> bool:
    """Whether `load_into` would keep every tensor of `weights` as it is: packed codes, or in the dtype it runs in
    and no conv kernel to lay out (its layers already quantized as stored: nothing is quantized while loading)."""
    return all(value.dtype == mx.uint32 or (value.dtype == running_dtype(key, dtype, keep_fp32)
                                             and not (key.endswith(".weight") and value.ndim in (4, 5)))
               for key, value in weights.items())


def load_into(module: nn.Module, weights: dict, dtype=mx.float32, keep_fp32: tuple = (), progress=None,
              channels_last: bool = False, partial: bool = False):
    """Load `weights` (Diffusers names -> mx or numpy arrays) into `module`, cast to `dtype`; parameters whose
    names contain one of `keep_fp32` stay float32. The dict is consumed tensor by tensor, so each source tensor
    is freed as soon as its cast copy exists. `progress(done, total)` is called after each tensor.
    `channels_last`: the conv kernels are MLX's layout already (MLX-written checkpoints), not PyTorch's.

    Quantized layers of `module` (see quantize.py) take either their stored `weight` (uint32, kept as it is),
    `scales` and `biases`, or a full-precision `weight` that is quantized here as it loads.

    Strict: a missing or unexpected key, or a shape mismatch, is an error naming the key. `partial`: `weights`
    replace some parameters of a loaded module (lora.py reloads layers so), none may be missing.
    """
    expected = dict(tree_flatten(module.parameters()))
    # Quantized layers that get a full-precision weight: their scales and biases are made here, not read.
    quantize_now = {
        path: layer for path, layer in module.named_modules()
        if is_quantized(layer) and f"{path}.weight" in weights and f"{path}.scales" not in weights
    }
    made = {f"{path}.{part}" for path in quantize_now for part in ("scales", "biases")}
    names = [k for k in weights if k not in TIED_COPIES]
    missing = [] if partial else sorted(set(expected) - set(names) - made)
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    loaded = []
    for i, key in enumerate(names):
        value = weights.pop(key)
        value = value if isinstance(value, mx.array) else mx.array(value)
        if not channels_last:
            value = to_mlx_layout(key, value)
        path = key.removesuffix(".weight")
        if path in quantize_now:
            layer = quantize_now[path]
            check_shape(key, value, full_precision_shape(layer))
            parts = list(zip((key, f"{path}.scales", f"{path}.biases"), quantize_weight(value.astype(dtype), layer)))
        elif value.dtype == mx.uint32:  # packed quantized codes: no cast
            parts = [(key, value)]
        else:
            parts = [(key, value.astype(running_dtype(key, dtype, keep_fp32)))]
        for name, value in parts:
            check_shape(name, value, expected[name].shape)
        mx.eval([value for _, value in parts])
        loaded.extend(parts)
        if progress:
            progress(i + 1, len(names))
    weights.clear()
    module.load_weights(loaded, strict=not partial)
    return module
