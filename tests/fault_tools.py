"""Tools of the fault-injection tests: a small real disk that can be filled, and hostile pictures."""

import errno
import os
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image


@contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder`; the test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Fill the disk holding `folder` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for block in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * block):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height (its pixel data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def hostile_pictures(folder: Path) -> dict:
    """name -> (path, what the refusal must say); the path is in the message."""
    whole = folder / "whole.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(whole)
    cut = folder / "cut.png"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    text = folder / "notes.png"
    text.write_text("these are notes, not a picture")
    return {
        "decompression bomb": (png_with_size(folder / "bomb.png", 24_000, 24_000),
                               "is too large (576 megapixels): pictures of up to 89 megapixels are allowed"),
        "huge dimensions, tiny file": (png_with_size(folder / "huge.png", 10_000, 10_000),
                                       "is too large (10000x10000, 100 megapixels): pictures of up to 89 megapixels"),
        "truncated": (cut, "is damaged or cut short"),
        "not a picture": (text, "is not a picture that can be read: use a PNG, JPEG or WebP picture"),
        "missing": (folder / "missing.png", "does not exist"),
    }
