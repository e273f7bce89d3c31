"""Faults, injected into the real engine and the real command line: a disk that is too full or fills up while a
run writes, a write or rename that fails, processes killed at each moment of a run, damaged cache entries, very
long and unusual prompts, and hostile pictures. Each test checks the message a user gets and that nothing
half-written is left or listed; the app's side is in test_faults_app.py.

A full disk is a real one where the machine lets us mount a small tmpfs (root on Linux); elsewhere those tests are
skipped and the failures of single os-level calls (fsync, rename) still run.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from fault_tools import files_in, fill, hostile_pictures, small_disk
from wan_engine import Engine, GenerationRequest, Result, WanError
from wan_engine.model_files.cache_files import DamagedEntry, read_entry, write_entry
from wan_engine.model_files.cache_files import cache_root
from wan_engine.model_files.demo import ensure_demo_model
from wan_engine.outputs.video import read_metadata, read_video, remove_stale_partials

SMALL = dict(width=64, height=64, frames=5, steps=2, seed=3)


def generate(engine, **request):
    *events, result = engine.generate(GenerationRequest(keep_frames=True, **request))
    assert isinstance(result, Result)
    return events, result


# -- a full disk --------------------------------------------------------------------------------------------------

def test_a_disk_too_full_for_the_video_is_refused_before_any_work(snapshots, no_torch_env, tmp_path):
    with small_disk(tmp_path / "disk", "512k") as disk:
        proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "a boat", "--width", 96, "--height",
                        64, "--frames", 9, "--steps", 1, "--output", disk / "out.mp4"], no_torch_env)
        assert proc.returncode == 1
        assert f"the disk holding {disk} is too full: a 96x64 video of 9 frames needs up to 1.2 MB" in proc.stderr
        assert "free some space or choose another output folder" in proc.stderr
        assert "[denoise]" not in proc.stderr  # refused before the work, not after it
        assert files_in(disk) == []


@pytest.mark.parametrize("stage", ["denoise", "decode", "save"])
def test_a_disk_that_fills_up_during_a_run_leaves_nothing_and_the_next_run_works(snapshots, tmp_path, stage):
    with small_disk(tmp_path / "disk", "4m") as disk:
        engine = Engine(snapshots["small"], dtype="float32", output_dir=disk)
        filler = None
        with pytest.raises(WanError) as failure:
            for event in engine.generate(GenerationRequest(prompt="a boat", **SMALL)):
                if filler is None and getattr(event, "stage", None) == stage:
                    filler = fill(disk)
        message = str(failure.value)
        assert message.startswith(f"could not save the video in {disk}: the disk is full (the video needs up to ")
        assert "are free). Nothing was kept; free some space and run it again" in message
        assert files_in(disk) == ["filler"]

        filler.unlink()
        _, result = generate(engine, prompt="a boat", **SMALL)
        assert files_in(disk) == sorted([result.video_path.name, result.sidecar_path.name])


def test_a_failing_fsync_or_rename_while_landing_leaves_neither_file(snapshots, tmp_path, monkeypatch):
    """The os-level calls of the last moment fail: the sidecar's fsync (a full disk on NFS reports it there), then
    the sidecar's rename after the video's succeeded (the video is taken back: both or neither)."""
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync_full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(WanError, match=f"could not save the video in {tmp_path}: the disk is full"):
        generate(engine, prompt="a boat", **SMALL)
    assert files_in(tmp_path) == []
    monkeypatch.setattr(os, "fsync", real_fsync)

    def replace_failing_for_sidecars(source, target):
        if str(target).endswith(".json"):
            raise OSError(errno.EIO, "Input/output error", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_failing_for_sidecars)
    with pytest.raises(WanError, match=f"could not save the video in {tmp_path}: Input/output error. Nothing was"):
        generate(engine, prompt="a boat", **SMALL)
    assert files_in(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)
    _, result = generate(engine, prompt="a boat", **SMALL)
    assert result.video_path.is_file() and result.sidecar_path.is_file()


@pytest.mark.parametrize("output,message", [
    ("a-file/out.mp4", "cannot save the video in {tmp}/a-file: {tmp}/a-file is a file, not a folder"),
    ("a-file/deeper/out.mp4", "cannot save the video in {tmp}/a-file/deeper: {tmp}/a-file is a file, not a folder"),
    ("a-folder", "cannot save the video as {tmp}/a-folder: that is a folder; give a file name ending in .mp4"),
])
def test_output_paths_that_cannot_be_made_are_refused_before_any_work(snapshots, no_torch_env, tmp_path, output,
                                                                     message):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "a boat", "--width", 64, "--height", 64,
                    "--frames", 5, "--steps", 1, "--output", tmp_path / output], no_torch_env)
    assert proc.returncode == 1
    assert message.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert "[denoise]" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert files_in(tmp_path) == ["a-file", "a-folder"] and files_in(tmp_path / "a-folder") == []


# -- killed processes ---------------------------------------------------------------------------------------------

def test_processes_killed_at_each_moment_leave_only_whole_videos(tmp_path):
    """SIGKILL during denoising, decoding, and saving (before and between the two renames); then the clean-up a
    restarted app or CLI runs: partials are gone, and the video whose sidecar was written but not yet renamed is
    kept whole (nothing finished is lost)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    last_event = {"denoise": "denoise", "decode": "decode", "saving": "save", "landing": "save", "none": "result"}
    for moment, event in last_event.items():
        proc = subprocess.run([sys.executable, "tests/fault_runner.py", str(tmp_path / moment / "wan.mp4"), moment],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == (0 if moment == "none" else -9), proc.stderr
        assert proc.stdout.split()[-1] == event
        left = files_in(tmp_path / moment)
        assert any(".partial-" in name for name in left) == (moment in ("decode", "saving", "landing")), left

        remove_stale_partials(tmp_path / moment)  # as the next run, or the app's start, does
        finished = moment in ("landing", "none")
        assert files_in(tmp_path / moment) == (["wan.json", "wan.mp4"] if finished else [])
        if finished:
            frames, _ = read_video(tmp_path / moment / "wan.mp4")
            assert frames.shape == (9, 64, 64, 3)
            assert json.loads((tmp_path / moment / "wan.json").read_text())["video"] == "wan.mp4"


# -- damaged caches -----------------------------------------------------------------------------------------------

DAMAGES = {
    "cut short": lambda data: data[: len(data) // 2],
    "one byte changed": lambda data: data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
    "empty": lambda data: b"",
    "not an entry": lambda data: b'{"json": "of another program"}',
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_entry_is_a_miss_said_once_and_rebuilt(tmp_path, damage, caplog):
    path = tmp_path / "entry.bin"
    assert write_entry(path, b"payload" * 100, {"tokens": 7})
    assert read_entry(path) == ({"tokens": 7}, b"payload" * 100)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    with pytest.raises(DamagedEntry):
        read_entry(path)
    said = [r.message for r in caplog.records if "damaged" in r.message]
    assert len(said) == 1 and said[0].startswith(f"the cache entry {path} is damaged (")
    assert said[0].endswith("): removed, it will be built again")
    assert read_entry(path) is None  # removed: a miss from now on, said once


def test_a_damaged_prompt_embedding_is_rebuilt_by_the_command_line(snapshots, no_torch_env, tmp_path):
    cache = Path(no_torch_env.get("WAN_STUDIO_CACHE") or os.environ["WAN_STUDIO_CACHE"]) / "prompt-embeddings"
    args = ["generate", "--model", snapshots["small"], "--prompt", "a damaged cache, rebuilt", "--guidance", 1,
            "--width", 64, "--height", 64, "--frames", 5, "--steps", 1, "--seed", 1]
    first = run_cli(args + ["--output", tmp_path / "a.mp4", "--save-frames", tmp_path / "a.npy"], no_torch_env)
    assert first.returncode == 0, first.stderr
    entry = max(cache.glob("*.embedding"), key=lambda p: p.stat().st_mtime)
    entry.write_bytes(entry.read_bytes()[:100])
    second = run_cli(args + ["--output", tmp_path / "b.mp4", "--save-frames", tmp_path / "b.npy"], no_torch_env)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("is damaged") == 1 and "built again" in second.stderr
    assert "loading the text encoder" in second.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert read_entry(entry) is not None  # whole again
    third = run_cli(args + ["--output", tmp_path / "c.mp4"], no_torch_env)
    assert third.returncode == 0 and "damaged" not in third.stderr


def test_a_damaged_demo_model_is_built_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WAN_STUDIO_CACHE", str(tmp_path))
    root = ensure_demo_model()
    assert root.parent == cache_root() == tmp_path
    shard = next((root / "transformer").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".{root.name}.partial-{gone.stdout.strip()}"  # a build whose process was killed
    (abandoned / "transformer").mkdir(parents=True)
    assert ensure_demo_model() == root
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]
    assert [r.message for r in caplog.records if "demo" in r.message] == [
        f"the demo model in {root} is damaged: building it again"]
    _, result = generate(Engine("demo", dtype="float32", output_dir=tmp_path / "out"), prompt="a boat", **SMALL)
    assert result.video_path.is_file()


# -- prompts ------------------------------------------------------------------------------------------------------

UNUSUAL = "a\x00b \u202eright-to-left\u202c 🎬🌊 \x07\x1b[31m bell and colour\nsecond line =;#\\ \t tab"


@pytest.mark.parametrize("prompt", ["a calm sea, " * 12_500, UNUSUAL], ids=["150000 characters", "unusual"])
def test_any_prompt_is_saved_with_bounded_metadata_and_its_token_count(snapshots, tmp_path, prompt):
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    events, result = generate(engine, prompt=prompt, **SMALL)
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["settings"]["prompt"] == prompt  # the whole prompt is kept
    tags = read_metadata(result.video_path)
    assert len(tags["title"]) <= 2000 and len(json.loads(tags["comment"])["prompt"]) <= 2000
    tokens = sidecar["prompt_tokens"]
    assert tokens == result.prompt_tokens and tokens["limit"] == 512
    if len(prompt) > 100_000:
        assert tokens["used"] == 512 and tokens["total"] > 10_000
        assert any(f"the prompt has {tokens['total']} tokens and the model reads 512" in e.message for e in events)
    else:
        assert tokens["used"] == tokens["total"] < 512
        assert tags["title"] == prompt.replace("\x00", "") and json.loads(tags["comment"])["prompt"] == prompt


# -- hostile pictures ---------------------------------------------------------------------------------------------

def test_hostile_pictures_are_refused_by_the_command_line_naming_the_file(snapshots, no_torch_env, tmp_path):
    for name, (path, message) in hostile_pictures(tmp_path).items():
        out = tmp_path / "out" / "never.mp4"
        proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "a boat", "--image", path, "--width",
                        64, "--height", 64, "--frames", 5, "--steps", 1, "--output", out], no_torch_env)
        assert proc.returncode == 1, name
        assert f"error: the image {path} {message}" in proc.stderr or f"error: the file {path} {message}" in \
            proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
        assert not out.parent.exists() or files_in(out.parent) == []
