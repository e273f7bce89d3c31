"""Faults against the real app (`python app.py --demo`, driven through gradio_client and Chromium): a disk that
fills up during a run, runs killed at each moment before the app starts, very long and unusual prompts, hostile
pictures, and several clients with stops in between. Each checks what the page or API says, that the app keeps
serving, and that the history lists whole videos only. The engine's side is in test_faults.py."""

import json
import os
import re
import subprocess
import sys

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from playwright.sync_api import expect

from app_server import ROOT, running_app
from browser import CHROMIUM, chromium
from fault_tools import files_in, fill, hostile_pictures, small_disk
from test_app_api import TIMEOUT_S, run, wait_until
from wan_engine.outputs.video import read_metadata, read_video

SMALL = dict(width=64, height=64, frames=5, steps=2)


def videos_and_sidecars(folder):
    return sorted(name for name in files_in(folder) if name.startswith("wan-"))


def partials(folder):
    return [name for name in files_in(folder) if ".partial-" in name]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("faults-app")) as server:
        yield server


def test_a_disk_filling_up_during_a_run_fails_clearly_lists_nothing_and_the_next_run_works(tmp_path):
    with small_disk(tmp_path / "outputs", "8m") as disk, running_app(tmp_path) as server:
        client = Client(server.url, verbose=False)
        job = client.submit(api_name="/text_to_video", prompt="a boat on a full disk", width=64, height=64, frames=9,
                            steps=100, seed=5)
        wait_until(lambda: any("Denoising" in update[3] for update in job.outputs()))
        filler = fill(disk)
        with pytest.raises(AppError, match=f"could not save the video in {disk}: the disk is full"):
            job.result(timeout=TIMEOUT_S)
        progress = job.outputs()[-1][3]
        assert progress.startswith(f"**Failed**: could not save the video in {disk}: the disk is full (the video "
                                   "needs up to "), progress
        assert videos_and_sidecars(disk) == [] and partials(disk) == []
        assert server.process.poll() is None

        filler.unlink()
        video, seed, *_ = run(client, "/text_to_video", prompt="after the full disk", seed=6, **SMALL)[-1]
        assert seed == 6 and read_video(video)[0].shape[0] == 5


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium package is not installed")
def test_runs_killed_at_each_moment_leave_only_whole_videos_in_the_restarted_apps_history(tmp_path):
    """The app starts on a folder where runs were killed while decoding, while saving and between landing the video
    and its sidecar: it clears the partials, keeps the landed video, and the page's history lists the two whole
    videos."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for number, moment in enumerate(("decode", "saving", "landing", "none")):
        # each in a folder of its own, since a run clears what killed runs left in its folder before it starts
        folder = tmp_path / moment
        proc = subprocess.run([sys.executable, "tests/fault_runner.py", str(folder / f"wan-{number}.mp4"), moment],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == (0 if moment == "none" else -9), proc.stderr
        for path in folder.iterdir():
            path.rename(outputs / path.name)
    assert len(partials(outputs)) >= 4  # decode: the video and its tags; saving: video and sidecar; landing: sidecar

    with running_app(tmp_path) as server, chromium() as browser:
        assert partials(outputs) == []
        assert videos_and_sidecars(outputs) == ["wan-2.json", "wan-2.mp4", "wan-3.json", "wan-3.mp4"]
        page = browser.new_page()
        page.goto(server.url)
        thumbnails = page.get_by_role("button", name=re.compile(r"^Thumbnail \d+ of"))
        expect(thumbnails.first).to_be_visible(timeout=30_000)
        expect(thumbnails).to_have_count(2)
        expect(page.get_by_role("button", name="Thumbnail 1 of 2")).to_be_visible()


@pytest.mark.parametrize("prompt", ["a calm sea, " * 12_500, "a\x00b \u202eright-to-left\u202c 🎬 \x1b[31m\nline"],
                         ids=["150000 characters", "unusual"])
def test_any_prompt_through_the_api_is_saved_and_says_how_many_tokens_were_read(app, prompt):
    video, seed, settings, done, _ = run(Client(app.url, verbose=False), "/text_to_video", prompt=prompt, seed=8,
                                         **SMALL)[-1]
    assert read_video(video)[0].shape[0] == 5 and settings["prompt"] == prompt
    sidecar = json.loads(next(app.output_dir.glob(f"{os.path.basename(video)[:-4]}.json")).read_text())
    assert sidecar["settings"]["prompt"] == prompt
    assert len(read_metadata(video)["title"]) <= 2000
    if len(prompt) > 100_000:
        assert f"**Prompt cut**: the model read the first 512 of its {sidecar['prompt_tokens']['total']} tokens" in done
    else:
        assert f"prompt: {sidecar['prompt_tokens']['total']} of 512 tokens" in done


def test_hostile_pictures_are_refused_naming_the_upload_and_the_app_keeps_serving(app, tmp_path):
    client = Client(app.url, verbose=False)
    for name, (path, message) in hostile_pictures(tmp_path).items():
        if not path.exists():
            continue  # a missing file cannot be uploaded (the command line's test covers it)
        with pytest.raises(AppError) as refusal:
            client.predict(api_name="/image_to_video", image=handle_file(path), prompt="a boat", seed=1, **SMALL)
        assert path.name in str(refusal.value) and message in str(refusal.value), (name, str(refusal.value))
        assert app.process.poll() is None
    assert partials(app.output_dir) == []


def test_several_clients_with_stops_in_between_get_whole_videos_or_a_clean_stop(app):
    """Four clients at once: one presses Stop while its run is denoising, one while it waits in line; the other
    two get their videos, and the folder holds exactly those."""
    clients = [Client(app.url, verbose=False) for _ in range(4)]
    before = set(videos_and_sidecars(app.output_dir))
    jobs = [clients[0].submit(api_name="/text_to_video", prompt="client 0", width=256, height=256, frames=33,
                              steps=100, seed=100)]
    wait_until(lambda: any("Denoising" in update[3] for update in jobs[0].outputs()))
    jobs += [client.submit(api_name="/text_to_video", prompt=f"client {i}", width=96, height=64, frames=9, steps=4,
                           seed=100 + i) for i, client in enumerate(clients[1:], start=1)]
    wait_until(lambda: any("Waiting" in update[3] for update in jobs[2].outputs()))
    assert "Stopped" in clients[2].predict(api_name="/stop")  # still waiting in line: it never starts
    assert "Stopped" in clients[0].predict(api_name="/stop")
    stopped = jobs[0].result(timeout=TIMEOUT_S)
    assert stopped[0] is None and "Stopped** at step" in stopped[3], stopped[3]
    finished = [jobs[i].result(timeout=TIMEOUT_S) for i in (1, 3)]
    assert jobs[2].result(timeout=TIMEOUT_S)[3].startswith("**Stopped**")
    assert [outcome[1] for outcome in finished] == [101, 103]
    assert all(read_video(outcome[0])[0].shape[0] == 9 for outcome in finished)
    landed = sorted(set(videos_and_sidecars(app.output_dir)) - before)
    assert landed == sorted(os.path.basename(outcome[0])[:-4] + suffix for outcome in finished
                            for suffix in (".json", ".mp4"))
    assert partials(app.output_dir) == []
