"""Several processes on one video: the `mx.distributed` group that `mlx.launch` starts, and how a run is shared.

    mlx.launch -n 2 -- python -m wan_engine generate --prompt "..."     # one video, one sidecar, from rank 0

Rank 0 owns the request. It encodes the prompt (and the first frame), then hands the request, the text embeddings,
the initial noise and the image latent to the others (`ParallelGroup.start_run`), which wait for work in
`ParallelGroup.serve`. Then every process runs its part (`RankPlan`) and all keep the same latents:

- guidance-parallel: with guidance > 1 and an even count, one half of the group runs the prompt's branch of the
  guidance pair and the other the negative prompt's; each step the halves exchange their predictions;
- sequence-parallel: the processes of a half (or of the whole group) split each frame's tokens (`TokenShard`,
  the transformer's sharding hint); self-attention gathers every process's keys and values (exact attention over
  all tokens) and the block output is gathered whole at the end of each step;
- the VAE decode: each process decodes its run of the decoder's exact vertical strips, and rank 0 gathers each
  chunk of frames and writes the MP4 and its sidecar.

Only `all_gather` and `all_sum` are used: they are the collectives every backend has (ring and JACCL have no
`group.split` nor `sum_scatter`, NCCL no `send` / `recv`). So a half's key/value exchange in a group of 4 is an
all-gather over the whole group, each process keeping its own half's (rank-local selection), at twice the bytes
of a sub-group gather. Keys and values are gathered rather than heads exchanged (Ulysses) because MLX has no
all-to-all: built from all-gathers, a head exchange would move every process's queries, keys, values and outputs
to every process, more than the keys and values alone. At 2 processes the two move the same bytes anyway.

The processes meet at a checkpoint before every denoising step and every decoded chunk: each says go, stop (rank
0's cancel token) or failed (with why), so Stop on rank 0 reaches all within a step and an error on one ends the
run on all. Collectives block, so a watchdog thread times the waits: a process that waits more than
`WAN_PARALLEL_TIMEOUT_S` seconds (default 60) in an exchange, or between two transformer blocks of a
sequence-parallel step, declares the group broken; a lost connection (the ring backend says so at once) does the
same. A broken group stays broken: restart it with mlx.launch.
"""

import io
import json
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
import numpy as np

from ..engine import Engine
from ..errors import Cancelled, WanError
from ..pipeline import decode_frames, generate_latents, step_noise_key
from ..sampling.samplers import make_scheduler
from ..models.vae import strip_layout

TIMEOUT_VARIABLE = "WAN_PARALLEL_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
CHECKPOINT_BYTES = 512  # a process's word at a checkpoint: its status, then why it failed (UTF-8)
GO, STOP, FAILED = 0, 1, 2
BACKEND_ERRORS = ("[ring]", "[nccl]", "[jaccl]", "[mpi]")  # how MLX's collectives begin their errors


def join(serving: bool = False):
    """The group `mlx.launch` started this process in, or None when it runs alone (or in a group of one). Call it
    on the main thread: it answers mlx.launch's SIGTERM (`ParallelGroup.stopped_by_launcher`); `serving`: rank 0
    serves the app, which keeps running when the group breaks."""
    if "MLX_RANK" not in os.environ:
        return None
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as error:
        raise WanError(f"mlx.launch started this process but its group could not be joined: {error}") from None
    if group.size() == 1:
        return None
    parallel = ParallelGroup(group)
    keep_running = serving and parallel.is_owner
    signal.signal(signal.SIGTERM, lambda signum, frame: parallel.stopped_by_launcher(keep_running))
    return parallel


@dataclass(frozen=True)
class Layout:
    """How a run's work is shared: `guidance` (2: the guidance pair's branches on the two halves of the group, or
    1) times `sequence` (processes sharing each branch's tokens) is `ranks`."""
    ranks: int
    guidance: int
    sequence: int

    @classmethod
    def choose(cls, ranks: int, use_guidance: bool) -> "Layout":
        guidance = 2 if use_guidance and ranks % 2 == 0 else 1
        return cls(ranks, guidance, ranks // guidance)

    def as_dict(self) -> dict:
        return {"ranks": self.ranks, "guidance": self.guidance, "sequence": self.sequence}


def pack(header: dict, arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> tuple[dict, dict]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    return json.loads(arrays.pop("header").tobytes()), arrays


class ParallelGroup:
    """This process's place in the group: its rank, the collectives with a watchdog on their waits, rank 0's side
    of a run (`start_run`, `end_run`, `release_followers`) and the others' (`serve`)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.timeout_s = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S))
        self.broken: str | None = None  # why the group cannot be used any more
        # Called (from the watchdog's thread) when a wait runs out; by default the process says why and exits,
        # since its own thread stays blocked in the collective. The app's rank 0 fails the run and keeps serving.
        self.on_timeout = self._exit
        self.run: RankPlan | None = None  # the run in progress, between its start and its last exchange
        self.stopped_once = False  # mlx.launch sent its SIGTERM
        self.engine = None  # the other processes' engine, kept between runs (and between calls of `serve`)
        self._watch = threading.Condition()
        self._waiting_for: str | None = None  # what this process waits for the others in, while it does
        self._deadline = 0.0
        threading.Thread(target=self._watchdog, name="parallel-watchdog", daemon=True).start()

    @property
    def is_owner(self) -> bool:
        return self.rank == 0

    # -- the watchdog ------------------------------------------------------------------------------------------------
    def expect_progress(self, what: str) -> None:
        """From now until `stop_waiting`, this process is to hear from the others within the timeout, again and
        again (`progress`)."""
        with self._watch:
            self._waiting_for, self._deadline = what, time.monotonic() + self.timeout_s
            self._watch.notify()

    def progress(self) -> None:
        with self._watch:
            self._deadline = time.monotonic() + self.timeout_s

    def stop_waiting(self) -> None:
        with self._watch:
            self._waiting_for = None

    def _watchdog(self) -> None:
        with self._watch:
            while True:
                self._watch.wait(None if self._waiting_for is None else max(self._deadline - time.monotonic(), 0))
                if self._waiting_for is not None and time.monotonic() >= self._deadline:
                    self.broken = (f"process {self.rank} of {self.size} waited {self.timeout_s:.0f} s for the others "
                                   f"while {self._waiting_for}: a process of the group stopped answering (it hung, or "
                                   "its machine or the network went away)")
                    self._waiting_for = None
                    threading.Thread(target=self.on_timeout, args=(self.broken_message(),), daemon=True).start()

    def broken_message(self) -> str:
        return f"the group of {self.size} processes is broken: {self.broken}. Restart it with mlx.launch"

    def _exit(self, message: str) -> None:
        print(f"\nerror: {message}", file=sys.stderr, flush=True)  # on a line of its own after a progress bar
        os._exit(1)

    def communication_failed(self, error: BaseException) -> bool:
        """Whether `error` is a collective's (a lost connection); if so the group is marked broken."""
        if isinstance(error, RuntimeError) and str(error).startswith(BACKEND_ERRORS):
            self.broken = self.broken or f"{error} (a process of the group ended, or its machine went away)"
        return self.broken is not None

    def stopped_by_launcher(self, keep_running: bool) -> None:
        """SIGTERM: mlx.launch stops every process of a group once one of them exits with an error (the group's
        own error, if a collective said so first, is kept). Raises the WanError that ends this process's work,
        unless it is to `keep_running` (the app's rank 0, which goes on serving and says the group is broken;
        a second SIGTERM ends it as Ctrl+C does)."""
        if keep_running and self.stopped_once:
            raise KeyboardInterrupt
        self.stopped_once, already_known = True, self.broken is not None
        self.broken = self.broken or "mlx.launch is stopping the group (one of its processes exited)"
        if keep_running:
            return
        if self.run is None:  # no run to clean up: waiting for one, or done (and the error said, if known)
            os._exit(1) if already_known else self._exit(self.broken_message())
        raise WanError(self.broken_message())

    def check_usable(self) -> None:
        if self.broken:
            raise WanError(self.broken_message())

    # -- collectives -------------------------------------------------------------------------------------------------
    def exchange(self, result: mx.array, what: str) -> mx.array:
        """Evaluate `result`, which holds a collective, with the watchdog on the wait."""
        with self._watch:
            before = self._waiting_for
        self.expect_progress(what)
        try:
            mx.eval(result)
        finally:
            if before is None:
                self.stop_waiting()
            else:
                self.expect_progress(before)
        return result

    def all_gather(self, x: mx.array) -> mx.array:
        return mx.distributed.all_gather(x, group=self.group)

    def _broadcast(self, data: bytes | None, what: str | None) -> bytes:
        """Rank 0's `data` on every process (the others pass None). `what`: the watchdog's name for the wait; None
        waits as long as it takes (the others waiting for rank 0's next request)."""

        def evaluate(result):
            return mx.eval(result) if what is None else self.exchange(result, what)

        size = mx.distributed.all_sum(mx.array([len(data) if self.is_owner else 0], mx.int32), group=self.group)
        evaluate(size)
        payload = mx.array(np.frombuffer(data, np.uint8)) if self.is_owner else mx.zeros((size.item(),), mx.uint8)
        payload = mx.distributed.all_sum(payload, group=self.group)  # the others add zeros: rank 0's bytes exactly
        evaluate(payload)
        return bytes(np.array(payload))

    def wait_for_all(self) -> None:
        """A barrier with no time limit: at start, while each process opens (perhaps downloads) the model."""
        mx.eval(mx.distributed.all_sum(mx.ones((1,)), group=self.group))

    def checkpoint(self, stop: bool = False, error: str | None = None) -> None:
        """Every process says go, stop (rank 0 alone: its cancel token) or failed (`error`); raises Cancelled when
        rank 0 stopped and WanError when one failed, on every process alike, and the run is over."""
        word = np.zeros(CHECKPOINT_BYTES, np.uint8)
        if error is not None:
            word[0] = FAILED
            text = error.encode()[: CHECKPOINT_BYTES - 1]
            word[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
        elif stop:
            word[0] = STOP
        words = np.array(self.exchange(self.all_gather(mx.array(word)), "at a checkpoint")).reshape(self.size, -1)
        failures = [f"process {rank}: " + bytes(w[1:]).rstrip(b"\0").decode(errors="replace")
                    for rank, w in enumerate(words) if w[0] == FAILED]
        if failures or words[0, 0] == STOP:
            self.run = None
        if failures:
            raise WanError("; ".join(failures))
        if words[0, 0] == STOP:
            raise Cancelled()

    # -- rank 0 ------------------------------------------------------------------------------------------------------
    def start_run(self, engine, request, seed: int, context: mx.array, noise: mx.array, condition) -> "RankPlan":
        """Hand a run to the others (after rank 0 encoded the text and the image) and return rank 0's part."""
        self.check_usable()
        layout = Layout.choose(self.size, context.shape[0] == 2)
        plan = RankPlan(self, layout, engine, request_fields := {
            "width": request.width, "height": request.height, "frames": request.frames, "steps": request.steps,
            "guidance": request.guidance, "shift": request.shift, "sampler": request.sampler, "seed": seed,
            "loras": [list(pair) for pair in request.loras]})  # each process fuses them (the same files there)
        header = {
            "kind": "run", "model": engine.model, "preset": engine.preset_source, "dtype": engine.dtype_name,
            "layout": layout.as_dict(), "request": request_fields,
        }
        arrays = {"context": np.array(context.astype(mx.float32)), "noise": np.array(noise)}
        if condition is not None:
            arrays["condition"] = np.array(condition)
        self._broadcast(pack(header, arrays), "handing the request to the others")
        self.run = plan
        return plan

    def leave(self, error: BaseException) -> WanError | None:
        """This process leaves the run early because of `error`. Between exchanges the others are on their way
        to the next checkpoint: it says stop (a cancel) or failed there. In the middle of one, or when a
        connection was lost, the group is out of step for good. Returns the WanError to raise instead, if any."""
        plan, self.run = self.run, None
        if self.communication_failed(error) or (plan is not None and plan.in_unit):
            self.broken = self.broken or f"process {self.rank} failed in the middle of an exchange ({error!r})"
            return WanError(self.broken_message())
        if plan is not None:
            stop = isinstance(error, (Cancelled, GeneratorExit))
            try:
                self.checkpoint(stop, None if stop else str(error) or type(error).__name__)
            except (Cancelled, WanError):
                pass
        return None

    def release_followers(self) -> None:
        """The work is over: the others return from `serve`."""
        if not self.broken:
            self._broadcast(pack({"kind": "quit"}, {}), "releasing the others")

    # -- the others --------------------------------------------------------------------------------------------------
    def serve(self, model: str, preset: str, dtype: str | None) -> None:
        """The other processes: open the model as rank 0 will (all wait until every one has: a first use may
        download it), then run rank 0's requests until it releases this process. Raises WanError when the group
        breaks."""
        if self.engine is None:
            self._engine_for(model, preset, dtype)
            self.wait_for_all()
        while True:
            try:
                header, arrays = unpack(self._broadcast(None, None))
            except RuntimeError as error:
                if self.communication_failed(error):
                    raise WanError(self.broken_message()) from None
                raise
            if header["kind"] == "quit":
                return
            try:
                engine = self._engine_for(header["model"], header["preset"], header["dtype"])
            except WanError as error:  # the others learn it at the run's first checkpoint (which raises it here)
                with suppress(WanError):
                    self.checkpoint(error=str(error))
                continue
            try:
                self.run = RankPlan(self, Layout(**header["layout"]), engine, header["request"])
                follow(engine, self.run, arrays)
            except BaseException as error:
                replacement = self.leave(error)
                if replacement is not None:
                    raise replacement from error
                if not isinstance(error, (Cancelled, WanError)):
                    raise


    def _engine_for(self, model: str, preset: str, dtype: str | None) -> Engine:
        """The others' engine, opened again when rank 0's model, preset or dtype is another."""
        engine = self.engine
        if engine is None or (engine.model, engine.preset_source, engine.dtype_name) != (model, preset, dtype):
            if engine is not None:
                engine.release()
            self.engine = engine = None
            self.engine = Engine(model, dtype=dtype, preset=preset)
        return self.engine


def follow(engine, plan: "RankPlan", arrays: dict) -> None:
    """A follower's part of a run, in rank 0's order of stages (loading and releasing as its preset says)."""
    request, preset = plan.request, engine.preset
    if preset.release_transformer_before_decode:
        engine.release("vae")
    transformer = engine.part("transformer")
    engine.hold_loras(request["loras"])
    scheduler = make_scheduler(request["sampler"], request["steps"], request["shift"], engine.scheduler_config,
                               step_noise_key(request["seed"]))
    condition = arrays.get("condition")
    steps = generate_latents(transformer, scheduler, mx.array(arrays["noise"]),
                             mx.array(arrays["context"]).astype(engine.dtype), request["guidance"],
                             None if condition is None else mx.array(condition), None, preset.cfg_batch, plan)
    for latents in steps:
        pass
    del transformer, steps
    if preset.release_transformer_before_decode:
        engine.release("transformer")
    if preset.clear_cache_between_stages:
        mx.clear_cache()
    if plan.decode_part is not None:
        for _ in decode_frames(engine.part("vae"), engine.normalizer, latents, None, None, preset.vae_frame_by_frame,
                               preset.vae_strip_width, plan):
            pass


class RankPlan:
    """One process's part of one run: which branch of the guidance pair (`branch`, None: both), which tokens
    (`shard`, None: all), which strips of the decode (`decode_part`, None: rank 0 decodes alone, in tiles), and
    the exchanges that join the parts (`pipeline.generate_latents` and `decode_frames` call these)."""

    def __init__(self, group: ParallelGroup, layout: Layout, engine, request: dict):
        self.group, self.layout, self.request = group, layout, request
        config, vae_config = engine.transformer_config, engine.vae_config
        p_t, p_h, p_w = config.patch_size
        spatial = vae_config.scale_factor_spatial
        self.latent_grid = ((request["frames"] - 1) // vae_config.scale_factor_temporal + 1,
                            request["height"] // spatial, request["width"] // spatial)
        frames, height, width = self.latent_grid
        rank = group.rank
        self.branch = rank // layout.sequence if layout.guidance == 2 else None
        self.shard = None
        if layout.sequence > 1:
            first = rank - rank % layout.sequence
            self.shard = TokenShard(group, first, layout.sequence, rank - first, frames // p_t,
                                    (height // p_h) * (width // p_w))
        if self.shard is not None and self.shard.tokens < layout.sequence:
            raise WanError(f"a frame of {self.shard.tokens} tokens cannot be shared by {layout.sequence} processes: "
                           "make the video larger or the group smaller")
        tiled = engine.vae_tile(request["width"], request["height"]) is not None
        self.decode_part = None if tiled else (rank, group.size)
        if not tiled:  # each part's own pixel columns (strip_layout's own columns do not depend on the margin)
            try:
                strips = strip_layout(width, engine.preset.vae_strip_width, 0, group.size)
            except ValueError as error:
                raise WanError(f"the decode of this video cannot be shared by {group.size} processes: {error} "
                               "(make the video wider or the group smaller)") from None
            per_part = len(strips) // group.size
            self.part_widths = [spatial * (strips[(i + 1) * per_part - 1][1] - strips[i * per_part][0])
                                for i in range(group.size)]
        self.steps_left = request["steps"]
        self.in_unit = False
        self.itemsize = engine.dtype.size
        self.transformer_config = config

    def checkpoint(self, cancel) -> None:
        """The start of a step or of a decoded chunk's exchange; rank 0's `cancel` stops every process here."""
        self.group.checkpoint(self.group.is_owner and cancel is not None and cancel.cancelled)
        self.in_unit = True

    def unit_done(self, finished: bool = False) -> None:
        """A step or a decoded chunk is complete (`finished`: the run's last exchange is behind)."""
        self.in_unit = False
        self.group.stop_waiting()
        if self.steps_left:
            self.steps_left -= 1
            finished = finished or (self.steps_left == 0 and self.decode_part is None)
        if finished:
            self.group.run = None

    def exchange_branches(self, prediction: mx.array) -> mx.array:
        """This half's prediction (1, ...) -> the pair (2, ...): the prompt's, then the negative prompt's."""
        mx.eval(prediction)  # this process's own work: the watchdog does not time it
        everyone = self.group.exchange(self.group.all_gather(prediction), "exchanging the guidance pair")
        return everyone[:: self.layout.sequence]

    def gather_columns(self, chunk: mx.array) -> mx.array | None:
        """This part's columns of a decoded chunk (1, T, H, w, 3) -> the whole chunk on rank 0, None elsewhere."""
        widths, own = self.part_widths, chunk.shape[3]
        chunk = mx.pad(chunk, [(0, 0)] * 3 + [(0, max(widths) - own), (0, 0)])
        everyone = self.group.exchange(self.group.all_gather(chunk), "gathering decoded frames")
        if not self.group.is_owner:
            return None
        return mx.concatenate([everyone[i : i + 1, :, :, :width] for i, width in enumerate(widths)], axis=3)

    @cached_property
    def exchanged_bytes_per_step(self) -> int:
        """Bytes each process receives per denoising step (a ring all-gather of n pieces brings n - 1 of them)."""
        config, (frames, height, width), n = self.transformer_config, self.latent_grid, self.group.size
        received = (n - 1) * CHECKPOINT_BYTES
        batch = 1 if self.branch is not None else 1 + (self.request["guidance"] > 1)
        if self.branch is not None:  # the prediction (1, F, H, W, C) of every process
            received += (n - 1) * frames * height * width * config.out_channels * self.itemsize
        if self.shard is not None:  # keys and values of every block, and the block output once
            p_t, p_h, p_w = config.patch_size
            longest = self.shard.groups * max(self.shard.sizes)
            keys_values = 2 * config.num_layers * longest * config.inner_dim
            output = longest * config.out_channels * p_t * p_h * p_w
            received += (n - 1) * batch * (keys_values + output) * self.itemsize
        return received


@dataclass(frozen=True)
class TokenShard:
    """The transformer's sharding hint: process `index` of the `count` processes from rank `first` on, which
    share `tokens` tokens in each of `groups` timestep groups (the frames): it takes its contiguous, as even as can
    be, range of each group. Uneven ranges are padded for the all-gathers and the padding dropped after."""
    group: ParallelGroup
    first: int
    count: int
    index: int
    groups: int
    tokens: int

    @property
    def bounds(self) -> list[int]:
        return [round(i * self.tokens / self.count) for i in range(self.count + 1)]

    @property
    def sizes(self) -> list[int]:
        bounds = self.bounds
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def split(self, x: mx.array) -> mx.array:
        """(B, groups, tokens, dim) -> this process's tokens (B, groups, n, dim). A step of the run begins: from
        here the watchdog expects every block to finish within the timeout."""
        if x.shape[1:3] != (self.groups, self.tokens):
            raise ValueError(f"tokens {x.shape[1:3]} do not match the shard's {(self.groups, self.tokens)}")
        self.group.expect_progress("running a sequence-parallel step")
        low, high = self.bounds[self.index : self.index + 2]
        return x[:, :, low:high]

    def split_rope(self, rope: tuple) -> tuple:
        """Rotary tables (groups * tokens, 1, head_dim) -> the rows of this process's tokens: their own positions."""
        low, high = self.bounds[self.index : self.index + 2]
        return tuple(table.reshape(self.groups, self.tokens, *table.shape[1:])[:, low:high].reshape(-1, *table.shape[1:])
                     for table in rope)

    def gather_keys(self, keys: mx.array) -> mx.array:
        """(B, groups * n, heads, head_dim) -> those of all `count` processes (B, groups * tokens, ...), process
        by process: attention does not depend on the order of its keys and values."""
        return self._gather(keys, 1, [self.groups * size for size in self.sizes])

    def gather_tokens(self, x: mx.array) -> mx.array:
        """(B, groups, n, C) -> (B, groups, tokens, C) in the tokens' order."""
        return self._gather(x, 2, self.sizes)

    def progress(self) -> None:
        self.group.progress()

    def _gather(self, x: mx.array, axis: int, lengths: list[int]) -> mx.array:
        longest = max(lengths)
        if x.shape[axis] < longest:
            x = mx.pad(x, [(0, 0)] * axis + [(0, longest - x.shape[axis])] + [(0, 0)] * (x.ndim - axis - 1))
        everyone = self.group.all_gather(x).reshape(self.group.size, *x.shape)
        cut = (slice(None),) * axis
        return mx.concatenate([everyone[self.first + i][cut + (slice(0, length),)] for i, length in enumerate(lengths)],
                              axis=axis)
