"""Parity of wan_engine.models.vae with diffusers' AutoencoderKLWan on small random models.

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

from wan_engine.models.config import VAEConfig
from wan_engine.models.vae import WanVAE, decode_caches, strip_layout
from wan_engine.model_files.weights import load_into


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


@pytest.mark.parametrize("frame_by_frame", [False, True])
def test_strips_decode_the_same_numbers_as_diffusers(case, frame_by_frame):
    """The strip decode on a wide latent: strips of 5, 9 and 13 latent columns, whose margins reach past the frame's
    edge on one side or both or neither, give diffusers' numbers (the margin is the least that does: see
    test_strip_margin_is_what_the_decoder_sees)."""
    reference, model, config, _, _, _ = case
    z = torch.randn(1, config["z_dim"], 2, 2, 40)
    with torch.no_grad():
        expected = channels_last(reference.decode(z).sample)
    z = mx.array(channels_last(z))
    margin = model.decoder.strip_margin
    for strip_width in (5, 9, 13):
        layout = strip_layout(40, strip_width, margin)
        assert {(low > 0, high < 40) for _, _, low, high in layout} >= {(False, True), (True, False)}
        got = np.array(model.decode(z, frame_by_frame, strip_width))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < DECODE_ATOL, strip_width


def test_strip_margin_is_what_the_decoder_sees(case):
    """With one latent column less of margin, the layers' trimming eats into a strip's own columns: the video comes
    out narrower (so the margin cannot be smaller, and the strip test above would see it)."""
    _, model, config, _, _, _ = case
    z = mx.random.normal((1, 2, 2, 40, config["z_dim"]), key=mx.random.key(2))
    whole = model.decode(z)
    assert np.abs(np.array(model.decode(z, strip_width=8)) - np.array(whole)).max() < DECODE_ATOL
    model.decoder.strip_margin -= 1
    try:
        assert model.decode(z, strip_width=8).shape[3] < whole.shape[3]
    finally:
        model.decoder.strip_margin += 1


def test_ti2v_decoder_stages_and_strip_margin():
    """TI2V-5B's decoder doubles the frames in up blocks 0 and 1: the frame-by-frame decode's stages split there.
    Its up blocks and head see 13 latent columns beyond a strip's edge (12.25 rounded up at each upsampling), so
    1280x704 (80 columns) decodes as two strips of 40 (+13) with the low-RAM preset."""
    config = VAEConfig.from_file(Path(__file__).resolve().parent.parent / "wan_engine/models/configs/vae.json")
    decoder = WanVAE(config).decoder
    assert [list(stage) for stage in decoder.stages] == [[0], [1], [2, 3]]
    assert decoder.strip_margin == 13
    assert strip_layout(80, 40, 13) == [(0, 40, 0, 53), (40, 80, 27, 80)]
    assert strip_layout(80, None, 13) == [(0, 80, 0, 80)]
    assert strip_layout(52, 40, 13) == [(0, 26, 0, 39), (26, 52, 13, 52)]


def test_decode_chunks(case):
    """One chunk per latent frame; with strips, an item per strip and latent frame, the chunks during the last."""
    reference, model, config, batch, (t, h, w), _ = case
    z = mx.array(np.random.default_rng(1).standard_normal((batch, t, h, w, config["z_dim"]), dtype=np.float32))
    items = list(model.decode_chunks(z))
    assert [(done, total) for done, total, _ in items] == [(i, t) for i in range(1, t + 1)]
    chunks = [chunk for _, _, chunk in items]
    assert [c.shape[1] for c in chunks] == [1] + [4] * (t - 1)
    # A second call starts from a fresh cache: same result.
    assert np.array_equal(np.array(mx.concatenate(chunks, axis=1)), np.array(model.decode(z)))
    # Waiting for each piece (a machine without the room for one more queued) changes when, not what.
    waited = [chunk for _, _, chunk in model.decode_chunks(z, queued_ahead=False)]
    assert np.array_equal(np.array(mx.concatenate(waited, axis=1)), np.array(mx.concatenate(chunks, axis=1)))
    assert [cache.one_ahead for cache in decode_caches(2, False, (False, False), False)[1]] == [True, True]
    assert [cache.one_ahead for cache in decode_caches(2, False, (False, False), False, False)[1]] == [False, False]
    assert not decode_caches(2, True, (False, False), False)[0].one_ahead  # frame by frame saves memory: waits

    items = list(model.decode_chunks(z, strip_width=1))  # w strips
    assert [(done, total) for done, total, _ in items] == [(i, w * t) for i in range(1, w * t + 1)]
    assert all(chunk is None for _, _, chunk in items[: (w - 1) * t])
    strips = mx.concatenate([chunk for _, _, chunk in items[(w - 1) * t :]], axis=1)
    assert np.abs(np.array(strips) - np.array(mx.concatenate(chunks, axis=1))).max() < DECODE_ATOL


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
