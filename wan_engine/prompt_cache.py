"""On-disk cache of prompt embeddings, so a repeated prompt skips loading the text encoder entirely.

Keyed by the text encoder's identity (its files, dtype and quantization), the cleaned prompt and the maximum
length. Entries are .npy files written atomically; the least recently used go first when the folder grows past
its size bound.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

DEFAULT_MAX_BYTES = 2 * 2**30


class PromptEmbeddingCache:
    def __init__(self, folder, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    @staticmethod
    def key(encoder_identity: str, cleaned_prompt: str, max_length: int) -> str:
        text = f"{encoder_identity}\0{max_length}\0{cleaned_prompt}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def get(self, key: str, max_length: int) -> np.ndarray | None:
        """The (max_length, D) float32 embedding, or None when absent or unreadable."""
        path = self._path(key)
        try:
            rows = np.load(path)
        except (OSError, ValueError):
            return None
        os.utime(path)  # recently used: evicted last
        padded = np.zeros((max_length, rows.shape[1]), np.float32)
        padded[: len(rows)] = rows
        return padded

    def put(self, key: str, embedding: np.ndarray) -> None:
        """Store a (max_length, D) embedding; only the rows up to the last non-zero one are kept on disk."""
        nonzero = np.flatnonzero(np.abs(embedding).sum(axis=1))
        rows = embedding[: (nonzero[-1] + 1) if len(nonzero) else 1].astype(np.float32)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{key}.{os.getpid()}.partial.npy"
        try:
            np.save(partial, rows)
            partial.replace(self._path(key))
        except OSError:  # a full disk must not fail the generation: the cache is an optimisation
            partial.unlink(missing_ok=True)
            return
        self.evict()

    def evict(self) -> None:
        entries = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        size = sum(p.stat().st_size for p in entries)
        for path in entries:
            if size <= self.max_bytes:
                break
            size -= path.stat().st_size
            path.unlink(missing_ok=True)


def encoder_identity(model_root, dtype: str, quantization) -> str:
    """What the cached embeddings depend on: the text encoder's and tokenizer's files (names, sizes, small
    config files' contents), the compute dtype and the quantization."""
    parts = [dtype, repr(quantization)]
    for folder in ("text_encoder", "tokenizer"):
        for path in sorted((Path(model_root) / folder).glob("*")):
            if path.suffix == ".json" and path.stat().st_size < 1_000_000:
                parts.append(f"{folder}/{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
            else:
                parts.append(f"{folder}/{path.name}:{path.stat().st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
