"""The prompt tokenizer, kept so that later loads need neither transformers nor PyTorch.

The reference tokenizes with the snapshot's transformers tokenizer (`AutoTokenizer`): a `tokenizers` (Rust)
tokenizer that transformers builds from the folder's files and sets up for the model (for UMT5: T5's normalizer,
pre-tokenizer and end-of-text template), called with padding and truncation to 512 tokens. Importing transformers
takes seconds, and where PyTorch is installed it imports PyTorch as well: 15 s and 0.7 GiB of the process on the H200
machine (bench/bench_cold_start.py's resident-set watch), on every launch.

So the first load builds the tokenizer with transformers, exactly as the reference does, and keeps its `tokenizers`
form (normalizer, pre-tokenizer, model, post-processor and added tokens, serialized by `tokenizers` itself) with the
padding and truncation settings transformers would apply, as a verified cache entry (cache_files). Later loads read
that entry with the `tokenizers` package alone. The entry is keyed by the tokenizer folder's files
(cache_files.source_identity) and the transformers and tokenizers versions, whose code decides the result.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .cache_files import DamagedEntry, read_entry, source_identity, write_entry
from ..errors import WanError

FORMAT = {"format": "wan-studio-tokenizer", "version": 1}

log = logging.getLogger("wan_engine")


@dataclass
class PromptTokenizer:
    """A `tokenizers` tokenizer called as transformers' `tokenizer(...)` is called for the text encoder."""

    backend: Tokenizer  # as transformers set it up, without padding or truncation
    pad_id: int
    pad_token: str
    padding_side: str = "right"
    truncation_side: str = "right"

    @classmethod
    def from_transformers(cls, tokenizer) -> "PromptTokenizer":
        """The `tokenizers` form of a transformers fast tokenizer, with its padding and truncation settings."""
        if tokenizer.pad_token is None:
            raise WanError("the tokenizer has no padding token: the text encoder needs one")
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, tokenizer.pad_token_id, tokenizer.pad_token, tokenizer.padding_side,
                   tokenizer.truncation_side)

    def to_json(self) -> str:
        return json.dumps({"tokenizer": self.backend.to_str(), "pad_id": self.pad_id, "pad_token": self.pad_token,
                           "padding_side": self.padding_side, "truncation_side": self.truncation_side})

    @classmethod
    def from_json(cls, text: str) -> "PromptTokenizer":
        kept = json.loads(text)
        return cls(Tokenizer.from_str(kept.pop("tokenizer")), **kept)

    def count(self, text: str) -> int:
        """Tokens of `text` with the end-of-text token, before any cut: `len(tokenizer(text, add_special_tokens=True,
        truncation=False)["input_ids"])`."""
        return len(self.backend.encode(text, add_special_tokens=True).ids)

    def batch(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 (B, max_length): `tokenizer(texts, padding="max_length",
        max_length=max_length, truncation=True, add_special_tokens=True)`, which transformers hands to the backend
        with these same truncation and padding settings."""
        self.backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        self.backend.enable_padding(length=max_length, direction=self.padding_side, pad_id=self.pad_id,
                                    pad_token=self.pad_token)
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        finally:  # `count` reads the same tokenizer uncut
            self.backend.no_padding()
            self.backend.no_truncation()
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        return ids, mask


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def transformers_tokenizer(folder: Path):
    """The tokenizer the reference uses: `AutoTokenizer.from_pretrained(folder)`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise WanError(f"could not load the tokenizer from {folder}: {e}") from None


def load_prompt_tokenizer(folder: Path, cache_folder: Path) -> PromptTokenizer:
    """The tokenizer of a snapshot's `tokenizer/` folder: from its kept form when there is one, else built by
    transformers (and kept)."""
    folder = Path(folder)
    key = json.dumps([str(folder.resolve()), source_identity(folder), package_version("transformers"),
                      package_version("tokenizers"), FORMAT])
    entry = Path(cache_folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.tokenizer"
    try:
        found = read_entry(entry)
        if found is not None:
            return PromptTokenizer.from_json(found[1].decode())
    except DamagedEntry:  # read_entry removed it and said so: built again below
        pass
    except Exception as error:  # whole but unreadable (tokenizers raises plain Exceptions): built again
        log.warning("the kept tokenizer %s could not be read (%s): it is built again", entry, error)
    tokenizer = PromptTokenizer.from_transformers(transformers_tokenizer(folder))
    write_entry(entry, tokenizer.to_json().encode(), FORMAT)
    return tokenizer
