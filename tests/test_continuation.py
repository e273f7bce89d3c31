"""Longer videos: continuing a video (`extend`) and stories of several prompts. One overlap frame is exactly image to
video from the source's last frame; five are Wan2GP's continuation (tests/continuation_reference.py, ported onto
diffusers' components); the written files hold the source, then the new frames, the overlap not repeated; a stopped
or killed story leaves nothing."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from continuation_reference import wan2gp_continuation
from test_pipeline import noise_for
from wan_engine import CancelToken, Cancelled, Engine, GenerationRequest, WanError
from wan_engine.outputs.video import read_video, remove_stale_partials

BAR = 1e-4  # the bar for K=1 against image to video, max abs
PROMPT, NEGATIVE = "a red fox runs through fresh snow", "blurry, static"


@pytest.fixture(scope="module")
def engine(snapshots, tmp_path_factory):
    return Engine(snapshots["small"], dtype="float32", output_dir=tmp_path_factory.mktemp("continued"))


@pytest.fixture(scope="module")
def source(engine, tmp_path_factory):
    """A 9-frame 96x64 video of the small snapshot, as a user's MP4."""
    path = tmp_path_factory.mktemp("source") / "source.mp4"
    *_, result = engine.generate(GenerationRequest(prompt="a boat on a lake", negative_prompt=NEGATIVE, width=96,
                                                   height=64, frames=9, steps=3, seed=11, output=str(path)))
    return result.video_path


def test_one_overlap_frame_is_image_to_video_from_the_last_frame(engine, source, tmp_path):
    frames, fps = read_video(source)
    Image.fromarray(frames[-1]).save(tmp_path / "last.png")
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=96, height=64, frames=9, steps=3, seed=5,
                  keep_frames=True)
    *events, extended = engine.generate(GenerationRequest(**common, extend=str(source), overlap_frames=1,
                                                          output=str(tmp_path / "extended.mp4")))
    *_, image_to_video = engine.generate(GenerationRequest(**common, image=str(tmp_path / "last.png"),
                                                           output=str(tmp_path / "i2v.mp4")))
    assert extended.frames.shape == (8, 64, 96, 3)  # the new frames: the overlap is the source's own
    assert np.abs(extended.frames - image_to_video.frames[1:]).max() < BAR
    written, written_fps = read_video(extended.video_path)
    assert len(written) == len(frames) + 8 and written_fps == fps  # the source's frames, then the new ones
    assert np.abs(written[: len(frames)].astype(int) - frames.astype(int)).mean() < 3  # re-encoded, not changed
    sidecar = json.loads(extended.sidecar_path.read_text())
    assert sidecar["source"]["frame_count"] == len(frames) and len(sidecar["source"]["sha256"]) == 64
    assert sidecar["segments"] == [{"prompt": PROMPT, "seed": 5, "frames": 9, "overlap": 1}]


def test_five_overlap_frames_are_wan2gps_continuation(engine, source, snapshots, tmp_path):
    frames, _ = read_video(source)
    noise = noise_for("small", 96, 64, 13, seed=2)
    *_, extended = engine.generate(GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=96, height=64, frames=13, steps=3, guidance=4.0, seed=1,
        latents=noise, extend=str(source), overlap_frames=5, keep_frames=True, output=str(tmp_path / "k5.mp4")))
    expected = wan2gp_continuation(snapshots["small"], PROMPT, NEGATIVE, frames[-5:], 13, 3, 4.0, noise)
    assert extended.frames.shape == expected.shape == (8, 64, 96, 3)
    assert np.abs(extended.frames - expected).max() < 2e-4
    assert np.abs(expected).max() > 0.1


def test_a_story_streams_its_segments_into_one_video(engine, tmp_path):
    prompts = ["a kite rises", "the kite loops", "the kite lands"]
    *events, story = engine.generate(GenerationRequest(
        prompt=prompts[0], continuations=prompts[1:], negative_prompt=NEGATIVE, width=96, height=64, frames=9,
        steps=2, seed=20, overlap_frames=5, keep_frames=True, output=str(tmp_path / "story.mp4")))
    assert "segment 2 of 3, step 1/2" in [e.message for e in events if e.stage == "denoise"]
    written, fps = read_video(story.video_path)
    assert len(written) == len(story.frames) == 9 + 2 * (9 - 5) and fps == 24
    sidecar = json.loads(story.sidecar_path.read_text())
    assert [s["prompt"] for s in sidecar["segments"]] == prompts and [s["seed"] for s in sidecar["segments"]] == [
        20, 21, 22]
    assert [s["overlap"] for s in sidecar["segments"]] == [0, 5, 5] and "source" not in sidecar
    first = engine.generate(GenerationRequest(prompt=prompts[0], negative_prompt=NEGATIVE, width=96, height=64,
                                              frames=9, steps=2, seed=20, keep_frames=True,
                                              output=str(tmp_path / "first.mp4")))
    *_, alone = first
    assert np.array_equal(story.frames[:9], alone.frames)  # the first segment is the video of its prompt


def test_a_stopped_story_writes_nothing(engine, tmp_path):
    cancel = CancelToken()
    with pytest.raises(Cancelled):
        for event in engine.generate(GenerationRequest(
                prompt="one", continuations=["two", "three"], width=96, height=64, frames=5, steps=2,
                output=str(tmp_path / "stopped.mp4")), cancel):
            if event.stage == "denoise" and event.message.startswith("segment 2"):
                cancel.cancel()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("change,message", [
    (dict(overlap_frames=3), "overlap frames 3 is not allowed: it must be 4n+1"),
    (dict(overlap_frames=9), "at most the segment's length minus 4 (5)"),
    (dict(image="first.png"), "--extend and --image are not allowed together"),
    (dict(extend="/nonexistent.mp4"), "the video /nonexistent.mp4 does not exist"),
    (dict(continuations=["  "]), "the prompt is empty for segment 2"),
    (dict(decoder="tiny"), "a draft (the tiny decoder) is not allowed for a continued video"),
])
def test_bad_continuations_are_refused_before_any_work(engine, source, tmp_path, change, message):
    request = {**dict(prompt="x", width=96, height=64, frames=9, steps=2, extend=str(source),
                      output=str(tmp_path / "never.mp4")), **change}
    with pytest.raises(WanError, match=re.escape(message)):
        list(engine.generate(GenerationRequest(**request)))
    assert not list(tmp_path.iterdir())


def test_a_video_shorter_than_the_overlap_is_refused(engine, tmp_path):
    *_, short = engine.generate(GenerationRequest(prompt="x", width=96, height=64, frames=1, steps=1,
                                                  output=str(tmp_path / "one-frame.mp4")))
    with pytest.raises(WanError, match="has 1 frames, fewer than the 5 overlap frames"):
        list(engine.generate(GenerationRequest(prompt="y", width=96, height=64, frames=9, steps=1, overlap_frames=5,
                                               extend=str(short.video_path))))


def test_a_killed_story_leaves_no_partial_file(snapshots, tmp_path):
    """SIGKILL in the second segment: no video, no sidecar; the partials it left are cleared by the next run."""
    command = [sys.executable, "-m", "wan_engine", "generate", "--model", str(snapshots["small"]), "--prompt", "a",
               "--prompt", "b", "--prompt", "c", "--width", 96, "--height", 64, "--frames", 9, "--steps", 40,
               "--dtype", "float32", "--output", tmp_path / "killed.mp4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([str(part) for part in command], env=env, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.monotonic() + 300
    while "segment 2 of 3" not in seen and time.monotonic() < deadline and (said := process.stderr.read(16)):
        seen += said
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert "segment 2 of 3" in seen
    assert not (tmp_path / "killed.mp4").exists() and not (tmp_path / "killed.json").exists()
    remove_stale_partials(tmp_path)
    assert not list(tmp_path.glob("*partial*"))
