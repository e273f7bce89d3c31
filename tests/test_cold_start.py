"""The first video as fast as the tenth: converted weights kept on disk (wan_engine/model_files/converted.py) and used by later
loads without converting again, rebuilt when the source or the preset changes, never used half-written (a process
killed while writing) or damaged, skipped with a message when the disk is short; LoRAs fused into a cached quantized
transformer; `download --preset`; the sidecar's whole-process memory; and the app's warm-up at launch, against a
real `python app.py --demo` (the page shows "Getting the model ready", a Generate meanwhile waits and succeeds;
`--no-warmup` starts without it)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext

import mlx.core as mx
import numpy as np
import pytest
from gradio_client import Client

import wan_engine.model_files.weights
from app_server import ROOT, running_app
from browser import CHROMIUM, chromium
from conftest import run_cli
from fault_tools import small_disk
from test_app_api import TIMEOUT_S, wait_until
from test_lora import comfy_lora, shapes_of
from tiny_snapshots import TinySpec, build_snapshot
from wan_engine import Engine, GenerationRequest, Result
from wan_engine.model_files.converted import ConvertedWeights
from wan_engine.model_files.loading import Snapshot
from wan_engine.model_files.prompt_cache import PromptEmbeddingCache

Q8 = {"bits": 8, "group_size": 64}
SMALL = dict(prompt="a paper boat on a pond", negative_prompt="blurry", width=64, height=64, frames=5, steps=2,
             seed=3)
LOADED_FROM_COPY = "from its converted copy"
CONVERTED_AND_KEPT = "from the model's files, converted and kept for next time"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random snapshot (float32, sharded, as diffusers saves it) whose linears are all as wide as a group of 64,
    so that 8-bit quantization shrinks the transformer and the text encoder as it does the real ones."""
    return build_snapshot(tmp_path_factory.mktemp("model") / "q8", TinySpec(head_dim=32, ffn_dim=128, text_dim=64))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache root of the test's own: the converted copies and the prompt embeddings start empty."""
    monkeypatch.setenv("WAN_STUDIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def quantizations(monkeypatch):
    """Counts the weights quantized while loading (weights.load_into quantizes each through quantize_weight)."""
    calls = []
    quantize_weight = wan_engine.model_files.weights.quantize_weight
    monkeypatch.setattr(wan_engine.model_files.weights, "quantize_weight", lambda *args: calls.append(1) or quantize_weight(*args))
    return calls


def generate(engine, **request):
    """(load messages, result) of one run."""
    *events, result = engine.generate(GenerationRequest(keep_frames=True, **{**SMALL, **request}))
    assert isinstance(result, Result)
    return [event.message for event in events if event.stage == "load"], result


def low_ram_engine(model, tmp_path, prompts="prompts"):
    """A low-RAM engine with a prompt cache of its own, so that its text encoder loads."""
    return Engine(model, dtype="float32", preset="low-ram", output_dir=tmp_path / "out",
                  prompt_cache=PromptEmbeddingCache(tmp_path / prompts))


def entries(cache):
    return sorted(path.name for path in (cache / "converted").iterdir())


# -- the conversion cache ---------------------------------------------------------------------------------------------

def test_the_low_ram_preset_converts_once_and_later_loads_map_the_converted_copy(model, cache, tmp_path,
                                                                                 quantizations):
    first_loads, first = generate(low_ram_engine(model, tmp_path, "first"))
    assert f"loaded the text encoder {CONVERTED_AND_KEPT}" in " ".join(first_loads)
    assert f"loaded the transformer {CONVERTED_AND_KEPT}" in " ".join(first_loads)
    assert quantizations and [name.split("-")[0] for name in entries(cache)] == ["text_encoder", "transformer"]
    converted = len(quantizations)

    later_loads, later = generate(low_ram_engine(model, tmp_path, "later"))
    assert f"loaded the text encoder {LOADED_FROM_COPY}" in " ".join(later_loads)
    assert f"loaded the transformer {LOADED_FROM_COPY}" in " ".join(later_loads)
    assert len(quantizations) == converted  # nothing quantized again
    np.testing.assert_array_equal(later.frames, first.frames)
    # the float32 VAE of a float32 run is stored as it runs: read from the model's files, no copy
    assert any(message.startswith("loaded the vae from the model's files in") for message in later_loads)


def test_between_videos_low_ram_loads_its_transformer_and_a_new_prompt_streams_the_encoder_beside_it(model, cache,
                                                                                                       tmp_path):
    engine = low_ram_engine(model, tmp_path, "between")
    generate(engine)  # no converted copies yet: the text encoder is converted whole, the transformer released
    assert "vae" in engine.parts and "transformer" not in engine.parts
    prepared = [event.message for event in engine.prepare_next()]
    assert prepared[-1].startswith(f"loaded the transformer {LOADED_FROM_COPY}")
    assert "transformer" in engine.parts and "vae" not in engine.parts
    assert list(engine.prepare_next()) == []  # ready already

    loads, later = generate(engine, prompt="a heron in the reeds")  # a new prompt
    assert not any("the transformer" in message for message in loads)  # it stayed loaded beside the encoder
    assert f"loaded the text encoder {LOADED_FROM_COPY}, a block at a time" in " ".join(loads)
    assert later.timings["load_s"] > 0 and "transformer" not in engine.parts  # released before decoding, as before

    # The same frames as a low-RAM engine that loads each part whole, one at a time, from the same copies.
    whole_preset = json.loads((ROOT / "presets" / "low-ram.json").read_text())
    del whole_preset["reload_transformer_after_video"], whole_preset["stream_text_encoder"]
    (tmp_path / "whole.json").write_text(json.dumps(whole_preset))
    whole = Engine(model, dtype="float32", preset=str(tmp_path / "whole.json"), output_dir=tmp_path / "out",
                   prompt_cache=PromptEmbeddingCache(tmp_path / "whole-prompts"))
    whole_loads, expected = generate(whole, prompt="a heron in the reeds")
    assert not any("a block at a time" in message for message in whole_loads)
    assert list(whole.prepare_next()) == []  # that preset keeps nothing ready
    np.testing.assert_array_equal(later.frames, expected.frames)


def test_a_damaged_encoder_copy_beside_the_resident_transformer_releases_it_before_the_whole_load(model, cache,
                                                                                                   tmp_path):
    engine = low_ram_engine(model, tmp_path, "damaged-beside")
    generate(engine)
    list(engine.prepare_next())
    entry = engine.converted.entry("text_encoder", engine.dtype, engine.preset.text_encoder_quantization)
    cut_shard(entry)
    loads, result = generate(engine, prompt="a heron in the reeds")
    assert f"loaded the text encoder {CONVERTED_AND_KEPT}" in " ".join(loads)  # rebuilt, loaded whole
    assert "loading the transformer" in loads  # released to make room for it, then loaded again
    assert (entry / "MANIFEST").is_file() and result.frames is not None


def test_the_converted_copy_is_rebuilt_when_the_source_or_the_preset_changes(model, cache, tmp_path,
                                                                              quantizations):
    source = tmp_path / "model"
    shutil.copytree(model, source)
    weights = ConvertedWeights(Snapshot.open(source), cache / "converted")
    assert weights.load("transformer", mx.float32, Q8)[1] == CONVERTED_AND_KEPT.removeprefix("from ")
    assert weights.load("transformer", mx.float32, Q8)[1] == "its converted copy"
    q8_entry = entries(cache)

    q4 = {"bits": 4, "group_size": 32}  # another preset: another copy, the first one kept
    model_q4, origin = weights.load("transformer", mx.float32, q4)
    assert origin.endswith("converted and kept for next time") and len(entries(cache)) == 2
    assert {layer.bits for _, layer in model_q4.named_modules() if hasattr(layer, "bits")} == {4}

    shard = sorted((source / "transformer").glob("*.safetensors"))[0]  # the source changes: re-saved, same size
    os.utime(shard, ns=(time.time_ns(), time.time_ns()))
    converted = len(quantizations)
    assert weights.load("transformer", mx.float32, Q8)[1].endswith("converted and kept for next time")
    assert len(quantizations) > converted
    assert q8_entry[0] not in entries(cache) and len(entries(cache)) == 2  # the old source's copy is gone


@pytest.mark.parametrize("moment", ["weights", "manifest"])
def test_a_write_killed_midway_is_never_used_and_the_next_load_rebuilds_it(model, cache, moment, quantizations):
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "converted_runner.py"), model, moment],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    left = entries(cache)
    assert len(left) == 1 and left[0].startswith(".transformer-") and ".partial-" in left[0]  # no entry, a partial

    weights = ConvertedWeights(Snapshot.open(model), cache / "converted")
    model, origin = weights.load("transformer", mx.float32, Q8)
    assert origin.endswith("converted and kept for next time") and quantizations  # rebuilt, not read
    assert len(entries(cache)) == 1 and not entries(cache)[0].startswith(".")  # the partial was cleared
    assert weights.load("transformer", mx.float32, Q8)[1] == "its converted copy"


def cut_shard(entry):
    shard = entry / "weights.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def change_header(entry):
    shard = entry / "weights.safetensors"
    data = bytearray(shard.read_bytes())
    data[20] ^= 1
    shard.write_bytes(bytes(data))


def damage_manifest(entry):
    manifest = entry / "MANIFEST"
    manifest.write_bytes(manifest.read_bytes()[:-3] + b"xyz")


DAMAGES = {"a weights file cut short": cut_shard, "a changed header": change_header,
           "a damaged manifest": damage_manifest, "no manifest": lambda entry: (entry / "MANIFEST").unlink()}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_rebuilt_and_said_in_the_log(model, cache, caplog, damage, quantizations):
    weights = ConvertedWeights(Snapshot.open(model), cache / "converted")
    first, _ = weights.load("transformer", mx.float32, Q8)
    DAMAGES[damage](cache / "converted" / entries(cache)[0])
    quantizations.clear()
    with caplog.at_level(logging.WARNING, logger="wan_engine"):
        rebuilt, origin = weights.load("transformer", mx.float32, Q8)
    assert origin.endswith("converted and kept for next time") and quantizations
    assert len([record for record in caplog.records if "damaged" in record.getMessage()]) == 1
    assert weights.load("transformer", mx.float32, Q8)[1] == "its converted copy"
    for name, value in rebuilt.parameters()["blocks"][0]["attn1"]["to_q"].items():
        np.testing.assert_array_equal(value, first.parameters()["blocks"][0]["attn1"]["to_q"][name])


def test_without_room_on_disk_the_parts_load_from_the_model_files_say_so_once_and_generate(model, cache, tmp_path,
                                                                                          caplog):
    with small_disk(cache / "converted", "256k"), caplog.at_level(logging.WARNING, logger="wan_engine"):
        for run in range(2):
            loads, result = generate(low_ram_engine(model, tmp_path, f"prompts-{run}"))
            assert "loaded the transformer from the model's files (no room on disk to keep a converted copy)" in \
                " ".join(loads)
            assert result.video_path.is_file()
        assert entries(cache) == []
    said = [record.getMessage() for record in caplog.records if "not enough disk space" in record.getMessage()]
    assert len(said) == 2  # once per part (text encoder, transformer), not once per load
    assert "it is converted from the model's files at each load, as before" in said[0]


def test_loras_fuse_into_a_cached_quantized_transformer_as_into_a_fresh_one(model, cache, tmp_path):
    lora = comfy_lora(tmp_path / "comfy.safetensors", shapes_of(model), 5, rank=4)
    fresh_loads, fresh = generate(low_ram_engine(model, tmp_path, "fresh"), loras=[(str(lora), 0.7)])
    cached_loads, cached = generate(low_ram_engine(model, tmp_path, "cached"), loras=[(str(lora), 0.7)])
    assert f"loaded the transformer {CONVERTED_AND_KEPT}" in " ".join(fresh_loads)
    assert f"loaded the transformer {LOADED_FROM_COPY}" in " ".join(cached_loads)
    assert any("the transformer holds 1 LoRAs" in message for message in cached_loads)
    np.testing.assert_array_equal(cached.frames, fresh.frames)
    plain = generate(low_ram_engine(model, tmp_path, "plain"))[1]
    assert np.abs(plain.frames - cached.frames).max() > 1e-3  # the LoRA changed the video


def test_download_with_a_preset_prepares_it_and_generate_then_loads_the_converted_copy(model, cache,
                                                                                       no_torch_env, tmp_path):
    env = {**no_torch_env, "WAN_STUDIO_CACHE": str(cache)}
    prepared = run_cli(["download", "--model", model, "--preset", "low-ram", "--dtype", "float32"], env)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.strip().endswith("prepared for low-ram")
    assert f"loaded the transformer {CONVERTED_AND_KEPT}" in prepared.stderr
    assert [name.split("-")[0] for name in entries(cache)] == ["text_encoder", "transformer"]

    generated = run_cli(["generate", "--model", model, "--preset", "low-ram", "--prompt", "a kite",
                         "--width", 64, "--height", 64, "--frames", 5, "--steps", 2, "--output", tmp_path / "a.mp4"],
                        env)
    assert generated.returncode == 0, generated.stderr
    assert f"loaded the transformer {LOADED_FROM_COPY}" in generated.stderr
    assert f"loaded the text encoder {LOADED_FROM_COPY}" in generated.stderr
    assert "process peak" in generated.stdout


def test_the_sidecar_records_the_whole_process_peak_beside_mlx_peak(model, cache, tmp_path):
    _, result = generate(Engine(model, dtype="float32", output_dir=tmp_path))
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["process_peak_rss_gib"] == result.process_peak_rss_gib > 0.05  # Python and MLX alone take more
    assert set(sidecar["stage_process_peak_rss_gib"]) == set(sidecar["stage_peak_memory_gib"])
    assert sidecar["timings"]["denoise_first_step_s"] > 0


def test_the_process_peak_is_the_process_own_not_its_parents():
    """Linux carries a parent's max RSS through fork and exec into the child's getrusage: a small process started
    by a large one must still report its own peak."""
    held = np.ones(2**30, np.uint8)  # 1 GiB resident here, in the parent
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from wan_engine.record import process_peak_rss_gib;"
            "print(process_peak_rss_gib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    own, inherited = done.stdout.split()
    assert float(own) < 0.5  # Python, numpy and MLX
    if sys.platform == "linux":
        assert int(inherited) / 2**20 >= 1.0  # what getrusage alone says there
    del held


# -- the app's warm-up -------------------------------------------------------------------------------------------------

HOLD_WARM_UP = """
import os, time
import wan_engine, wan_engine.warmup

warm_up = wan_engine.warmup.warm_up


def held_warm_up(engine):
    # the test's hand on the warm-up: it stops after its first event until the release file exists
    for number, event in enumerate(warm_up(engine)):
        yield event
        while number == 0 and not os.path.exists(os.environ["WAN_TEST_RELEASE_WARM_UP"]):
            time.sleep(0.05)


wan_engine.warm_up = held_warm_up
"""


@pytest.fixture
def held_app(tmp_path):
    """The app with its warm-up held after its first step until the test releases it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HOLD_WARM_UP)
    release = tmp_path / "release-warm-up"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "WAN_TEST_RELEASE_WARM_UP": str(release)}
    with running_app(tmp_path, env=env) as server:
        yield server, release


def progress_lines(job):
    return [update[3] for update in job.outputs()]


def test_the_page_shows_the_warm_up_and_a_generate_meanwhile_waits_for_it_then_succeeds(held_app):
    server, release = held_app
    with urllib.request.urlopen(server.url) as page:  # the page is served while the model gets ready
        assert page.status == 200
    with chromium() if os.path.exists(CHROMIUM) else nullcontext() as browser:
        if browser:
            from playwright.sync_api import expect

            page = browser.new_page()
            page.goto(server.url)
            expect(page.locator("#progress")).to_contain_text("Getting the model ready", timeout=30_000)
        client = Client(server.url, verbose=False)
        job = client.submit(api_name="/text_to_video", **{**SMALL, "negative_prompt": "", "seed": 8})
        wait_until(lambda: any("Getting the model ready: your run starts right after" in line
                               for line in progress_lines(job)))
        time.sleep(1)
        assert not any("Denoising" in line for line in progress_lines(job))  # it waits: no second load, no run
        release.touch()
        video, seed, settings, done, _ = job.result(timeout=TIMEOUT_S)
        assert seed == 8 and "Done" in done and "GiB MLX" in done and "GiB process" in done
        lines = progress_lines(job)
        assert not any("loading the transformer" in line for line in lines)  # the warm-up loaded it
        if browser:
            expect(page.locator("#progress")).to_contain_text("Ready: the model was prepared in", timeout=30_000)
    outputs = sorted(path.name for path in server.output_dir.glob("wan-*"))
    assert [name.rsplit(".", 1)[1] for name in outputs] == ["json", "mp4"]  # the warm-up wrote nothing there
    assert "getting the model ready failed" not in server.log_text()


def test_no_warmup_starts_without_it_and_the_first_generate_loads_the_model(tmp_path):
    with running_app(tmp_path, ["--no-warmup"]) as server:
        client = Client(server.url, verbose=False)
        job = client.submit(api_name="/text_to_video", **{**SMALL, "seed": 9})
        assert job.result(timeout=TIMEOUT_S)[1] == 9
        assert any("loading the transformer" in line for line in progress_lines(job))
        assert not any("Getting the model ready" in line for line in progress_lines(job))
