"""The numbers of text (and image) to video with Wan2.2 TI2V: noise, first-frame conditioning, the denoising loop and
the decode, as functions of the parts and arrays they are given (the engine walks the stages that call them).

Mirrors diffusers' `WanPipeline` / `WanImageToVideoPipeline` with `expand_timesteps=True`. Latents are kept
channels-last, (B, F, H, W, C), and in float32 between steps, as diffusers keeps them. The loops run the same code
alone and in a group of processes: they ask the process's share of the run (parallel/share.py; `ALONE` alone)
for its context, its exchanges and the checkpoints where Stop reaches every process.
"""

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import WanError
from .images import open_image
from .models.vae_tiling import decode_tiled
from .models.transformer import BlockResidual
from .parallel.share import ALONE
from .sampling.magcache import magnitude_ratio

# Wan's official default negative prompt (Wan-Video/Wan2.2 `shared_config.sample_neg_prompt`).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def latent_shape(vae_config, transformer_config, width: int, height: int, frames: int) -> tuple:
    """diffusers' latent layout (1, C, F, H, W) for a video of this size."""
    spatial = vae_config.scale_factor_spatial
    return (
        1, transformer_config.in_channels, (frames - 1) // vae_config.scale_factor_temporal + 1,
        height // spatial, width // spatial,
    )


def initial_noise(seed: int, shape: tuple) -> mx.array:
    """Standard normal noise from MLX's generator keyed by `seed` (deterministic per seed), in diffusers'
    (B, C, F, H, W) layout like the `--latents` files, returned channels-last."""
    noise = mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(seed))
    return noise.transpose(0, 2, 3, 4, 1)


def step_noise_key(seed: int) -> mx.array:
    """The key of the fresh noise a sampler draws during denoising (DMD): split from the seed's key, which the
    initial noise uses as it is, so that the two are different streams of the same seed."""
    return mx.random.split(mx.random.key(seed))[1]


def from_diffusers_layout(latents: np.ndarray, expected_shape: tuple) -> mx.array:
    """A user-supplied (B, C, F, H, W) noise array -> channels-last float32, checking its shape."""
    if tuple(latents.shape) != tuple(expected_shape):
        raise WanError(
            f"--latents has shape {tuple(latents.shape)}, this video needs {tuple(expected_shape)} "
            "(1 x channels x ((frames-1)/4+1) x height/16 x width/16)"
        )
    return mx.array(latents.astype(np.float32)).transpose(0, 2, 3, 4, 1)


def load_image(image, width: int, height: int) -> mx.array:
    """The conditioning image as diffusers' `VideoProcessor.preprocess` prepares it: RGB, resized to exactly
    width x height with Lanczos, scaled to [-1, 1]. `image`: a path or a PIL image. Returns (1, 1, H, W, 3) float32."""
    image = open_image(image).resize((width, height), resample=Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return mx.array(pixels * 2.0 - 1.0)[None, None]


class LatentNormalizer:
    """The VAE's per-channel latent statistics: the transformer works on (z - mean) / std."""

    def __init__(self, vae_config):
        self.mean = mx.array(vae_config.latents_mean, dtype=mx.float32)
        # diffusers stores 1/std and divides by it when decoding; the same float32 arithmetic keeps parity
        self.inv_std = 1.0 / mx.array(vae_config.latents_std, dtype=mx.float32)

    def normalize(self, z: mx.array) -> mx.array:
        return (z.astype(mx.float32) - self.mean) * self.inv_std

    def denormalize(self, latents: mx.array) -> mx.array:
        """In the latents' dtype, as diffusers casts to the VAE's dtype before denormalizing."""
        return latents / self.inv_std.astype(latents.dtype) + self.mean.astype(latents.dtype)


def encode_image(vae, normalizer: LatentNormalizer, image: mx.array) -> mx.array:
    """Conditioning latents of given frames (1, K, H, W, 3) in [-1, 1], K = 4n + 1 (a first frame: K = 1):
    (1, n + 1, h, w, C), the VAE's posterior mean, normalized."""
    return normalizer.normalize(vae.encode(image.astype(vae.dtype)))


def generate_latents(transformer, sampler, noise, context, guidance: float, condition=None, cancel=None,
                     cfg_batch: bool = True, share=ALONE, plan: list | None = None, calibration: list | None = None):
    """Denoise `noise` (1, F, H, W, C). Yields the video latents after each step (float32); the last one is
    the result to decode.

    context: (2, L, D) text-encoder states [prompt, negative prompt] when `guidance > 1`, else (1, L, D). The
    guidance pair runs as one batch of two (`cfg_batch`, faster) or as two passes of one (half the activations).
    condition: given latent frames (1, n, h, w, C), normalized, kept fixed as the first n frames with timestep 0
    (TI2V's `expand_timesteps` conditioning, as diffusers and FastVideo's TI2V denoising do it for a first frame,
    and Wan2GP's for the last frames of a video it continues; with every sampler, DMD too).
    share: this process's share of the run (`ALONE`, or a group's parallel.share.RankShare, whose branch of the
    guidance pair this process runs and whose tokens the transformer was sharded for). Every step starts at its
    checkpoint, where the cancel token stops the run. All processes keep the same latents.
    plan: a step cache's (sampling/magcache.py): for each step whether the transformer runs its blocks, or adds the
    residual they added at the last step that ran them (one kept per branch of the guidance pair, as diffusers keeps
    one per cache context). calibration: a list that gets each step's magnitude ratio of the prompt branch's residual
    to the step before's (every step runs its blocks), as diffusers' MagCache measures it with `calibrate=True`.
    """
    context = share.branch_context(context)
    _, num_frames, height, width, _ = noise.shape
    dtype = transformer.dtype
    rope = transformer.rope(num_frames, height, width)
    kv = transformer.cross_attention_kv(transformer.embed_text(context.astype(dtype)))
    mx.eval(rope, kv)
    batch = context.shape[0]
    # per-frame timestep mask: 0 for the given frames, 1 elsewhere (diffusers' `first_frame_mask`)
    given = 0 if condition is None else condition.shape[1]
    frame_mask = (mx.arange(num_frames) >= given).astype(mx.float32)

    passes = 1 if cfg_batch else batch
    caching = plan is not None or calibration is not None
    holds = [BlockResidual() if caching else None for _ in range(passes)]
    latents = noise
    for step, t in enumerate(sampler.timesteps):
        share.checkpoint(cancel)
        previous = holds[0].residual if calibration is not None else None
        for hold in holds:
            if hold is not None:
                hold.skip = plan is not None and not plan[step]
        x = latents if condition is None else mx.concatenate([condition, latents[:, given:]], axis=1)
        timestep = (frame_mask * float(t))[None]
        if cfg_batch:
            x = mx.broadcast_to(x.astype(dtype), (batch, *x.shape[1:]))
            prediction = transformer(x, mx.broadcast_to(timestep, (batch, num_frames)), kv, rope, holds[0])
        else:
            prediction = mx.concatenate([
                transformer(x.astype(dtype), timestep, [(k[i:i + 1], v[i:i + 1]) for k, v in kv], rope, holds[i])
                for i in range(batch)])
        prediction = share.exchange_branches(prediction)  # (2, ...) with guidance: the prompt's, the negative's
        if prediction.shape[0] == 2:
            cond, uncond = prediction[:1], prediction[1:]
            prediction = uncond + guidance * (cond - uncond)
        # the solver keeps evolving its own first frames; the video's are the given ones
        latents = sampler.step(prediction, latents)
        mx.eval(latents, [hold.residual for hold in holds if hold is not None])
        if calibration is not None:
            calibration.append(magnitude_ratio(holds[0].residual[:1], None if previous is None else previous[:1]))
        share.unit_done()
        yield latents if condition is None else mx.concatenate([condition, latents[:, given:]], axis=1)


def decode_frames(vae, normalizer: LatentNormalizer, latents: mx.array, cancel=None, tile=None,
                  frame_by_frame: bool = False, strip_width: int | None = None, share=ALONE, queued_ahead: bool = True):
    """Decode latents to float32 frames in [0, 1] (diffusers' postprocessing), yielding (done, total, frames):
    untiled, as WanVAE.decode_chunks (one chunk per latent frame, the VAE's causal cache carried along; strips x
    latent frames with `strip_width`), `frames` (T_i, H, W, 3) or None while earlier strips decode; tiled (`tile` =
    {"tile": latent pixels, "overlap": latent pixels}), one item per tile and the whole video at the end (`frames`
    None before). Frames are MLX arrays. `frame_by_frame`, `strip_width`, `queued_ahead`: see WanVAE.decode_chunks.
    share: untiled, this process decodes the strips of `share.decode_share` and the share gathers each chunk's
    columns (the whole chunk on rank 0, None on the others); each chunk is a checkpoint, as each denoising step. A
    tiled decode runs on rank 0 alone."""

    def chunks(z, share):
        for done, total, chunk in vae.decode_chunks(z, frame_by_frame, strip_width, share.decode_share, queued_ahead):
            share.checkpoint(cancel)
            chunk = None if chunk is None else share.gather_columns(chunk)
            share.unit_done(finished=done == total)
            yield done, total, None if chunk is None else mx.clip(chunk[0] / 2 + 0.5, 0.0, 1.0).astype(mx.float32)

    z = normalizer.denormalize(latents.astype(vae.dtype))
    if tile is None:
        yield from chunks(z, share)
        return
    tiles = decode_tiled(lambda z: (np.array(frames) for _, _, frames in chunks(z, ALONE) if frames is not None), z,
                         vae.config.scale_factor_spatial, tile["tile"], tile["overlap"])
    for done, total, video in tiles:
        yield done, total, None if video is None else mx.array(video)


def decode_draft(tiny_decoder, latents: mx.array, cancel=None):
    """A draft's frames: the tiny decoder (models/taehv.py) on the normalized latents, a latent frame at a time,
    yielding (done, total, frames (T_i, H, W, 3) float32 in [0, 1]) as decode_frames does."""
    total = latents.shape[1]
    for done, frames in enumerate(tiny_decoder.decode_chunks(latents), start=1):
        ALONE.checkpoint(cancel)
        yield done, total, frames.astype(mx.float32)


def frames_to_uint8(frames: mx.array) -> mx.array:
    """Float frames in [0, 1] -> uint8, rounding to the nearest level (as video.to_uint8), on the device."""
    return mx.round(mx.clip(frames, 0.0, 1.0) * 255.0).astype(mx.uint8)
