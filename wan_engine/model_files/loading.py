"""Reading a model folder: configs, tokenizer and the safetensors weights of each part.

Three formats share the Diffusers folder layout (`model_index.json` plus one folder per part):
- a Diffusers snapshot (`Wan-AI/Wan2.2-TI2V-5B-Diffusers`): Diffusers key names, PyTorch layouts;
- a Wan Studio package (`python -m wan_engine convert`): the same, in bfloat16, plus `wan_studio_package.json`
  recording which parts hold quantized linears (stored as MLX writes them: weight, scales, biases);
- an mlx-gen package (`mlxgen prepare`): its transformer/ and vae/ were written by MLX with mlx-gen's key names,
  channels-last, and say so in their safetensors header metadata; they have no config.json, so the TI2V-5B
  configs shipped in `configs/` apply unless the folder holds one.

The weights are memory-mapped lazily by `mx.load` and cast while being assigned, so a part never exists in
two copies (on-disk dtype and compute dtype) at once, except for the tensor being converted.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..models.config import SHIPPED_CONFIGS, SchedulerConfig, TextEncoderConfig, TransformerConfig, VAEConfig
from ..errors import WanError
from .mapped_embedding import StoredTensor, leave_in_file
from .quantize import POLICIES, quantize_as_stored, quantize_layers, stored_quantization
from .tensor_reader import read_tensors
from .weights import (
    TIED_COPIES, load_into, running_dtype, runs_as_stored, sanitize_mlxgen_transformer, sanitize_mlxgen_vae,
)

PARTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
PACKAGE_RECORD = "wan_studio_package.json"
PACKAGE_FORMAT = "wan-studio-package"
PACKAGE_VERSION = 1
# `Wan-AI/Wan2.2-TI2V-5B-Diffusers`' transformer and VAE config.json, copied from diffusers'
# scripts/convert_wan_to_diffusers.py and checked against the official Wan-Video/Wan2.2 wan/modules/vae2_2.py
# (latents_mean / latents_std) and wan/configs/wan_ti2v_5B.py; configs/README.md says which value came from where.
MLXGEN_SANITIZERS = {"transformer": sanitize_mlxgen_transformer, "vae": sanitize_mlxgen_vae}

# diffusers' `WanTransformer3DModel._keep_in_fp32_modules` (matched as substrings of parameter names): these stay
# float32 when the model runs in half precision, and the model computes with them in float32.
TRANSFORMER_FP32_PARAMETERS = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
# transformers' `UMT5PreTrainedModel._keep_in_fp32_modules`, applied by transformers for float16 only.
TEXT_ENCODER_FP16_KEEP_FP32 = ("wo",)


def check_safetensors(path: Path) -> dict:
    """The header of a safetensors file; fails with the file's name if it is truncated or its header is invalid."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError):
        raise WanError(f"{path} is not a valid safetensors file (corrupt or truncated): download it again") from None
    if 8 + header_len + end > size:
        raise WanError(
            f"{path} is truncated ({size} bytes, its header needs {8 + header_len + end}): download it again"
        )
    return header


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of one part: those the index names, else every *.safetensors file in the folder (but
    macOS's `._*` AppleDouble files, as mlx-gen skips them)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WanError(f"{folder} is incomplete: {', '.join(missing)} listed in {indexes[0].name} is missing")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("._"))
    if not files:
        raise WanError(f"{folder} holds no .safetensors weights")
    return files


def read_weights(folder: Path) -> tuple[dict, dict]:
    """name -> lazily loaded mx.array across every shard of a part, and the first shard's header metadata."""
    files = safetensors_files(folder)
    headers = [check_safetensors(path) for path in files]
    weights = {}
    for path in files:
        weights.update(mx.load(str(path)))
    return weights, headers[0].get("__metadata__", {})


def read_stored(stored: dict, names) -> dict:
    """name -> evaluated mx.array of `names` among `stored` (stored_tensors), as they are stored, read by several
    threads at once (tensor_reader.py): for parts stored as they run, such as converted copies."""
    wanted = set(names) - set(TIED_COPIES)
    return read_tensors({name: (tensor.path, name, tensor.nbytes) for name, tensor in stored.items() if name in wanted})


def stored_tensors(folder: Path) -> dict:
    """name -> StoredTensor (file, offset, shape, dtype) of every tensor in a part's shards."""
    found = {}
    for path in safetensors_files(folder):
        header = check_safetensors(path)
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        found.update({name: StoredTensor(path, data_start + entry["data_offsets"][0], tuple(entry["shape"]),
                                         entry["dtype"]) for name, entry in header.items() if name != "__metadata__"})
    return found


def leave_embedding_in_file(model, weights: dict, stored: dict, dtype, keep_fp32: tuple) -> None:
    """The text encoder's token table stays in its files (`stored`: stored_tensors) when they hold it as it runs
    (mapped_embedding.py)."""
    leave_in_file(model, "shared", weights, stored, running_dtype("shared.weight", dtype, keep_fp32))


def written_by_mlxgen(metadata: dict) -> bool:
    """mlx-gen's own test (`WeightLoader._try_load_mflux_format`) on the first shard's header metadata."""
    return "quantization_level" in metadata or "mflux_version" in metadata


@dataclass
class Snapshot:
    """A model folder in any of the three formats (see the module docstring)."""

    root: Path
    record: dict = None  # the package record of a Wan Studio package, None for the other formats

    @classmethod
    def open(cls, path) -> "Snapshot":
        root = Path(path)
        if not (root / "model_index.json").is_file():
            raise WanError(f"{root} is not a model folder (Diffusers snapshot or package): it has no model_index.json")
        snapshot = cls(root)
        index = snapshot.model_index
        if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
            raise WanError(f"{root} is a two-expert Wan2.2 model (A14B); only TI2V-style single-transformer models are supported")
        for part in PARTS:
            if not (root / part).is_dir():
                raise WanError(f"{root} is missing its {part}/ folder: the snapshot is incomplete")
        if (root / PACKAGE_RECORD).is_file():
            snapshot.record = read_record(root / PACKAGE_RECORD)
        return snapshot

    @property
    def model_index(self) -> dict:
        return json.loads((self.root / "model_index.json").read_text())

    def config(self, part: str, name: str = "config.json") -> dict:
        path = self.root / part / name
        if path.is_file():
            return json.loads(path.read_text())
        if self.uses_shipped_config(part):
            return json.loads((SHIPPED_CONFIGS / f"{part}.json").read_text())
        raise WanError(f"{path} is missing: the snapshot is incomplete")

    def uses_shipped_config(self, part: str) -> bool:
        """mlx-gen writes no config.json for the transformer and the VAE: Wan2.2-TI2V-5B's then apply."""
        if (self.root / part / "config.json").is_file() or part not in MLXGEN_SANITIZERS:
            return False
        first_shard = safetensors_files(self.root / part)[0]
        return written_by_mlxgen(check_safetensors(first_shard).get("__metadata__", {}))

    @property
    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig.from_dict(self.config("transformer"))

    @property
    def vae_config(self) -> VAEConfig:
        return VAEConfig.from_dict(self.config("vae"))

    @property
    def text_encoder_config(self) -> TextEncoderConfig:
        return TextEncoderConfig.from_dict(self.config("text_encoder"))

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.from_dict(self.config("scheduler", "scheduler_config.json"))

    @property
    def pipeline_class(self) -> str | None:
        """model_index.json's `_class_name`: diffusers' `WanPipeline`, or `WanDMDPipeline` for FastVideo's
        DMD-distilled checkpoints (FastVideo picks its pipeline by this name: fastvideo/registry.py get_model_info)."""
        return self.model_index.get("_class_name")

    def quantization(self, part: str) -> dict:
        """The package record's quantization of `part` ({"bits", "group_size", "mode"}), or None."""
        return ((self.record or {}).get("quantization") or {}).get(part)

    def new_model(self, part: str):
        """The model of `part` (transformer, vae or text_encoder) with its config, lazily initialised: nothing is
        computed or allocated until its weights are loaded."""
        from ..models.text_encoder import UMT5Encoder
        from ..models.transformer import WanTransformer
        from ..models.vae import WanVAE

        if part == "transformer":
            return WanTransformer(self.transformer_config)
        if part == "vae":
            return WanVAE(self.vae_config)
        return UMT5Encoder(self.text_encoder_config)

    @staticmethod
    def keep_fp32(part: str, dtype) -> tuple:
        """Parameters of `part` that stay float32 when it runs in `dtype` (matched as substrings of names)."""
        if part == "transformer":
            return TRANSFORMER_FP32_PARAMETERS
        if part == "text_encoder" and dtype == mx.float16:
            return TEXT_ENCODER_FP16_KEEP_FP32
        return ()

    def load(self, part: str, dtype, progress=None, quantize: dict = None, map_embedding: bool = False):
        """`part`'s model in `dtype`. Linears stored quantized stay quantized; `quantize` ({"bits", "group_size"})
        also quantizes the part's policy layers (quantize.POLICIES; the VAE has none) stored in full precision.
        `map_embedding`: the text encoder's token table stays in the files when they hold it as it runs
        (mapped_embedding.py); not for a model whose parameters are written out (a package, a converted copy)."""
        model = self.new_model(part)
        return self._load(part, model, dtype, self.keep_fp32(part, dtype), progress, quantize,
                          map_embedding)

    def load_transformer(self, dtype, progress=None, quantize: dict = None):
        return self.load("transformer", dtype, progress, quantize)

    def load_vae(self, dtype, progress=None):
        return self.load("vae", dtype, progress)

    def load_text_encoder(self, dtype, progress=None, quantize: dict = None):
        return self.load("text_encoder", dtype, progress, quantize)

    def read(self, part: str) -> tuple[dict, dict, bool]:
        """`part`'s weights in whichever format they are, lazily mapped, under our names; the first shard's
        header metadata; and whether they are channels-last (written by MLX for mlx-gen)."""
        weights, metadata = read_weights(self.root / part)
        mlxgen = written_by_mlxgen(metadata) and part in MLXGEN_SANITIZERS
        if mlxgen:
            weights = MLXGEN_SANITIZERS[part](weights)
        return weights, metadata, mlxgen

    def reload_transformer_layers(self, model, weights: dict, dtype, channels_last: bool) -> None:
        """Replace some parameters of the loaded transformer `model` by checkpoint tensors (our names, as `read`
        gives them), converted exactly as `load_transformer` converts them: layout, dtype, quantization."""
        load_into(model, weights, dtype, TRANSFORMER_FP32_PARAMETERS, channels_last=channels_last, partial=True)

    def _load(self, part, model, dtype, keep_fp32, progress, quantize=None, map_embedding=False):
        """Read `part`'s weights in whichever format they are, give `model` the quantized layers they hold
        (and those of its policy that `quantize` asks for), then load them."""
        folder = self.root / part
        layers = POLICIES.get(part)
        weights, metadata, mlxgen = self.read(part)
        bits = (self.quantization(part) or {}).get("bits")
        if mlxgen:
            level = metadata.get("quantization_level", "None")
            bits = int(level) if level.isdigit() else None
        try:
            stored = stored_quantization(weights, bits)
            # Only the layers our policy may quantize: the model reads the dtype of the others' weights.
            unsupported = sorted(path for path in stored if layers is None or not layers.fullmatch(path))
            if unsupported:
                raise WanError(f"{folder} holds {unsupported[0]} quantized; this engine keeps that layer in full "
                               "precision: use a package of the published q8 policy")
            quantize_as_stored(model, stored)
            if quantize:
                quantize_layers(model, layers, quantize["bits"], quantize.get("group_size", 64))
            stored = stored_tensors(folder)
            if map_embedding and part == "text_encoder":
                leave_embedding_in_file(model, weights, stored, dtype, keep_fp32)
            if not quantize and not mlxgen and runs_as_stored(weights, dtype, keep_fp32):
                weights = read_stored(stored, weights)  # nothing to convert: read by several threads at once
            return load_into(model, weights, dtype, keep_fp32, progress, channels_last=mlxgen)
        except ValueError as e:
            hint = ""
            if self.uses_shipped_config(part):
                hint = (f" ({folder} has no config.json, so Wan2.2-TI2V-5B's was used: add the config.json of the "
                        "model this package was made from)")
            raise WanError(f"{folder} does not fit its model: {e}{hint}") from None


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise WanError(f"{path} is not valid JSON: the package is damaged") from None
    if record.get("format") != PACKAGE_FORMAT or record.get("version") != PACKAGE_VERSION:
        raise WanError(
            f"{path} describes a {record.get('format')} version {record.get('version')} package; this engine reads "
            f"{PACKAGE_FORMAT} version {PACKAGE_VERSION}: convert the model again"
        )
    return record
