"""Wan's 3-D rotary position embedding: diffusers `WanRotaryPosEmbed` and the rotation in `WanAttnProcessor`.

Each attention head's channels form interleaved pairs (x[..., 0::2], x[..., 1::2]). The first pairs rotate with the
token's frame index, the next with its row, the last with its column, each axis with its own frequency ladder.
"""

import mlx.core as mx
import numpy as np


def rope_axis_dims(head_dim: int) -> tuple:
    """Channels of a head given to the (frame, height, width) axes: height = width = 2 * (head_dim // 6)."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    if t_dim % 2:
        raise ValueError(f"attention_head_dim {head_dim} must be even for Wan's rotary embedding")
    return t_dim, h_dim, w_dim


def rope_tables(head_dim: int, grid: tuple, theta: float = 10000.0) -> tuple:
    """(cos, sin) for a (frames, height, width) token grid, each (frames * height * width, head_dim // 2) float32.

    Rows follow the patch embedding's token order (frame-major). The angles and their cos / sin are computed in
    float64 and rounded to float32, as diffusers does (except on Apple MPS, where diffusers stays in float32).
    """
    angles = []
    for axis, (n, dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        axis_angles = np.outer(np.arange(n), freqs)  # (n, dim // 2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        angles.append(np.broadcast_to(axis_angles.reshape(shape), (*grid, dim // 2)))
    angles = np.concatenate(angles, axis=-1).reshape(-1, head_dim // 2)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


@mx.compile  # fuses the elementwise ops: no float32 temporaries of the (B, heads, L, head_dim) queries / keys
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the channel pairs of x (B, heads, L, head_dim) by the (L, head_dim // 2) tables.

    The float32 tables promote the arithmetic to float32; the result is cast back to x's dtype, as diffusers does.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
