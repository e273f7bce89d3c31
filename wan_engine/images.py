"""Opening a user's picture (the first frame of an image-to-video run), with refusals that name the file and say
what is allowed: not a picture, damaged or cut short, or too large (its size and the limit)."""

import re
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from .errors import WanError

# Pillow's own warning threshold (about 89 megapixels, a 48-megapixel phone photo fits); the video itself is about
# one megapixel a frame, so a larger picture only costs memory. Pillow refuses twice this outright.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
READABLE = "use a PNG, JPEG or WebP picture"


def describe(image) -> str:
    """How a message names the picture: its path, or its file name for an in-memory picture."""
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "the picture given"
    return str(image)


def too_large(name: str, pixels: int, size: tuple | None) -> WanError:
    dimensions = f"{size[0]}x{size[1]}, " if size else ""
    return WanError(
        f"the image {name} is too large ({dimensions}{pixels / 1e6:.0f} megapixels): pictures of up to "
        f"{MAX_PIXELS / 1e6:.0f} megapixels are allowed; scale it down (the video is about 1 megapixel a frame)"
    )


def open_image(image, name: str | None = None) -> Image.Image:
    """The picture at path `image` (or a PIL image), decoded, upright (EXIF orientation applied) and RGB; WanError
    naming the file (as `name`, when given: an upload's own name) when it is missing, not a picture, damaged or too
    large."""
    name = name or describe(image)
    if not isinstance(image, Image.Image) and not Path(image).is_file():
        raise WanError(f"the image {name} does not exist: {READABLE}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with the size
            picture = image if isinstance(image, Image.Image) else Image.open(image)
            if picture.width * picture.height > MAX_PIXELS:
                raise too_large(name, picture.width * picture.height, picture.size)
            picture.load()
            return ImageOps.exif_transpose(picture).convert("RGB")
    except Image.DecompressionBombError as error:  # Pillow stops before it tells the size; its message has it
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise too_large(name, int(pixels.group(1)) if pixels else 2 * MAX_PIXELS, None) from None
    except Image.UnidentifiedImageError:
        raise WanError(f"the file {name} is not a picture that can be read: {READABLE}") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data; Pillow raises all three
        raise WanError(f"the image {name} is damaged or cut short ({error}): {READABLE}") from None
