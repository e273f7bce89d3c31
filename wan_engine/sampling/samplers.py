"""Flow-matching samplers: UniPC (diffusers' `UniPCMultistepScheduler` with flow sigmas), Euler, and DMD (FastVideo's
few-step sampling of DMD-distilled models such as FastWan2.2-TI2V-5B).

UniPC and Euler share the shifted flow schedule sigma(t) of Wan: `sigmas = shift*s / (1 + (shift-1)*s)` for `s`
evenly spaced from 1 to 1/1000, timesteps `sigma * 1000` truncated to integers, and a final sigma of zero. The solver
coefficients are scalar and computed in float32 numpy, as diffusers computes them with float32 torch scalars; the
latent updates are MLX arrays in float32. DMD has its own fixed timesteps and draws fresh noise at every step.
"""

import math

import mlx.core as mx
import numpy as np

from ..models.config import SchedulerConfig


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000, final_sigma: str = "zero"):
    """(timesteps int64 [num_steps], sigmas float32 [num_steps + 1]) exactly as diffusers' `set_timesteps`."""
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # diffusers: keeps log(alpha) finite in the first UniPC update
    timesteps = (sigmas * num_train_timesteps).copy().astype(np.int64)
    last = sigmas[-1] if final_sigma == "sigma_min" else 0.0
    return timesteps, np.concatenate([sigmas, [last]]).astype(np.float32)


class EulerSampler:
    """First-order flow matching: x <- x + (sigma_next - sigma) * velocity."""

    order = 1
    description = "simpler, needs more steps"
    few_step = False  # a full-length sampler: Wan's steps and guidance

    def __init__(self, num_steps: int, shift: float, config: SchedulerConfig):
        self.timesteps, self.sigmas = flow_sigmas(num_steps, shift, config.num_train_timesteps)
        self.step_index = 0

    def step(self, model_output: mx.array, sample: mx.array) -> mx.array:
        dt = self.sigmas[self.step_index + 1] - self.sigmas[self.step_index]
        self.step_index += 1
        return sample + dt.item() * model_output.astype(mx.float32)


def _lambda(sigma: np.float32) -> np.float32:
    """Log signal-to-noise ratio of a flow sigma (alpha = 1 - sigma); +inf at the final sigma of zero, as in
    diffusers, where the bh2 update still has its finite limit."""
    with np.errstate(divide="ignore"):
        return np.log(np.float32(1) - sigma) - np.log(sigma)


class UniPCSampler:
    """diffusers' UniPC multistep solver (predict_x0, flow_prediction): a predictor of order up to
    `solver_order` and a corrector (UniC) that reuses the next model output, bh1 or bh2 variant."""

    description = "Wan's default"
    few_step = False

    def __init__(self, num_steps: int, shift: float, config: SchedulerConfig):
        unsupported = config.prediction_type != "flow_prediction" or not config.use_flow_sigmas or not config.predict_x0
        if unsupported:
            raise ValueError("only UniPC with flow_prediction, use_flow_sigmas and predict_x0 is supported")
        if config.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unknown UniPC solver_type {config.solver_type!r}: expected 'bh1' or 'bh2'")
        self.config = config
        self.timesteps, self.sigmas = flow_sigmas(
            num_steps, shift, config.num_train_timesteps, config.final_sigmas_type
        )
        self.step_index = 0
        self.model_outputs = []  # the last `solver_order` x0 predictions, oldest first
        self.last_sample = None
        self.this_order = 1

    def _coefficients(self, index_t: int, index_s0: int, previous: list):
        """Shared UniP/UniC quantities between sigma[index_s0] and sigma[index_t]; `previous` are the sigma
        indices of the older model outputs, newest first. Returns (h_phi_1, B_h, rks, b)."""
        sigmas = self.sigmas
        lambda_s0 = _lambda(sigmas[index_s0])
        h = _lambda(sigmas[index_t]) - lambda_s0
        rks = [(_lambda(sigmas[si]) - lambda_s0) / h for si in previous] + [np.float32(1)]
        hh = -h
        h_phi_1 = np.expm1(hh)
        B_h = hh if self.config.solver_type == "bh1" else np.expm1(hh)
        h_phi_k = h_phi_1 / hh - np.float32(1)
        factorial_i = 1
        b = []
        for i in range(1, len(rks) + 1):
            b.append(h_phi_k * np.float32(factorial_i) / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - np.float32(1 / factorial_i)
        return h_phi_1, B_h, np.array(rks, np.float32), np.array(b, np.float32)

    def _base(self, x, m0, index_t, index_s0, h_phi_1):
        """The first-order (DPM-Solver-like) part of both updates, in x0-prediction form."""
        sigma_t, sigma_s0 = self.sigmas[index_t], self.sigmas[index_s0]
        alpha_t = np.float32(1) - sigma_t
        return (sigma_t / sigma_s0).item() * x - (alpha_t * h_phi_1).item() * m0, alpha_t

    def _predict(self, x: mx.array, order: int) -> mx.array:
        """UniP: extrapolate from sigma[i] to sigma[i+1] with the last `order` model outputs."""
        i = self.step_index
        m = self.model_outputs
        previous = [i - k for k in range(1, order)]
        h_phi_1, B_h, rks, b = self._coefficients(i + 1, i, previous)
        x_t, alpha_t = self._base(x, m[-1], i + 1, i, h_phi_1)
        if order == 1:
            return x_t
        R = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
        rhos = np.array([0.5], np.float32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(np.float32)
        pred_res = sum(rhos[k].item() * ((m[-(k + 2)] - m[-1]) / rks[k].item()) for k in range(order - 1))
        return x_t - (alpha_t * B_h).item() * pred_res

    def _correct(self, model_t: mx.array, x: mx.array, x_t: mx.array, order: int) -> mx.array:
        """UniC: refine the previous prediction `x_t` (from `x`) with the new model output `model_t`."""
        i = self.step_index
        m = self.model_outputs
        previous = [i - (k + 1) for k in range(1, order)]
        h_phi_1, B_h, rks, b = self._coefficients(i, i - 1, previous)
        base, alpha_t = self._base(x, m[-1], i, i - 1, h_phi_1)
        R = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
        rhos = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(R, b).astype(np.float32)
        correction = sum(rhos[k].item() * ((m[-(k + 2)] - m[-1]) / rks[k].item()) for k in range(order - 1))
        return base - (alpha_t * B_h).item() * (correction + rhos[-1].item() * (model_t - m[-1]))

    def step(self, model_output: mx.array, sample: mx.array) -> mx.array:
        """One solver step from sigma[i] to sigma[i+1]; `model_output` is the predicted flow velocity."""
        config, i = self.config, self.step_index
        x0_pred = sample - self.sigmas[i].item() * model_output.astype(mx.float32)
        if i > 0 and (i - 1) not in config.disable_corrector and self.last_sample is not None:
            sample = self._correct(x0_pred, self.last_sample, sample, self.this_order)
        self.model_outputs = (self.model_outputs + [x0_pred])[-config.solver_order :]
        order = min(config.solver_order, len(self.timesteps) - i) if config.lower_order_final else config.solver_order
        self.this_order = min(order, len(self.model_outputs))
        self.last_sample = sample
        prev_sample = self._predict(sample, self.this_order)
        self.step_index += 1
        return prev_sample


# FastVideo's DMD sampling, the spec of DMDSampler (fastvideo 0.2.1 = hao-ai-lab/FastVideo 2f3d407):
# fastvideo/pipelines/stages/denoising.py `DmdDenoisingStage` (lines 1250-1409), with `pred_noise_to_pred_video`
# (fastvideo/models/utils.py 138-175) and `FlowMatchEulerDiscreteScheduler.__init__` / `add_noise`
# (fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py 112-161, 601-635).
DMD_TIMESTEPS = (1000, 757, 522)  # FastWan2.2-TI2V-5B's `dmd_denoising_steps` (configs/pipelines/wan.py 276-278)
DMD_SHIFT = 8.0  # DmdDenoisingStage looks sigmas up in its own FlowMatchEulerDiscreteScheduler(shift=8.0)


def dmd_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The timesteps of `num_steps` DMD steps: FastWan2.2's three for 3 steps. FastVideo derives no list from a
    step count (its DMD stage ignores num_inference_steps and runs the configured list); for other counts we space
    them evenly from 1000 down, 1000*(N-k)/N rounded down, which is what FastVideo's 4-step DMD configs list
    ([1000, 750, 500, 250]). The distilled model was trained on its own list only."""
    if num_steps == len(DMD_TIMESTEPS):
        return np.array(DMD_TIMESTEPS, np.int64)
    return num_train_timesteps * np.arange(num_steps, 0, -1, dtype=np.int64) // num_steps


def dmd_sigma_table(shift: float, num_train_timesteps: int = 1000):
    """(timesteps, sigmas), float32 [num_train_timesteps]: the training schedule of FastVideo's
    FlowMatchEulerDiscreteScheduler, in its float32 arithmetic, from timestep 1000 (sigma 1) down."""
    sigmas = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * num_train_timesteps, sigmas


class DMDSampler:
    """Few-step sampling of a DMD-distilled model, as FastVideo's DmdDenoisingStage: at each timestep the flow
    prediction v gives a clean estimate x0 = x_t - sigma_t * v, which is noised again to the next timestep's level
    with fresh noise, x = (1 - sigma_next) * x0 + sigma_next * noise; the last step returns x0. Each timestep's sigma
    is that of the nearest timestep of the shifted 1000-step table (so sigma ~ t/1000; the shift only moves it
    along that grid). The fresh noise comes from `key`, split once per draw: one seed, one video."""

    order = 1
    description = "few-step distilled sampling (FastVideo's)"
    few_step = True  # made for DMD-distilled models: a few steps, no guidance

    def __init__(self, num_steps: int, shift: float, config: SchedulerConfig, key: mx.array):
        self.timesteps = dmd_timesteps(num_steps, config.num_train_timesteps)
        table_timesteps, table_sigmas = dmd_sigma_table(shift, config.num_train_timesteps)
        # FastVideo compares in float64 (pred_noise_to_pred_video), with the table's float32 values
        nearest = np.abs(table_timesteps.astype(np.float64)[None] - self.timesteps[:, None]).argmin(axis=1)
        self.sigmas = table_sigmas[nearest]
        self.key = key
        self.step_index = 0

    def fresh_noise(self, shape: tuple) -> mx.array:
        """Standard normal noise for one re-noising, from the next split of the key."""
        self.key, key = mx.random.split(self.key)
        return mx.random.normal(shape, dtype=mx.float32, key=key)

    def step(self, model_output: mx.array, sample: mx.array) -> mx.array:
        i = self.step_index
        self.step_index += 1
        # FastVideo computes x0 in float64 and rounds it to the prediction's dtype (bfloat16 when its transformer runs
        # in bfloat16); we keep x0 in float32, as the latents are: the same to round-off in float32 runs (the tests),
        # finer than FastVideo's by one bfloat16 rounding in bfloat16 ones
        clean = sample - self.sigmas[i].item() * model_output.astype(mx.float32)
        if self.step_index == len(self.timesteps):
            return clean
        sigma_next = self.sigmas[i + 1]
        return (1 - sigma_next).item() * clean + sigma_next.item() * self.fresh_noise(sample.shape)


SAMPLERS = {"unipc": UniPCSampler, "euler": EulerSampler, "dmd": DMDSampler}


def sampler_defaults(name: str, config: SchedulerConfig) -> dict:
    """What sampler `name` runs with when a request leaves steps, guidance or shift unset. DMD: the distilled
    model's three steps without guidance (FastVideo's DMD stage runs the prompt alone), and FastVideo's table shift;
    the others: Wan2.2's 50 steps, guidance 5 and the scheduler config's flow shift."""
    if name in SAMPLERS and SAMPLERS[name].few_step:  # an unknown name is refused by the request's checks
        return {"sampler": name, "steps": len(DMD_TIMESTEPS), "guidance": 1.0, "shift": DMD_SHIFT}
    return {"sampler": name, "steps": 50, "guidance": 5.0, "shift": config.flow_shift}


def make_sampler(name: str, num_steps: int, shift: float, config: SchedulerConfig, noise_key: mx.array | None = None):
    """A sampler; `noise_key` is the key of DMD's fresh noise (the other samplers draw none)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive number, got {shift}")
    if name == "dmd":
        return DMDSampler(num_steps, shift, config, noise_key)
    return SAMPLERS[name](num_steps, shift, config)
