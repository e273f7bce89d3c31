"""The reference for wan_engine/models/taehv.py: TAEHV's decoder in PyTorch, ported line by line from
`madebyollin/taehv`'s taehv.py (MIT; `TAEHV.__init__`'s base decoder, `patch_tgrow_layers`,
`apply_model_with_memblocks_parallel` and `decode_video`), which is not on PyPI. NCHW / NTCHW as there; test-only.

`random_taew2_2(path)` writes random weights in the published layout (`safetensors/taew2_2.safetensors`: the whole
TAEHV state dict, encoder included, in float32) for a decoder of the given widths.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in * 2, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x, past):
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    def __init__(self, n_f, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)


class TGrow(nn.Module):
    def __init__(self, n_f, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x):
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TAEHV(nn.Module):
    """taehv.py's TAEHV for TAEW2.2 (patch 2, 48 latent channels), base decoder, widths `n_f`."""

    def __init__(self, n_f=(256, 128, 64, 64), decoder_time_upscale=(False, True, True),
                 decoder_space_upscale=(True, True, True), patch_size=2, latent_channels=48):
        super().__init__()
        self.patch_size = patch_size
        self.encoder = nn.Sequential(  # the published file holds it; decoding does not use it
            conv(3 * patch_size**2, 64), nn.ReLU(),
            TPool(64, 2), conv(64, 64, stride=2, bias=False), MemBlock(64, 64), MemBlock(64, 64), MemBlock(64, 64),
            TPool(64, 2), conv(64, 64, stride=2, bias=False), MemBlock(64, 64), MemBlock(64, 64), MemBlock(64, 64),
            TPool(64, 1), conv(64, 64, stride=2, bias=False), MemBlock(64, 64), MemBlock(64, 64), MemBlock(64, 64),
            conv(64, latent_channels),
        )
        up_t, up_s = decoder_time_upscale, decoder_space_upscale
        layers = [Clamp(), conv(latent_channels, n_f[0]), nn.ReLU()]
        for i in range(3):
            layers += [MemBlock(n_f[i], n_f[i]), MemBlock(n_f[i], n_f[i]), MemBlock(n_f[i], n_f[i]),
                       nn.Upsample(scale_factor=2 if up_s[i] else 1), TGrow(n_f[i], 2 if up_t[i] else 1),
                       conv(n_f[i], n_f[i + 1], bias=False)]
        layers += [nn.ReLU(), conv(n_f[3], 3 * patch_size**2)]
        self.decoder = nn.Sequential(*layers)
        self.frames_to_trim = 2 ** sum(t.stride == 2 for t in self.decoder if isinstance(t, TGrow)) - 1

    def patch_tgrow_layers(self, sd):
        """A TGrow stored with more output channels than this decoder's keeps the last ones."""
        new_sd = self.state_dict()
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, TGrow):
                key = f"decoder.{i}.conv.weight"
                if sd[key].shape[0] > new_sd[key].shape[0]:
                    sd[key] = sd[key][-new_sd[key].shape[0]:]
        return sd

    def decode_video(self, x):
        """NTCHW latents -> NTCHW frames in [0, 1], all frames at once (taehv.py's parallel mode)."""
        n, t, c, h, w = x.shape
        x = x.reshape(n * t, c, h, w)
        for block in self.decoder:
            if isinstance(block, MemBlock):
                nt, c, h, w = x.shape
                frames = x.reshape(n, nt // n, c, h, w)
                memory = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0), value=0)[:, : nt // n].reshape(x.shape)
                x = block(x, memory)
            else:
                x = block(x)
        nt, c, h, w = x.shape
        x = x.view(n, nt // n, c, h, w)
        x = F.pixel_shuffle(x, self.patch_size).clamp(0, 1)
        return x[:, self.frames_to_trim:]


def random_taew2_2(path, n_f=(256, 128, 64, 64), seed=0, wider_first_tgrow=True, latent_channels=48) -> TAEHV:
    """A TAEHV with random weights saved at `path` in the published safetensors layout. `wider_first_tgrow`: the
    first (stride 1) TGrow stored with twice its channels, as a checkpoint trained with time upscaling there is,
    which `patch_tgrow_layers` cuts."""
    torch.manual_seed(seed)
    model = TAEHV(n_f, latent_channels=latent_channels)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            fan_in = value[0].numel() if value.ndim > 1 else 1
            value.copy_(torch.randn_like(value) * (1.0 / fan_in**0.5 if value.ndim > 1 else 0.05))
        model.decoder[-1].bias.add_(0.5)  # frames spread over [0, 1], not clamped at 0
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
    if wider_first_tgrow:
        key = next(f"decoder.{i}.conv.weight" for i, layer in enumerate(model.decoder) if isinstance(layer, TGrow))
        tensors[key] = torch.cat([torch.randn_like(tensors[key]), tensors[key]])
    save_file(tensors, str(path))
    return model
