"""The first frame of an image-to-video run: the upload field, and reading a picture with errors that say what to
upload."""

from pathlib import Path

import gradio as gr
from PIL import Image

from wan_engine import WanError, open_image

READABLE = "upload a PNG, JPEG or WebP picture"


class PictureInput(gr.Image):
    """gr.Image that hands an unreadable upload on as its path (gr.Image would fail on it with a stack trace), so
    the handlers refuse it in their own lines, naming the file and saying what to upload (open_picture)."""

    is_template = True  # the browser draws it as a plain gr.Image

    def preprocess(self, payload):
        if payload is not None and payload.path:
            try:
                open_image(payload.path)
            except WanError:
                return payload.path
        return super().preprocess(payload)


def open_picture(path) -> Image.Image:
    """The picture at `path`, upright (EXIF orientation applied) and RGB; gr.Error when there is none or it cannot
    be read (saying which file and what is allowed)."""
    if not path:
        raise gr.Error(f"there is no image: {READABLE} for the video to start from")
    try:
        return open_image(path, name=Path(str(path)).name)  # an upload keeps its own name in Gradio's cache
    except WanError as error:
        raise gr.Error(str(error)) from None


def readable_picture(path) -> Image.Image | None:
    """open_picture, or None when there is no readable picture (for notes on the page, which never fail)."""
    try:
        return open_picture(path) if path else None
    except gr.Error:
        return None
