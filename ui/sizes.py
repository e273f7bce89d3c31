"""Video sizes: the resolution choices, the size an image-to-video run takes from its picture, and durations.

Everything here is plain arithmetic on pixels, so the page can show a size before any model is loaded. Which sizes
a model makes (the multiples of its widths and heights, its frame step) is the model's: wan_engine.SizeRules, read
from its files by wan_engine.recommended_settings.
"""

import math

from PIL import Image

# The model's native 1280x704 in both orientations, then smaller sizes of the same aspects (faster, less memory).
MODEL_SIZES = [(1280, 704), (704, 1280), (960, 544), (544, 960), (832, 480), (480, 832), (640, 352), (352, 640)]
# The demo model is tiny and random: small sizes keep a run well under a second per step on a CPU.
DEMO_SIZES = [(96, 64), (64, 96), (128, 128), (160, 96)]
CUSTOM = "Custom"


def size_label(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_size(label: str) -> tuple[int, int] | None:
    """(width, height) for a choice like "1280x704"; None for "Custom"."""
    if label == CUSTOM:
        return None
    width, height = label.split("x")
    return int(width), int(height)


def resolution_choices(sizes: list[tuple[int, int]]) -> list[str]:
    return [size_label(w, h) for w, h in sizes] + [CUSTOM]


def matching_choice(width: int, height: int, sizes: list[tuple[int, int]]) -> str:
    """The choice that names this size, or "Custom"."""
    return size_label(width, height) if (width, height) in sizes else CUSTOM


def size_for_aspect(aspect: float, area: int, rules) -> tuple[int, int]:
    """The size the model makes (`rules`: wan_engine.SizeRules) nearest to `area` pixels with this width/height
    aspect."""
    height = math.sqrt(area / aspect)
    return rules.nearest(height * aspect, height)


def crop_to_aspect(picture: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred part of `picture` with the aspect width:height (the engine then resizes it)."""
    return picture.crop(_centre_box(picture.size, width / height))


def _centre_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    picture_width, picture_height = size
    if picture_width / picture_height > aspect:  # too wide: trim the sides
        width = round(picture_height * aspect)
        left = (picture_width - width) // 2
        return left, 0, left + width, picture_height
    height = round(picture_width / aspect)  # too tall: trim top and bottom
    top = (picture_height - height) // 2
    return 0, top, picture_width, top + height


def duration_text(frames, fps) -> str:
    """How long `frames` play at `fps`, for the line under the frames slider."""
    if not frames or not fps:
        return ""
    return f"{int(frames)} frames = **{frames / fps:.1f} s** at {int(fps)} fps"
