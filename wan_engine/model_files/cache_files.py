"""Verified, atomic cache entries: what every on-disk cache of the engine writes and reads; and the partial names
that every file the engine writes (cache entries, videos, sidecars) has until it is whole.

An entry is one file: a fixed magic, the length of a JSON header, the header (the caller's metadata, the payload's
size and its SHA-256), then the payload. It is written under a temporary name beside its final one and renamed
when complete, so a reader never sees half an entry under the final name; and a reader checks the magic, the
header and the checksum, so a file damaged later (a bad sector, a copy cut short, an edit by hand) is found too.
A damaged entry is removed and reported as `DamagedEntry`: the cache treats it as a miss and builds it again.
"""

import hashlib
import json
import logging
import os
import re
import struct
from pathlib import Path

MAGIC = b"WANCACHE"
HEADER_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 20
CONFIG_BYTES = 1_000_000  # JSON files below this size are identified by their content
PARTIAL = re.compile(r"^\.(?P<stem>.+)\.partial-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")  # see partial_name

log = logging.getLogger("wan_engine")


def cache_root() -> Path:
    """Where every disk cache of the engine lives: WAN_STUDIO_CACHE, or wan-studio/ in the user's cache folder."""
    base = os.environ.get("WAN_STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wan-studio"
    )
    return Path(base)


class DamagedEntry(Exception):
    """A cache entry that cannot be trusted (it was removed)."""


def partial_name(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`: hidden, and marked with the
    writing process's id, so that `stale_partials` can tell an abandoned write from one still under way."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def stale_partials(folder) -> list[tuple[Path, Path]]:
    """(partial, the final name it was meant for) for each partial file in `folder` whose writer is gone."""
    try:
        paths = list(Path(folder).iterdir())
    except OSError:
        return []
    stale = []
    for path in paths:
        match = PARTIAL.match(path.name)
        if match and not process_alive(int(match["pid"])):
            stale.append((path, path.with_name(match["stem"] + (match["suffix"] or ""))))
    return stale


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def entry_bytes(payload: bytes, meta: dict) -> bytes:
    """An entry as stored: magic, header (meta, size, SHA-256 of the payload), payload."""
    header = json.dumps({"meta": meta, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    return MAGIC + HEADER_LENGTH.pack(len(header)) + header + payload


def write_entry(path, payload: bytes, meta: dict) -> bool:
    """Store `payload` with `meta` under `path`, atomically. Returns False when it could not be written (a full
    disk, no permission): a cache is an optimisation and never fails the work it speeds up."""
    path = Path(path)
    partial = partial_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            f.write(entry_bytes(payload, meta))
        partial.replace(path)
        return True
    except OSError as error:
        partial.unlink(missing_ok=True)
        log.warning("could not write the cache entry %s (%s): continuing without it", path, error.strerror or error)
        return False


def read_entry(path) -> tuple[dict, bytes] | None:
    """(meta, payload) of the entry at `path`; None when there is none; `DamagedEntry` (after removing it and
    saying so in the log) when it is not whole or not what was written."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:  # unreadable (a bad sector): as damaged
        raise _damaged(path, error.strerror or str(error)) from None
    start = len(MAGIC) + HEADER_LENGTH.size
    if len(data) < start or not data.startswith(MAGIC):
        raise _damaged(path, "not a cache entry (wrong magic or too short)")
    (header_bytes,) = HEADER_LENGTH.unpack_from(data, len(MAGIC))
    if header_bytes > min(MAX_HEADER_BYTES, len(data) - start):
        raise _damaged(path, "its header is cut short")
    try:
        header = json.loads(data[start:start + header_bytes])
        meta, size, checksum = header["meta"], header["size"], header["sha256"]
    except (ValueError, KeyError, TypeError):
        raise _damaged(path, "its header is not valid") from None
    payload = data[start + header_bytes:]
    if len(payload) != size:
        raise _damaged(path, f"{len(payload)} bytes of data where {size} were written")
    if hashlib.sha256(payload).hexdigest() != checksum:
        raise _damaged(path, "its checksum does not match its data")
    return meta, payload


def _damaged(path: Path, why: str) -> DamagedEntry:
    log.warning("the cache entry %s is damaged (%s): removed, it will be built again", path, why)
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    return DamagedEntry(f"{path}: {why}")


def source_identity(folder: Path) -> str:
    """What a cache entry made from the files of `folder` depends on: their names, sizes, modification times and
    link targets (a Hugging Face cache links each file to a blob named by its content hash), and the small JSON
    configs' contents. Hashing gigabytes of weights at every load would cost the time a cache saves."""
    if not folder.is_dir():
        return "absent"
    parts = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # partial downloads, macOS's AppleDouble files
            continue
        stat = path.stat()
        if path.suffix == ".json" and stat.st_size < CONFIG_BYTES:
            parts.append(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
        else:
            link = os.readlink(path) if path.is_symlink() else ""
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{link}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
