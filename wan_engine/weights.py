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


def load_into(module: nn.Module, weights: dict, dtype=mx.float32, keep_fp32: tuple = (), progress=None):
    """Load `weights` (Diffusers names -> mx or numpy arrays) into `module`, cast to `dtype`; parameters whose
    names contain one of `keep_fp32` stay float32. The dict is consumed tensor by tensor, so each source tensor
    is freed as soon as its cast copy exists. `progress(done, total)` is called after each tensor.

    Strict: a missing or unexpected key, or a shape mismatch, is an error naming the key.
    """
    expected = dict(tree_flatten(module.parameters()))
    # transformers ties `encoder.embed_tokens` to `shared` (checkpoints may hold both); our encoder reads `shared`.
    names = {k: k for k in weights if k != "encoder.embed_tokens.weight"}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    loaded = []
    for i, key in enumerate(names):
        value = weights.pop(key)
        value = to_mlx_layout(key, value if isinstance(value, mx.array) else mx.array(value))
        if value.shape != expected[key].shape:
            raise ValueError(f"weight {key} has shape {value.shape}, the model expects {expected[key].shape}")
        value = value.astype(mx.float32 if any(p in key for p in keep_fp32) else dtype)
        mx.eval(value)
        loaded.append((key, value))
        if progress:
            progress(i + 1, len(names))
    weights.clear()
    module.load_weights(loaded)
    return module
