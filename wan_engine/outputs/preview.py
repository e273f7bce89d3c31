"""Live previews while denoising: the tiny decoder's picture of the middle latent frame at the video's resolution
(half of it above 640 pixels wide), when the tiny decoder is on this machine; else a linear map from the latent
channels to RGB, no decoder at all.

The map is calibrated once per model by encoding a few synthetic colour images with the model's own VAE and
fitting RGB (averaged over each latent pixel's patch) from the normalized latents by ridge regression. That
works for any VAE of this family, real or demo, without shipping a table of factors.
"""

import mlx.core as mx
import numpy as np


def calibration_images(size: int = 256, count: int = 3) -> np.ndarray:
    """Smooth, colourful test pictures (count, size, size, 3) in [-1, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for k in range(count):
        phase = 2.1 * k
        rgb = [np.sin(6 * x + phase) * np.cos(4 * y - phase), np.sin(5 * y + 2 * x + phase), np.cos(7 * x * y + phase)]
        images.append(np.stack(rgb, -1) * 0.9)
    return np.stack(images).astype(np.float32)


def calibrate(vae, normalizer, spatial: int) -> np.ndarray:
    """Fit the (C + 1, 3) latent-to-RGB map (last row: bias) for this VAE."""
    images = calibration_images()
    features, targets = [], []
    for image in images:
        z = normalizer.normalize(vae.encode(mx.array(image)[None, None].astype(vae.dtype)))
        z = np.array(z[0, 0].astype(mx.float32))  # (h, w, C)
        h, w, channels = z.shape
        rgb = image[: h * spatial, : w * spatial].reshape(h, spatial, w, spatial, 3).mean(axis=(1, 3))
        features.append(z.reshape(-1, channels))
        targets.append(rgb.reshape(-1, 3))
    x = np.concatenate(features)
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    y = np.concatenate(targets)
    ridge = 1e-2 * np.eye(x.shape[1], dtype=np.float32)
    return np.linalg.solve(x.T @ x + ridge, x.T @ y).astype(np.float32)


HALVED_ABOVE = 640  # preview widths above this are halved: a sharp picture, a light PNG


def tiny_preview(tiny_decoder, latents: mx.array) -> np.ndarray:
    """The middle latent frame of (1, F, h, w, C) latents through the tiny decoder, as if it began the video (its
    memory empty): one uint8 RGB frame."""
    middle = latents.shape[1] // 2
    (frame,) = tiny_decoder.decode_chunks(latents[:, middle : middle + 1])
    image = np.array(mx.round(frame[-1] * 255).astype(mx.uint8))
    return image[::2, ::2] if image.shape[1] > HALVED_ABOVE else image


def latent_preview(latents: mx.array, rgb_map: np.ndarray, scale: int = 4) -> np.ndarray:
    """The middle latent frame of (1, F, h, w, C) latents as a uint8 RGB image, `scale` times enlarged."""
    frame = np.array(latents[0, latents.shape[1] // 2].astype(mx.float32))
    rgb = frame @ rgb_map[:-1] + rgb_map[-1]
    image = np.clip((rgb + 1) * 127.5, 0, 255).astype(np.uint8)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)
