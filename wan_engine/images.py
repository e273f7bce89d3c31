"""Opening a user's inputs, with refusals that name the file and say what is allowed: a picture (the first frame
of an image-to-video run: not a picture, damaged or cut short, or too large) and a video to continue (any file
ffmpeg reads: its frames, fitted to the run's size, one at a time).
"""

import hashlib
import re
import warnings
from pathlib import Path

import imageio_ffmpeg
import numpy as np
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


def fit(picture: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred part of `picture` with the aspect width:height, resized to width x height (Lanczos)."""
    aspect, (w, h) = width / height, picture.size
    if w / h > aspect:  # too wide: trim the sides
        crop = round(h * aspect)
        picture = picture.crop(((w - crop) // 2, 0, (w - crop) // 2 + crop, h))
    elif w / h < aspect:  # too tall: trim top and bottom
        crop = round(w / aspect)
        picture = picture.crop((0, (h - crop) // 2, w, (h - crop) // 2 + crop))
    return picture if picture.size == (width, height) else picture.resize((width, height), Image.LANCZOS)


class SourceVideo:
    """A video to continue: its frame rate, frame count and checksum, and its frames fitted to a size."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WanError(f"the video {path} does not exist: give an MP4, MOV or WebM file to continue")
        try:
            reader = imageio_ffmpeg.read_frames(str(self.path))
            meta = next(reader)
            self.size, self.fps = tuple(meta["size"]), meta["fps"]
            self.frame_count = sum(1 for _ in reader)
        except (RuntimeError, OSError, StopIteration, KeyError) as error:
            said = [line.strip() for line in str(error).splitlines() if line.strip()]  # ffmpeg's last word
            raise WanError(f"the video {path} cannot be read ({said[-1][:200] if said else 'no frames'}): give an "
                           "MP4, MOV or WebM file that plays") from None
        if self.frame_count == 0:
            raise WanError(f"the video {path} has no frames: give a video that plays")
        digest = hashlib.sha256()
        with open(self.path, "rb") as file:
            while block := file.read(2**20):
                digest.update(block)
        self.sha256 = digest.hexdigest()

    def frames(self, width: int, height: int):
        """Its frames, uint8 (H, W, 3), each fitted to width x height (`fit`), one at a time."""
        reader = imageio_ffmpeg.read_frames(str(self.path))
        source_width, source_height = next(reader)["size"]
        for frame in reader:
            picture = Image.fromarray(np.frombuffer(frame, np.uint8).reshape(source_height, source_width, 3))
            yield np.asarray(fit(picture, width, height))

    def record(self) -> dict:
        """What the sidecar says of it."""
        return {"path": str(self.path), "sha256": self.sha256, "frame_count": self.frame_count}
