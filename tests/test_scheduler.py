"""The flow UniPC and Euler samplers against diffusers, step by step, on a toy velocity field."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wan_engine.models.config import SchedulerConfig
from wan_engine.sampling.samplers import EulerSampler, UniPCSampler, make_sampler

WAN22_SCHEDULER = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0,
    solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
)


def velocity(sample: np.ndarray, step: int) -> np.ndarray:
    """A deterministic, sample-dependent stand-in for the transformer's prediction."""
    return np.tanh(sample * 0.7 + 0.1 * step) - 0.3 * sample


def run_diffusers(scheduler, x: np.ndarray, steps: int):
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(x)
    for i, t in enumerate(scheduler.timesteps):
        out = torch.from_numpy(velocity(sample.numpy(), i))
        sample = scheduler.step(out, t, sample, return_dict=False)[0]
    return scheduler.timesteps.numpy(), sample.numpy()


def run_ours(scheduler, x: np.ndarray):
    sample = mx.array(x)
    for i in range(len(scheduler.timesteps)):
        out = mx.array(velocity(np.array(sample), i))
        sample = scheduler.step(out, sample)
    return np.array(sample)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"flow_shift": 1.0}, {"flow_shift": 3.7, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {"solver_order": 3},
     {"disable_corrector": [0, 3]}, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}],
)
def test_unipc_matches_diffusers(steps, overrides):
    # (bh1 with a final sigma of zero gives NaN in diffusers itself: -inf * 0 in its last update; so bh1 is
    # compared with final_sigmas_type="sigma_min"; so is lower_order_final=False, whose order-2 last step
    # divides by an infinite h there.)
    params = {**WAN22_SCHEDULER, **overrides}
    if steps == 1 and params["final_sigmas_type"] == "sigma_min":
        pytest.skip("degenerate schedule: the final sigma equals the only sigma (h = 0)")
    x = np.random.default_rng(steps).standard_normal((1, 6, 3, 4, 5)).astype(np.float32)
    timesteps, expected = run_diffusers(UniPCMultistepScheduler(**params), x, steps)
    ours = UniPCSampler(steps, params["flow_shift"], SchedulerConfig.from_dict(params))
    np.testing.assert_array_equal(ours.timesteps, timesteps)
    result = run_ours(ours, x)
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result, expected, atol=2e-5, rtol=1e-5)


def test_unipc_final_sigma_is_zero_and_sigmas_shifted():
    ours = UniPCSampler(4, 5.0, SchedulerConfig.from_dict(WAN22_SCHEDULER))
    reference = UniPCMultistepScheduler(**WAN22_SCHEDULER)
    reference.set_timesteps(4)
    np.testing.assert_array_equal(ours.sigmas, reference.sigmas.numpy())
    assert ours.sigmas[-1] == 0 and ours.sigmas[0] < 1


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (7, 5.0), (20, 2.5)])
def test_euler_matches_diffusers_flow_match_euler(steps, shift):
    x = np.random.default_rng(1).standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
    ours = EulerSampler(steps, shift, SchedulerConfig())
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # diffusers' flow Euler with the same (already shifted) sigmas as Wan's UniPC schedule
    reference.set_timesteps(sigmas=list(ours.sigmas[:-1] / (shift - (shift - 1) * ours.sigmas[:-1])))
    np.testing.assert_allclose(reference.sigmas.numpy(), ours.sigmas, atol=1e-6)
    expected = torch.from_numpy(x)
    for i, t in enumerate(reference.timesteps):
        expected = reference.step(torch.from_numpy(velocity(expected.numpy(), i)), t, expected).prev_sample
    np.testing.assert_allclose(run_ours(ours, x), expected.numpy(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,steps,shift,message", [
    ("ddim", 10, 5.0, "unknown sampler 'ddim': choose one of unipc, euler, dmd"),
    ("unipc", 0, 5.0, "steps must be at least 1"),
    ("euler", 10, -1.0, "shift must be a positive number"),
])
def test_bad_sampler_settings_are_refused(name, steps, shift, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(name, steps, shift, SchedulerConfig())
