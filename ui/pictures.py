"""The first frame of an image-to-video run: the upload field, and reading a picture with errors that say what to
upload."""

import gradio as gr
from PIL import Image, ImageOps

READABLE = "upload a PNG, JPEG or WebP picture"


def unreadable(error: Exception) -> gr.Error:
    return gr.Error(f"the image cannot be read ({error}): {READABLE}")


class PictureInput(gr.Image):
    """gr.Image whose unreadable uploads get an error that says what to upload, instead of a stack trace."""

    is_template = True  # the browser draws it as a plain gr.Image

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise unreadable(error) from None


def open_picture(path) -> Image.Image:
    """The picture at `path`, upright (EXIF orientation applied) and RGB; gr.Error when there is none or it cannot
    be read."""
    if not path:
        raise gr.Error(f"there is no image: {READABLE} for the video to start from")
    try:
        with Image.open(path) as picture:
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise unreadable(error) from None


def readable_picture(path) -> Image.Image | None:
    """open_picture, or None when there is no readable picture (for notes on the page, which never fail)."""
    try:
        return open_picture(path) if path else None
    except gr.Error:
        return None
