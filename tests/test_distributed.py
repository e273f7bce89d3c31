"""Several processes on one video (wan_engine.parallel), on this machine's CPU: real processes that mlx.launch starts
with the ring backend on localhost, each on ports of its own (tests may run side by side).

Frames from 2 and 4 processes equal one process's (float32, tiny snapshots) for text to video with and without
guidance, image to video, both presets, and a LoRA (fused by every process) with the dmd sampler: at 2 processes
guidance-parallel or sequence-parallel, at 4 both at once (two halves of two) or sequence-parallel over 4 (whose 6
tokens a frame split unevenly: 2, 1, 2, 1). The
K/V all-gather has no constraint on the head counts, so the snapshots' heads (2 and 3) need none either. A cancel
and a closed run on rank 0 stop every process (the runs after them, on the same processes, are still exact); a
killed or hung process ends the run on rank 0 with the group's error within the timeout; the CLI writes one video
and one sidecar; the app serves from rank 0, and says so when its group breaks.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_server import running_app
from conftest import ROOT
from test_app_api import run
from test_lora import musubi_lora, shapes_of
from tiny_snapshots import sample_image
from wan_engine import Engine, GenerationRequest, Result
from wan_engine.outputs.video import read_video

BAR = 1e-5  # max abs against one process; we measure ~2e-6
MLX_LAUNCH = shutil.which("mlx.launch")
TIMEOUT_S = 60  # the group's default: a dead or hung process is noticed within it
PROMPT, NEGATIVE = "a red fox runs through fresh snow", "blurry, static"
MAGCACHE = dict(cache="magcache", cache_threshold=0.1, cache_max_skip=2, cache_retention=0.25,
                cache_ratios=[1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93])  # skips 4 of 8 steps

# name: (snapshot, preset, request)
CASES = {
    "t2v": ("small", "normal", dict(width=96, height=64, frames=9, steps=3, guidance=5.0, seed=1)),
    "t2v-no-guidance": ("small", "normal", dict(width=96, height=64, frames=9, steps=3, guidance=1.0, seed=2)),
    "i2v": ("small", "normal", dict(width=96, height=64, frames=9, steps=3, guidance=5.0, seed=3, image=True)),
    "low-ram": ("wide", "low-ram", dict(width=128, height=64, frames=9, steps=2, guidance=4.0, seed=4)),
    "low-ram-i2v-no-guidance": ("wide", "low-ram", dict(width=128, height=64, frames=5, steps=2, guidance=1.0,
                                                        seed=5, image=True)),
    # a distillation LoRA's use: the base model, a LoRA (which every process fuses) and the dmd sampler
    "lora-dmd": ("small", "normal", dict(width=96, height=64, frames=9, sampler="dmd", seed=6, lora=True)),
    # MagCache: every process takes the same plan; sequence-parallel processes keep their own tokens' residuals
    "magcache": ("small", "normal", dict(width=96, height=64, frames=9, steps=8, guidance=5.0, seed=7, **MAGCACHE)),
    "magcache-low-ram-no-guidance": ("wide", "low-ram", dict(width=128, height=64, frames=5, steps=8, guidance=1.0,
                                                             seed=8, **MAGCACHE)),
    # a story: each segment handed over with its given latent frames (the last 5 frames of the one before)
    "story": ("small", "normal", dict(width=96, height=64, frames=9, steps=2, guidance=5.0, seed=10,
                                      continuations=["it turns around"], overlap_frames=5)),
}
LAYOUTS = {  # processes -> case -> the layout the sidecar records
    2: {"t2v": (2, 1), "t2v-no-guidance": (1, 2), "i2v": (2, 1), "low-ram": (2, 1), "low-ram-i2v-no-guidance": (1, 2),
        "lora-dmd": (1, 2), "magcache": (2, 1), "magcache-low-ram-no-guidance": (1, 2), "story": (2, 1)},
    4: {"t2v": (2, 2), "t2v-no-guidance": (1, 4), "i2v": (2, 2), "low-ram": (2, 2), "low-ram-i2v-no-guidance": (1, 4),
        "lora-dmd": (1, 4), "magcache": (2, 2), "magcache-low-ram-no-guidance": (1, 4), "story": (2, 2)},
}


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (the ring backend listens on one per process)."""
    while True:
        first = random.randrange(20000, 60000 - count)
        try:
            probes = [socket.create_server(("127.0.0.1", first + i)) for i in range(count)]
        except OSError:
            continue
        for probe in probes:
            probe.close()
        return first


def launch_command(processes: int, command: list, hostfile: Path | None = None) -> list:
    hosts = ["--hostfile", str(hostfile)] if hostfile else ["-n", str(processes)]
    return [MLX_LAUNCH, "--backend", "ring", "--starting-port", str(free_ports(processes)), *hosts, "--", *command]


@contextmanager
def launched(processes: int, command: list, log: Path, env: dict | None = None, hostfile: Path | None = None):
    """mlx.launch running `command` in a session of its own; every process of it is killed at the end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "w") as out:
        launcher = subprocess.Popen(launch_command(processes, command, hostfile), cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.PIPE, start_new_session=True)
    try:
        yield launcher
    finally:
        with suppress(ProcessLookupError):  # all ended already
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process of `rank` among those mlx.launch started (its MLX_RANK)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == launcher.pid and \
                    f"MLX_RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ProcessLookupError):
            continue
    raise AssertionError(f"no process of rank {rank}")


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def request_of(case: str, snapshots, inputs) -> tuple:
    name, preset, settings = CASES[case]
    settings = dict(settings, prompt=PROMPT, negative_prompt=NEGATIVE)
    if settings.pop("image", False):
        settings["image"] = str(inputs["image"])
    if settings.pop("lora", False):
        settings["loras"] = [[str(inputs["lora"]), 0.8]]
    return str(snapshots[name]), preset, settings


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, snapshots):
    """The inputs the cases read from files: a first frame, and a LoRA for the small snapshot."""
    folder = tmp_path_factory.mktemp("inputs")
    sample_image().save(folder / "first.png")
    return {"image": folder / "first.png",
            "lora": musubi_lora(folder / "style.safetensors", shapes_of(snapshots["small"]), seed=7, rank=4)}


@pytest.fixture(scope="module")
def one_process(snapshots, inputs, tmp_path_factory):
    """Each case's frames from one process."""
    out, frames, engines = tmp_path_factory.mktemp("one-process"), {}, {}
    for case in CASES:
        model, preset, settings = request_of(case, snapshots, inputs)
        engine = engines.setdefault((model, preset), Engine(model, dtype="float32", preset=preset, output_dir=out))
        *_, result = engine.generate(GenerationRequest(**settings, keep_frames=True))
        assert isinstance(result, Result) and result.parallel is None
        frames[case] = result.frames
    return frames


def run_jobs(processes: int, jobs: list, tmp_path: Path) -> Path:
    """Run parallel_runner.py's jobs under mlx.launch; returns the folder of their outcomes."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    command = [sys.executable, "tests/parallel_runner.py", str(tmp_path / "jobs.json"), str(out)]
    with launched(processes, command, tmp_path / "launch.log") as launcher:
        try:
            launcher.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the group did not finish:\n" + (tmp_path / "launch.log").read_text())
    assert all((out / f"{job['name']}.json").exists() for job in jobs), (tmp_path / "launch.log").read_text()
    return out


def case_job(case: str, snapshots, inputs, name: str | None = None, **extra) -> dict:
    model, preset, settings = request_of(case, snapshots, inputs)
    return {"name": name or case, "model": model, "preset": preset, "request": settings, **extra}


@pytest.mark.parametrize("processes", [2, 4])
def test_frames_from_a_group_equal_one_process(processes, snapshots, inputs, one_process, tmp_path):
    jobs = [case_job(case, snapshots, inputs) for case in CASES]
    if processes == 2:  # stops between the exact runs: each later run proves every process stopped at the same place
        jobs[1:1] = [case_job("t2v", snapshots, inputs, "cancel-denoise", cancel_at=["denoise", 1])]
        jobs[3:3] = [case_job("t2v-no-guidance", snapshots, inputs, "close-denoise", close_at=["denoise", 2])]
        jobs[5:5] = [case_job("i2v", snapshots, inputs, "cancel-decode", cancel_at=["decode", 1])]
    out = run_jobs(processes, jobs, tmp_path)
    for case in CASES:
        outcome = json.loads((out / f"{case}.json").read_text())
        guidance, sequence = LAYOUTS[processes][case]
        expected = {"ranks": processes, "guidance": guidance, "sequence": sequence}
        assert outcome["parallel"] | expected == outcome["parallel"], outcome
        assert outcome["sidecar"]["parallel"] == outcome["parallel"]
        assert outcome["parallel"]["exchanged_mib_per_step"] > 0
        frames = np.load(out / f"{case}.npy")
        assert frames.shape == one_process[case].shape
        assert np.abs(frames - one_process[case]).max() < BAR, case
        assert np.abs(frames).max() > 0.1
        if case.startswith("magcache"):
            assert outcome["sidecar"]["cache"] | {"computed_steps": 4, "skipped_steps": 4} == outcome["sidecar"]["cache"]
    if processes == 2:
        assert json.loads((out / "cancel-denoise.json").read_text()) == {"cancelled_after": ["denoise", 1]}
        assert json.loads((out / "close-denoise.json").read_text()) == {"closed_at": ["denoise", 2]}
        assert json.loads((out / "cancel-decode.json").read_text()) == {"cancelled_after": ["decode", 1]}
        assert not list(out.glob("cancel-*.mp4")) and not list(out.glob("close-*.mp4"))
        assert not list(out.glob("*.partial*"))


def test_a_draft_in_a_group_is_decoded_by_rank_0_alone(tmp_path):
    """The demo model's draft: every process denoises, rank 0 alone decodes with the tiny decoder and keeps the
    latents; the frames are one process's."""
    request = dict(prompt=PROMPT, width=96, height=64, frames=9, steps=3, guidance=5.0, seed=9, decoder="tiny")
    *_, alone = Engine("demo", dtype="float32", output_dir=tmp_path / "alone").generate(
        GenerationRequest(**request, keep_frames=True))
    out = run_jobs(2, [{"name": "draft", "model": "demo", "preset": "normal", "request": request}], tmp_path)
    outcome = json.loads((out / "draft.json").read_text())
    assert outcome["sidecar"]["decoder"] == "tiny" and outcome["parallel"]["guidance"] == 2
    assert (out / "draft.latents").is_file()
    assert np.abs(np.load(out / "draft.npy") - alone.frames).max() < BAR


def test_cli_in_a_group_from_a_hostfile_writes_one_video_and_one_sidecar(snapshots, one_process, inputs,
                                                                          no_torch_env, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    model, _, settings = request_of("t2v", snapshots, inputs)
    out = tmp_path / "videos"
    command = [sys.executable, "-m", "wan_engine", "generate", "--model", model, "--dtype", "float32",
               "--output", str(out / "fox.mp4"), "--save-frames", str(tmp_path / "frames.npy")]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    with launched(2, command, tmp_path / "launch.log", env=no_torch_env, hostfile=hostfile) as launcher:
        launcher.wait(timeout=120)
    log = (tmp_path / "launch.log").read_text()
    assert log.count("wrote ") == 1 and "shared by 2 processes (guidance x2, sequence x1)" in log, log
    assert sorted(path.name for path in out.iterdir()) == ["fox.json", "fox.mp4"]
    sidecar = json.loads((out / "fox.json").read_text())
    assert {key: sidecar["parallel"][key] for key in ("ranks", "guidance", "sequence")} == {
        "ranks": 2, "guidance": 2, "sequence": 1}
    assert read_video(out / "fox.mp4")[0].shape == (9, 64, 96, 3)
    assert np.abs(np.load(tmp_path / "frames.npy") - one_process["t2v"]).max() < BAR


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_killed_or_hung_process_ends_the_run_on_rank_0_with_the_groups_error(fault, snapshots, tmp_path):
    """SIGKILL: the ring backend's lost connection (or mlx.launch's SIGTERM) ends rank 0's run at once; SIGSTOP:
    rank 0's watchdog gives up after WAN_PARALLEL_TIMEOUT_S. mlx.launch itself then waits for the stopped
    process, which the test ends."""
    timeout_s = 5 if fault == "hung" else TIMEOUT_S
    command = [sys.executable, "-m", "wan_engine", "generate", "--model", str(snapshots["small"]), "--prompt",
               "a fox", "--width", "64", "--height", "64", "--frames", "5", "--steps", "1000", "--dtype", "float32",
               "--output", str(tmp_path / "never.mp4")]
    log = tmp_path / "launch.log"
    with launched(2, command, log, env={"WAN_PARALLEL_TIMEOUT_S": str(timeout_s)}) as launcher:
        wait_for(lambda: "[denoise]" in log.read_text(), 60, "denoising")
        follower = rank_pid(launcher, 1)
        os.kill(follower, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        took = wait_for(lambda: "error: the group of 2 processes is broken" in log.read_text(), timeout_s + 15,
                        "rank 0's error")
        if fault == "hung":
            assert "process 0 of 2 waited 5 s for the others" in log.read_text()
            assert took >= timeout_s - 1
            os.kill(follower, signal.SIGKILL)
        launcher.wait(timeout=30)
    assert took < timeout_s + 15
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "never.mp4").exists()


def test_the_app_serves_from_rank_0_and_says_when_its_group_breaks(tmp_path):
    launcher = [MLX_LAUNCH, "--backend", "ring", "--starting-port", str(free_ports(2)), "-n", "2", "--"]
    with running_app(tmp_path, launcher=launcher) as server:
        client = Client(server.url, verbose=False)
        for seed in (7, 8):
            video, used_seed, settings, done, _ = run(client, "/text_to_video", prompt="a paper boat", width=96,
                                                      height=64, frames=9, steps=2, seed=seed)[-1]
            assert used_seed == seed and read_video(video)[0].shape == (9, 64, 96, 3)
            assert "2 processes (guidance x2, sequence x1)" in done, done
        sidecars = sorted(server.output_dir.glob("wan-*.json"))
        assert len(sidecars) == 2
        assert json.loads(sidecars[0].read_text())["parallel"]["ranks"] == 2

        os.kill(rank_pid(server.process, 1), signal.SIGKILL)
        time.sleep(1)  # mlx.launch notices the loss and asks rank 0 to stop (it keeps serving)
        with pytest.raises(AppError, match="the group of 2 processes is broken"):
            run(client, "/text_to_video", prompt="after the break", width=96, height=64, frames=9, steps=2, seed=9)
        assert server.process.poll() is None or rank_pid(server.process, 0)
        with pytest.raises(AppError, match="Restart it with mlx.launch"):  # still serving, still saying why
            run(client, "/text_to_video", prompt="again", width=96, height=64, frames=9, steps=2, seed=10)
