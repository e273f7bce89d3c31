"""LoRA adapters on the page: the files of the `loras/` folder beside the output folder, and the `loras` parameter
of /text_to_video and /image_to_video: a list of "name:strength" items, where name is a file of that folder, a
path, or a Hub file (owner/repo/path/in/repo.safetensors), and strength 1.0 when left out."""

import math
from pathlib import Path

import gradio as gr

from wan_engine import parse_lora

HELP = ("Each as name:strength (1.0 when left out): a file of the loras/ folder beside the videos, a path, or a "
        "Hub file owner/repo/file.safetensors. Type an item again with another strength to change it.")


def lora_folder(output_dir: Path) -> Path:
    return output_dir.parent / "loras"


def lora_choices(output_dir: Path) -> list[str]:
    """The folder's LoRA files as items at full strength, for the page's list."""
    return [f"{path.name}:1.0" for path in sorted(lora_folder(output_dir).glob("*.safetensors"))]


def engine_loras(items, output_dir: Path) -> list[tuple[str, float]]:
    """The `loras` parameter -> the engine's (reference, strength) pairs; gr.Error naming a malformed item."""
    if items is None or isinstance(items, str):
        items = [items] if items else []
    pairs = []
    for item in items:
        reference, strength = parse_lora(str(item).strip(), lora_folder(output_dir))
        if not reference or not math.isfinite(strength):
            raise gr.Error(f"LoRA {item!r} is not allowed: give name:strength, such as style.safetensors:0.8")
        pairs.append((reference, strength))
    return pairs


def lora_items(recorded: list, output_dir: Path) -> list[str]:
    """A past run's recorded LoRAs as the page's items (files of the loras/ folder by their name)."""
    folder = lora_folder(output_dir)
    return [f"{Path(lora['name']).name if Path(lora['name']).parent == folder else lora['name']}:{lora['strength']}"
            for lora in recorded]
