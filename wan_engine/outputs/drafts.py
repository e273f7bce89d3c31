"""Drafts: a video decoded by the tiny decoder keeps its final latents beside it, `<video>.latents`, a verified
cache entry (model_files/cache_files.py) that lands with the video; `finish` decodes them with the full VAE later,
with no denoising repeated. Reading a draft back refuses, in one line, a video that is not a draft, and latents
that are gone or damaged.
"""

import io
import json
from pathlib import Path

import numpy as np

from ..errors import WanError
from ..model_files.cache_files import DamagedEntry, entry_bytes, read_entry
from ..record import RunRecord
from .video import draft_latents_path

KIND = "draft-latents"


def draft_latents_entry(latents: np.ndarray, video: Path) -> bytes:
    """The `.latents` file of a draft: its final latents (1, F, h, w, C) float32, as the full decode takes them."""
    payload = io.BytesIO()
    np.save(payload, np.ascontiguousarray(latents, dtype=np.float32))
    return entry_bytes(payload.getvalue(), {"kind": KIND, "video": video.name, "shape": list(latents.shape)})


def read_draft(video) -> tuple[RunRecord, np.ndarray]:
    """A draft's record (its sidecar) and its kept latents."""
    video = Path(video)
    sidecar = video.with_suffix(".json")
    if not video.is_file():
        raise WanError(f"the video {video} does not exist: give a draft's MP4 (made with --decoder tiny)")
    try:
        record = RunRecord.from_dict(json.loads(sidecar.read_text()))
    except FileNotFoundError:
        raise WanError(f"{video} has no settings file ({sidecar.name}) beside it: only a draft made here can be "
                       "finished") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WanError(f"the settings file {sidecar} cannot be read ({error}): the draft cannot be finished") from None
    if record.decoder != "tiny":
        raise WanError(f"{video.name} is not a draft: it was decoded in full quality already (finish takes videos "
                       "made with --decoder tiny)")
    path = draft_latents_path(video)
    try:
        entry = read_entry(path)
    except DamagedEntry:
        raise WanError(f"the draft's latents {path.name} are damaged (removed): the draft cannot be finished; "
                       "generate it again with the same settings and seed") from None
    if entry is None:
        raise WanError(f"the draft's latents {path.name} are gone: the draft cannot be finished; generate it again "
                       "with the same settings and seed")
    meta, payload = entry
    latents = np.load(io.BytesIO(payload), allow_pickle=False)
    if meta.get("kind") != KIND or list(latents.shape) != meta.get("shape"):
        raise WanError(f"{path.name} holds no draft latents: the draft cannot be finished")
    return record, latents


def read_draft_record(video) -> RunRecord:
    """A draft's record, its latents checked: what a finish needs to know before it opens the model."""
    return read_draft(video)[0]
