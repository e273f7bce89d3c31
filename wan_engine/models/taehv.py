"""TAEHV, the tiny video autoencoder of `madebyollin/taehv` (MIT), in MLX: its decoder, channels-last.

TAEW2.2 (`taew2_2`) is the one trained for the Wan2.2 5B latent space: it decodes the latents the transformer works
on (normalized, no `latents_mean` / `latents_std` applied) to frames in [0, 1], about 150x cheaper than the full VAE.
A latent frame becomes 4 frames (two 2x temporal upsamplings), of which the first 3 of a video are dropped, so t
latent frames make 1 + 4 (t - 1) frames, as the Wan VAE's do; 8x spatial upsampling then a 2x2 pixel shuffle.

Layer indices and names follow taehv.py's `nn.Sequential` (`decoder.{i}.conv.{j}.weight`, ...), so its published
weights load by name; convolution kernels move to MLX's (out, kh, kw, in). Its `MemBlock`s see the previous frame's
input: taehv.py runs all frames at once ("parallel"), shifting each block's input by a frame; `decode_chunks` runs a
few latent frames at a time and carries each block's last input frame to the next chunk, which gives the same
numbers with memory bounded by the chunk.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

WEIGHTS_FILE = "taew2_2.safetensors"  # the name taehv's repository publishes TAEW2.2's weights under


@dataclass(frozen=True)
class TAEHVConfig:
    """taehv.py's `TAEHV(...)` arguments for a checkpoint; TAEW2.2's by default."""
    latent_channels: int = 48
    patch_size: int = 2
    decoder_time_upscale: tuple = (False, True, True)
    decoder_space_upscale: tuple = (True, True, True)
    widths: tuple = (256, 128, 64, 64)  # the base variant's decoder widths

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def frames_to_trim(self) -> int:
        return self.time_upscale - 1


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return mx.tanh(x / 3) * 3


class ReLU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(x)


class Upsample(nn.Module):
    """nn.Upsample(scale_factor, mode="nearest") on (N, H, W, C)."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        if self.scale == 1:
            return x
        return mx.repeat(mx.repeat(x, self.scale, axis=1), self.scale, axis=2)


class MemBlock(nn.Module):
    """relu(conv(concat(x, past)) + skip(x)): `past` is the same block's input one frame earlier (zeros first)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = [conv(n_in * 2, n_out), ReLU(), conv(n_out, n_out), ReLU(), conv(n_out, n_out)]
        if n_in != n_out:
            self.skip = nn.Conv2d(n_in, n_out, 1, bias=False)

    def __call__(self, x: mx.array, past: mx.array) -> mx.array:
        y = mx.concatenate([x, past], axis=-1)
        for layer in self.conv:
            y = layer(y)
        return nn.relu(y + (self.skip(x) if "skip" in self else x))


class TGrow(nn.Module):
    """Temporal upsampling: a 1x1 conv to `stride` x the channels, each share of them one more frame."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        nt, h, w, c = x.shape
        x = self.conv(x).reshape(nt, h, w, self.stride, c)
        return x.transpose(0, 3, 1, 2, 4).reshape(nt * self.stride, h, w, c)


def pixel_shuffle(x: mx.array, p: int) -> mx.array:
    """torch's F.pixel_shuffle on channels-last: (N, H, W, C p p) -> (N, H p, W p, C), channel order (c, i, j)."""
    n, h, w, cpp = x.shape
    x = x.reshape(n, h, w, cpp // (p * p), p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * p, w * p, cpp // (p * p))


class TAEHVDecoder(nn.Module):
    """TAEHV's decoder (`TAEHV.decoder` and `decode_video`), for (B, T, H, W, latent_channels) latents."""

    def __init__(self, config: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.config = config
        n_f, up_t, up_s = config.widths, config.decoder_time_upscale, config.decoder_space_upscale
        layers = [Clamp(), conv(config.latent_channels, n_f[0]), ReLU()]
        for stage in range(3):
            layers += [MemBlock(n_f[stage], n_f[stage]) for _ in range(3)]
            layers += [Upsample(2 if up_s[stage] else 1), TGrow(n_f[stage], 2 if up_t[stage] else 1),
                       conv(n_f[stage], n_f[stage + 1], bias=False)]
        layers += [ReLU(), conv(n_f[3], 3 * config.patch_size**2)]
        self.decoder = layers

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder[1].weight.dtype

    def decode_chunks(self, latents: mx.array, chunk: int = 1):
        """latents (1, t, h, w, C), normalized -> frames (T_i, H, W, 3) in [0, 1], `chunk` latent frames at a time
        (the first chunk's first 3 frames dropped), each evaluated before the next: 1 + 4 (t - 1) frames in all."""
        memory = {}  # block index -> its input's last frame so far
        trim = self.config.frames_to_trim
        for start in range(0, latents.shape[1], chunk):
            x = latents[0, start : start + chunk].astype(self.dtype)
            for i, layer in enumerate(self.decoder):
                if isinstance(layer, MemBlock):
                    past = memory.get(i, mx.zeros_like(x[:1]))
                    memory[i] = x[-1:]
                    x = layer(x, mx.concatenate([past, x[:-1]]))
                else:
                    x = layer(x)
            x = mx.clip(pixel_shuffle(x, self.config.patch_size), 0.0, 1.0)
            if start == 0:
                x = x[trim:]
            mx.eval(x, list(memory.values()))
            yield x

    def decode(self, latents: mx.array) -> mx.array:
        """latents (1, t, h, w, C) -> the whole video (1 + 4 (t - 1), H, W, 3) in [0, 1]."""
        return mx.concatenate(list(self.decode_chunks(latents, chunk=latents.shape[1])))
