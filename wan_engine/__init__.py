"""Wan Studio's MLX engine for Wan2.2 TI2V-5B."""

__version__ = "0.1.0"
