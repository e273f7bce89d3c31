"""The dmd sampler against FastVideo's DMD sampling (tests/dmd_reference.py, a port of its DmdDenoisingStage):
its timesteps and sigmas, its steps on a toy velocity field, and whole videos from tiny snapshots with the same
initial noise and the same noise at each re-noising; then seeds, cancelling, the CLI, and the defaults a
FastWan checkpoint (model_index.json naming FastVideo's WanDMDPipeline) gets."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import SPECS, run_cli
from dmd_reference import FlowMatchTable, fastvideo_dmd_frames, pred_noise_to_pred_video
from test_pipeline import BAR, noise_for, run_engine
from tiny_snapshots import sample_image
from wan_engine.models.config import SchedulerConfig
from wan_engine.engine import Engine
from wan_engine.request import CancelToken, GenerationRequest, SizeRules, validate
from wan_engine.errors import Cancelled, WanError
from wan_engine.pipeline import step_noise_key
from wan_engine.sampling.samplers import DMDSampler, make_sampler

PROMPT = "a red fox runs through fresh snow"
# Beside the BAR: we measure ~1e-6; looking sigmas up in a shift-5 table instead of FastVideo's shift-8 one
# (sigmas 3e-4 apart) is already 5e-4 to 3e-3 off.
TIGHT = 2e-5


def velocity(sample: np.ndarray, step: int) -> np.ndarray:
    """A deterministic, sample-dependent stand-in for the transformer's prediction."""
    return np.tanh(sample * 0.7 + 0.1 * step) - 0.3 * sample


def step_noises(steps: int, shape: tuple, seed: int = 1) -> list:
    """The noise of each re-noising (one fewer than the steps), in diffusers' layout."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps - 1)]


def inject(monkeypatch, noises: list) -> None:
    """Make DMDSampler re-noise with `noises` (diffusers' layout), in order, instead of its key's draws."""
    draws = iter(noises)

    def given_noise(self, shape):
        noise = mx.array(next(draws)).transpose(0, 2, 3, 4, 1)
        assert noise.shape == tuple(shape)
        return noise

    monkeypatch.setattr(DMDSampler, "fresh_noise", given_noise)


@pytest.mark.parametrize("steps,expected", [
    (3, [1000, 757, 522]), (1, [1000]), (2, [1000, 500]), (4, [1000, 750, 500, 250]),
    (6, [1000, 833, 666, 500, 333, 166]),
])
@pytest.mark.parametrize("shift", [8.0, 5.0])
def test_timesteps_and_sigmas_are_fastvideos(steps, expected, shift):
    ours = make_sampler("dmd", steps, shift, SchedulerConfig(), mx.random.key(0))
    assert ours.timesteps.tolist() == expected
    table = FlowMatchTable(shift=shift)
    ids = torch.argmin((table.timesteps.double()[None] - torch.tensor(expected)[:, None]).abs(), dim=1)
    np.testing.assert_array_equal(ours.sigmas, table.sigmas[ids].numpy())  # the same float32 values
    if steps == 3 and shift == 8.0:  # sigma ~ t / 1000 on the shift-8 grid
        np.testing.assert_allclose(ours.sigmas, [1.0, 0.7567567, 0.5217391], rtol=1e-6)


@pytest.mark.parametrize("steps,shift", [(3, 8.0), (1, 8.0), (4, 8.0), (5, 3.0)])
def test_steps_match_fastvideo_on_a_toy_field(steps, shift, monkeypatch):
    x = np.random.default_rng(steps).standard_normal((1, 6, 3, 4, 5)).astype(np.float32)  # diffusers' layout
    noises = step_noises(steps, x.shape)
    inject(monkeypatch, noises)
    ours = make_sampler("dmd", steps, shift, SchedulerConfig(), mx.random.key(0))
    table = FlowMatchTable(shift=shift)
    sample, expected = mx.array(x).transpose(0, 2, 3, 4, 1), torch.from_numpy(x)
    timesteps = torch.tensor(ours.timesteps)
    for i, t in enumerate(timesteps):
        sample = ours.step(mx.array(velocity(np.array(sample), i)), sample)
        # as DmdDenoisingStage calls them: rows of the flattened batch, timesteps of shape [1]
        v = torch.from_numpy(velocity(expected.numpy(), i))
        expected = pred_noise_to_pred_video(v.flatten(0, 1), expected.flatten(0, 1), t[None], table)
        if i < steps - 1:
            expected = table.add_noise(expected, torch.from_numpy(noises[i]).flatten(0, 1), timesteps[i + 1][None])
        expected = expected.unflatten(0, x.shape[:2])
    np.testing.assert_allclose(np.array(sample).transpose(0, 4, 1, 2, 3), expected.numpy(), atol=1e-6, rtol=1e-6)


CASES = {
    # name: (snapshot, width, height, frames, steps, image). FastVideo's DMD pipeline ignores an input picture: the
    # image cases check our own image to video with dmd, the reference conditioning frame 0 as TI2V's DenoisingStage
    # does and sampling as the DMD stage does.
    "t2v": ("small", 96, 64, 9, 3, False),
    "i2v": ("small", 96, 64, 13, 3, True),
    "t2v-wide-4-steps": ("wide", 64, 96, 5, 4, False),
    "i2v-wide-2-steps": ("wide", 64, 64, 9, 2, True),
}


@pytest.mark.parametrize("case", CASES)
def test_engine_matches_fastvideo(case, snapshots, tmp_path, monkeypatch):
    name, width, height, frames, steps, with_image = CASES[case]
    noise = noise_for(name, width, height, frames)
    noises = step_noises(steps, noise.shape)
    image = sample_image() if with_image else None
    timesteps = make_sampler("dmd", steps, 8.0, SchedulerConfig(), mx.random.key(0)).timesteps.tolist()
    expected = fastvideo_dmd_frames(snapshots[name], PROMPT, width, height, frames, timesteps, noise, noises, image)
    inject(monkeypatch, noises)
    events, result = run_engine(snapshots[name], tmp_path, prompt=PROMPT, image=image, width=width, height=height,
                                frames=frames, steps=steps, sampler="dmd", latents=noise)
    assert result.frames.shape == expected.shape == (frames, height, width, 3)
    assert np.abs(result.frames - expected).max() < min(BAR, TIGHT)
    assert np.abs(expected).max() > 0.1  # a meaningful comparison, not two black videos
    assert [e.stage for e in events].count("denoise") == steps
    assert result.settings["guidance"] == 1.0 and result.settings["shift"] == 8.0
    assert [e.message for e in events if e.stage == "text"] == ["encoding the prompt"]  # no negative prompt


def test_same_seed_same_video_and_renoising_from_the_seed(snapshots, tmp_path):
    common = dict(prompt="waves", width=64, height=64, frames=5, sampler="dmd")
    _, a = run_engine(snapshots["small"], tmp_path, seed=11, output=str(tmp_path / "a.mp4"), **common)
    _, b = run_engine(snapshots["small"], tmp_path, seed=11, output=str(tmp_path / "b.mp4"), **common)
    assert np.array_equal(a.frames, b.frames)
    # the same initial noise, another seed: only the re-noising differs, and it shows
    latents = noise_for("small", 64, 64, 5)
    _, c = run_engine(snapshots["small"], tmp_path, seed=11, latents=latents, output=str(tmp_path / "c.mp4"), **common)
    _, d = run_engine(snapshots["small"], tmp_path, seed=12, latents=latents, output=str(tmp_path / "d.mp4"), **common)
    assert np.abs(c.frames - d.frames).max() > 1e-2


def test_cancel_between_steps(snapshots, tmp_path):
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    cancel = CancelToken()
    steps_seen = 0
    request = GenerationRequest(prompt="x", width=64, height=64, frames=5, sampler="dmd")
    with pytest.raises(Cancelled):
        for event in engine.generate(request, cancel):
            if getattr(event, "stage", None) == "denoise":
                steps_seen += 1
                cancel.cancel()
    assert steps_seen == 1
    assert not list(tmp_path.iterdir())


def test_guidance_is_refused_with_dmd(snapshots, no_torch_env, tmp_path):
    with pytest.raises(WanError, match="guidance 5.0 is not allowed with the dmd sampler"):
        validate(GenerationRequest(prompt="x", sampler="dmd", guidance=5.0), SizeRules())
    proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "x", "--width", 64, "--height", 64,
                    "--frames", 5, "--sampler", "dmd", "--guidance", 5, "--output", tmp_path / "never.mp4"],
                   no_torch_env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "error: guidance 5.0 is not allowed with the dmd sampler" in proc.stderr


@pytest.fixture(scope="module")
def fastwan_snapshot(snapshots, tmp_path_factory):
    """The small snapshot as FastVideo publishes FastWan2.2-TI2V-5B: model_index.json names its WanDMDPipeline."""
    root = shutil.copytree(snapshots["small"], tmp_path_factory.mktemp("fastwan") / "FastWan-tiny")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanDMDPipeline"}))
    return root


def test_fastwan_checkpoints_default_to_dmd(fastwan_snapshot, snapshots, tmp_path):
    fastwan, base = Engine(fastwan_snapshot, output_dir=tmp_path), Engine(snapshots["small"], output_dir=tmp_path)
    assert fastwan.defaults() == {"sampler": "dmd", "steps": 3, "guidance": 1.0, "shift": 8.0}
    assert base.defaults() == {"sampler": "unipc", "steps": 50, "guidance": 5.0, "shift": SPECS["small"].flow_shift}
    assert base.defaults("dmd") == fastwan.defaults()
    assert fastwan.defaults("unipc") == base.defaults()
    request = GenerationRequest(prompt="x", sampler=None, guidance=None, steps=None, width=64, height=64, frames=5)
    assert fastwan.with_defaults(request) == GenerationRequest(prompt="x", sampler="dmd", steps=3, guidance=1.0,
                                                               shift=8.0, width=64, height=64, frames=5)
    assert fastwan.with_defaults(GenerationRequest(prompt="x", steps=4)).steps == 4  # what a request sets stays


def test_cli_dmd_matches_fastvideo_and_fastwan_defaults(fastwan_snapshot, snapshots, no_torch_env, tmp_path):
    """`--sampler dmd` on the base layout, and no sampler/steps/guidance on a FastWan checkpoint: the same video,
    FastVideo's for the noise our seed draws at each re-noising."""
    width, height, frames, seed = 96, 64, 9, 3
    noise = noise_for("small", width, height, frames, seed=4)
    np.save(tmp_path / "L.npy", noise)
    videos = {}
    for label, model, extra in (("base", snapshots["small"], ["--sampler", "dmd"]), ("fastwan", fastwan_snapshot, [])):
        out = tmp_path / f"{label}.mp4"
        proc = run_cli(["generate", "--model", model, "--prompt", PROMPT, "--width", width, "--height", height,
                        "--frames", frames, "--seed", seed, "--latents", tmp_path / "L.npy", "--save-frames",
                        tmp_path / f"{label}.npy", "--output", out, "--dtype", "float32", *extra], no_torch_env)
        assert proc.returncode == 0, proc.stderr
        settings = json.loads(out.with_suffix(".json").read_text())["settings"]
        assert (settings["sampler"], settings["steps"], settings["guidance"], settings["shift"]) == ("dmd", 3, 1.0, 8.0)
        videos[label] = np.load(tmp_path / f"{label}.npy")
    assert np.array_equal(videos["base"], videos["fastwan"])
    sampler = DMDSampler(3, 8.0, SchedulerConfig(), step_noise_key(seed))
    channels_last = noise.transpose(0, 2, 3, 4, 1).shape
    seed_noises = [np.array(sampler.fresh_noise(channels_last).transpose(0, 4, 1, 2, 3)) for _ in range(2)]
    expected = fastvideo_dmd_frames(snapshots["small"], PROMPT, width, height, frames, [1000, 757, 522], noise,
                                    seed_noises)
    assert np.abs(videos["base"] - expected).max() < min(BAR, TIGHT)
