"""Frames to MP4 (H.264, yuv420p) through imageio-ffmpeg, a JSON sidecar, and reading videos back.

Everything is written under a temporary name beside the target and renamed when complete, so a crash or a
cancelled run never leaves a half-written file behind. `VideoWriter` encodes while the frames are still being
decoded.
"""

import json
import os
import queue
import re
import subprocess
import threading
from pathlib import Path

import imageio_ffmpeg
import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounding to the nearest level."""
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


class VideoWriter:
    """An H.264 MP4 (yuv420p) written while its frames are still being made.

    ffmpeg starts here, on the caller's thread; `add` hands uint8 frames (T, H, W, 3) to a feeder thread that pipes
    them to ffmpeg, so encoding overlaps whatever produces the next frames. `finish` waits for ffmpeg and renames the
    file into place; `abort` (or an error) leaves nothing behind. `metadata` goes into the container's tags.
    """

    def __init__(self, path, width: int, height: int, fps: int, metadata: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = _temporary(self.path)
        tags = []
        for key, value in (metadata or {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            tags += ["-metadata", f"{key}={text}"]
        self.writer = imageio_ffmpeg.write_frames(
            str(self.partial), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=8,
            macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-preset", "veryfast", "-movflags", "+faststart", *tags],
        )
        self.writer.send(None)  # starts ffmpeg
        self.queue = queue.Queue(maxsize=2)
        self.error = None
        self.thread = threading.Thread(target=self._feed, name="video-writer", daemon=True)
        self.thread.start()

    def _feed(self):
        while (frames := self.queue.get()) is not None:
            if self.error is None:
                try:
                    for frame in frames:
                        self.writer.send(frame)
                except Exception as e:  # noqa: BLE001 - reported by add / finish on the caller's thread
                    self.error = e

    def add(self, frames: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(np.ascontiguousarray(frames))

    def finish(self) -> Path:
        self.queue.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            self.writer.close()
            self.partial.replace(self.path)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.writer.close()
        self.partial.unlink(missing_ok=True)


def write_video(path, frames: np.ndarray, fps: int, metadata: dict | None = None) -> Path:
    """Write uint8 frames (T, H, W, 3) to an H.264 MP4; `metadata` goes into the container's tags."""
    height, width = frames.shape[1:3]
    writer = VideoWriter(path, width, height, fps, metadata)
    try:
        writer.add(frames)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


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
