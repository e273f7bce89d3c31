"""The other processes of a group: they open the model as rank 0 does and run their share of rank 0's runs.

    Follower(group).serve(model, preset, dtype)   # on every process but rank 0, until rank 0 releases them

Each run comes from rank 0's hand-over (`ParallelGroup.receive`) and goes through `Engine.follow`: the same stages
rank 0 walks, from the hand-over on.
"""

from contextlib import suppress

from .engine import Engine
from .errors import Cancelled, WanError
from .parallel.group import ParallelGroup


class Follower:
    """One of the other processes, with its engine kept between runs (and between calls of `serve`)."""

    def __init__(self, group: ParallelGroup):
        self.group = group
        self.engine: Engine | None = None

    def serve(self, model: str, preset: str, dtype: str | None) -> None:
        """Open the model as rank 0 will (all wait until every one has: a first use may download it), then run
        rank 0's runs until it releases this process. Raises WanError when the group breaks."""
        if self.engine is None:
            self._engine_for(model, preset, dtype)
            self.group.wait_for_all()
        while (handed := self.group.receive()) is not None:
            header, arrays = handed
            try:
                engine = self._engine_for(header["model"], header["preset"], header["dtype"])
            except WanError as error:  # the others learn it at the run's first checkpoint (which raises it here)
                with suppress(WanError):
                    self.group.checkpoint(error=str(error))
                continue
            try:
                engine.follow(self.group, header, arrays)
            except BaseException as error:
                replacement = self.group.leave(error)
                if replacement is not None:
                    raise replacement from error
                if not isinstance(error, (Cancelled, WanError)):
                    raise

    def _engine_for(self, model: str, preset: str, dtype: str | None) -> Engine:
        """The engine, opened again when rank 0's model, preset or dtype is another."""
        engine = self.engine
        if engine is None or (engine.model, engine.preset_source, engine.dtype_name) != (model, preset, dtype):
            if engine is not None:
                engine.release()
            self.engine = engine = None
            self.engine = Engine(model, dtype=dtype, preset=preset)
        return self.engine
