"""Which layers are quantized, in one place: the published Wan2.2 TI2V-5B q8 policy and its text-encoder option.

Quantization replaces an `nn.Linear` (or `nn.Embedding`) by MLX's `QuantizedLinear` (`QuantizedEmbedding`), whose
call runs `mx.quantized_matmul` on the packed weights, so the model code needs no change. A quantized layer holds
`weight` (uint32: 32 / bits codes per word along the input axis), `scales` and `biases` (one of each per group of
`group_size` inputs: w = scales * code + biases) and its ordinary `bias`. Affine mode, as mlx-gen writes it.

The structure is quantized on a freshly built (lazy, never evaluated) model before `weights.load_into` fills it:
from full-precision weights (`load_into` quantizes each as it loads) or from weights stored quantized.
"""

import re

import mlx.core as mx
import mlx.nn as nn

MODE = "affine"
BITS = {"q8": 8, "q4": 4}  # --quantize choices; "bf16" quantizes nothing

# The published policy (mlx-gen 0.18.11's package, `AbstractFramework/wan2.2-ti2v-5b-diffusers-8bit`): every
# attention projection of self- and cross-attention and both feed-forward linears. `condition_embedder.*`,
# `proj_out`, `patch_embedding`, the norms and the VAE stay in full precision: they are small and steer every token.
TRANSFORMER_LAYERS = re.compile(r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))")

# UMT5: every linear of the attention and gated feed-forward, and the token embedding. The relative-position bias
# tables (32 x heads) are tiny and stay in full precision.
TEXT_ENCODER_LAYERS = re.compile(
    r"shared|encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))"
)
POLICIES = {"transformer": TRANSFORMER_LAYERS, "text_encoder": TEXT_ENCODER_LAYERS}  # the VAE is never quantized


def quantization(bits: int, group_size: int = 64) -> dict:
    """The record of one part's quantization, as packages store it and as loaders take it."""
    return {"bits": bits, "group_size": group_size, "mode": MODE}


def in_features(layer: nn.Module) -> int:
    """Input width of a linear (weight: out x in) or the width of an embedding (weight: vocab x dims)."""
    return layer.weight.shape[1]


def quantize_layers(model: nn.Module, layers: re.Pattern, bits: int, group_size: int = 64) -> nn.Module:
    """Quantize the layers whose path matches `layers` in full (`re.fullmatch`). A layer whose input width is not
    a multiple of `group_size` cannot be grouped and silently stays in full precision."""

    def chosen(path: str, layer: nn.Module) -> bool:
        return (
            isinstance(layer, (nn.Linear, nn.Embedding))
            and layers.fullmatch(path) is not None
            and in_features(layer) % group_size == 0
        )

    nn.quantize(model, group_size, bits, mode=MODE, class_predicate=chosen)
    return model


def quantize_transformer(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    return quantize_layers(model, TRANSFORMER_LAYERS, bits, group_size)


def quantize_text_encoder(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    return quantize_layers(model, TEXT_ENCODER_LAYERS, bits, group_size)


def stored_quantization(weights: dict, bits: int | None) -> dict:
    """Layers that `weights` hold quantized (a `.scales` and a `.biases` beside the `.weight`), with the
    `to_quantized` arguments that rebuild them: path -> {"bits", "group_size", "mode"}.

    The group size is not stored: the packed weight is (out, in * bits / 32) and there is one scale per group,
    so group = in / scales.shape[1] (as mlx-gen itself derives it).
    """
    stored = {}
    for key in weights:
        path = key.removesuffix(".scales")
        if key == path or f"{path}.biases" not in weights:
            continue
        if bits is None:
            raise ValueError(f"{path} is stored quantized, but the files do not say with how many bits")
        in_dim = weights[f"{path}.weight"].shape[1] * 32 // bits
        stored[path] = quantization(bits, in_dim // weights[key].shape[1])
    return stored


def quantize_as_stored(model: nn.Module, stored: dict) -> nn.Module:
    """Quantize exactly the layers `stored_quantization` found, with their own bits and group size. A stored
    layer whose width differs from the model's is left alone, so loading reports the mismatch by name."""

    def chosen(path: str, layer: nn.Module):
        if path not in stored or not hasattr(layer, "to_quantized"):
            return False
        return dict(stored[path]) if in_features(layer) % stored[path]["group_size"] == 0 else False

    nn.quantize(model, class_predicate=chosen)
    return model


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def full_precision_shape(layer: nn.Module) -> tuple:
    """The (out, in) shape of the full-precision weight that a quantized layer packs."""
    out_dim, packed = layer.weight.shape
    return out_dim, packed * 32 // layer.bits


def quantize_weight(weight: mx.array, layer: nn.Module) -> tuple:
    """(weight, scales, biases) of a full-precision weight for the quantized `layer` it is loaded into."""
    return mx.quantize(weight, layer.group_size, layer.bits, mode=layer.mode)
