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
    """Rotation tables for a (frames, height, width) token grid, each (tokens, 1, head_dim) float32, for
    `apply_rope`: cos per channel ([c0, c0, c1, c1, ...]) and sin signed for the pair swap ([-s0, s0, -s1, s1, ...]).

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
    angles = np.concatenate(angles, axis=-1).reshape(-1, 1, head_dim // 2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return mx.array(np.repeat(cos, 2, axis=-1)), mx.array(np.stack([-sin, sin], axis=-1).reshape(cos.shape[0], 1, -1))


@mx.compile  # one elementwise kernel: no float32 temporaries of the queries / keys
def apply_rope(x: mx.array, cos: mx.array, sin_signed: mx.array) -> mx.array:
    """Rotate the channel pairs (x[..., 0::2], x[..., 1::2]) of x (B, L, heads, head_dim) by the `rope_tables`.

    diffusers computes out[0::2] = x1 cos - x2 sin and out[1::2] = x1 sin + x2 cos in float32 (the tables promote
    it) and casts back to x's dtype. Here the same products and sums come from x * cos + swap_pairs(x) * sin_signed,
    where swap_pairs exchanges the two channels of each pair, in one pass over x.
    """
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    return (x * cos + swapped * sin_signed).astype(x.dtype)
