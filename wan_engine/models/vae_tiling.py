"""Spatially tiled VAE decoding, to bound memory at large sizes.

The latent frame is cut into overlapping tiles; each tile is decoded through the whole video on its own (so only
one tile's causal cache and activations exist at a time), and the decoded tiles are blended with linear ramps
across the overlaps, which leaves no visible seams. The blend runs in float32 numpy on the host, not in MLX memory.
"""

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size) with at least `overlap` shared."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def ramp(length: int, overlap_before: int, overlap_after: int) -> np.ndarray:
    """Blend weights along one axis: rising over the leading overlap, falling over the trailing one."""
    w = np.ones(length, np.float32)
    if overlap_before:
        w[:overlap_before] = np.arange(1, overlap_before + 1, dtype=np.float32) / (overlap_before + 1)
    if overlap_after:
        w[length - overlap_after:] = np.minimum(
            w[length - overlap_after:], np.arange(overlap_after, 0, -1, dtype=np.float32) / (overlap_after + 1)
        )
    return w


def tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple]:
    """(y0, x0, th, tw) latent tiles with the overlaps they share with their neighbours, row by row."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    return [(y, x, min(tile, height), min(tile, width)) for y in ys for x in xs]


def decode_tiled(decode_chunks, z, spatial: int, tile: int, overlap: int):
    """Decode latents z (1, t, h, w, C) tile by tile. `decode_chunks(z_tile)` yields float32 numpy frame chunks
    (T_i, H, W, 3) for a tile. Yields (i, n, None) after each tile but the last, then (n, n, video) with the
    blended float32 video (T, h*spatial, w*spatial, 3)."""
    _, _, height, width, _ = z.shape
    layout = tiles(height, width, tile, overlap)
    total = sum_weights = None
    for i, (y, x, th, tw) in enumerate(layout):
        frames = np.concatenate(list(decode_chunks(z[:, :, y:y + th, x:x + tw])))
        if total is None:
            shape = (frames.shape[0], height * spatial, width * spatial, 3)
            total, sum_weights = np.zeros(shape, np.float32), np.zeros(shape[1:3], np.float32)
        # ramps only where a neighbour overlaps (inner edges), so the borders of the frame keep full weight
        before_y = (y > 0) * min(overlap, th) * spatial
        after_y = (y + th < height) * min(overlap, th) * spatial
        before_x = (x > 0) * min(overlap, tw) * spatial
        after_x = (x + tw < width) * min(overlap, tw) * spatial
        weight = np.outer(ramp(th * spatial, before_y, after_y), ramp(tw * spatial, before_x, after_x))
        region = (slice(y * spatial, (y + th) * spatial), slice(x * spatial, (x + tw) * spatial))
        total[:, region[0], region[1]] += frames * weight[None, :, :, None]
        sum_weights[region] += weight
        del frames
        if i + 1 < len(layout):
            yield i + 1, len(layout), None
    yield len(layout), len(layout), total / sum_weights[None, :, :, None]
