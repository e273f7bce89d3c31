"""The engine's thread: every run happens on one long-lived thread, one at a time, and Stop reaches the runs of
one session.

One thread, because MLX streams belong to the thread that made them (MLX 0.31.2 and later): an engine's arrays
and compiled functions only work on the thread that created them, so the engine is created and used only here.
A run does not belong to the page that asked for it either: if the browser goes away (a closed tab, a phone that
sleeps, a dropped share link), Gradio stops streaming but the run still finishes and its video lands in the
history; only Stop (the engine's cancel token) ends a run early.
"""

import logging
import queue
import threading
from dataclasses import dataclass, field

from wan_engine import CancelToken

log = logging.getLogger("wan_studio")


class _Finished:
    """Marks the end of a run's updates."""


@dataclass
class _Failed:
    error: BaseException


@dataclass
class Run:
    session: str
    token: CancelToken = field(default_factory=CancelToken)
    finished: threading.Event = field(default_factory=threading.Event)
    last_event: object = None  # the latest ProgressEvent (set by the work), for "stopped at step i/N"
    outcome: str | None = None  # how it ended, as the progress line says it (set by the work)
    updates: queue.Queue = field(default_factory=queue.Queue)
    started: bool = False  # the engine's thread took it up
    withdrawn: bool = False  # stopped while it waited: the engine's thread passes it over

    def end(self) -> None:
        self.send(_Finished())
        self.finished.set()

    def send(self, update) -> None:
        """Hand an update to the streaming handler (from the engine's thread)."""
        self.updates.put(update)

    def stream(self):
        """The run's updates as they come; re-raises the error that ended it, if one did."""
        while not isinstance(item := self.updates.get(), _Finished):
            if isinstance(item, _Failed):
                raise item.error
            yield item


class EngineThread:
    def __init__(self, between_runs=None):
        """`between_runs()`: called on the engine's thread when a run has ended and none waits (the engine gets
        ready for the next video); what it raises is logged, and the thread keeps serving."""
        self.between_runs = between_runs
        self._between = False  # between_runs is running: a run asked for now waits for it
        self._waiting = queue.Queue()  # (run, work) in the order they were asked for
        self._runs_lock = threading.Lock()
        self._runs: list[Run] = []  # asked for and not finished
        threading.Thread(target=self._serve, name="engine", daemon=True).start()

    def start(self, session: str, work, waiting_update) -> Run:
        """Queue `work(run)`, a generator of updates, to run on the engine's thread; `waiting_update(ahead)` is
        streamed first when `ahead` runs are before it, or with 0 while the engine gets ready between runs. Stop
        reaches a run while it waits too."""
        run = Run(session)
        with self._runs_lock:
            if self._runs or self._between:
                run.send(waiting_update(len(self._runs)))
            self._runs.append(run)
        self._waiting.put((run, work))
        return run

    def _serve(self) -> None:
        while True:
            run, work = self._waiting.get()
            with self._runs_lock:
                if run.withdrawn:
                    continue
                run.started = True
            try:
                for update in work(run):
                    run.send(update)
            except BaseException as error:  # handed to the streaming handler, which shows it on the page
                run.send(_Failed(error))
            finally:
                with self._runs_lock:
                    if run in self._runs:  # not abandoned
                        self._runs.remove(run)
                run.end()
            with self._runs_lock:
                self._between = self.between_runs is not None and self._waiting.empty()
            if self._between:
                try:
                    self.between_runs()
                except Exception:
                    log.exception("getting ready for the next run failed (the next run loads what it needs)")
                finally:
                    with self._runs_lock:
                        self._between = False

    def abandon(self, update, error: BaseException) -> None:
        """The engine's thread is stuck for good (a process of the engine's group stopped answering, and the
        collective it waits in never returns): every run it holds streams `update`, then ends with `error`."""
        with self._runs_lock:
            runs, self._runs = self._runs, []
        for run in runs:
            run.send(update)
            run.send(_Failed(error))
            run.end()

    def stop(self, session: str, withdrawn_outcome: str, withdrawn_update) -> list[Run]:
        """Cancel `session`'s runs; returns them. A running one ends at its next check of the token; one still
        waiting for its turn leaves the line at once, its stream ending with `withdrawn_update`."""
        with self._runs_lock:
            runs = [run for run in self._runs if run.session == session]
            for run in runs:
                run.token.cancel()
                if not run.started:
                    run.withdrawn = True
                    self._runs.remove(run)
        for run in runs:
            if run.withdrawn:
                run.outcome = withdrawn_outcome
                run.send(withdrawn_update)
                run.end()
        return runs
