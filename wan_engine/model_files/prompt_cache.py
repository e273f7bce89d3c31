"""On-disk cache of prompt embeddings, so a repeated prompt skips loading the text encoder entirely.

Keyed by the text encoder's identity (its files, dtype and quantization), the cleaned prompt and the maximum
length. Each entry (cache_files.py: atomic, checksummed) holds the embedding's rows up to the prompt's last token
and how many tokens the prompt had before the model's limit cut it. A damaged entry is a miss, rebuilt. The least
recently used entries go first when the folder grows past its size bound.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

from .cache_files import DamagedEntry, read_entry, source_identity, stale_partials, write_entry

DEFAULT_MAX_BYTES = 2 * 2**30
SUFFIX = ".embedding"


class PromptEmbeddingCache:
    def __init__(self, folder, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    @staticmethod
    def key(encoder_identity: str, cleaned_prompt: str, max_length: int) -> str:
        text = f"{encoder_identity}\0{max_length}\0{cleaned_prompt}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str, max_length: int) -> tuple[np.ndarray, int] | None:
        """The (max_length, D) float32 embedding and the prompt's token count, or None when absent or damaged."""
        path = self._path(key)
        try:
            entry = read_entry(path)
        except DamagedEntry:
            return None
        if entry is None:
            return None
        meta, payload = entry
        rows = np.frombuffer(payload, np.float32).reshape(meta["rows"], meta["width"])
        os.utime(path)  # recently used: evicted last
        padded = np.zeros((max_length, rows.shape[1]), np.float32)
        padded[: len(rows)] = rows
        return padded, meta["tokens"]

    def put(self, key: str, embedding: np.ndarray, tokens: int) -> None:
        """Store a (max_length, D) embedding of a prompt of `tokens` tokens (before truncation); only the rows up
        to the last non-zero one are kept on disk."""
        nonzero = np.flatnonzero(np.abs(embedding).sum(axis=1))
        rows = np.ascontiguousarray(embedding[: (nonzero[-1] + 1) if len(nonzero) else 1], np.float32)
        meta = {"rows": rows.shape[0], "width": rows.shape[1], "tokens": tokens}
        if write_entry(self._path(key), rows.tobytes(), meta):
            self.evict()

    def evict(self) -> None:
        """Remove the least recently used entries (and files of older cache versions) past the size bound, and
        what writers killed mid-write left."""
        for partial, _ in stale_partials(self.folder):
            partial.unlink(missing_ok=True)
        entries = sorted((p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                         key=_last_used)
        size = sum(p.stat().st_size for p in entries)
        for path in entries:
            if size <= self.max_bytes and path.suffix == SUFFIX:
                break
            size -= path.stat().st_size
            path.unlink(missing_ok=True)


def _last_used(path: Path) -> tuple:
    return path.suffix == SUFFIX, path.stat().st_mtime  # other versions' files first


def encoder_identity(model_root, dtype: str, quantization) -> str:
    """What the cached embeddings depend on: the text encoder's and tokenizer's files (cache_files.source_identity),
    the compute dtype and the quantization."""
    parts = [dtype, repr(quantization)]
    parts += [f"{folder}:{source_identity(Path(model_root) / folder)}" for folder in ("text_encoder", "tokenizer")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
