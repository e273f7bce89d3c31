"""Parity of wan_engine.models.transformer with diffusers' WanTransformer3DModel on small random models.

Every parameter is randomized (diffusers zero-inits some, which would hide mistakes), inputs are random, the
per-token timesteps are built the way diffusers' Wan pipelines build them with `expand_timesteps=True`, and the
batch holds two samples with different contexts and timesteps.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel as TorchWanTransformer3DModel
from mlx.utils import tree_flatten

from wan_engine.models.config import TransformerConfig
from wan_engine.model_files.loading import TRANSFORMER_FP32_PARAMETERS
from wan_engine.models.transformer import WanTransformer
from wan_engine.model_files.weights import load_into

SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, ffn_dim=64, in_channels=12,
             out_channels=12, text_dim=32, freq_dim=32)

# (diffusers config, latent grid (F, H, W), text length)
CASES = {
    "small": (SMALL, (3, 8, 12), 7),
    "3heads-odd-grid-no-cross-norm": (
        dict(num_attention_heads=3, attention_head_dim=24, num_layers=2, ffn_dim=96, in_channels=48,
             out_channels=48, text_dim=64, freq_dim=33, cross_attn_norm=False),
        (5, 6, 10), 5),
    "4heads-3layers-in16-out8": (
        dict(num_attention_heads=4, attention_head_dim=32, num_layers=3, ffn_dim=160, in_channels=16,
             out_channels=8, text_dim=32, freq_dim=64),
        (4, 10, 6), 9),
    "head_dim128-like-ti2v": (
        dict(num_attention_heads=2, attention_head_dim=128, num_layers=1, ffn_dim=128, in_channels=48,
             out_channels=48, text_dim=64, freq_dim=256),
        (3, 4, 6), 6),
}
TIMESTEPS = [937.25, 412.5]  # one per sample; different across the batch

# float32 round-off bar: max |mlx - diffusers| over max |diffusers| (outputs are O(1) by construction)
FLOAT32_RTOL = 1e-5


def randomize_(model: torch.nn.Module):
    """O(1)-scale random values for every parameter, so each one changes the output visibly."""
    for name, p in model.named_parameters():
        if "scale_shift_table" in name:
            p.data = 0.5 * torch.randn_like(p)
        elif name.endswith("bias"):
            p.data = 0.1 * torch.randn_like(p)
        elif p.ndim == 1:  # norm weights
            p.data = 1 + 0.2 * torch.randn_like(p)
        else:  # linear / conv weights: unit-variance outputs
            p.data = torch.randn_like(p) / math.sqrt(p[0].numel())


def make_models(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    reference = TorchWanTransformer3DModel(**config).eval()
    randomize_(reference)
    model = WanTransformer(TransformerConfig.from_dict(config))
    weights = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    load_into(model, dict(weights), mx.float32)  # load_into consumes the dict
    return reference, model, weights


def make_inputs(config: dict, grid: tuple, text_len: int, mode: str, seed: int = 1):
    """Random latents / text states and both timestep forms: diffusers' (per sample or per token) and ours.

    mode "sample": timestep (B,), as pipelines without expand_timesteps pass. "t2v" / "i2v": diffusers' per-token
    timesteps from `mask[0][0][:, ::p_h, ::p_w] * t`, with the first latent frame's mask zeroed for i2v
    (pipeline_wan.py / pipeline_wan_i2v.py); ours are the same values per latent frame, (B, F).
    """
    torch.manual_seed(seed)
    batch = len(TIMESTEPS)
    latents = torch.randn(batch, config["in_channels"], *grid)
    text = torch.randn(batch, text_len, config["text_dim"])
    t = torch.tensor(TIMESTEPS)
    if mode == "sample":
        torch_t, our_t = t, t.numpy()
    else:
        mask = torch.ones(1, config["in_channels"], *grid)
        if mode == "i2v":
            mask[:, :, 0] = 0
        _, p_h, p_w = config.get("patch_size", (1, 2, 2))
        torch_t = torch.stack([(mask[0][0][:, ::p_h, ::p_w] * tb).flatten() for tb in t])
        our_t = (mask[0, 0, :, 0, 0][None] * t[:, None]).numpy()
    return (latents, torch_t, text), (mx.array(latents.permute(0, 2, 3, 4, 1).numpy()), mx.array(our_t),
                                      mx.array(text.numpy()))


def run_reference(reference, latents, timestep, text) -> np.ndarray:
    with torch.no_grad():
        out = reference(latents, timestep, text, return_dict=False)[0]
    return out.float().permute(0, 2, 3, 4, 1).numpy()  # channels-last


def run_ours(model, latents, timestep, text) -> mx.array:
    context = model.cross_attention_kv(model.embed_text(text))
    return model(latents, timestep, context, model.rope(*latents.shape[1:4]))


@pytest.mark.parametrize("mode", ["sample", "t2v", "i2v"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_float32(case, mode):
    config, grid, text_len = CASES[case]
    reference, model, _ = make_models(config)
    torch_inputs, our_inputs = make_inputs(config, grid, text_len, mode)

    expected = run_reference(reference, *torch_inputs)
    out = run_ours(model, *our_inputs)

    assert out.dtype == model.dtype == mx.float32
    assert out.shape == expected.shape == (len(TIMESTEPS), *grid, config["out_channels"])
    scale = np.abs(expected).max()
    assert 0.5 < scale < 50  # the random model is well-conditioned, so the relative bar below means something
    err = np.abs(np.array(out) - expected).max()
    assert err <= FLOAT32_RTOL * scale, f"max abs diff {err:.3g} (output max {scale:.3g})"
    # The two samples differ (own context and timestep), so a batch mix-up cannot pass.
    assert np.abs(expected[0] - expected[1]).max() > 100 * FLOAT32_RTOL * scale


def test_patch_size_with_time_patching():
    """patch_size (2, 2, 2): temporal patching in the embedding, the rope grid and the unpatchify."""
    config = dict(SMALL, patch_size=(2, 2, 2), attention_head_dim=20, in_channels=4, out_channels=6)
    grid = (4, 6, 8)
    reference, model, _ = make_models(config)
    torch_inputs, our_inputs = make_inputs(config, grid, 4, "sample")
    expected = run_reference(reference, *torch_inputs)
    out = np.array(run_ours(model, *our_inputs))
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= FLOAT32_RTOL * np.abs(expected).max()


def test_context_forms_agree():
    """Passing embed_text's array instead of precomputed cross-attention K/V gives the identical result."""
    config, grid, text_len = CASES["small"]
    _, model, _ = make_models(config)
    _, (latents, timestep, text) = make_inputs(config, grid, text_len, "i2v")
    rope = model.rope(*grid)
    precomputed = model(latents, timestep, model.cross_attention_kv(model.embed_text(text)), rope)
    inline = model(latents, timestep, model.embed_text(text), rope)
    assert mx.array_equal(precomputed, inline)


def test_bfloat16_close_to_diffusers_bfloat16():
    """bf16 smoke check: loaded as diffusers' from_pretrained(torch_dtype=bfloat16) does (its keep-in-float32 modules
    stay float32), our error against the float32 output is on par with diffusers' own bf16 error."""
    config, grid, text_len = CASES["4heads-3layers-in16-out8"]
    reference, model, weights = make_models(config)
    (latents, torch_t, text), (our_latents, our_t, our_text) = make_inputs(config, grid, text_len, "i2v")
    expected = run_reference(reference, latents, torch_t, text)

    # The loader's float32 list is diffusers' (`rope` has no parameters).
    assert set(TRANSFORMER_FP32_PARAMETERS) == set(TorchWanTransformer3DModel._keep_in_fp32_modules) - {"rope"}
    # Cast parameter by parameter (not `.to()`, which would also round the float32 rope buffers).
    for name, p in reference.named_parameters():
        keep = any(part in TRANSFORMER_FP32_PARAMETERS for part in name.split("."))
        p.data = p.data.float() if keep else p.data.bfloat16()
    reference_bf16 = run_reference(reference, latents.bfloat16(), torch_t, text.bfloat16())

    load_into(model, weights, mx.bfloat16, TRANSFORMER_FP32_PARAMETERS)
    assert model.scale_shift_table.dtype == mx.float32 and model.proj_out.weight.dtype == mx.bfloat16
    out = run_ours(model, our_latents, our_t, our_text)
    assert out.dtype == model.dtype == mx.bfloat16

    ours_err = np.abs(np.array(out.astype(mx.float32)) - expected)
    diffusers_err = np.abs(reference_bf16 - expected)
    assert diffusers_err.max() < 0.02 * np.abs(expected).max()  # sanity: bf16 is approximate, not broken
    # Rounding noise of the same size: the mean is stable, the max is one sample of the noise (hence the slack).
    assert ours_err.mean() <= 1.25 * diffusers_err.mean(), f"{ours_err.mean():.3g} vs {diffusers_err.mean():.3g}"
    assert ours_err.max() <= 2 * diffusers_err.max(), f"{ours_err.max():.3g} vs {diffusers_err.max():.3g}"


def test_ti2v_5b_parameter_names_and_shapes():
    """At the real TI2V-5B size (diffusers on the meta device, MLX arrays lazy): every key and shape matches."""
    config = dict(num_attention_heads=24, attention_head_dim=128, num_layers=30, ffn_dim=14336, in_channels=48,
                  out_channels=48, text_dim=4096, freq_dim=256)
    with torch.device("meta"):
        reference = TorchWanTransformer3DModel(**config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    expected["patch_embedding.weight"] = (3072, 1, 2, 2, 48)  # channels-last, as the loader stores it
    model = WanTransformer(TransformerConfig.from_dict(config))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert ours == expected


def test_image_conditioning_is_rejected():
    with pytest.raises(NotImplementedError):
        WanTransformer(TransformerConfig.from_dict(dict(SMALL, image_dim=16, added_kv_proj_dim=32)))
