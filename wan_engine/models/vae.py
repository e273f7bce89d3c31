"""The Wan VAE (diffusers' `AutoencoderKLWan`) in MLX: video <-> latents, channels-last.

Wan2.2 TI2V-5B's VAE (`is_residual=True`, `patch_size=2`) compresses 4x in time and 16x in space into 48 channels:
a video (B, 4n+1, H, W, 3) encodes to latents (B, n+1, H/16, W/16, 48). The Wan2.1 layout (no patching, plain
up/down blocks) is built too.

Both directions are causal in time and run chunk by chunk as diffusers' `_encode` / `_decode` do: the encoder takes
the first frame, then 4 frames at a time (one latent frame each); the decoder takes one latent frame at a time (the
first decodes to 1 frame, the others to 4). A `FeatureCache` carries the last frames of every causal conv's input
from one chunk to the next; it lives for one call, and each chunk is evaluated before the next so memory does not
grow with the video's length. To bound memory further, the decoder's upsampling layers can decode the video in
vertical strips, one after another, with the same numbers (`WanVAE.decode_chunks`).
"""

from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from .config import VAEConfig
from .vae_layers import (
    FeatureCache,
    WanCausalConv3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanResidualDownBlock,
    WanResidualUpBlock,
    WanRMS_norm,
    WanUpBlock,
    silu,
)


# The decoder leaves results under this size lazy instead of evaluating each on its own (FeatureCache.settle).
MIN_SETTLE_BYTES = 64 * 2**20


class WanEncoder3d(nn.Module):
    def __init__(self, in_channels, dim, z_dim, dim_mult, num_res_blocks, temperal_downsample, is_residual):
        super().__init__()
        dims = [dim * u for u in [1] + dim_mult]
        self.conv_in = WanCausalConv3d(in_channels, dims[0], 3, padding=1)

        self.down_blocks = []
        last = len(dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if is_residual:
                temporal = temperal_downsample[i] if i != last else False
                self.down_blocks.append(WanResidualDownBlock(in_dim, out_dim, num_res_blocks, temporal, i != last))
            else:  # Wan2.1: a flat list of residual blocks and resamplers
                for j in range(num_res_blocks):
                    self.down_blocks.append(WanResidualBlock(in_dim if j == 0 else out_dim, out_dim))
                if i != last:
                    mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                    self.down_blocks.append(WanResample(out_dim, mode))

        self.mid_block = WanMidBlock(dims[-1])
        self.norm_out = WanRMS_norm(dims[-1], images=False)
        self.conv_out = WanCausalConv3d(dims[-1], z_dim, 3, padding=1)

    def __call__(self, x: mx.array, cache: FeatureCache) -> mx.array:
        x = self.conv_in.cached(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out.cached(silu(self.norm_out(x)), cache)


class WanDecoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, out_channels, is_residual):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        self.conv_in = WanCausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = WanMidBlock(dims[0])

        self.up_blocks = []
        last = len(dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up_flag = i != last
            temporal = temperal_upsample[i] if up_flag else False
            if is_residual:
                self.up_blocks.append(WanResidualUpBlock(in_dim, out_dim, num_res_blocks, temporal, up_flag))
            else:  # Wan2.1: the previous stage's upsampler halved the channels
                mode = ("upsample3d" if temporal else "upsample2d") if up_flag else None
                self.up_blocks.append(WanUpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, num_res_blocks, mode))

        self.norm_out = WanRMS_norm(dims[-1], images=False)
        self.conv_out = WanCausalConv3d(dims[-1], out_channels, 3, padding=1)
        # The frame-by-frame decode's stages (as up block indices): a new one begins after each temporal upsampling.
        bounds = [0] + [i + 1 for i in range(last) if temperal_upsample[i]] + [len(self.up_blocks)]
        self.stages = [range(start, end) for start, end in zip(bounds[:-1], bounds[1:])]
        # The strip decode (WanVAE.decode_chunks): the up blocks and the head upsample `scale` times in space and
        # see `strip_margin` latent pixels beyond each edge of what they decode.
        self.scale = 2**last
        self.strip_margin = self.conv_out.spatial_padding[1]
        for block in reversed(self.up_blocks):
            self.strip_margin = block.input_margin(self.strip_margin)

    def mid(self, x: mx.array, cache: FeatureCache) -> mx.array:
        """The input conv and the mid block, on one chunk (one latent frame) of whole frames: the mid block's
        attention sees all of a frame."""
        return self.mid_block(self.conv_in.cached(x, cache), cache)

    def __call__(self, x: mx.array, caches: list, first_chunk: bool) -> mx.array:
        """The up blocks and the head on one chunk of `mid`'s output, or a strip of it. `caches`: one FeatureCache,
        and the chunk's frames go through the layers together; or one per stage (`self.stages`), and after each
        temporal upsampling the next stage takes the frames one at a time, with its own cache cursor. The layers
        are causal in time and see the same frames in the same order, so the numbers are the same, with one frame
        of the highest resolutions alive at once."""
        return self._stage(x, self.stages if len(caches) > 1 else [range(len(self.up_blocks))], caches, first_chunk)

    def _stage(self, x: mx.array, stages: list, caches: list, first_chunk: bool) -> mx.array:
        cache = caches[0]
        for i in stages[0]:
            x = self.up_blocks[i](x, cache, first_chunk)
        if len(stages) == 1:
            return cache.settle(self.conv_out.cached(silu(self.norm_out(x)), cache))
        # Each frame copied out on its own (a slice would share x's buffer), so a frame is freed once decoded.
        pending = cache.settle([mx.take(x, mx.array([t]), axis=1) for t in range(x.shape[1])])
        del x
        decoded = []
        while pending:
            caches[1].next_chunk()
            decoded.append(self._stage(pending.pop(0), stages[1:], caches[1:], first_chunk))
        return mx.concatenate(decoded, axis=1)


def patchify(x: mx.array, p: int) -> mx.array:
    """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p); folded channel order (c, w-offset, h-offset) as in diffusers."""
    B, T, H, W, C = x.shape
    if H % p or W % p:
        raise ValueError(f"height {H} and width {W} must be divisible by the patch size {p}")
    x = x.reshape(B, T, H // p, p, W // p, p, C).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(B, T, H // p, W // p, C * p * p)


def unpatchify(x: mx.array, p: int) -> mx.array:
    """Inverse of `patchify`: (B, T, h, w, C*p*p) -> (B, T, h*p, w*p, C)."""
    B, T, h, w, Cpp = x.shape
    x = x.reshape(B, T, h, w, Cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(B, T, h * p, w * p, Cpp // (p * p))


class WanVAE(nn.Module):
    """diffusers' `AutoencoderKLWan` (no tiling, no slicing): `encode` gives the posterior mean, `decode` the video."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = WanEncoder3d(c.in_channels, c.base_dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks,
                                    c.temperal_downsample, c.is_residual)
        self.quant_conv = WanCausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.post_quant_conv = WanCausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = WanDecoder3d(c.decoder_base_dim, c.z_dim, c.dim_mult, c.num_res_blocks,
                                    c.temperal_downsample[::-1], c.out_channels, c.is_residual)

    @property
    def dtype(self):
        return self.quant_conv.weight.dtype

    def encode(self, video: mx.array) -> mx.array:
        """video (B, T, H, W, 3) in [-1, 1], T = 4n+1 -> posterior mean (B, n+1, H/16, W/16, z_dim), unnormalized.

        Like diffusers, a T that is not 4n+1 drops its last (T-1) % 4 frames.
        """
        p = self.config.patch_size
        video = video.astype(self.dtype)
        cache = FeatureCache()
        means = []
        for i in range(1 + (video.shape[1] - 1) // 4):
            cache.next_chunk()
            chunk = video[:, :1] if i == 0 else video[:, 1 + 4 * (i - 1) : 1 + 4 * i]
            if p is not None and p > 1:
                chunk = patchify(chunk, p)
            # quant_conv is 1x1x1, so applying it per chunk equals diffusers applying it to the whole output.
            moments = self.quant_conv(self.encoder(chunk, cache))
            means.append(moments[..., : self.config.z_dim])  # DiagonalGaussianDistribution: (mean, logvar)
            mx.eval(means[-1], cache.arrays())
        return mx.concatenate(means, axis=1)

    def decode_chunks(self, z: mx.array, frame_by_frame: bool = False, strip_width: int | None = None,
                      share=(0, 1), queued_ahead: bool = True) -> Iterator[tuple[int, int, mx.array | None]]:
        """z (B, t, h, w, z_dim), unnormalized -> the video, one chunk per latent frame, (B, T_i, H, W, 3) in [-1, 1]
        (T_0 = 1 and T_i = 4 after it for Wan's VAEs: 1 + 4 (t - 1) frames in all). Yields (done, total, chunk)
        after each piece of work, `chunk` None until one is complete; each is evaluated (or, in a decode that keeps
        the next piece of work queued, handed to the device: the caller waiting for its frames then finds the device
        busy with the next chunk, not idle), so between items the caller may report progress or stop.

        `strip_width` (latent pixels): the up blocks and the head, which hold nearly all of the memory (their
        causal caches and activations grow with the frame's area), decode the video in vertical strips one after
        another, each through all frames with its own caches. A strip takes as many more columns of the mid block's
        output on each side with a neighbour as the layers after it see (`decoder.strip_margin`, 13 for TI2V-5B);
        the layers trim what their convs spoil there (FeatureCache.inner), and it keeps its own columns: the
        numbers are those of the whole frame. The input conv and the mid block, whose attention sees whole frames,
        run on whole frames for each strip again (at the latent resolution: cheap). `total` counts strips x latent
        frames, and chunks come while the last strip decodes.

        `frame_by_frame`: after each temporal upsampling the frames go on one at a time (WanDecoder3d), the last
        stage op by op: the same numbers with less memory.

        `share` = (index, count): the processes of a group decode one share each. The strips are laid out in a
        multiple of `count` (`strip_layout`) and this call decodes the `index`-th run of them, left to right, its
        chunks holding only those columns: the shares' chunks side by side are the whole video's. `queued_ahead`:
        see `decode_caches`."""
        decoder, p = self.decoder, self.config.patch_size
        x = self.post_quant_conv(z.astype(self.dtype))  # 1x1x1: per frame
        width = x.shape[3]
        index, count = share
        strips = strip_layout(width, strip_width, decoder.strip_margin, count)
        strips = strips[index * len(strips) // count : (index + 1) * len(strips) // count]
        stages = len(decoder.stages) if frame_by_frame else 1
        done, total = 0, len(strips) * x.shape[1]
        columns = [[] for _ in range(x.shape[1])]  # per latent frame, its strips decoded so far
        for s, (start, end, low, high) in enumerate(strips):
            inner = (low > 0, high < width)
            mid_cache, caches = decode_caches(stages, frame_by_frame, inner, len(strips) > 1, queued_ahead)
            settle = mx.async_eval if caches[0].one_ahead else mx.eval  # one_ahead: the device goes on to the next
            for i in range(x.shape[1]):
                mid_cache.next_chunk()
                caches[0].next_chunk()
                mid = decoder.mid(x[:, i : i + 1], mid_cache)
                out = decoder(mid[:, :, :, low:high], caches, first_chunk=i == 0)
                del mid
                # The strip's own columns: the convs spoiled (and the layers trimmed) `shrink` at each inner side.
                shrink = (decoder.scale * (high - low) - out.shape[3]) // max(sum(inner), 1)
                left = decoder.scale * (start - low) - shrink * inner[0]
                columns[i].append(out[:, :, :, left : left + decoder.scale * (end - start)])
                settle(columns[i][-1], mid_cache.arrays(), [cache.arrays() for cache in caches])
                done += 1
                if s < len(strips) - 1:
                    yield done, total, None
                    continue
                out = mx.concatenate(columns[i], axis=3) if len(strips) > 1 else columns[i][0]
                columns[i] = None
                if p is not None and p > 1:
                    out = unpatchify(out, p)
                out = mx.clip(out, -1.0, 1.0)
                settle(out)
                yield done, total, out

    def decode(self, z: mx.array, frame_by_frame: bool = False, strip_width: int | None = None) -> mx.array:
        """z (B, t, h, w, z_dim), unnormalized -> video (B, 1 + 4 (t - 1), 16 h, 16 w, 3) in [-1, 1]."""
        chunks = self.decode_chunks(z, frame_by_frame, strip_width)
        return mx.concatenate([chunk for _, _, chunk in chunks if chunk is not None], axis=1)


def decode_caches(stages: int, frame_by_frame: bool, inner: tuple[bool, bool], in_strips: bool,
                  queued_ahead: bool = True) -> tuple:
    """The mid block's cache and each stage's for one strip of a decode. Frame by frame, the last stage (the highest
    resolutions, the largest tensors) is evaluated op by op. A decode that saves memory (frame by frame, in strips,
    or not `queued_ahead`) waits for each piece of work; one that does not keeps the next piece queued
    (FeatureCache.settle)."""
    one_ahead = queued_ahead and not (frame_by_frame or in_strips)
    mid_cache = FeatureCache(min_settle_bytes=MIN_SETTLE_BYTES, one_ahead=one_ahead)
    caches = [FeatureCache(frame_by_frame and stage == stages - 1, inner, MIN_SETTLE_BYTES, one_ahead)
              for stage in range(stages)]
    return mid_cache, caches


def strip_layout(width: int, strip_width: int | None, margin: int, multiple: int = 1) -> list[tuple[int, int, int, int]]:
    """Vertical strips of at most `strip_width` columns, as even as can be, covering `width` latent columns:
    (start, end) of each strip's own columns and (low, high) of those it decodes, `margin` more on each side
    within the frame. `multiple`: their count is a multiple of this (the processes of a group share them)."""
    count = 1 if not strip_width else -(-width // strip_width)
    count = -(-count // multiple) * multiple
    if count > width:
        raise ValueError(f"{width} latent columns cannot make {count} strips")
    bounds = [round(i * width / count) for i in range(count + 1)]
    return [(a, b, max(a - margin, 0), min(b + margin, width)) for a, b in zip(bounds[:-1], bounds[1:])]
