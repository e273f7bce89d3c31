"""Engine features around the pipeline: the prompt-embedding cache, live previews, tiled VAE decoding, memory
presets and the demo model."""

import dataclasses
import json
import logging
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, run_cli
from wan_engine.models import vae_tiling
from wan_engine import Engine, GenerationRequest, Result
from wan_engine.errors import WanError
from wan_engine.model_files.loading import Snapshot
from wan_engine.pipeline import LatentNormalizer, decode_frames, frames_to_uint8
from wan_engine.presets import available_presets, load_preset
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache, encoder_identity
from wan_engine.models.vae import WanVAE, strip_layout
from wan_engine.outputs.video import METADATA_TEXT_CHARS, VideoOutput, read_metadata, read_video, to_uint8

SMALL = dict(width=64, height=64, frames=5, steps=2, seed=5)


def generate(engine, **request):
    *events, result = engine.generate(GenerationRequest(keep_frames=True, **request))
    assert isinstance(result, Result)
    return events, result


def test_repeated_prompt_skips_the_text_encoder(snapshots, tmp_path):
    cache = PromptEmbeddingCache(tmp_path / "cache")
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path, prompt_cache=cache)
    first_events, first = generate(engine, prompt="a paper boat", negative_prompt="rain", **SMALL)
    assert "loading the text encoder" in [e.message for e in first_events]
    assert len(list((tmp_path / "cache").glob("*.embedding"))) == 2  # prompt and negative prompt
    # a new engine (as after a restart): the cache alone serves both prompts, UMT5 is never loaded
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path, prompt_cache=cache)
    events, again = generate(engine, prompt="  a paper   boat ", negative_prompt="rain", **SMALL)
    assert not [e for e in events if "text encoder" in e.message or "tokenizer" in e.message]
    assert "text_encoder" not in engine.parts
    assert np.array_equal(first.frames, again.frames)
    # another dtype is another key
    assert PromptEmbeddingCache.key(engine.text_identity, "x", 512) != PromptEmbeddingCache.key(
        Engine(snapshots["small"], dtype="bfloat16", prompt_cache=cache).text_identity, "x", 512)


def test_prompt_cache_is_bounded_and_least_recently_used_goes_first(tmp_path):
    embedding = np.zeros((32, 8), np.float32)
    embedding[:16] = 1.0
    PromptEmbeddingCache(tmp_path / "one").put("k", embedding, tokens=16)
    entry_bytes = next((tmp_path / "one").iterdir()).stat().st_size
    cache = PromptEmbeddingCache(tmp_path, max_bytes=3 * entry_bytes)
    for i in range(5):
        cache.put(f"k{i}", embedding, tokens=16)
        cache.get("k0", 32)  # keep k0 recently used
    kept = sorted(p.stem for p in tmp_path.glob("*.embedding"))
    assert "k0" in kept and "k1" not in kept and len(kept) == 3
    restored, tokens = cache.get("k0", 32)
    assert restored.shape == (32, 8) and np.array_equal(restored, embedding) and tokens == 16


def test_previews_stream_with_each_denoising_step(snapshots, tmp_path):
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    events, _ = generate(engine, prompt="a lantern", preview=True, **SMALL)
    previews = [e.preview for e in events if e.stage == "denoise"]
    assert len(previews) == SMALL["steps"]
    assert all(p.dtype == np.uint8 and p.shape == (16, 16, 3) for p in previews)  # 4x4 latents, 4x enlarged
    assert previews[0].std() > 0 and not np.array_equal(previews[0], previews[-1])
    events, _ = generate(engine, prompt="a lantern", **SMALL)
    assert all(e.preview is None for e in events)


def seam_strength(tiled: np.ndarray, untiled: np.ndarray, edges: list[int]) -> float:
    """How much the tiled-minus-untiled error jumps across tile edges (along the width), relative to how much it
    changes between neighbouring columns elsewhere: ~1 for smooth blending, clearly more for hard cuts."""
    steps = np.abs(np.diff(tiled - untiled, axis=2)).mean(axis=(0, 1, 3))
    return max(steps[e - 1] for e in edges) / np.median(steps)


def test_tiled_decoding_is_close_to_untiled_and_has_no_seams(snapshots):
    snapshot = Snapshot.open(snapshots["small"])
    vae, normalizer = snapshot.load_vae(mx.float32), LatentNormalizer(snapshot.vae_config)
    z = mx.random.normal((1, 3, 10, 14, 12), key=mx.random.key(0))
    untiled = np.concatenate([f for _, _, f in decode_frames(vae, normalizer, z)])
    items = list(decode_frames(vae, normalizer, z, tile={"tile": 8, "overlap": 4}))
    assert [(done, total) for done, total, _ in items] == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    tiled = items[-1][2]
    assert tiled.shape == untiled.shape == (9, 160, 224, 3)
    difference = np.abs(tiled - untiled)
    # measured on this random tiny VAE: mean 0.018, max 0.22 (frames in [0, 1]); trained VAEs differ far less
    assert difference.mean() < 0.025 and difference.max() < 0.3
    edges = sorted({e * 16 for s in vae_tiling.tile_starts(14, 8, 4) for e in (s, s + 8) if 0 < e < 14})
    assert seam_strength(tiled, untiled, edges) < 2.0  # hard cuts measure 3.5 here


def test_tile_layout_covers_the_frame_with_the_asked_overlap():
    assert vae_tiling.tile_starts(44, 48, 8) == [0]
    assert vae_tiling.tile_starts(80, 48, 8) == [0, 32]
    assert vae_tiling.tile_starts(100, 24, 6) == [0, 18, 36, 54, 72, 76]
    weights = vae_tiling.ramp(10, 3, 3)
    assert weights.max() == 1 and weights[0] < weights[1] < weights[2] < 1 and weights[-1] < weights[-2]


def test_presets_are_different_data_and_bad_ones_are_refused(tmp_path):
    assert {"normal", "low-ram"} <= set(available_presets())
    normal, low = load_preset("normal"), load_preset("low-ram")
    assert normal != low and low.transformer_quantization and low.release_transformer_before_decode
    with pytest.raises(WanError, match="preset 'tiny' not found: choose one of .*low-ram.*normal"):
        load_preset("tiny")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"release_everything": True}))
    with pytest.raises(WanError, match=r"unknown settings \['release_everything'\]"):
        load_preset(str(bad))
    for width in (0, -4, 2.5, "40"):
        bad.write_text(json.dumps({"vae_strip_width": width}))
        with pytest.raises(WanError, match=r"vae_strip_width must be a whole number of latent columns, 1 or more, "
                                           r"or null \(no strips\)"):
            load_preset(str(bad))


def test_a_preset_releasing_parts_gives_the_same_video(snapshots, tmp_path):
    """Releasing and reloading parts between stages, running the guidance pair as two passes and the blocks one
    at a time (as the low-memory preset does) changes nothing but round-off."""
    preset = tmp_path / "lean.json"
    preset.write_text(json.dumps({"release_text_encoder": True, "release_transformer_before_decode": True,
                                  "vae_tile": None, "cache_limit_gib": 0, "cfg_batch": False,
                                  "block_lookahead": False}))
    _, reference = generate(Engine(snapshots["small"], dtype="float32", output_dir=tmp_path), prompt="a kite", **SMALL)
    lean = Engine(snapshots["small"], dtype="float32", preset=str(preset), output_dir=tmp_path)
    events, result = generate(lean, prompt="a kite", image=None, **SMALL)
    assert np.abs(result.frames - reference.frames).max() < 1e-5
    assert "transformer" not in lean.parts and "text_encoder" not in lean.parts
    assert result.settings["preset"] == "lean"


@pytest.mark.parametrize("preset", ["normal", "low-ram"])
def test_demo_model_runs_offline_without_torch_with_each_preset(preset, no_torch_env, tmp_path):
    outputs = []
    for run in range(2):
        out = tmp_path / f"{preset}-{run}.mp4"
        proc = run_cli(["generate", "--model", "demo", "--preset", preset, "--prompt", "a red kite", "--width", 96,
                        "--height", 64, "--frames", 9, "--steps", 2, "--seed", 3, "--output", out,
                        "--save-frames", tmp_path / f"{preset}-{run}.npy"], no_torch_env)
        assert proc.returncode == 0, proc.stderr
        assert "demo model: random weights" in proc.stderr
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert {"seed", "settings", "timings", "peak_memory_gib"} <= set(sidecar)
        assert sidecar["settings"]["preset"] == preset and sidecar["seed"] == 3
        outputs.append(np.load(tmp_path / f"{preset}-{run}.npy"))
    assert outputs[0].shape == (9, 64, 96, 3)
    assert np.array_equal(outputs[0], outputs[1])  # the demo model is deterministic


def test_a_stop_before_denoising_ends_the_run_between_stages(snapshots, tmp_path):
    from wan_engine import CancelToken
    from wan_engine.errors import Cancelled

    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    cancel = CancelToken()
    cancel.cancel()  # e.g. Stop pressed while the text was being encoded
    with pytest.raises(Cancelled):
        for event in engine.generate(GenerationRequest(prompt="a boat", **SMALL), cancel):
            assert event.stage in ("text", "load")
    assert "transformer" not in engine.parts and not list(tmp_path.glob("*.mp4"))


def test_runs_finishing_together_do_not_overwrite_each_other(snapshots, tmp_path, monkeypatch):
    import datetime as real

    import wan_engine.engine as engine_module

    class FrozenClock(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2026, 11, 25, 12, 0, 0, 123456)

    monkeypatch.setattr(engine_module, "datetime", FrozenClock)
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    first = engine.output_path(GenerationRequest(prompt="x"), seed=1)
    assert first.name == "wan-20261125-120000-123-1.mp4"
    first.write_bytes(b"an earlier video")
    second = engine.output_path(GenerationRequest(prompt="x"), seed=1)
    assert second.name == "wan-20261125-120000-123-1-1.mp4"


def test_frames_to_uint8_on_the_device_equals_the_numpy_rounding():
    values = np.concatenate([np.random.default_rng(0).uniform(-0.1, 1.1, 10_000),
                             (np.arange(256) + 0.5) / 255, [0.0, 1.0]]).astype(np.float32).reshape(1, -1, 1, 1)
    assert np.array_equal(np.array(frames_to_uint8(mx.array(values))), to_uint8(values))


def test_video_output_encodes_chunk_by_chunk_and_lands_both_files_or_nothing(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (n, 32, 48, 3), dtype=np.uint8) for n in (1, 4, 4)]
    output = VideoOutput(tmp_path / "v.mp4", 48, 32, 12, {"title": "chunks", "comment": {"prompt": "p" * 5000}})
    for chunk in chunks:
        output.add(chunk)
    output.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing lands yet
    assert output.land({"seed": 1}) == (tmp_path / "v.mp4", tmp_path / "v.json")
    video, fps = read_video(tmp_path / "v.mp4")
    assert video.shape == (9, 32, 48, 3) and fps == 12
    tags = read_metadata(tmp_path / "v.mp4")
    assert tags["title"] == "chunks" and len(json.loads(tags["comment"])["prompt"]) == METADATA_TEXT_CHARS
    assert json.loads((tmp_path / "v.json").read_text()) == {"seed": 1}

    output = VideoOutput(tmp_path / "w.mp4", 48, 32, 12)
    output.add(chunks[1])
    output.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.mp4"]


def test_a_preset_decodes_in_strips_with_the_same_numbers_and_says_so(snapshots, tmp_path):
    """The low-RAM preset's strips: the progress counts strips of latent frames, and the frames are those of a
    whole-frame decode (float32 round-off; they are exact to diffusers, tests/test_vae.py)."""
    preset = tmp_path / "strips.json"
    preset.write_text(json.dumps({"vae_strip_width": 6}))
    engine = Engine(snapshots["small"], dtype="float32", preset=str(preset), output_dir=tmp_path)
    plain = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    request = dict(prompt="a lantern", width=384, height=32, frames=5, steps=2, seed=3)
    margin = WanVAE(Snapshot.open(snapshots["small"]).vae_config).decoder.strip_margin
    assert {(low > 0, high < 24) for _, _, low, high in strip_layout(24, 6, margin)} >= {(True, False), (False, True)}
    events, result = generate(engine, **request)
    decode_messages = [e.message for e in events if e.stage == "decode"]
    assert decode_messages[0] == "decoded strip 1/4, latent frame 1/2", decode_messages
    assert decode_messages[-1] == "decoded strip 4/4, latent frame 2/2", decode_messages
    _, reference = generate(plain, **request)
    assert result.frames.shape == reference.frames.shape
    assert np.abs(result.frames - reference.frames).max() < 1e-5


def test_a_preset_tiles_the_decode_only_above_its_size_and_says_so(snapshots, tmp_path):
    """The low-RAM preset's rule: untiled (and exact) up to `min_pixels` per frame, tiled above, with the progress
    counting tiles; decoding frame by frame changes nothing."""
    preset = tmp_path / "tiles.json"
    preset.write_text(json.dumps({"vae_tile": {"min_pixels": 96 * 64, "tile": 2, "overlap": 1},
                                  "vae_frame_by_frame": True}))
    engine = Engine(snapshots["small"], dtype="float32", preset=str(preset), output_dir=tmp_path)
    plain = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    request = dict(prompt="a lantern", frames=5, steps=2, seed=3)
    for width, tiled in ((64, False), (96, True)):
        events, result = generate(engine, width=width, height=64, **request)
        decode_messages = [e.message for e in events if e.stage == "decode"]
        assert all(("tile" in m) == tiled for m in decode_messages), decode_messages
        _, reference = generate(plain, width=width, height=64, **request)
        difference = np.abs(result.frames - reference.frames).max()
        assert (difference > 1e-4) if tiled else (difference < 1e-5)


def test_prompt_embeddings_are_keyed_by_the_text_encoders_files_not_only_their_sizes(snapshots, tmp_path):
    """A fine-tune of the same shape (same names and sizes, other contents) must not reuse old embeddings."""
    root = shutil.copytree(snapshots["small"], tmp_path / "model")
    before = encoder_identity(root, "float32", None)
    assert encoder_identity(root, "float32", None) == before  # stable
    weights = next((root / "text_encoder").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other contents, written later
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert encoder_identity(root, "float32", None) != before


def test_the_text_encoder_stays_loaded_when_the_machine_has_the_memory(snapshots, tmp_path, monkeypatch, caplog):
    """keep_resident: null decides from the machine's memory (this one's is under 40 GiB: released, as before; a
    64 GiB Mac's working set keeps it); true keeps it; the sidecar says which and why. The VAE decode keeps its next
    piece queued only where there is the room (the log says which)."""
    import wan_engine.parts as parts

    request = GenerationRequest(prompt="a kept encoder", width=64, height=64, frames=5, steps=1)
    caplog.set_level(logging.INFO, logger="wan_engine")
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path / "auto")
    *_, result = engine.generate(request)
    assert "text_encoder" not in engine.parts
    decision = json.loads(result.sidecar_path.read_text())["text_encoder"]
    assert decision["kept_between_videos"] is False and "under the 40 GiB" in decision["why"]
    assert not engine.parts.policy.decode_queued_ahead
    assert any(r.getMessage().startswith("the VAE decode waits for each piece: the machine's memory is")
               for r in caplog.records)
    monkeypatch.setattr(parts, "machine_memory_gib", lambda: (48.0, "Metal's recommended working set"))
    roomy = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path / "roomy")
    assert roomy.parts.policy.decode_queued_ahead
    *_, result = roomy.generate(dataclasses.replace(request, prompt="a new prompt"))
    assert "text_encoder" in roomy.parts
    assert json.loads(result.sidecar_path.read_text())["text_encoder"] == {
        "kept_between_videos": True, "why": "Metal's recommended working set is 48 GiB, at least the 40 GiB that keep "
                                             "it beside the rest"}
    *events, _ = roomy.generate(dataclasses.replace(request, prompt="another new prompt"))
    assert not any(e.message == "loading the text encoder" for e in events)  # a new prompt loads nothing
    preset = tmp_path / "kept.json"
    preset.write_text(json.dumps({**json.loads((ROOT / "presets/low-ram.json").read_text()), "keep_resident": True}))
    kept = Engine(snapshots["small"], dtype="float32", preset=str(preset), output_dir=tmp_path / "kept")
    assert kept.parts.policy.text_encoder_decision == "the kept preset's keep_resident is true"
