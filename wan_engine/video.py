"""Frames to MP4 (H.264, yuv420p) through imageio-ffmpeg, a JSON sidecar, and reading videos back.

Everything is written under a temporary name beside the target and renamed when complete, so a crash or a
cancelled run never leaves a half-written file behind.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounding to the nearest level."""
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def write_video(path, frames: np.ndarray, fps: int, metadata: dict | None = None) -> Path:
    """Write uint8 frames (T, H, W, 3) to an H.264 MP4; `metadata` goes into the container's tags."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _temporary(path)
    tags = []
    for key, value in (metadata or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        tags += ["-metadata", f"{key}={text}"]
    frames = np.ascontiguousarray(frames)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(partial), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=8,
        macro_block_size=1, ffmpeg_log_level="error",
        output_params=["-preset", "veryfast", "-movflags", "+faststart", *tags],
    )
    try:
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
        partial.replace(path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return path


def write_sidecar(path, record: dict) -> Path:
    """Write `record` as pretty JSON, atomically."""
    path = Path(path)
    partial = _temporary(path)
    try:
        partial.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_video(path) -> tuple[np.ndarray, float]:
    """Decode an MP4 back to uint8 frames (T, H, W, 3) and its frame rate."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames), meta["fps"]


def read_metadata(path) -> dict:
    """The container tags written by `write_video` (via ffmpeg's metadata dump)."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run(
        [exe, "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True, text=True, check=True
    ).stdout
    tags = {}
    for line in out.splitlines():
        if "=" in line and not line.startswith(";"):
            key, value = line.split("=", 1)
            tags[key] = re.sub(r"\\(.)", r"\1", value)  # ffmetadata escapes = ; # and backslash
    return tags
