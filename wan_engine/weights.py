"""Every checkpoint-key mapping and all weight loading, in one place.

Our MLX modules use the Diffusers / transformers parameter names, so a Diffusers checkpoint needs only layout
changes: convolution weights go from PyTorch's channels-first (O, I, kT, kH, kW) to MLX's channels-last
(O, kT, kH, kW, I).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def to_mlx_layout(key: str, value: mx.array) -> mx.array:
    """PyTorch conv kernels (4-D or 5-D `*.weight`) -> MLX channels-last; everything else unchanged."""
    if key.endswith(".weight") and value.ndim == 5:
        return value.transpose(0, 2, 3, 4, 1)
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(0, 2, 3, 1)
    return value


def sanitize_diffusers(weights: dict) -> dict:
    """Diffusers / transformers keys -> our module's keys (same names, MLX layouts)."""
    # transformers ties `encoder.embed_tokens` to `shared`; our encoder reads `shared` only.
    return {k: to_mlx_layout(k, v) for k, v in weights.items() if k != "encoder.embed_tokens.weight"}


def load_into(module: nn.Module, weights: dict, dtype=mx.float32) -> nn.Module:
    """Load `weights` (name -> mx.array or numpy array, Diffusers names) into `module`, cast to `dtype`.

    Strict: a missing or unexpected key, or a shape mismatch, is an error naming the key.
    """
    weights = sanitize_diffusers({k: mx.array(v) if not isinstance(v, mx.array) else v for k, v in weights.items()})
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"weight {k} has shape {v.shape}, the model expects {expected[k].shape}")
    module.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    return module
