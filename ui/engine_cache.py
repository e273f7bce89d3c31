"""One engine for the whole app: opened on first use, reused by every request, replaced when the model or the
memory preset changes (the old one is released first, so two models never sit in memory together).

It is only used from the engine's thread (runs.py), so it needs no lock.
"""

from pathlib import Path

from wan_engine import Engine


class EngineCache:
    def __init__(self, output_dir: Path, group=None):
        self.output_dir = output_dir
        self.group = group  # the process group whose runs the engine shares, or None
        self.key = None  # (model, preset) of the open engine
        self.engine = None

    def get(self, model: str, preset: str, report) -> Engine:
        """The engine for (model, preset), opened when needed; `report(line)` hears how opening goes (a first
        download takes long). Raises WanError when the model or the preset cannot be had. The engine then loads
        its parts during the run, with progress events of its own."""
        if self.key != (model, preset):
            self.release()
            report(f"Opening the model {model} ({preset} memory preset)")
            self.engine = Engine(model, preset=preset, output_dir=self.output_dir,
                                 download_progress=DownloadReport(report), group=self.group)
            self.key = (model, preset)
        return self.engine

    def release(self) -> None:
        if self.engine is not None:
            self.engine.release()
        self.engine = self.key = None


class DownloadReport:
    """The engine's download callback, passed on at most once per whole percent of each file."""

    def __init__(self, report):
        self.report = report
        self.shown = None

    def __call__(self, done: int, total: int, what: str) -> None:
        percent = 100 * done // max(total, 1)
        if (what, percent) != self.shown:
            self.shown = (what, percent)
            self.report(f"Downloading the model: {what} {percent}%")
