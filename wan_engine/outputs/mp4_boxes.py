"""An MP4's structure read back in-process (ISO/IEC 14496-12 boxes), to check a video we wrote before it lands: that
its top-level boxes fill the file exactly (nothing cut off), and that every frame of its video track, as the sample
tables place it, lies inside the media data. What ffmpeg's demuxer reads to list each packet, without starting a
process (which cost about as much again as reading the boxes of a 121-frame video)."""

import struct
from pathlib import Path

TRACK_CONTAINERS = (b"mdia", b"minf", b"stbl")  # the boxes between a track and its sample tables


class DamagedMP4(ValueError):
    """The file is not a whole MP4: the message says what is wrong."""


def box_header(header: bytes, at: int, end: int) -> tuple[bytes, int, int]:
    """The box starting at byte `at` of a region ending at `end`, from its first 16 bytes (fewer at the end):
    (type, header length, size of the whole box)."""
    if len(header) < 8:
        raise DamagedMP4(f"a box header is cut off at byte {at}")
    size, kind = struct.unpack_from(">I4s", header)
    length = 8
    if size == 1:  # a 64-bit size follows the type
        if len(header) < 16:
            raise DamagedMP4(f"a box header is cut off at byte {at}")
        size, length = struct.unpack_from(">Q", header, 8)[0], 16
    elif size == 0:  # the box runs to the end
        size = end - at
    if size < length or at + size > end:
        raise DamagedMP4(f"box {kind.decode(errors='replace')!r} at byte {at} runs past the end ({size} bytes from "
                         f"there, {end - at} left): the file is cut off or damaged")
    return kind, length, size


def boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of each box in data[start:end]."""
    end = len(data) if end is None else end
    at = start
    while at < end:
        kind, length, size = box_header(data[at : at + 16], at, end)
        yield kind, at + length, at + size
        at += size


def top_level(path: Path) -> tuple[bytes, list[tuple[int, int]]]:
    """The file's `moov` box and the payload ranges of its `mdat` boxes, reading only the box headers and moov."""
    end = path.stat().st_size
    moov, media = None, []
    with open(path, "rb") as f:
        at = 0
        while at < end:
            f.seek(at)
            kind, length, size = box_header(f.read(16), at, end)
            if kind == b"moov":
                f.seek(at)
                moov = f.read(size)
            elif kind == b"mdat":
                media.append((at + length, at + size))
            at += size
    if moov is None or not media:
        raise DamagedMP4("no " + ("moov (the index of the frames)" if moov is None else "mdat (the frames' data)"))
    return moov, media


def video_tables(moov: bytes) -> dict:
    """The boxes of the first video track in `moov` (the moov box itself), by type: hdlr, stsz, stsc, stco or
    co64 among them (payloads)."""
    def track(start, end, found):
        for kind, a, b in boxes(moov, start, end):
            if kind in TRACK_CONTAINERS:
                track(a, b, found)
            else:
                found[kind] = moov[a:b]
        return found

    for _, start, end in boxes(moov):
        for kind, a, b in boxes(moov, start, end):
            tables = track(a, b, {}) if kind == b"trak" else {}
            if tables.get(b"hdlr", b"")[8:12] == b"vide":  # after version, flags and pre_defined: the handler
                if b"stsz" in tables and b"stsc" in tables and (b"stco" in tables or b"co64" in tables):
                    return tables
                raise DamagedMP4("the video track has no sample tables")
    raise DamagedMP4("no video track")


def sample_ranges(tables: dict) -> list[tuple[int, int]]:
    """(offset, end) in the file of each sample (frame) of a track, from its sample tables."""
    stsz, stsc = tables[b"stsz"], tables[b"stsc"]
    uniform, count = struct.unpack_from(">II", stsz, 4)
    sizes = [uniform] * count if uniform else list(struct.unpack_from(f">{count}I", stsz, 12))
    if b"co64" in tables:
        offsets = struct.unpack_from(f">{struct.unpack_from('>I', tables[b'co64'], 4)[0]}Q", tables[b"co64"], 8)
    else:
        offsets = struct.unpack_from(f">{struct.unpack_from('>I', tables[b'stco'], 4)[0]}I", tables[b"stco"], 8)
    runs = [struct.unpack_from(">III", stsc, 8 + 12 * i)[:2] for i in range(struct.unpack_from(">I", stsc, 4)[0])]
    ranges, sample = [], 0
    for chunk, offset in enumerate(offsets, start=1):
        per_chunk = next((n for first, n in reversed(runs) if first <= chunk), 0)
        for _ in range(per_chunk):
            if sample == count:
                raise DamagedMP4("the chunk table lists more frames than the size table")
            ranges.append((offset, offset + sizes[sample]))
            offset += sizes[sample]
            sample += 1
    if sample != count:
        raise DamagedMP4(f"the chunk table places {sample} of the {count} frames")
    return ranges


def video_frame_count(path) -> int:
    """The number of frames of the file's video track, once its structure checks out; DamagedMP4 otherwise."""
    try:
        moov, media = top_level(Path(path))
        ranges = sample_ranges(video_tables(moov))
    except struct.error:
        raise DamagedMP4("a box is shorter than its contents") from None
    for start, end in ranges:
        if not any(a <= start and end <= b for a, b in media):
            raise DamagedMP4(f"a frame's data (bytes {start}-{end}) lies outside the media data")
    return len(ranges)
