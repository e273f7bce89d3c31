"""The reference for continuing a video: Wan2GP's TI2V-5B continuation (`models/wan/any2video.py`, `WanAny2V.generate`
with `input_video`: the overlap frames VAE-encoded into `source_latents`, written into the latents and given timestep 0
at every step, written again after the last step, and the decoded overlap dropped), ported onto diffusers' components
of the same snapshot (its text encoder, transformer, UniPC scheduler and VAE, in float32). Test-only."""

import numpy as np
import torch
from diffusers import WanPipeline


def wan2gp_continuation(snapshot, prompt, negative_prompt, overlap_frames: np.ndarray, frames: int, steps: int,
                        guidance: float, noise: np.ndarray) -> np.ndarray:
    """The new frames (frames - K, H, W, 3) in [0, 1] of a segment continuing a video whose last K frames are
    `overlap_frames` (K, H, W, 3) uint8; `noise` (1, C, F, h, w) the segment's initial latents."""
    pipe = WanPipeline.from_pretrained(str(snapshot), dtype=torch.float32)
    vae, transformer, scheduler = pipe.vae, pipe.transformer, pipe.scheduler
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=guidance > 1,
                                          max_sequence_length=512)
        pixels = torch.from_numpy(overlap_frames).float().div(255.0).mul(2.0).sub(1.0)  # as a first frame is scaled
        video = pixels.permute(3, 0, 1, 2)[None]  # (1, 3, K, H, W)
        source_latents = (vae.encode(video).latent_dist.mode() - mean) * inv_std  # any2video's vae.encode
        given = source_latents.shape[2]
        latents = torch.from_numpy(noise).float()
        scheduler.set_timesteps(steps)
        p_h, p_w = transformer.config.patch_size[1:]
        for t in scheduler.timesteps:
            latents[:, :, :given] = source_latents  # timestep_injection
            frame_timesteps = torch.full((latents.shape[2],), float(t))
            frame_timesteps[:given] = 0
            tokens = latents.shape[3] // p_h * latents.shape[4] // p_w
            timestep = frame_timesteps.repeat_interleave(tokens)[None]
            prediction = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond,
                                     return_dict=False)[0]
            if guidance > 1:
                prediction_uncond = transformer(hidden_states=latents, timestep=timestep,
                                                encoder_hidden_states=uncond, return_dict=False)[0]
                prediction = prediction_uncond + guidance * (prediction - prediction_uncond)
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        latents[:, :, :given] = source_latents
        decoded = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    frames_out = (decoded[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    return frames_out[len(overlap_frames):]
