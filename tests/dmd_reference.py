"""FastVideo's DMD sampling for Wan, ported line by line to torch as the reference of tests/test_dmd.py.

FastVideo itself does not import here (fastvideo 0.2.1's fastvideo/utils.py imports torchvision, whose PyPI wheel
does not fit torch 2.13 CPU), so its few lines of sampling are ported, with diffusers' WanTransformer3DModel and
AutoencoderKLWan (which FastVideo's Wan DiT and VAE reproduce) loaded from the same tiny snapshot. Source:
fastvideo 0.2.1 = github.com/hao-ai-lab/FastVideo at 2f3d407 (the files are the same in both):
- fastvideo/pipelines/stages/denoising.py, `DmdDenoisingStage` (lines 1250-1409): the loop;
- fastvideo/models/utils.py, `pred_noise_to_pred_video` (lines 138-175);
- fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py, `FlowMatchEulerDiscreteScheduler.__init__`
  (lines 141-157) and `add_noise` (lines 601-635);
- image to video: `DmdDenoisingStage` has no TI2V conditioning of its own (FastWan2.2's `WanDMDPipeline` has no
  image stage either, so FastVideo's DMD drops the picture); the conditioning ported here is that of its TI2V
  `DenoisingStage` (denoising.py lines 260-284, 424-429 and 597-599), which our engine applies with every sampler.
FastVideo draws each re-noising with `torch.randn(..., generator=batch.generator[0])`; here the noise is given.
"""

import numpy as np
import torch
from diffusers import WanPipeline


class FlowMatchTable:
    """The training schedule of FastVideo's FlowMatchEulerDiscreteScheduler (no set_timesteps: DmdDenoisingStage
    builds its own with shift=8.0 and only looks sigmas up in it)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32)
        sigmas = timesteps / num_train_timesteps
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas

    def add_noise(self, clean_latent, noise, timestep):
        timestep = expand_timestep(timestep, clean_latent.shape[0])
        timestep_id = torch.argmin((self.timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
        sigma = self.sigmas[timestep_id].reshape(-1, 1, 1, 1)
        sample = (1 - sigma) * clean_latent + sigma * noise
        return sample.type_as(noise)


def expand_timestep(timestep, rows: int):
    """The timestep shapes both FastVideo functions accept: [bs, num_frames], [1] or [rows]."""
    if timestep.ndim == 2:
        timestep = timestep.flatten(0, 1)
        assert timestep.numel() == rows
    elif timestep.ndim == 1:
        if timestep.shape[0] == 1:
            timestep = timestep.expand(rows)
        else:
            assert timestep.numel() == rows
    else:
        raise ValueError(f"Invalid timestep shape: {timestep.shape}")
    return timestep


def pred_noise_to_pred_video(pred_noise, noise_input_latent, timestep, scheduler):
    timestep = expand_timestep(timestep, noise_input_latent.shape[0])
    dtype = pred_noise.dtype
    pred_noise = pred_noise.double()
    noise_input_latent = noise_input_latent.double()
    sigmas = scheduler.sigmas.double()
    timesteps = scheduler.timesteps.double()
    timestep_id = torch.argmin((timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
    sigma_t = sigmas[timestep_id].reshape(-1, 1, 1, 1)
    pred_video = noise_input_latent - sigma_t * pred_noise
    return pred_video.to(dtype)


def dmd_denoise(transformer, latents, prompt_embeds, dmd_denoising_steps, step_noise, z=None, shift=8.0):
    """DmdDenoisingStage.forward in float32 (FastVideo runs the transformer in bfloat16 autocast): `latents` the
    initial noise (B, C, T, H, W), `step_noise` the noise of each re-noising in the same layout, `z` the normalized
    first-frame latent (B, C, 1, H, W) for image to video. Returns the denoised latents (B, C, T, H, W)."""
    scheduler = FlowMatchTable(shift=shift)
    latents = latents.permute(0, 2, 1, 3, 4)  # LatentPreparationStage(use_btchw_layout=True): (B, T, C, H, W)
    if z is not None:  # DenoisingStage 280-284, in (B, T, C, H, W): frame 0 becomes the image's latent
        _, mask2 = masks_like([latents[0]])
        latents = ((1. - mask2[0]) * z.permute(0, 2, 1, 3, 4)[0] + mask2[0] * latents[0])[None]
    timesteps = torch.tensor(dmd_denoising_steps, dtype=torch.long)
    for i, t in enumerate(timesteps):
        noise_latents = latents.clone()
        latent_model_input = latents
        t_expand = t.repeat(latent_model_input.shape[0])
        model_timestep = t_expand
        if z is not None:  # DenoisingStage 424-429: per-token timesteps, 0 on the first frame's tokens (its
            # padding to seq_len adds none: the tokens are all there)
            temp_ts = (mask2[0][:, 0][:, ::2, ::2] * torch.stack([t])).flatten()
            model_timestep = temp_ts.unsqueeze(0).repeat(latent_model_input.shape[0], 1)
        pred_noise = transformer(hidden_states=latent_model_input.permute(0, 2, 1, 3, 4), timestep=model_timestep,
                                 encoder_hidden_states=prompt_embeds, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        pred_video = pred_noise_to_pred_video(pred_noise=pred_noise.flatten(0, 1),
                                              noise_input_latent=noise_latents.flatten(0, 1),
                                              timestep=t_expand,
                                              scheduler=scheduler).unflatten(0, pred_noise.shape[:2])
        if i < len(timesteps) - 1:
            next_timestep = timesteps[i + 1] * torch.ones([1], dtype=torch.long)
            noise = step_noise[i].permute(0, 2, 1, 3, 4)  # FastVideo: torch.randn(video_raw_latent_shape, ...)
            latents = scheduler.add_noise(pred_video.flatten(0, 1), noise.flatten(0, 1),
                                          next_timestep).unflatten(0, pred_video.shape[:2])
        else:
            latents = pred_video
        if z is not None:  # DenoisingStage 597-599: after each step frame 0 is the image's latent again
            latents = ((1. - mask2[0]) * z.permute(0, 2, 1, 3, 4)[0] + mask2[0] * latents[0])[None]
    return latents.permute(0, 2, 1, 3, 4)


def masks_like(tensors):
    """fastvideo/utils.py `masks_like(..., zero=True)` without a generator, for (T, C, H, W) latents: ones, with
    the first frame zero (FastVideo indexes frames as dim 1 of (C, T, H, W); here they are dim 0)."""
    out1 = [torch.ones_like(u) for u in tensors]
    out2 = [torch.ones_like(u) for u in tensors]
    for u, v in zip(out1, out2):
        u[0] = 0
        v[0] = 0
    return out1, out2


def fastvideo_dmd_frames(snapshot, prompt, width, height, frames, dmd_denoising_steps, latents, step_noise,
                         image=None, shift=8.0) -> np.ndarray:
    """FastVideo's DMD video, float32 frames (F, H, W, 3) in [0, 1], for the snapshot: `latents` the initial noise
    and `step_noise` the noise of each re-noising, numpy in diffusers' layout (1, C, F, h, w)."""
    pipe = WanPipeline.from_pretrained(str(snapshot), dtype=torch.float32)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
        z = None
        if image is not None:  # as our engine and diffusers prepare the picture (FastVideo crops to its own size)
            pixels = pipe.video_processor.preprocess(image, height=height, width=width).unsqueeze(2)
            z = (vae.encode(pixels).latent_dist.mean - mean) * inv_std
        out = dmd_denoise(pipe.transformer, torch.from_numpy(latents), prompt_embeds, dmd_denoising_steps,
                          [torch.from_numpy(n) for n in step_noise], z, shift)
        video = vae.decode(out / inv_std + mean, return_dict=False)[0]  # DecodingStage: z / scaling + shift
        return pipe.video_processor.postprocess_video(video, output_type="np")[0].astype(np.float32)
