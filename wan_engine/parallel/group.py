"""The group of processes that `mlx.launch` started: joining it, its collectives with a watchdog on their waits,
the checkpoints where every process says go, stop or failed, and handing runs from rank 0 to the others."""


import io
import json
import os
import signal
import sys
import threading
import time

import mlx.core as mx
import numpy as np

from ..errors import Cancelled, WanError

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
    of a run (`hand_off`, `release_followers`) and the others' (`receive`)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.timeout_s = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S))
        self.broken: str | None = None  # why the group cannot be used any more
        self._on_timeout = self._exit  # see on_timeout
        self.run = None  # this process's share (share.RankShare) of the run in progress, until its last exchange
        self.stopped_once = False  # mlx.launch sent its SIGTERM
        self._watch = threading.Condition()
        self._waiting_for: str | None = None  # what this process waits for the others in, while it does
        self._deadline = 0.0
        threading.Thread(target=self._watchdog, name="parallel-watchdog", daemon=True).start()

    @property
    def is_owner(self) -> bool:
        return self.rank == 0

    # -- the watchdog ------------------------------------------------------------------------------------------------
    def on_timeout(self, callback) -> None:
        """`callback(message)` is called (from the watchdog's thread) when a wait runs out. Without one the process
        says why and exits, since its own thread stays blocked in the collective; the app's rank 0 fails the run and
        keeps serving."""
        self._on_timeout = callback

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
                    threading.Thread(target=self._on_timeout, args=(self.broken_message(),), daemon=True).start()

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
    def hand_off(self, header: dict, arrays: dict, share) -> None:
        """Rank 0: hand a run to the others (after it encoded the text and the image); `share` is rank 0's."""
        self.check_usable()
        self._broadcast(pack({"kind": "run", **header}, arrays), "handing the request to the others")
        self.run = share

    def receive(self) -> tuple[dict, dict] | None:
        """The others: rank 0's next run (header, arrays), waiting as long as it takes; None when rank 0 releases
        them. Raises WanError when the group breaks."""
        try:
            header, arrays = unpack(self._broadcast(None, None))
        except RuntimeError as error:
            if self.communication_failed(error):
                raise WanError(self.broken_message()) from None
            raise
        return None if header.pop("kind") == "quit" else (header, arrays)

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

