"""What the app was started with, and the form's initial values that follow from it."""

from dataclasses import dataclass
from pathlib import Path

from .sizes import DEMO_SIZES, MODEL_SIZES

MAX_SEED = 2**53 - 1  # the largest integer a browser's numbers hold exactly (seeds travel as JSON numbers)


@dataclass(frozen=True)
class StudioConfig:
    model: str  # as the engine's resolve_model accepts: "demo", a folder or a Hugging Face repo id
    preset: str  # the memory preset new sessions start with
    output_dir: Path
    group: object = None  # wan_engine.ParallelGroup when mlx.launch started the app (this is rank 0), else None

    @property
    def demo(self) -> bool:
        return self.model == "demo"

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return DEMO_SIZES if self.demo else MODEL_SIZES

    @property
    def defaults(self) -> dict:
        """The form's initial values, which are also the API's defaults. The real model's are Wan2.2's own
        (5 s at 24 fps, 50 steps); the demo model's are small so a run takes seconds."""
        width, height = self.sizes[0]
        return {
            "width": width, "height": height,
            "frames": 17 if self.demo else 121,
            "steps": 10 if self.demo else 50,
            "guidance": 5.0, "shift": 5.0, "seed": -1, "fps": 24,
        }
