"""The tiny decoder (wan_engine/models/taehv.py) against TAEHV's own decoding (tests/taehv_reference.py, ported from
madebyollin/taehv's taehv.py) on random weights in the published layout; finding and downloading its weights;
drafts: decoded by it, their latents kept, finished by the full VAE into the very frames of a full run."""

import http.server
import json
import re
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import run_cli
from taehv_reference import TAEHV, random_taew2_2
from tiny_snapshots import sample_image
from wan_engine import Engine, GenerationRequest, WanError
from wan_engine.model_files.demo import ensure_demo_model
from wan_engine.model_files.tiny_decoder import download, find_tiny_decoder, git_blob_sha1, load_tiny_decoder
from wan_engine.outputs.drafts import read_draft
from wan_engine.outputs.video import read_video

BAR = 1e-4  # the bar on frames, max abs
WIDTHS = (32, 16, 8, 8)


@pytest.fixture(scope="module")
def taew2_2(tmp_path_factory) -> tuple[Path, TAEHV]:
    """Random TAEW2.2 weights in the published layout (its first TGrow stored wider, as taehv.py patches), and
    taehv.py's model holding them."""
    path = tmp_path_factory.mktemp("taehv") / "taew2_2.safetensors"
    reference = random_taew2_2(path, WIDTHS)
    from safetensors.torch import load_file

    reference.load_state_dict(reference.patch_tgrow_layers(load_file(str(path))))
    return path, reference.eval()


def reference_decode(reference: TAEHV, latents: np.ndarray) -> np.ndarray:
    """taehv.py's decode_video of channels-last latents (1, t, h, w, C) -> frames (T, H, W, 3)."""
    with torch.no_grad():
        frames = reference.decode_video(torch.from_numpy(latents).permute(0, 1, 4, 2, 3))
    return frames[0].permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("latent_frames,height,width,chunk", [(1, 4, 6, 1), (2, 8, 8, 1), (5, 4, 6, 2), (5, 6, 4, 5)])
def test_frames_match_taehv(taew2_2, latent_frames, height, width, chunk):
    path, reference = taew2_2
    latents = np.random.default_rng(latent_frames).standard_normal((1, latent_frames, height, width, 48))
    latents = latents.astype(np.float32)
    expected = reference_decode(reference, latents)
    decoder = load_tiny_decoder(path, mx.float32)
    chunks = [np.array(frames) for frames in decoder.decode_chunks(mx.array(latents), chunk)]
    ours = np.concatenate(chunks)
    assert ours.shape == expected.shape == (1 + 4 * (latent_frames - 1), 16 * height, 16 * width, 3)
    assert [len(c) for c in chunks][0] == 1 + 4 * (min(chunk, latent_frames) - 1)  # the first 3 frames dropped
    assert np.abs(ours - expected).max() < BAR
    assert 0.05 < expected.std() and 0 < expected.mean() < 1  # frames spread over [0, 1], not clamped flat


def test_a_file_of_another_layout_is_refused(taew2_2, tmp_path):
    from safetensors.numpy import load_file, save_file

    stored = load_file(str(taew2_2[0]))
    save_file({k: v for k, v in stored.items() if k != "decoder.3.conv.2.weight"}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(WanError, match="lacks decoder.3.conv.2.weight"):
        load_tiny_decoder(tmp_path / "cut.safetensors", mx.float32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WanError, match="is not a TAEHV decoder's weights"):
        load_tiny_decoder(tmp_path / "junk.safetensors", mx.float32)
    with pytest.raises(WanError, match="does not exist"):
        find_tiny_decoder(str(tmp_path / "nowhere.safetensors"), tmp_path)


def test_the_git_blob_id_is_gits(taew2_2):
    """The download is checked against the repository's git blob id: ours is the one git computes."""
    git = subprocess.run(["git", "hash-object", str(taew2_2[0])], capture_output=True, text=True, check=True)
    assert git_blob_sha1(taew2_2[0]) == git.stdout.strip()


@pytest.fixture
def served(taew2_2):
    """The weights served over HTTP on this machine, as the repository serves them."""
    folder = taew2_2[0].parent
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(folder))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/{taew2_2[0].name}"
    server.shutdown()


def test_the_download_is_checked_and_kept_whole_or_not_at_all(served, taew2_2, tmp_path):
    destination = tmp_path / "tiny-decoders" / "taew2_2.safetensors"
    seen = []
    assert download(served, git_blob_sha1(taew2_2[0]), destination, lambda *p: seen.append(p)) == destination
    assert destination.read_bytes() == taew2_2[0].read_bytes() and seen[-1][0] == destination.stat().st_size
    destination.unlink()
    with pytest.raises(WanError, match="is not the published file"):
        download(served, "0" * 40, destination)
    with pytest.raises(WanError, match="could not download the tiny decoder"):
        download(served + ".missing", "0" * 40, destination)
    assert list(destination.parent.iterdir()) == []  # no partial file left


def test_offline_without_the_weights_one_line_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WAN_STUDIO_CACHE", str(tmp_path))
    with pytest.raises(WanError, match="download it from https://raw.githubusercontent.com/madebyollin/taehv/"):
        find_tiny_decoder(None, tmp_path)


# -- drafts --------------------------------------------------------------------------------------------------------
REQUEST = dict(prompt="a draft of a red kite", width=96, height=64, frames=9, steps=4, seed=3, keep_frames=True)


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    return Engine("demo", dtype="float32", output_dir=tmp_path_factory.mktemp("drafts"))


def test_a_draft_is_the_tiny_decoders_and_finishes_into_the_full_runs_frames(demo_engine):
    *events, draft = demo_engine.generate(GenerationRequest(**REQUEST, decoder="tiny"))
    assert any("(tiny decoder)" in e.message for e in events if e.stage == "decode")
    sidecar = json.loads(draft.sidecar_path.read_text())
    assert sidecar["decoder"] == "tiny" and "decode" in sidecar["stage_peak_memory_gib"]
    record, latents = read_draft(draft.video_path)
    reference = TAEHV((32, 16, 8, 8))
    from safetensors.torch import load_file

    loaded = reference.load_state_dict(load_file(str(ensure_demo_model() / "tiny_decoder" / "taew2_2.safetensors")),
                                       strict=False)
    assert all(key.startswith("encoder.") for key in loaded.missing_keys)  # the demo ships the decoder alone
    assert np.abs(draft.frames - reference_decode(reference.eval(), latents)).max() < BAR
    assert read_video(draft.video_path)[0].shape == (9, 64, 96, 3)
    assert x264_settings(draft.video_path)["cabac"] == "0"  # the draft's encoder preset: ultrafast

    *_, finished = demo_engine.finish(draft.video_path, keep_frames=True)
    *_, full = demo_engine.generate(GenerationRequest(**REQUEST))
    assert np.array_equal(finished.frames, full.frames)  # no denoising repeated, and the same latents
    assert finished.video_path == draft.video_path.with_name(f"{draft.video_path.stem}-full.mp4")
    finished_sidecar = json.loads(finished.sidecar_path.read_text())
    assert finished_sidecar["decoder"] == "full" and finished_sidecar["finished_from"] == draft.video_path.name
    assert finished_sidecar["settings"] == sidecar["settings"] and finished_sidecar["seed"] == 3
    assert "denoise_s" not in finished_sidecar["timings"]
    assert x264_settings(finished.video_path)["cabac"] == "1"  # a finished video's: veryfast


def x264_settings(path) -> dict:
    """The encoder settings x264 writes into the stream (its SEI text: "x264 - core ... options: cabac=1 ...")."""
    options = re.search(rb"x264 - core [^\0]*? options: ([^\0]*)", path.read_bytes()).group(1).decode()
    return dict(option.split("=", 1) for option in options.split() if "=" in option)


def test_image_to_video_drafts_finish_too(demo_engine, tmp_path):
    request = dict(REQUEST, image=sample_image(), output=str(tmp_path / "picture-draft.mp4"))
    *_, draft = demo_engine.generate(GenerationRequest(**request, decoder="tiny"))
    *_, finished = demo_engine.finish(draft.video_path, str(tmp_path / "finished.mp4"), keep_frames=True)
    *_, full = demo_engine.generate(GenerationRequest(**dict(request, output=str(tmp_path / "full.mp4"))))
    assert np.array_equal(finished.frames, full.frames) and finished.video_path.name == "finished.mp4"


def test_what_cannot_be_finished_is_said_in_one_line(demo_engine, tmp_path, no_torch_env):
    *_, full = demo_engine.generate(GenerationRequest(**REQUEST, output=str(tmp_path / "full.mp4")))
    with pytest.raises(WanError, match="full.mp4 is not a draft"):
        list(demo_engine.finish(full.video_path))
    *_, draft = demo_engine.generate(GenerationRequest(**REQUEST, decoder="tiny", output=str(tmp_path / "d.mp4")))
    latents = draft.video_path.with_suffix(".latents")
    latents.write_bytes(latents.read_bytes()[:-7])
    proc = run_cli(["finish", draft.video_path], no_torch_env)
    assert proc.returncode == 1 and "the draft's latents d.latents are damaged" in proc.stderr
    proc = run_cli(["finish", draft.video_path], no_torch_env)
    assert proc.returncode == 1 and "the draft's latents d.latents are gone" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "d-full.mp4").exists()
    proc = run_cli(["generate", "--model", "demo", "--prompt", "x", "--width", 96, "--height", 64, "--frames", 5,
                    "--decoder", "small"], no_torch_env)
    assert proc.returncode == 1 and "decoder 'small' is not allowed: choose full, or tiny" in proc.stderr


def test_the_command_line_drafts_and_finishes(tmp_path, no_torch_env):
    draft = tmp_path / "kite.mp4"
    common = ["--model", "demo", "--prompt", "a kite", "--width", 96, "--height", 64, "--frames", 9, "--steps", 3,
              "--seed", 4]
    proc = run_cli(["generate", *common, "--decoder", "tiny", "--output", draft], no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert draft.with_suffix(".latents").is_file()
    proc = run_cli(["finish", draft, "--output", tmp_path / "out" / "kite-hq.mp4"], no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert "in full quality" in proc.stdout
    assert read_video(tmp_path / "out" / "kite-hq.mp4")[0].shape == (9, 64, 96, 3)


def test_live_previews_go_through_the_tiny_decoder_at_the_videos_size(demo_engine):
    events = demo_engine.generate(GenerationRequest(**REQUEST, preview=True))
    previews = [e.preview for e in events if getattr(e, "stage", None) == "denoise"]
    assert len(previews) == 4 and all(p.shape == (64, 96, 3) and p.dtype == np.uint8 for p in previews)
    assert previews[0].std() > 1  # a picture, not a flat field
