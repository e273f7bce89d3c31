"""The web app's API against a real server on the demo model, through gradio_client: both endpoints stream
progress and end with the video, the seed and the settings; bad input is refused with what is allowed; Stop ends
a run and the next one works; two clients wait in the queue and are both served; only the output folder's files
are served. And the command line's login and sharing flags."""

import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from app_server import ROOT
from test_lora import musubi_lora, shapes_of
from wan_engine.model_files.demo import ensure_demo_model
from wan_engine.outputs.video import read_video

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server.url, verbose=False)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 120x80 PNG: red left half, blue right half."""
    path = tmp_path_factory.mktemp("pictures") / "red-blue.png"
    image = Image.new("RGB", (120, 80), (220, 30, 30))
    image.paste((30, 30, 220), (60, 0, 120, 80))
    image.save(path)
    return path


def run(client, api_name, **arguments):
    """Submit, wait, and return every streamed update (video, seed, settings, progress, preview); the last is the
    result."""
    job = client.submit(api_name=api_name, **arguments)
    job.result(timeout=TIMEOUT_S)
    return job.outputs()


def wait_until(condition, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_text_to_video_streams_progress_and_ends_with_video_seed_and_settings(client, app_server):
    updates = run(client, "/text_to_video", prompt="a paper boat on a pond", width=96, height=64, frames=9, steps=2,
                  seed=7)
    assert len(updates) >= 2
    progress = [update[3] for update in updates]
    assert any("Denoising" in line and "step 1/2" in line and "s/step" in line for line in progress)
    assert any("ETA" in line and "GiB in use" in line for line in progress)
    previews = [update[4] for update in updates if update[4]]
    assert previews and Image.open(previews[0]).mode == "RGB"
    assert all(update[0] is None for update in updates[:-1])  # no video until the end

    video, seed, settings, done, _ = updates[-1]
    frames, fps = read_video(video)
    assert frames.shape == (9, 64, 96, 3) and fps == 24
    assert seed == 7
    assert {key: settings[key] for key in ("prompt", "width", "height", "frames", "steps", "seed")} == {
        "prompt": "a paper boat on a pond", "width": 96, "height": 64, "frames": 9, "steps": 2, "seed": 7}
    assert "Done" in done and "peak memory" in done
    assert re.search(r"denoising [\d.]+ s \([\d.]+ s/step\) · decoding [\d.]+ s · saving [\d.]+ s", done), done
    # the history is the output folder: the video and its sidecar
    sidecar = json.loads(next(app_server.output_dir.glob("wan-*-7.json")).read_text())
    assert sidecar["settings"]["prompt"] == "a paper boat on a pond"
    assert (app_server.output_dir / sidecar["video"]).is_file()


def test_image_to_video_takes_its_size_from_the_picture(client, app_server, picture):
    updates = run(client, "/image_to_video", image=handle_file(picture), prompt="the colours swirl", frames=5,
                  steps=2, seed=11)
    assert len(updates) >= 2
    video, seed, settings, _, _ = updates[-1]
    assert read_video(video)[0].shape == (5, 64, 96, 3)  # 120x80 is 3:2; at the demo's 96x64 area: 96x64
    assert seed == 11
    assert (settings["width"], settings["height"], settings["frames"]) == (96, 64, 5)
    first_frame = Path(settings["image"])  # kept beside the videos, for the history
    assert first_frame.parent == app_server.output_dir / "inputs"
    assert Image.open(first_frame).size == (120, 80)  # the same aspect: nothing cropped


def test_image_to_video_honours_an_explicit_size_by_cropping_the_centre(client, picture):
    video, seed, settings, _, _ = run(client, "/image_to_video", image=handle_file(picture), prompt="a square",
                                      width=64, height=64, frames=5, steps=2, seed=12)[-1]
    assert read_video(video)[0].shape == (5, 64, 64, 3)
    assert (settings["width"], settings["height"], seed) == (64, 64, 12)
    first_frame = Image.open(settings["image"])
    assert first_frame.size == (80, 80)  # the centre of 120x80: half red, half blue
    assert first_frame.getpixel((10, 40))[0] > 150 and first_frame.getpixel((70, 40))[2] > 150


REFUSED = [
    ("/text_to_video", dict(width=100, frames=8), "width 100 is not allowed: it must be a positive multiple of 32"),
    ("/text_to_video", dict(frames=8), "frames 8 is not allowed: it must be 4n+1"),
    ("/text_to_video", dict(prompt="   "), "the prompt is empty"),
    ("/text_to_video", dict(steps=0), "steps 0 is not allowed: it must be between 1 and 100"),
    ("/text_to_video", dict(guidance=25), "guidance 25 is not allowed: it must be between 0 and 20"),
    ("/text_to_video", dict(seed=-5), "seed -5 is not allowed: use -1 for a random seed"),
    ("/image_to_video", dict(image="unreadable"), "the file notes.png is not a picture that can be read: use a PNG"),
    ("/image_to_video", dict(width=64, height=0), "give both width and height"),
]


@pytest.mark.parametrize("api_name, change, message", REFUSED, ids=[message for _, _, message in REFUSED])
def test_bad_input_is_refused_with_what_is_allowed(client, app_server, picture, tmp_path, api_name, change, message):
    arguments = dict(prompt="a lighthouse", width=96, height=64, frames=5, steps=2, seed=1)
    if api_name == "/image_to_video":
        arguments["image"] = handle_file(picture)
        if change.pop("image", None):
            not_a_picture = tmp_path / "notes.png"
            not_a_picture.write_text("this is text, not a picture")
            arguments["image"] = handle_file(not_a_picture)
    arguments.update(change)
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(api_name=api_name, **arguments)
    assert app_server.process.poll() is None  # the app keeps running


def test_stop_ends_the_run_within_a_step_and_the_next_run_works(client, app_server):
    job = client.submit(api_name="/text_to_video", prompt="a very long walk", width=256, height=256, frames=33,
                        steps=100, seed=3)
    wait_until(lambda: any("Denoising" in update[3] for update in job.outputs()))
    asked = time.monotonic()
    stopped = client.predict(api_name="/stop")
    assert time.monotonic() - asked < 10
    match = re.search(r"Stopped\*\* at step (\d+)/100", stopped)
    assert match and int(match.group(1)) < 100, stopped
    video, seed, settings, progress, _ = job.result(timeout=TIMEOUT_S)
    assert (video, seed, settings) == (None, None, None) and progress == stopped
    assert not list(app_server.output_dir.glob("wan-*-3.*"))  # a stopped run writes nothing

    video, seed, *_ = run(client, "/text_to_video", prompt="after the stop", width=96, height=64, frames=5, steps=2,
                          seed=4)[-1]
    assert read_video(video)[0].shape[0] == 5 and seed == 4


def test_clients_wait_in_line_see_their_place_and_stop_leaves_the_line(app_server):
    first, second, third = (Client(app_server.url, verbose=False) for _ in range(3))
    with pytest.raises(AppError, match="prompt"):  # an Improve prompt first: it shares the line, not its own limit
        first.predict(api_name="/improve_prompt", prompt=" ")
    long_run = first.submit(api_name="/text_to_video", prompt="first in line", width=160, height=96, frames=33,
                            steps=30, seed=21)
    wait_until(lambda: any("Denoising" in update[3] for update in long_run.outputs()))
    second_run = second.submit(api_name="/text_to_video", prompt="second in line", width=96, height=64, frames=5,
                               steps=2, seed=22)
    wait_until(lambda: second_run.outputs())
    third_run = third.submit(api_name="/text_to_video", prompt="third in line", width=96, height=64, frames=5,
                             steps=2, seed=23)
    wait_until(lambda: any("Waiting" in update[3] for update in third_run.outputs()))
    assert "Waiting for 2 runs ahead of yours" in third_run.outputs()[-1][3]  # it saw its place in line
    assert "Stopped" in second.predict(api_name="/stop")  # while it waits: it leaves the line, never runs
    assert long_run.result(timeout=TIMEOUT_S)[1] == 21
    assert third_run.result(timeout=TIMEOUT_S)[1] == 23
    video, seed, _, progress, _ = second_run.result(timeout=TIMEOUT_S)
    assert (video, seed) == (None, None) and progress.startswith("**Stopped**")
    assert not list(app_server.output_dir.glob("wan-*-22.*"))


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_only_the_output_folders_files_are_served(client, app_server):
    run(client, "/text_to_video", prompt="a served video", width=96, height=64, frames=5, steps=2, seed=41)
    video = next(app_server.output_dir.glob("wan-*-41.mp4"))
    assert status_of(f"{app_server.url}gradio_api/file={video}") == 200
    assert status_of(f"{app_server.url}gradio_api/file={ROOT / 'app.py'}") == 403
    assert status_of(f"{app_server.url}gradio_api/file=/etc/passwd") == 403


def test_sharing_without_a_login_is_warned_about(monkeypatch):
    monkeypatch.delenv(app.AUTH_VARIABLE, raising=False)
    assert "anyone with the link" in app.exposure_warning(app.parse_args(["--share"]))
    assert app.exposure_warning(app.parse_args(["--share", "--auth", "ada:secret"])) is None
    assert app.exposure_warning(app.parse_args([])) is None


def test_the_login_comes_from_the_flag_or_the_environment(monkeypatch, capsys):
    monkeypatch.delenv(app.AUTH_VARIABLE, raising=False)
    assert app.parse_args(["--auth", "ada:pass:word"]).auth == ("ada", "pass:word")
    assert app.parse_args([]).auth is None
    monkeypatch.setenv(app.AUTH_VARIABLE, "grace:secret")
    assert app.parse_args([]).auth == ("grace", "secret")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-password"])
    assert "must look like user:password" in capsys.readouterr().err


def test_loras_from_the_folder_are_fused_recorded_and_a_bad_one_is_refused(client, app_server):
    """`loras` takes "name:strength" items; a file of the loras/ folder beside the outputs goes by its name. The
    sidecar records name, sha256 and strength; a bad file is refused by name and leaves the model unchanged."""
    folder = app_server.output_dir.parent / "loras"
    folder.mkdir(exist_ok=True)
    style = musubi_lora(folder / "style.safetensors", shapes_of(ensure_demo_model()), seed=3, rank=4)
    (folder / "broken.safetensors").write_bytes(b"this is not a LoRA file")
    arguments = dict(prompt="a boat with a style", width=96, height=64, frames=5, steps=2, seed=9)
    plain = run(client, "/text_to_video", loras=[], **arguments)[-1]
    styled = run(client, "/text_to_video", loras=["style.safetensors:0.8"], **arguments)[-1]
    assert styled[2]["loras"] == [{"name": str(style), "sha256": hashlib.sha256(style.read_bytes()).hexdigest(),
                                   "strength": 0.8}]
    sidecar = app_server.output_dir / Path(styled[0]).with_suffix(".json").name
    assert json.loads(sidecar.read_text())["settings"]["loras"] == styled[2]["loras"]
    assert np.abs(read_video(styled[0])[0].astype(int) - read_video(plain[0])[0]).max() > 10

    with pytest.raises(AppError, match=r"broken\.safetensors"):
        client.predict(api_name="/text_to_video", loras=["broken.safetensors"], **arguments)
    again = run(client, "/text_to_video", loras=[], **arguments)[-1]
    assert np.array_equal(read_video(again[0])[0], read_video(plain[0])[0])  # the model is as it was


def test_the_api_takes_the_sampler_and_the_step_cache(client, app_server):
    """`sampler` and `cache` are parameters of both endpoints: Balanced's MagCache skips steps and says so."""
    updates = run(client, "/text_to_video", prompt="a cached kite", width=96, height=64, frames=5, steps=20, seed=61,
                  sampler="euler", cache="magcache")
    assert any("blocks skipped (MagCache)" in update[3] for update in updates[:-1])
    settings = updates[-1][2]
    assert settings["sampler"] == "euler" and settings["steps"] == 20
    cache = json.loads(next(app_server.output_dir.glob("wan-*-61.json")).read_text())["cache"]
    assert cache["kind"] == "magcache" and (cache["threshold"], cache["max_skip"], cache["retention"]) == (0.06, 2, 0.2)
    assert cache["skipped_steps"] > 0 and cache["computed_steps"] + cache["skipped_steps"] == 20
    with pytest.raises(AppError, match=re.escape("'teacache' (type: <class 'str'>) is not in the list of choices: "
                                                 "['none', 'magcache']")):
        client.predict(api_name="/text_to_video", prompt="x", width=96, height=64, frames=5, steps=2, cache="teacache")
    with pytest.raises(AppError, match="the magcache cache is not allowed with the dmd sampler"):
        client.predict(api_name="/text_to_video", prompt="x", width=96, height=64, frames=5, steps=3, guidance=1.0,
                       sampler="dmd", cache="magcache")


def test_a_draft_and_its_finish_through_the_api(client, app_server):
    """`decoder="tiny"` makes a draft whose latents are kept; /finish takes its file name and writes the full
    quality video beside it; a video that is not a draft, or outside the output folder, is refused."""
    updates = run(client, "/text_to_video", prompt="a drafted boat", width=96, height=64, frames=9, steps=2, seed=71,
                  decoder="tiny")
    video, _, settings, done, _ = updates[-1]
    assert settings["decoder"] == "tiny" and "draft" in done
    draft = app_server.output_dir / Path(video).name
    assert draft.with_suffix(".latents").is_file()
    updates = run(client, "/finish", video=draft.name)
    finished, seed, settings, done, _ = updates[-1]
    assert any("decoded latent frame" in update[3] for update in updates[:-1])
    assert seed == 71 and settings["decoder"] == "full" and settings["finished_from"] == draft.name
    assert "finished from the draft" in done and read_video(finished)[0].shape == (9, 64, 96, 3)
    assert (app_server.output_dir / f"{draft.stem}-full.json").is_file()
    with pytest.raises(AppError, match="is not a draft"):
        client.predict(api_name="/finish", video=f"{draft.stem}-full.mp4")
    with pytest.raises(AppError, match="is not in the output folder"):
        client.predict(api_name="/finish", video="/etc/passwd")


def test_the_api_continues_a_video_and_tells_a_story(client, app_server):
    """`extend` (a video file), `overlap_frames` and `continuations` (a list of prompts) on /text_to_video."""
    first = run(client, "/text_to_video", prompt="a lighthouse", width=96, height=64, frames=9, steps=2, seed=81)
    source = first[-1][0]
    updates = run(client, "/text_to_video", prompt="the light turns on", width=96, height=64, frames=9, steps=2,
                  seed=82, extend=handle_file(source), overlap_frames=5, continuations=["a ship passes"])
    progress = [update[3] for update in updates]
    assert any("segment 2 of 2, step 1/2" in line for line in progress)
    video, _, _, done, _ = updates[-1]
    assert "2 segments, continuing a video of 9 frames" in done
    assert len(read_video(video)[0]) == 9 + 2 * (9 - 5)
    sidecar = json.loads(next(app_server.output_dir.glob("wan-*-82.json")).read_text())
    assert [segment["prompt"] for segment in sidecar["segments"]] == ["the light turns on", "a ship passes"]
    assert sidecar["source"]["frame_count"] == 9
    with pytest.raises(AppError, match=re.escape("Value: 3 is not in the list of choices: [1, 5, 9, 13, 17]")):
        client.predict(api_name="/text_to_video", prompt="x", width=96, height=64, frames=9, steps=2,
                       extend=handle_file(source), overlap_frames=3)
