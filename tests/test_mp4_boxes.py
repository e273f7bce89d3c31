"""The in-process MP4 check (outputs/mp4_boxes.py) against ffmpeg's own demuxer: the same frame count on files that
ffmpeg's muxer lays out in different ways, and every cut or damaged file refused; and MP4s read while MLX computes."""

import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

from conftest import ROOT
from wan_engine.errors import WanError
from wan_engine.outputs.mp4_boxes import DamagedMP4, video_frame_count
from wan_engine.outputs.video import VideoOutput

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def encode(path, frames: int, options: list) -> None:
    video = np.random.default_rng(frames).integers(0, 256, (frames, 32, 48, 3), dtype=np.uint8)
    subprocess.run([FFMPEG, "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "48x32", "-r", "12",
                    "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", *options, str(path)],
                   input=video.tobytes(), check=True)


def ffmpeg_packets(path) -> int:
    """The reference: the packets ffmpeg's demuxer reads from the file's video stream."""
    listing = subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                              "-f", "framecrc", "-"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in listing.splitlines() if line and not line.startswith("#"))


LAYOUTS = {
    "index first (faststart)": ["-movflags", "+faststart"],
    "index last": [],
    "no B-frames": ["-bf", "0", "-movflags", "+faststart"],
    "a sound track first": None,  # the video is the second track
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("frames", [1, 9, 121])
def test_the_frame_count_is_ffmpegs_in_every_layout(tmp_path, layout, frames):
    path = tmp_path / "v.mp4"
    if LAYOUTS[layout] is None:
        encode(tmp_path / "silent.mp4", frames, [])
        subprocess.run([FFMPEG, "-y", "-v", "error", "-f", "lavfi", "-i", "sine=duration=11", "-i",
                        str(tmp_path / "silent.mp4"), "-map", "0:a", "-map", "1:v", "-c:v", "copy", "-c:a", "aac",
                        "-shortest", str(path)], check=True)
    else:
        encode(path, frames, LAYOUTS[layout])
    assert video_frame_count(path) == ffmpeg_packets(path) == frames


def test_a_cut_or_damaged_file_is_refused(tmp_path):
    path = tmp_path / "v.mp4"
    for options in LAYOUTS["index first (faststart)"], LAYOUTS["index last"]:
        encode(path, 9, options)
        whole = path.read_bytes()
        for cut in [1, 7, 8, 100, len(whole) // 2, len(whole) - 1000, len(whole) - 1]:
            path.write_bytes(whole[:cut])
            with pytest.raises(DamagedMP4):
                video_frame_count(path)
        moov = whole.index(b"moov") - 4
        damaged = bytearray(whole)
        damaged[moov:moov + 4] = (len(whole) * 2).to_bytes(4, "big")  # a box larger than the file
        path.write_bytes(bytes(damaged))
        with pytest.raises(DamagedMP4, match="runs past the end"):
            video_frame_count(path)
        stco = whole.index(b"stco") + 12  # the first chunk's offset, moved past the media data
        damaged = bytearray(whole)
        damaged[stco:stco + 4] = (len(whole) + 10).to_bytes(4, "big")
        path.write_bytes(bytes(damaged))
        with pytest.raises(DamagedMP4, match="outside the media data"):
            video_frame_count(path)


def test_a_video_that_does_not_read_back_is_not_landed(tmp_path):
    output = VideoOutput(tmp_path / "v.mp4", 48, 32, 12)
    output.add(np.zeros((5, 32, 48, 3), np.uint8))
    output.close()  # whole: it reads back
    whole = output.partial.read_bytes()
    output.partial.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WanError, match=f"could not save the video in {tmp_path}: the written file does not read back"):
        output.close()
    assert list(tmp_path.iterdir()) == []  # the partial files are gone, nothing landed


def test_videos_are_read_while_mlx_computes_on_another_thread(tmp_path):
    """The history and a continued video read MP4s through imageio-ffmpeg while the engine may be computing: its
    ffmpeg processes must start without running fork handlers (OpenBLAS's stop the threads of a BLAS call under way
    on MLX's CPU stream, which then never returns). Bounded: a hang fails the test."""
    path = tmp_path / "v.mp4"
    encode(path, 9, [])
    script = f"""
import threading, time
import imageio_ffmpeg, mlx.core as mx
import wan_engine  # sets how imageio-ffmpeg starts ffmpeg

stop = False
def read():
    while not stop:
        frames = imageio_ffmpeg.read_frames({str(path)!r})
        next(frames)
        frames.close()
reader = threading.Thread(target=read)
reader.start()
a = mx.random.normal((512, 512))
start = time.time()
while time.time() - start < 3:
    x = a
    for _ in range(20):
        x = x @ a / 512
    mx.eval(x)
stop = True
reader.join()
print("done")
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ran.returncode == 0 and ran.stdout.strip() == "done", ran.stderr
