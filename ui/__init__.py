"""Wan Studio's Gradio app, on top of wan_engine: `build_app(StudioConfig(...))` returns the gr.Blocks."""

from .config import StudioConfig
from .layout import CSS, build_app

__all__ = ["CSS", "StudioConfig", "build_app"]
