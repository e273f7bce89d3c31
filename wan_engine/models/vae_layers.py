"""Building blocks of the Wan VAE, in MLX, mirroring diffusers' `autoencoder_kl_wan.py` layer by layer.

Everything is channels-last: videos are (B, T, H, W, C), images (N, H, W, C). Class and attribute names follow
diffusers so that the parameter names equal its `state_dict()` keys.

The VAE is causal in time and runs over a video chunk by chunk (see vae.py). What a layer needs from earlier chunks
lives in a `FeatureCache`, diffusers' `feat_cache` / `feat_idx` pair, which the caller creates for each encode or
decode call, so no state is left on the modules.
"""

import mlx.core as mx
import mlx.nn as nn

CACHE_T = 2  # frames of its input a causal conv keeps for the next chunk (the temporal kernel is 3)


@mx.compile  # one kernel; compiled per shape, as MLX's shapeless `nn.silu` runs much slower on CUDA for large tensors
def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


class FeatureCache:
    """Per-call state of the causal layers (diffusers' `feat_cache` list and `feat_idx` cursor).

    Each causal layer owns one slot. The layers visit their slots in the same order in every chunk, so a cursor that
    `next_chunk` rewinds finds them. A slot is None until its layer has seen the first chunk.

    `each_op`: evaluate after every operation (see `op`), which the frame-by-frame decode asks for at its highest
    resolutions, where the least memory matters more than a few host syncs.

    `inner`: (left, right), whether the region being decoded goes on into a neighbouring strip on that side (the
    strip decode, vae.py). There the input holds the neighbour's pixels as a margin, and each 3x3 conv, padding
    zeros where those pixels would be, spoils one more column of it: the layers `trim` them.
    """

    def __init__(self, each_op: bool = False, inner: tuple[bool, bool] = (False, False), min_settle_bytes: int = 0,
                 one_ahead: bool = False):
        self.slots = []
        self.cursor = 0
        self.settled = 0  # slots before this index are evaluated in the current chunk
        self.each_op = each_op
        self.inner = inner
        self.min_settle_bytes = min_settle_bytes
        self.one_ahead = one_ahead
        self.queued = None  # with `one_ahead`: the work handed to the device last, not waited for yet

    def next_chunk(self):
        self.cursor = self.settled = 0

    def settle(self, x):
        """Evaluate `x` (an array or a tuple of them) and the history written since the last call.

        Each cached history is a copy of a layer's input; until it is evaluated that whole input stays alive, so
        without this a chunk would hold every layer's input at once. And a GPU backend keeps every buffer of the
        work it was given until that work completes: settling after each convolution of a residual block bounds
        the decoder's memory to a few tensors (decoding 17 frames at 1280x704 on an H100: 13.6 GiB settling once
        per block, 10.8 twice, same speed).

        Each evaluation waits for the device, which then idles while the host queues the next work, so results
        under `min_settle_bytes` are left lazy, to be evaluated with a later, larger one: the decoder's layers at
        the lowest resolutions then run as one graph (vae.MIN_SETTLE_BYTES: at 1280x704 on an H100, two strips
        5-8% faster for 0.03 GiB more; 256 MiB would let the graph reach the large layers: 7.9 GiB).

        `one_ahead`: the work is handed to the device without waiting for it, and the call waits for the work of
        the call before instead, so the device has the next piece queued while the host builds the one after: no
        idle device between pieces, for one more piece's buffers held (a decode that saves memory keeps waiting)."""
        if sum(a.nbytes for a in (x if isinstance(x, (list, tuple)) else [x])) < self.min_settle_bytes:
            return x
        work = [x, *[slot for slot in self.slots[self.settled:self.cursor] if slot is not None]]
        if self.one_ahead:
            mx.async_eval(work)
            if self.queued is not None:
                mx.eval(self.queued)
            self.queued = work
        else:
            mx.eval(work)
        self.settled = self.cursor
        return x

    def op(self, x):
        """`settle(x)` with `each_op`, else `x` as it is (lazy). Settling after each operation, a GPU holds only
        the tensors still referenced, not every intermediate of a residual block until the block completes."""
        return self.settle(x) if self.each_op else x

    def trim(self, x: mx.array, columns: int) -> mx.array:
        """x (B, T, H, W, C) without `columns` columns at each inner side (a view)."""
        left, right = self.inner
        if not (left or right):
            return x
        return x[:, :, :, columns * left : x.shape[3] - columns * right]

    def crop_like(self, x: mx.array, reference: mx.array) -> mx.array:
        """x trimmed to `reference`'s width: a skip path, which lost nothing at the inner sides, beside its convs'."""
        excess = x.shape[3] - reference.shape[3]
        return self.trim(x, excess // sum(self.inner)) if excess else x

    def read(self):
        """The current layer's slot, which is emptied (so that a history is freed as soon as it is used);
        `write` must follow."""
        if self.cursor == len(self.slots):
            self.slots.append(None)
        value, self.slots[self.cursor] = self.slots[self.cursor], None
        return value

    def write(self, value):
        self.slots[self.cursor] = value
        self.cursor += 1

    def arrays(self) -> list:
        return [slot for slot in self.slots if isinstance(slot, mx.array)]


def last_frames(history, x: mx.array) -> mx.array:
    """The last CACHE_T frames of the video so far (`history` then `x`), as diffusers caches them.

    A copy: a slice would keep the whole chunk's buffer alive until the next chunk.
    """
    if x.shape[1] < CACHE_T and history is not None:
        x = mx.concatenate([history[:, -1:], x], axis=1)
    return mx.contiguous(x[:, -CACHE_T:])


class WanCausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time: `2 * padding_t` frames of history (zeros at the start of the video),
    none after; `padding_h` / `padding_w` zeros on both sides, as usual."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.history_frames = 2 * pad_t
        self.spatial_padding = (pad_h, pad_w)

    def __call__(self, x: mx.array, history: mx.array = None) -> mx.array:
        """x: (B, T, H, W, C_in); history: up to `history_frames` frames that precede x (from the cache), or None."""
        if history is None:
            return self.convolve(x, known_frames=0)
        return self.convolve(mx.concatenate([history, x], axis=1), known_frames=history.shape[1])

    def convolve(self, x: mx.array, known_frames: int) -> mx.array:
        """x begins with `known_frames` frames of history; the rest of the history is zeros."""
        pad_h, pad_w = self.spatial_padding
        zeros_t = max(self.history_frames - known_frames, 0)
        # The conv pads (zeros before in time, zeros around in space) without copying x once more.
        y = mx.conv_general(x, self.weight, stride=self.stride, padding=([zeros_t, pad_h, pad_w], [0, pad_h, pad_w]))
        return y + self.bias

    def cached(self, x: mx.array, cache: FeatureCache) -> mx.array:
        """Apply to one chunk: the history is what this layer kept from the previous chunks; keep this chunk's.

        The conv's input is the history followed by x, in one tensor, and its last frames become the next history.
        Evaluated op by op (`cache.each_op`, the frame-by-frame decode), the history is first extended by x's frames
        and x (still lazy) written into that tensor in place (nothing else holds it, so MLX reuses its buffer): the
        old history is freed before x is computed, and the joined input right after the new history is copied out.
        """
        history = cache.read()
        known_frames = 0
        if history is not None:
            known_frames = history.shape[1]
            joined = cache.op(mx.pad(history, [(0, 0), (0, x.shape[1]), (0, 0), (0, 0), (0, 0)]))
            del history
            joined[:, known_frames:] = x
            x = cache.op(joined)
            del joined
        y = self.convolve(x, known_frames)
        cache.write(mx.contiguous(x[:, -CACHE_T:]))  # as last_frames(history, x)
        return cache.op(y)  # with the new history


class WanRMS_norm(nn.Module):
    """RMS norm over channels: F.normalize(x) * sqrt(C) * gamma, i.e. x / rms(x) * gamma (bias unused by Wan).

    `gamma` keeps diffusers' shape, (C, 1, 1, 1) for videos and (C, 1, 1) for images.
    """

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.gamma = mx.ones((dim, 1, 1) if images else (dim, 1, 1, 1))

    def __call__(self, x: mx.array) -> mx.array:
        # F.normalize divides by max(||x||, 1e-12); rms_norm accumulates in float32 for half inputs, as diffusers does.
        return mx.fast.rms_norm(x, self.gamma.reshape(-1), eps=1e-12)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a residual down block: fold (factor_t, factor_s, factor_s) blocks into channels,
    then average groups of consecutive channels down to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.group_size = in_channels * factor_t * factor_s * factor_s // out_channels

    def __call__(self, x: mx.array) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[1] % ft) % ft  # the first chunk's single frame gets a zero frame before it
        if pad_t:
            x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        B, T, H, W, C = x.shape
        x = x.reshape(B, T // ft, ft, H // fs, fs, W // fs, fs, C)
        # Folded channel order is (c, t-offset, h-offset, w-offset), c slowest, as diffusers' permute gives.
        x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(B, T // ft, H // fs, W // fs, self.out_channels, self.group_size)
        return x.mean(axis=-1)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of a residual up block, the inverse of AvgDown3D: repeat each channel, then unfold
    channels into (factor_t, factor_s, factor_s) blocks."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def __call__(self, x: mx.array, first_chunk: bool = False) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        B, T, H, W, _ = x.shape
        x = mx.repeat(x, self.repeats, axis=-1)  # repeat_interleave: c0, c0, c1, c1, ...
        x = x.reshape(B, T, H, W, self.out_channels, ft, fs, fs)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, T * ft, H * fs, W * fs, self.out_channels)
        # The first latent frame decodes to one frame, not factor_t (its upsampler skips the time conv).
        return x[:, ft - 1 :] if first_chunk else x


class WanResample(nn.Module):
    """Spatial 2x up/down sampling per frame, plus a temporal 2x in the '3d' modes.

    `resample` is a list so that the conv is `resample.1`, as in diffusers' nn.Sequential; slot 0 (upsampling or
    zero padding) has no weights.
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: int = None):
        super().__init__()
        self.mode = mode
        upsample_out_dim = upsample_out_dim or dim // 2
        if mode in ("upsample2d", "upsample3d"):
            # 2x 'nearest-exact' (diffusers) and 'nearest' agree: both repeat each pixel twice.
            upsample = nn.Upsample(scale_factor=2.0, mode="nearest")
            self.resample = [upsample, nn.Conv2d(dim, upsample_out_dim, 3, padding=1)]
        elif mode in ("downsample2d", "downsample3d"):
            # diffusers: nn.ZeroPad2d((0, 1, 0, 1)) then the stride-2 conv; the conv does the padding (see __call__).
            self.resample = [nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)]
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = WanCausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = WanCausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, cache: FeatureCache) -> mx.array:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)

        B, T, H, W, C = x.shape
        x = x.reshape(B * T, H, W, C)
        if self.mode.startswith("upsample"):
            upsample, conv = self.resample
            x = conv(cache.op(upsample(x)))
        else:
            conv = self.resample[1]
            x = mx.conv_general(x, conv.weight, stride=2, padding=([0, 0], [1, 1])) + conv.bias
        x = x.reshape(B, T, *x.shape[1:])
        if self.mode.startswith("upsample"):
            x = cache.trim(x, 1)  # the conv's spoiled column

        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: mx.array, cache: FeatureCache) -> mx.array:
        """T -> 2T frames: time_conv doubles the channels, the halves become even and odd frames.

        On the first chunk diffusers only marks the slot ("Rep") and leaves x alone. From the second chunk on,
        time_conv runs as a causal conv whose history starts at the second chunk (zeros before it): diffusers calls
        it without cache then, and caches [zeros, x] when x has one frame, which pads the same way later.
        """
        history = cache.read()
        if history is None:
            cache.write("Rep")
            return x
        if isinstance(history, str):
            history = None
        cache.write(last_frames(history, x))
        x = self.time_conv(x, history)
        B, T, H, W, C2 = x.shape
        x = x.reshape(B, T, H, W, 2, C2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return x.reshape(B, T * 2, H, W, C2 // 2)

    def _downsample_time(self, x: mx.array, cache: FeatureCache) -> mx.array:
        """Stride-2 time_conv over (previous chunk's last frame, x); the first chunk (one frame) passes unchanged."""
        previous = cache.read()
        cache.write(mx.contiguous(x[:, -1:]))  # diffusers keeps all of the first chunk, but reads only its last frame
        if previous is None:
            return x
        return self.time_conv(mx.concatenate([previous, x], axis=1))


class WanResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = WanRMS_norm(in_dim, images=False)
        self.conv1 = WanCausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = WanRMS_norm(out_dim, images=False)
        self.conv2 = WanCausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = WanCausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def __call__(self, x: mx.array, cache: FeatureCache) -> mx.array:
        # Evaluated op by op (cache.each_op), the order decides what is alive at once: the shortcut comes after
        # conv1 (the caller holds x anyway); a conv's input is passed lazily and unnamed (see cached).
        y = self.conv1.cached(silu(self.norm1(x)), cache)
        h = x if self.conv_shortcut is None else cache.op(self.conv_shortcut(x))
        y, h = cache.settle((y, h))
        y = cache.trim(self.conv2.cached(silu(self.norm2(y)), cache), 2)  # one spoiled column per conv
        return cache.settle(y + cache.crop_like(h, y))  # dropout: 0 at inference


class WanAttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = WanRMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        identity = x
        B, T, H, W, C = x.shape
        x = self.to_qkv(self.norm(x.reshape(B * T, H, W, C)))
        q, k, v = (part.reshape(B * T, 1, H * W, C) for part in mx.split(x, 3, axis=-1))
        x = mx.fast.scaled_dot_product_attention(q, k, v, scale=C**-0.5)
        x = self.proj(x.reshape(B * T, H, W, C))
        return x.reshape(B, T, H, W, C) + identity


class WanMidBlock(nn.Module):
    def __init__(self, dim: int, num_layers: int = 1):
        super().__init__()
        self.attentions = [WanAttentionBlock(dim) for _ in range(num_layers)]
        self.resnets = [WanResidualBlock(dim, dim) for _ in range(num_layers + 1)]

    def __call__(self, x: mx.array, cache: FeatureCache) -> mx.array:
        x = self.resnets[0](x, cache)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x), cache)
        return x


class WanResidualDownBlock(nn.Module):
    """Wan2.2 encoder stage: residual blocks, then an optional downsampler, plus an AvgDown3D shortcut."""

    def __init__(self, in_dim, out_dim, num_res_blocks, temperal_downsample=False, down_flag=False):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temperal_downsample else 1, 2 if down_flag else 1)
        self.resnets = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        mode = "downsample3d" if temperal_downsample else "downsample2d"
        self.downsampler = WanResample(out_dim, mode) if down_flag else None

    def __call__(self, x: mx.array, cache: FeatureCache) -> mx.array:
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class WanResidualUpBlock(nn.Module):
    """Wan2.2 decoder stage: residual blocks, then an optional upsampler, plus a DupUp3D shortcut."""

    def __init__(self, in_dim, out_dim, num_res_blocks, temperal_upsample=False, up_flag=False):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temperal_upsample else 1, 2) if up_flag else None
        self.resnets = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        mode = "upsample3d" if temperal_upsample else "upsample2d"
        self.upsampler = WanResample(out_dim, mode, upsample_out_dim=out_dim) if up_flag else None

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        block_input = x if self.avg_shortcut is not None else None
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is not None:
            x = cache.settle(self.upsampler(x, cache))  # before the shortcut: both are large
        if self.avg_shortcut is not None:
            x = x + cache.op(cache.crop_like(self.avg_shortcut(block_input, first_chunk), x))
        return cache.settle(x)

    def input_margin(self, margin: int) -> int:
        return up_block_input_margin(margin, len(self.resnets), self.upsampler)


class WanUpBlock(nn.Module):
    """Wan2.1 decoder stage: residual blocks, then an optional upsampler that halves the channels."""

    def __init__(self, in_dim, out_dim, num_res_blocks, upsample_mode=None):
        super().__init__()
        self.resnets = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        self.upsamplers = [WanResample(out_dim, upsample_mode)] if upsample_mode else None

    def __call__(self, x: mx.array, cache: FeatureCache, first_chunk: bool) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x

    def input_margin(self, margin: int) -> int:
        return up_block_input_margin(margin, len(self.resnets), self.upsamplers and self.upsamplers[0])


def up_block_input_margin(margin: int, num_resnets: int, upsampler) -> int:
    """How far beyond an edge of its output region an up block must see (pixels at its input's resolution) for its
    output to be right `margin` pixels beyond that edge: each 3x3 conv adds a pixel at its resolution (two per
    residual block, one for the upsampler's), and the upsampler makes each input pixel two."""
    if upsampler is not None:
        margin = -(-(margin + 1) // 2)
    return margin + 2 * num_resnets
