"""Converted weights kept on disk: a model part is converted once (cast to the compute dtype, quantized as the
preset asks) and later loads read the result as it is, so a later video converts nothing.

Entries live under `cache_root()/converted/`, a folder each:

    converted/<part>-<slot>-<source>/weights*.safetensors   the part's parameters under our names, MLX layout, in
                                                            their final dtype, quantized layers as MLX packs them
    converted/<part>-<slot>-<source>/MANIFEST                a cache_files entry, written last: what the folder holds

`slot` hashes what the entry is for: the model folder, the part, the compute dtype, the quantization asked for, the
MLX version (its quantization decides the packed numbers) and this format's version. `source` hashes what the entry
was made from: each file of the part's folder by name, size and modification time (and, in the Hugging Face cache,
the blob it links to, which is named by its content hash), and the JSON configs by content. Sizes alone would not
do (a fine-tune of the same architecture has the same sizes); hashing the weights would cost seconds on every load
(20 GiB for the upstream transformer), which is what the cache saves. A new source gets a new folder, and the old
folder of its slot is removed.

A folder is written under its partial name (cache_files.partial_name), its MANIFEST last, and renamed when whole: a
process killed on the way leaves a partial folder that no load reads and the next write clears. A load checks the
MANIFEST (checksummed), each shard's size and the SHA-256 of its header before mapping it; a damaged entry, or one
that fails to load, is removed, said in the log and rebuilt. Only conversions that shrink a part to at most 3/4 of
its bytes are kept (a quantization or a down-cast: reading fewer bytes beats reading more and converting them); a
part stored as it runs loads from the model's files as before. The free space is checked before writing: without
room the part loads from the model's files each time, as before, and the log says so once.
"""

import hashlib
import json
import logging
import shutil
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache_files import DamagedEntry, partial_name, read_entry, source_identity, stale_partials, write_entry
from ..errors import WanError
from .loading import (
    Snapshot, leave_embedding_in_file, read_stored, read_weights, safetensors_files, stored_tensors,
)
from .mapped_embedding import MappedEmbedding
from .packages import write_weights
from .quantize import is_quantized, quantize_as_stored
from .streamed_blocks import BLOCK_KEY, StreamedBlocks
from .weights import load_into

FORMAT_VERSION = 1
MANIFEST = "MANIFEST"
WEIGHTS_STEM = "weights"
KEEP_FREE_BYTES = 2 * 2**30  # a cache never fills the disk: this much stays free after an entry is written
WORTH_KEEPING = 0.75  # kept when it takes at most this share of the source's bytes (q8 of bfloat16: about 0.53;
# bfloat16 of float32: 0.5)

log = logging.getLogger("wan_engine")
_said = set()  # messages already said by this process


class ConvertedWeights:
    """The converted parts of one model folder, kept under `folder`."""

    def __init__(self, snapshot: Snapshot, folder):
        self.snapshot = snapshot
        self.folder = Path(folder)

    def load(self, part: str, dtype, quantize: dict = None, stream_blocks: bool = False,
             make_room=None) -> tuple:
        """(model, origin): `part` (transformer, vae, text_encoder) in `dtype`, quantized as `quantize` asks,
        from its entry when one is whole, else from the model's files (kept as an entry when that pays and there is
        room). `origin` says where it came from, for the load message. `stream_blocks`: a text encoder read from its
        entry leaves its blocks there, each read as the encoder reaches it (streamed_blocks.py). `make_room()` is
        called before a load from the model's files, which holds the whole part (no entry yet, or a damaged one)."""
        entry = self.entry(part, dtype, quantize)
        model = self.read(entry, part, dtype, stream_blocks)
        if model is not None:
            return model, "its converted copy" + (", a block at a time" if stream_blocks else "")
        if make_room is not None:
            make_room()
        model = self.snapshot.load(part, dtype, quantize=quantize, map_embedding=True)
        return model, self.keep(entry, part, model)

    def entry(self, part: str, dtype, quantize: dict | None) -> Path:
        slot = self.slot(part, dtype, quantize)
        return self.folder / f"{part}-{slot}-{source_identity(self.snapshot.root / part)}"

    def slot(self, part: str, dtype, quantize: dict | None) -> str:
        """What an entry is for (see the module docstring), hashed."""
        what = [FORMAT_VERSION, str(self.snapshot.root.resolve()), part, str(dtype), quantize, mx.__version__]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    def read(self, entry: Path, part: str, dtype, stream_blocks: bool = False):
        """The model from `entry`, or None when there is none or it is damaged (then it is removed)."""
        try:
            manifest = read_manifest(entry)
            if manifest is None:
                return None
            check_shards(entry, manifest["files"])
            model = quantize_as_stored(self.snapshot.new_model(part), manifest["quantized"])
            weights, _ = read_weights(entry)
            stored = stored_tensors(entry)
            keep_fp32 = Snapshot.keep_fp32(part, dtype)
            if part == "text_encoder":
                leave_embedding_in_file(model, weights, stored, dtype, keep_fp32)
            if part == "text_encoder" and stream_blocks:
                blocks = StreamedBlocks(model.encoder.config, stored, manifest["quantized"], dtype, keep_fp32)
                model.encoder.pop("block")  # an nn.Module is a dict of its children
                model.encoder.block = blocks  # a plain attribute: its tensors are no parameters of the model
                weights = {name: value for name, value in weights.items() if not BLOCK_KEY.fullmatch(name)}
            weights = read_stored(stored, weights)  # stored as they run: read by several threads, nothing converted
            return load_into(model, weights, dtype, keep_fp32, channels_last=True)
        except DamagedEntry:  # the manifest: read_entry said so and removed it
            shutil.rmtree(entry, ignore_errors=True)
        except (WanError, ValueError, KeyError, RuntimeError, OSError) as error:  # cut short, unreadable, not fitting
            log.warning("the converted copy %s is damaged (%s): removed, it will be built again", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
        return None

    def keep(self, entry: Path, part: str, model) -> str:
        """Write `model` as `entry` when the conversion shrank it and the disk has room; returns the origin phrase.
        Never fails the load: the model is loaded already."""
        if isinstance(getattr(model, "shared", None), MappedEmbedding):
            return "the model's files"  # its table stayed in them as it runs: nothing of it was converted
        parameters = dict(tree_flatten(model.parameters()))
        size = sum(value.nbytes for value in parameters.values())
        source_size = sum(path.stat().st_size for path in safetensors_files(self.snapshot.root / part))
        if size > WORTH_KEEPING * source_size:
            return "the model's files"  # stored about as it runs: a copy would read about as many bytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for partial, _ in stale_partials(self.folder):  # what writers killed mid-write left
                shutil.rmtree(partial, ignore_errors=True)
            free = shutil.disk_usage(self.folder).free
            if free < size + KEEP_FREE_BYTES:
                say_once(f"not enough disk space in {self.folder} to keep the converted {part} (it needs "
                         f"{size / 2**30:.2f} GiB and {KEEP_FREE_BYTES / 2**30:.0f} GiB left free, {free / 2**30:.2f} "
                         "GiB are free): it is converted from the model's files at each load, as before")
                return "the model's files (no room on disk to keep a converted copy)"
            write_folder(entry, parameters, {"component": part, "quantized": quantized_layers(model)})
        except (OSError, RuntimeError) as error:  # a full disk or no permission: loading from the files still works
            say_once(f"could not keep the converted {part} in {self.folder} ({error}): it is converted from the "
                     "model's files at each load, as before")
            return "the model's files (the converted copy could not be written)"
        for older in self.folder.glob(entry.name.rsplit("-", 1)[0] + "-*"):  # the same slot, an older source
            if older != entry:
                shutil.rmtree(older, ignore_errors=True)
        return "the model's files, converted and kept for next time"


def quantized_layers(model) -> dict:
    """path -> {"bits", "group_size", "mode"} of each quantized layer, as quantize.quantize_as_stored takes them."""
    return {path: {"bits": layer.bits, "group_size": layer.group_size, "mode": layer.mode}
            for path, layer in model.named_modules() if is_quantized(layer)}


def header_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header (bounded by the file's size)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        header = f.read(min(length, path.stat().st_size))
    return hashlib.sha256(prefix + header).hexdigest()


def write_folder(entry: Path, parameters: dict, manifest: dict) -> None:
    """Write the entry under its partial name, the MANIFEST last, and rename it into place."""
    partial = partial_name(entry)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        write_weights(parameters, partial, WEIGHTS_STEM)
        files = {path.name: {"size": path.stat().st_size, "header_sha256": header_digest(path)}
                 for path in safetensors_files(partial)}
        payload = json.dumps({**manifest, "files": files}).encode()
        if not write_entry(partial / MANIFEST, payload, {"format": "wan-studio-converted", "version": FORMAT_VERSION}):
            raise OSError(f"the manifest {partial / MANIFEST} could not be written")
        try:
            partial.rename(entry)
        except OSError:
            if not (entry / MANIFEST).is_file():
                raise  # else another process kept the same entry first: ours is not needed
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def read_manifest(entry: Path) -> dict | None:
    """The entry's manifest; None when there is no entry; DamagedEntry when the manifest is not whole."""
    found = read_entry(entry / MANIFEST)
    if found is None:
        if entry.exists():  # a folder without its manifest was not written by write_folder
            raise ValueError("it has no manifest")
        return None
    return json.loads(found[1])


def check_shards(entry: Path, files: dict) -> None:
    """Each shard the manifest lists has its size and header as written (ValueError naming the first that does not)."""
    for name, written in files.items():
        path = entry / name
        if path.stat().st_size != written["size"]:
            raise ValueError(f"{name} has {path.stat().st_size} bytes where {written['size']} were written")
        if header_digest(path) != written["header_sha256"]:
            raise ValueError(f"the header of {name} is not the one written")


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)
