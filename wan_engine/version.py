"""The engine's version, which packages and sidecars record."""

__version__ = "0.1.0"
