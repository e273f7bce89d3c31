"""A run's outputs: the MP4 (H.264, yuv420p, through the ffmpeg that imageio-ffmpeg ships) and its JSON sidecar,
which land together or not at all; and reading videos back.

`VideoOutput` encodes while the frames are still being decoded, into a hidden partial file beside the target.
`close` checks ffmpeg's exit status and that the file reads back with the frame count it was given; `land`
writes the sidecar under a partial name too, and only then renames both into place (the sidecar last: the history lists a
video by its sidecar). On any failure both partials are removed and the error says which folder and what failed,
and, for a full disk, how much room the video needs. Partial names carry the writing process's id, so
`remove_stale_partials` can clear what a killed process left without touching a write still under way.

No user text reaches a command line: the container's tags go to ffmpeg in an ffmetadata file, cut to a bounded
length (the sidecar keeps the whole prompt).
"""

import errno
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from ..errors import WanError
from ..model_files.cache_files import partial_name, stale_partials
from .mp4_boxes import DamagedMP4, video_frame_count

# imageio-ffmpeg starts its ffmpeg processes with a pre-exec function (its own process group), which makes Python
# fork rather than vfork; a fork runs OpenBLAS's fork handlers, which stop its threads under a BLAS call another
# thread has under way (MLX's CPU stream), and that call never returns. Without the pre-exec function Python vforks:
# reading a video (the history, a video to continue) while the engine computes is then safe. Its ffmpeg processes
# stay in our process group, as the encoder's always were.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
METADATA_TEXT_CHARS = 2000  # longest text kept in one MP4 tag
CRF = 10  # H.264 quality (imageio-ffmpeg's quality 8 of 10)
# Fewer frames held back inside x264 (veryfast looks 10 ahead, plus one frame per thread): what is still held when
# the last frame arrives is what a video waits for after its decode. A shorter lookahead: 0.31 s -> 0.13 s on 16
# threads; each frame split across the threads (sliced-threads) rather than one frame per thread: 0.155 s -> 0.088 s
# on 16 cores, alike on 2, same quality setting, a file no larger (bench/bench_mp4.py: a 121-frame 1280x704 video
# fed at the decoder's pace).
X264_LATENCY = "rc-lookahead=4:sync-lookahead=0:sliced-threads=1"
X264_PRESET = "veryfast"
# A draft's frames all come at once (the tiny decoder takes 0.11 s for 121 frames at 1280x704), so its wait is x264
# encoding them: 1.58 s of decode and 0.86 s of save around 0.11 s of decoding on an H100 machine's 16 cores
# (bench_tiny_decoder). With ultrafast, at the same quality setting, a draft's 121 frames took 1.04 s from the
# first frame to the landed file against 3.26 s with veryfast, the file 51 MB against 35 (bench_mp4's `draft`
# variants, 2 cores); a draft is finished later in full quality, and with X264_PRESET.
X264_DRAFT_PRESET = "ultrafast"


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounding to the nearest level."""
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def video_bytes_bound(width: int, height: int, frames: int) -> int:
    """What an MP4 of this size can take on disk at most: H.264 at our quality stays below the raw yuv420p size
    (1.5 bytes a pixel) even for noise; 2 bytes a pixel plus a megabyte leaves room for the container."""
    return 2 * width * height * frames + 2**20


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def prepare_folder(path: Path, width: int, height: int, frames: int) -> None:
    """Create the folder `path` will be written in and check it has room for the video; a WanError that names
    the folder and what is wrong otherwise. Run before the work, so a wrong --output costs no denoising."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise WanError(f"cannot save the video in {folder}: {blocker} is a file, not a folder; choose another "
                       "output path") from None
    except OSError as error:
        raise WanError(f"cannot create the output folder {folder}: {error.strerror or error}") from None
    if path.is_dir():
        raise WanError(f"cannot save the video as {path}: that is a folder; give a file name ending in .mp4")
    if not os.access(folder, os.W_OK):
        raise WanError(f"cannot save the video in {folder}: the folder is not writable")
    needed, free = video_bytes_bound(width, height, frames), shutil.disk_usage(folder).free
    if free < needed:
        raise WanError(f"the disk holding {folder} is too full: a {width}x{height} video of {frames} frames needs "
                       f"up to {megabytes(needed)}, and {megabytes(free)} are free; free some space or choose "
                       "another output folder")


def draft_latents_path(video: Path) -> Path:
    """Where a draft's final latents are kept: beside its video."""
    return video.with_suffix(".latents")


def remove_stale_partials(folder) -> None:
    """Clear the partial files in `folder` whose writing process is gone (cache_files.stale_partials). One case
    is finished instead of removed: a sidecar or a draft's latents whose video already landed (the process died
    between the renames; they were written whole before the video was renamed), so a finished video is never
    lost."""
    for partial, final in stale_partials(folder):
        try:
            landed = final.suffix in (".json", ".latents") and final.with_suffix(".mp4").is_file()
            if landed and not final.exists():
                partial.replace(final)
            else:
                partial.unlink(missing_ok=True)
        except OSError:  # another process cleared it first
            pass


def bounded(text: str) -> str:
    return text if len(text) <= METADATA_TEXT_CHARS else text[: METADATA_TEXT_CHARS - 1] + "…"


def ffmetadata(tags: dict) -> str:
    """`tags` in ffmpeg's metadata file format (`=`, `;`, `#`, backslash and newlines escaped), each text bounded;
    dict values as JSON (still valid JSON: each string in it is bounded)."""
    lines = [";FFMETADATA1"]
    for key, value in tags.items():
        if isinstance(value, dict):
            text = json.dumps({k: bounded(v) if isinstance(v, str) else v for k, v in value.items()},
                              ensure_ascii=False)
        else:
            text = bounded(str(value)).replace("\0", "")  # ffmpeg's tags end at a NUL
        lines.append(f"{key}=" + re.sub(r"([=;#\\\n])", r"\\\1", text))
    return "\n".join(lines) + "\n"


class VideoOutput:
    """An MP4 and its sidecar, written while the frames are still being made (see the module's docstring).

    ffmpeg starts here; `add` hands uint8 frames (T, H, W, 3) to a feeder thread that pipes them to ffmpeg, so
    encoding overlaps whatever produces the next frames. `close()` then `land(record)` put both files in place;
    `abort` (also after any error) leaves nothing behind.
    """

    def __init__(self, path, width: int, height: int, fps: int, tags: dict | None = None,
                 x264_preset: str = X264_PRESET):
        self.path = Path(path)
        self.sidecar_path = self.path.with_suffix(".json")
        self.size = (width, height)
        self.partial = partial_name(self.path)
        self.sidecar_partial = partial_name(self.sidecar_path)
        self.latents_path = draft_latents_path(self.path)
        self.latents_partial = partial_name(self.latents_path)
        self.tags_file = partial_name(self.path.with_suffix(".ffmeta"))
        self.frames = 0
        self.error = None
        self.log = tempfile.TemporaryFile()  # ffmpeg's messages, for the error that explains a failure
        try:
            self.tags_file.write_text(ffmetadata(tags or {}), encoding="utf-8")
            command = [
                imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-v", "error",
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
                "-f", "ffmetadata", "-i", str(self.tags_file), "-map", "0:v", "-map_metadata", "1",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(CRF), "-preset", x264_preset,
                "-x264-params", X264_LATENCY,
                "-movflags", "+faststart", "-f", "mp4", str(self.partial),
            ]
            self.ffmpeg = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log)
        except OSError as error:
            self._remove_partials()
            raise self.failure(error) from None
        self.queue = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._feed, name="video-writer", daemon=True)
        self.thread.start()

    def _feed(self):
        while (frames := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.ffmpeg.stdin.write(frames)
                except OSError as error:  # ffmpeg stopped (a full disk, say): close says why
                    self.error = error

    def add(self, frames: np.ndarray) -> None:
        if frames.shape[1:] != (self.size[1], self.size[0], 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames of shape {frames.shape} {frames.dtype} for a {self.size} video")
        if self.error is not None:
            self.abort()
            raise self.failure(self.error)
        self.frames += len(frames)
        self.queue.put(np.ascontiguousarray(frames))

    def close(self) -> None:
        """Wait for ffmpeg and check the video it wrote; WanError (nothing left behind) when it failed."""
        with self._aborting_on_error():
            self._stop_feeding()
            self.ffmpeg.stdin.close()
            status = self.ffmpeg.wait()
            if status != 0 or self.error is not None:
                raise self.failure(self.error, f"ffmpeg ended with status {status}")
            self._check_readable()

    def land(self, record: dict | None, draft_latents: bytes | None = None) -> tuple[Path, Path | None]:
        """After `close`: write the sidecar (`record`; None: no sidecar) and a draft's latents (a cache entry, the
        `.latents` file beside the video) and rename them into place after the video, the sidecar last; WanError
        (nothing left behind) when any of it fails."""
        with self._aborting_on_error():
            if record is not None:
                write_durably(self.sidecar_partial, json.dumps(record, indent=2, ensure_ascii=False).encode())
            if draft_latents is not None:
                write_durably(self.latents_partial, draft_latents)
            write_durably(self.partial)  # on disk before its name says it is whole
            self.partial.replace(self.path)
            try:
                if draft_latents is not None:
                    self.latents_partial.replace(self.latents_path)
                if record is not None:
                    self.sidecar_partial.replace(self.sidecar_path)
            except OSError:
                self.path.unlink(missing_ok=True)  # together or not at all
                self.latents_path.unlink(missing_ok=True)
                raise
        self._remove_partials()
        return self.path, self.sidecar_path if record is not None else None

    @contextmanager
    def _aborting_on_error(self):
        try:
            yield
        except BaseException as error:
            self.abort()
            if isinstance(error, OSError):
                raise self.failure(error) from None
            raise

    def abort(self) -> None:
        """Stop ffmpeg and remove every partial file."""
        self._stop_feeding()
        if self.ffmpeg.poll() is None:
            self.ffmpeg.kill()
        self.ffmpeg.wait()
        try:
            self.ffmpeg.stdin.close()
        except OSError:  # ffmpeg is gone; nothing waits for the rest
            pass
        self._remove_partials()

    def _stop_feeding(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _remove_partials(self) -> None:
        for path in (self.partial, self.sidecar_partial, self.latents_partial, self.tags_file):
            path.unlink(missing_ok=True)

    def _check_readable(self) -> None:
        """The file reads back whole, with the frame count it was given (mp4_boxes: its boxes and sample tables)."""
        try:
            frames = video_frame_count(self.partial)
        except DamagedMP4 as damage:
            frames, reason = None, str(damage)
        else:
            reason = f"{frames} frames of {self.frames}"
        if frames != self.frames:
            raise WanError(f"could not save the video in {self.path.parent}: the written file does not read back "
                           f"({reason})")

    def failure(self, error: BaseException | None, what: str = "") -> WanError:
        """The error to show for a failed write: which folder, what failed, and for a full disk how much room the
        video needs."""
        self.log.seek(0)
        ffmpeg_says = self.log.read().decode(errors="replace").strip()
        folder = self.path.parent
        if "No space left" in ffmpeg_says or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            needed = video_bytes_bound(*self.size, max(self.frames, 1))
            return WanError(f"could not save the video in {folder}: the disk is full (the video needs up to "
                            f"{megabytes(needed)}; {megabytes(shutil.disk_usage(folder).free)} are free). Nothing "
                            "was kept; free some space and run it again")
        reason = getattr(error, "strerror", None) or (str(error) if error else "") or what
        detail = f" ({ffmpeg_says.splitlines()[-1][:300]})" if ffmpeg_says else ""
        return WanError(f"could not save the video in {folder}: {reason}{detail}. Nothing was kept")


def write_durably(path: Path, data: bytes | None = None) -> None:
    """Write `data` to `path` (None: keep what is there) and wait until it is on the disk."""
    with open(path, "r+b" if data is None else "wb") as f:
        if data is not None:
            f.write(data)
        os.fsync(f.fileno())


def write_video(path, frames: np.ndarray, fps: int, tags: dict | None = None) -> Path:
    """Write uint8 frames (T, H, W, 3) to an H.264 MP4 (no sidecar); returns its path."""
    height, width = frames.shape[1:3]
    output = VideoOutput(path, width, height, fps, tags)
    try:
        output.add(frames)
    except BaseException:
        output.abort()
        raise
    output.close()
    return output.land(None)[0]


def read_video(path) -> tuple[np.ndarray, float]:
    """Decode an MP4 back to uint8 frames (T, H, W, 3) and its frame rate."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames), meta["fps"]


def read_metadata(path) -> dict:
    """The container tags written by `VideoOutput` (via ffmpeg's metadata dump)."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run(
        [exe, "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True, text=True, check=True
    ).stdout
    tags = {}
    for line in re.split(r"(?<!\\)\n", out):
        if "=" in line and not line.startswith(";"):
            key, value = line.split("=", 1)
            tags[key] = re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL)  # ffmetadata escapes = ; # \ and newlines
    return tags
