"""MagCache (wan_engine/sampling/magcache.py) against diffusers' own hook, `transformer.enable_cache(MagCacheConfig)`,
on tiny random snapshots: the same steps skipped, the same frames; calibration as diffusers' `calibrate=True`; and
the refusals of bad settings in one line."""

import ast
import json
import re

import numpy as np
import pytest
from diffusers.hooks import MagCacheConfig

from conftest import run_cli
from test_lora import musubi_lora, shapes_of
from test_pipeline import noise_for, run_engine
from tiny_snapshots import reference_frames, sample_image
from wan_engine import Engine, GenerationRequest
from wan_engine.errors import WanError
from wan_engine.run import drain
from wan_engine.sampling.magcache import TI2V_5B_IMAGE_TO_VIDEO, TI2V_5B_TEXT_TO_VIDEO, MagCache

FRAMES_BAR = 2e-4  # the bar on decoded frames, max abs
CALIBRATION_BAR = 1e-3
PROMPT, NEGATIVE = "a red fox runs through fresh snow", "blurry, static"
DECAYING = [1.0, 0.99, 0.985, 0.97, 0.96, 0.95, 0.93, 0.92, 0.9, 0.88]

CASES = {
    # name: (snapshot, width, height, frames, steps, guidance, image, ratios, threshold, max_skip, retention)
    "t2v-published-ratios-resampled": ("small", 96, 64, 9, 12, 5.0, False, TI2V_5B_TEXT_TO_VIDEO, 0.02, 2, 0.2),
    "t2v-no-guidance": ("wide", 64, 64, 5, 10, 1.0, False, DECAYING, 0.1, 3, 0.2),
    "i2v": ("small", 96, 64, 9, 10, 4.0, True, TI2V_5B_IMAGE_TO_VIDEO, 0.01, 2, 0.3),
}


def blocks_ran_per_step(calls: list, guidance: float) -> list:
    """diffusers' calls, prompt branch then negative branch each step -> per step whether the blocks ran (the two
    branches must agree)."""
    if guidance > 1:
        assert calls[0::2] == calls[1::2]
        return calls[0::2]
    return calls


@pytest.mark.parametrize("case", CASES)
def test_frames_and_skipped_steps_match_diffusers(case, snapshots, tmp_path):
    name, width, height, frames, steps, guidance, with_image, ratios, threshold, max_skip, retention = CASES[case]
    noise = noise_for(name, width, height, frames)
    image = sample_image() if with_image else None
    calls = []
    config = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,
                            num_inference_steps=steps, mag_ratios=ratios)
    expected = reference_frames(snapshots[name], PROMPT, NEGATIVE, width, height, frames, steps, guidance, noise,
                                image=image, cache=config, blocks_ran=calls)
    events, result = run_engine(snapshots[name], tmp_path, prompt=PROMPT, negative_prompt=NEGATIVE, image=image,
                                width=width, height=height, frames=frames, steps=steps, guidance=guidance,
                                latents=noise, cache="magcache", cache_threshold=threshold, cache_max_skip=max_skip,
                                cache_retention=retention, cache_ratios=ratios)
    ran = [not e.message.endswith("(MagCache)") for e in events if e.stage == "denoise"]
    assert ran == blocks_ran_per_step(calls, guidance)
    assert 0 < ran.count(False) < steps - 1  # some steps skipped, others computed
    assert MagCache(tuple(ratios), threshold, max_skip, retention).plan(steps) == ran
    assert np.abs(result.frames - expected).max() < FRAMES_BAR
    assert np.abs(expected).max() > 0.1
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["cache"] == {"kind": "magcache", "threshold": threshold, "max_skip": max_skip,
                                "retention": retention, "computed_steps": ran.count(True),
                                "skipped_steps": ran.count(False)}


def test_without_a_cache_nothing_is_skipped_and_the_sidecar_says_nothing(snapshots, tmp_path):
    events, result = run_engine(snapshots["small"], tmp_path, prompt=PROMPT, width=64, height=64, frames=5, steps=4)
    assert not any("MagCache" in e.message for e in events)
    assert "cache" not in json.loads(result.sidecar_path.read_text())


@pytest.mark.parametrize("steps,length", [(50, 50), (12, 50), (7, 3), (1, 10)])
def test_the_plan_is_diffusers_for_ratios_of_any_length(steps, length):
    """The plan against diffusers' hook's own arithmetic, its config resampling the ratios and its state updated
    step by step as MagCacheHeadHook does (float32 tensors)."""
    import torch

    ratios = list(np.linspace(1.0, 0.9, length).round(5))
    for threshold, max_skip, retention in [(0.06, 2, 0.2), (0.12, 3, 0.0), (0.0, 3, 0.2), (0.3, 5, 0.5)]:
        config = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,
                                num_inference_steps=steps, mag_ratios=ratios)
        ratio, err, count, kept, expected = 1.0, 0.0, 0, False, []
        for step in range(steps):
            compute = True
            if step >= int(retention * steps + 0.5):
                ratio = ratio * config.mag_ratios[step]
                count += 1
                err = err + abs(1.0 - ratio)
                if kept and err <= threshold and count <= max_skip:
                    compute = False
                else:
                    ratio, err, count = 1.0, 0.0, 0
            expected.append(compute)
            kept = kept or compute
        assert isinstance(ratio, (float, torch.Tensor))
        assert MagCache(tuple(ratios), threshold, max_skip, retention).plan(steps) == expected


def diffusers_calibration(capsys) -> list:
    """The prompt branch's list, the first that diffusers prints after "[MagCache] Calibration Complete"."""
    printed = capsys.readouterr().out
    return ast.literal_eval(re.findall(r"Calibration Complete.*?\n(\[.*?\])", printed, re.S)[0])


@pytest.mark.parametrize("image", [False, True])
def test_calibration_matches_diffusers(image, snapshots, tmp_path, capsys):
    steps, noise = 6, noise_for("small", 96, 64, 9)
    picture = sample_image() if image else None
    capsys.readouterr()
    reference_frames(snapshots["small"], PROMPT, NEGATIVE, 96, 64, 9, steps, 5.0, noise, image=picture,
                     cache=MagCacheConfig(calibrate=True, num_inference_steps=steps))
    expected = diffusers_calibration(capsys)
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    ours = drain(engine.calibrate_cache(GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, image=picture, width=96, height=64, frames=9, steps=steps,
        guidance=5.0, latents=noise)))
    assert len(ours) == len(expected) == steps and ours[0] == 1.0
    assert np.abs(np.array(ours) - np.array(expected)).max() < CALIBRATION_BAR
    assert not list(tmp_path.iterdir())  # a calibration writes no video


def test_calibrate_cache_command_writes_the_ratios_and_generate_reads_them(snapshots, no_torch_env, tmp_path):
    noise = noise_for("wide", 64, 64, 5)
    np.save(tmp_path / "L.npy", noise)
    ratios_file = tmp_path / "ratios.json"
    common = ["--model", snapshots["wide"], "--prompt", PROMPT, "--width", 64, "--height", 64, "--frames", 5,
              "--steps", 8, "--latents", tmp_path / "L.npy", "--dtype", "float32"]
    proc = run_cli(["calibrate-cache", *common, "--output", ratios_file], no_torch_env)
    assert proc.returncode == 0, proc.stderr
    ratios = json.loads(ratios_file.read_text())
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    out = tmp_path / "cached.mp4"
    proc = run_cli(["generate", *common, "--cache", "magcache", "--cache-ratios", ratios_file, "--cache-threshold",
                    "0.5", "--output", out], no_torch_env)
    assert proc.returncode == 0, proc.stderr
    cache = json.loads(out.with_suffix(".json").read_text())["cache"]
    assert cache["kind"] == "magcache" and cache["threshold"] == 0.5 and cache["computed_steps"] + cache[
        "skipped_steps"] == 8


@pytest.mark.parametrize("args,message", [
    (["--cache", "teacache"], "cache 'teacache' is not allowed: choose magcache, or none"),
    (["--cache", "magcache", "--cache-threshold", "-0.1"], "cache threshold -0.1 is not allowed"),
    (["--cache", "magcache", "--cache-max-skip", "0"], "cache max skip 0 is not allowed"),
    (["--cache", "magcache", "--cache-retention", "1.5"], "cache retention 1.5 is not allowed"),
    (["--cache", "magcache", "--sampler", "dmd"], "the magcache cache is not allowed with the dmd sampler"),
    (["--cache", "magcache", "--cache-ratios", "RATIOS"], "are not allowed: give a list of positive numbers"),
    (["--cache", "magcache", "--cache-ratios", "/nonexistent.json"], "cannot read the cache ratios"),
    (["--cache", "magcache"], "this model has no built-in MagCache ratios"),
    (["--sampler", "dmd", "--guidance", "0.5"], "guidance 0.5 is not allowed with the dmd sampler"),
])
def test_bad_cache_settings_are_refused_in_one_line(args, message, snapshots, no_torch_env, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1.0, -0.5, "x"]))
    out = tmp_path / "never.mp4"
    args = [str(bad) if arg == "RATIOS" else arg for arg in args]
    proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "a boat", "--width", 96, "--height", 64,
                    "--frames", 5, "--steps", 4, "--output", out, *args], no_torch_env)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_the_demo_model_takes_the_published_ratios_of_its_task(tmp_path):
    engine = Engine("demo", dtype="float32", output_dir=tmp_path)
    common = dict(prompt="a kite", width=96, height=64, frames=9, steps=50, seed=1, cache="magcache",
                  cache_max_skip=2)
    *_, text = engine.generate(GenerationRequest(**common))
    *_, picture = engine.generate(GenerationRequest(**common, image=sample_image()))
    for result, ratios in ((text, TI2V_5B_TEXT_TO_VIDEO), (picture, TI2V_5B_IMAGE_TO_VIDEO)):
        plan = MagCache(tuple(ratios), 0.06, 2, 0.2).plan(50)
        assert result.record.cache["skipped_steps"] == plan.count(False) > 15


def test_a_model_without_published_ratios_needs_its_own(snapshots, tmp_path):
    with pytest.raises(WanError, match="calibrate-cache"):
        run_engine(snapshots["small"], tmp_path, prompt="x", width=64, height=64, frames=5, steps=4, cache="magcache")


def test_with_loras_on_a_quantized_transformer_a_cache_changes_only_the_skipped_steps(snapshots, tmp_path):
    """low-ram's 8-bit transformer with a LoRA fused: a cache that skips nothing gives the very frames of no cache,
    and one that skips steps still runs to a video."""
    lora = musubi_lora(tmp_path / "style.safetensors", shapes_of(snapshots["small"]), seed=3, rank=2)
    engine = Engine(snapshots["small"], dtype="float32", preset="low-ram", output_dir=tmp_path)
    common = dict(prompt=PROMPT, width=96, height=64, frames=5, steps=8, seed=5, keep_frames=True,
                  loras=[(str(lora), 0.7)])
    cache = dict(cache="magcache", cache_ratios=[1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93], cache_retention=0.25)
    *_, plain = engine.generate(GenerationRequest(**common))
    *_, none_skipped = engine.generate(GenerationRequest(**common, **cache, cache_threshold=0.0))
    *_, skipping = engine.generate(GenerationRequest(**common, **cache, cache_threshold=0.1, cache_max_skip=2))
    assert none_skipped.record.cache["skipped_steps"] == 0
    assert np.array_equal(none_skipped.frames, plain.frames)
    assert skipping.record.cache["skipped_steps"] == 4 and skipping.settings["loras"][0]["strength"] == 0.7
    assert 0 < np.abs(skipping.frames - plain.frames).max() < 0.5
