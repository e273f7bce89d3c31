"""What the app was started with, and the form's initial values that follow from it."""

from dataclasses import dataclass
from pathlib import Path

from wan_engine import SAMPLERS

from .sizes import DEMO_SIZES, MODEL_SIZES

MAX_SEED = 2**53 - 1  # the largest integer a browser's numbers hold exactly (seeds travel as JSON numbers)


@dataclass(frozen=True)
class StudioConfig:
    model: str  # as the engine's resolve_model accepts: "demo", a folder or a Hugging Face repo id
    preset: str  # the memory preset new sessions start with
    output_dir: Path
    recommended: dict  # wan_engine.recommended_settings(model): the model's sampler, each sampler's settings, its
    # sizes (wan_engine.SizeRules)
    warmup: bool = True  # load the model and run a small warm-up generation at launch (handlers.Studio.warm_up)
    group: object = None  # wan_engine.ParallelGroup when mlx.launch started the app (this is rank 0), else None
    queue_size: int = 20  # how many requests may wait for their turn (--queue-size)
    prompt_model: str | None = None  # the prompt writer's model (--prompt-model); None: its default

    @property
    def demo(self) -> bool:
        return self.model == "demo"

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return DEMO_SIZES if self.demo else MODEL_SIZES

    @property
    def size_rules(self):
        """The sizes the model makes (wan_engine.SizeRules)."""
        return self.recommended["sizes"]

    @property
    def sampler(self) -> str:
        """The sampler the page starts with: the model's own (dmd for a FastWan checkpoint)."""
        return self.recommended["sampler"]

    def sampler_settings(self, sampler: str) -> dict:
        """Steps, guidance and shift that go with `sampler` on this model; the demo model's full-length samplers
        take 10 steps, so a run takes seconds."""
        settings = {key: self.recommended["by_sampler"][sampler][key] for key in ("steps", "guidance", "shift")}
        if self.demo and not SAMPLERS[sampler].few_step:
            settings["steps"] = 10
        return settings

    @property
    def defaults(self) -> dict:
        """The form's initial values, which are also the API's defaults. The real model's are Wan2.2's own
        (5 s at 24 fps, its sampler's steps); the demo model's are small so a run takes seconds."""
        width, height = self.sizes[0]
        return {
            "width": width, "height": height, "frames": 17 if self.demo else 121, "seed": -1, "fps": 24,
            **self.sampler_settings(self.sampler),
        }
