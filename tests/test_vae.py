"""Parity of wan_engine.vae with diffusers' AutoencoderKLWan on small random models.

Every parameter is randomized (RMS gammas included), at scales that keep activations O(1) and most decoded values
inside the [-1, 1] clamp, so that a mistake in any layer shows. Latent and video lengths span several chunks, so the
temporal cache, diffusers' 'Rep' first-chunk path of the upsamplers and the first-chunk padding of the shortcuts
all take part. diffusers works channels-first (B, C, T, H, W); the engine channels-last (B, T, H, W, C).
"""

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from wan_engine.config import VAEConfig
from wan_engine.vae import WanVAE
from wan_engine.weights import load_into


def wan22_like(z_dim, **config):
    """Wan2.2's layout (residual blocks, 2x2 patches: 12 channels in and out), made tiny."""
    return dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, z_dim=z_dim,
                latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, **config)


# name: (diffusers config, batch, latent grid (t, h, w), video frames for encode)
CASES = {
    "wan2.2-like": (
        wan22_like(8, base_dim=8, decoder_base_dim=12, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True], scale_factor_spatial=16),
        1, (3, 3, 2), 13),
    "3-stages-2-res-blocks-batch-2": (
        wan22_like(12, base_dim=12, decoder_base_dim=16, dim_mult=[1, 4, 4], num_res_blocks=2,
                   temperal_downsample=[True, True], scale_factor_spatial=8),
        2, (4, 4, 3), 9),
    "wan2.1-layout": (
        dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        1, (3, 3, 4), 9),
}

# float32 round-off bars, measured ~3e-6 (decode, absolute) and ~1e-6 (encode, relative to the largest |mean|)
DECODE_ATOL = 2e-5
ENCODE_RTOL = 2e-5


def randomize_(model: torch.nn.Module):
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data = 1 + 0.2 * torch.randn_like(p)
        elif name.endswith("bias"):
            p.data = 0.1 * torch.randn_like(p)
        else:  # conv kernels: unit-variance outputs
            p.data = torch.randn_like(p) / math.sqrt(p[0].numel())


def channels_last(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config, batch, grid, frames = CASES[request.param]
    torch.manual_seed(0)
    reference = AutoencoderKLWan(**config).float().eval()
    randomize_(reference)
    model = WanVAE(VAEConfig.from_dict(config))
    load_into(model, {k: v.numpy() for k, v in reference.state_dict().items()}, mx.float32)
    return reference, model, config, batch, grid, frames


@pytest.mark.parametrize("frame_by_frame", [False, True])
def test_decode_matches_diffusers(case, frame_by_frame):
    """Whole chunks as diffusers, or one frame at a time after each temporal upsampling (the last stage op by op):
    the same numbers."""
    reference, model, config, batch, (t, h, w), _ = case
    z = torch.randn(batch, config["z_dim"], t, h, w)
    with torch.no_grad():
        expected = channels_last(reference.decode(z).sample)
    got = np.array(model.decode(mx.array(channels_last(z)), frame_by_frame))

    scale = config.get("scale_factor_spatial", 8)
    assert got.shape == (batch, 1 + 4 * (t - 1), h * scale, w * scale, 3) == expected.shape
    assert np.mean(np.abs(expected) < 1) > 0.6 and expected.std() > 0.2  # mostly unclamped, not degenerate
    assert np.abs(got - expected).max() < DECODE_ATOL


def test_frame_by_frame_stages_follow_the_temporal_upsamplings():
    """TI2V-5B's decoder doubles the frames in up blocks 0 and 1: the frame-by-frame decode's stages split there."""
    config = VAEConfig.from_file(Path(__file__).resolve().parent.parent / "wan_engine/configs/vae.json")
    assert [list(stage) for stage in WanVAE(config).decoder.stages] == [[0], [1], [2, 3]]


def test_decode_chunks(case):
    reference, model, config, batch, (t, h, w), _ = case
    z = mx.array(np.random.default_rng(1).standard_normal((batch, t, h, w, config["z_dim"]), dtype=np.float32))
    chunks = list(model.decode_chunks(z))
    assert [c.shape[1] for c in chunks] == [1] + [4] * (t - 1)
    # A second call starts from a fresh cache: same result.
    assert np.array_equal(np.array(mx.concatenate(chunks, axis=1)), np.array(model.decode(z)))


def test_encode_matches_diffusers(case):
    reference, model, config, batch, _, frames = case
    scale = config.get("scale_factor_spatial", 8)
    video = torch.rand(batch, 3, frames, 3 * scale, 2 * scale) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(video).latent_dist
    expected = channels_last(posterior.mode())
    assert np.array_equal(expected, channels_last(posterior.mean))
    got = np.array(model.encode(mx.array(channels_last(video))))

    assert got.shape == (batch, 1 + (frames - 1) // 4, 3, 2, config["z_dim"]) == expected.shape
    assert np.abs(got - expected).max() < ENCODE_RTOL * np.abs(expected).max()
    # A second call starts from a fresh cache: same result.
    assert np.array_equal(got, np.array(model.encode(mx.array(channels_last(video)))))
