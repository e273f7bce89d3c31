"""Reading a Diffusers snapshot folder: configs, tokenizer and the safetensors weights of each component.

The weights are memory-mapped lazily by `mx.load` and cast while being assigned, so a component never exists in
two copies (on-disk dtype and compute dtype) at once, except for the tensor being converted.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .config import SchedulerConfig, TextEncoderConfig, TransformerConfig, VAEConfig
from .errors import WanError
from .weights import load_into

COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")

# diffusers' `WanTransformer3DModel._keep_in_fp32_modules` (matched as substrings of parameter names): these stay
# float32 when the model runs in half precision, and the model computes with them in float32.
TRANSFORMER_FP32_PARAMETERS = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
# transformers' `UMT5PreTrainedModel._keep_in_fp32_modules`, applied by transformers for float16 only.
TEXT_ENCODER_FP16_KEEP_FP32 = ("wo",)


def check_safetensors(path: Path) -> None:
    """Fail with the file's name if a safetensors file is truncated or its header is not valid."""
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


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of one component: those the index names, else every *.safetensors file in the folder."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WanError(f"{folder} is incomplete: {', '.join(missing)} listed in {indexes[0].name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WanError(f"{folder} holds no .safetensors weights")
    return files


def read_weights(folder: Path) -> dict:
    """name -> lazily loaded mx.array, across every shard of a component."""
    weights = {}
    for path in safetensors_files(folder):
        check_safetensors(path)
        weights.update(mx.load(str(path)))
    return weights


@dataclass
class Snapshot:
    """A Diffusers-layout model folder (`model_index.json` plus one folder per component)."""

    root: Path

    @classmethod
    def open(cls, path) -> "Snapshot":
        root = Path(path)
        if not (root / "model_index.json").is_file():
            raise WanError(f"{root} is not a Diffusers snapshot: it has no model_index.json")
        snapshot = cls(root)
        index = snapshot.model_index
        if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
            raise WanError(f"{root} is a two-expert Wan2.2 model (A14B); only TI2V-style single-transformer models are supported")
        for component in COMPONENTS:
            if not (root / component).is_dir():
                raise WanError(f"{root} is missing its {component}/ folder: the snapshot is incomplete")
        return snapshot

    @property
    def model_index(self) -> dict:
        return json.loads((self.root / "model_index.json").read_text())

    def config(self, component: str, name: str = "config.json") -> dict:
        path = self.root / component / name
        if not path.is_file():
            raise WanError(f"{path} is missing: the snapshot is incomplete")
        return json.loads(path.read_text())

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
    def expand_timesteps(self) -> bool:
        return bool(self.model_index.get("expand_timesteps", False))

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.root / "tokenizer"))
        except (OSError, ValueError) as e:
            raise WanError(f"could not load the tokenizer from {self.root / 'tokenizer'}: {e}") from None

    def load_transformer(self, dtype, progress=None):
        from .transformer import WanTransformer

        model = WanTransformer(self.transformer_config)
        return load_into(model, read_weights(self.root / "transformer"), dtype, TRANSFORMER_FP32_PARAMETERS, progress)

    def load_vae(self, dtype, progress=None):
        from .vae import WanVAE

        return load_into(WanVAE(self.vae_config), read_weights(self.root / "vae"), dtype, (), progress)

    def load_text_encoder(self, dtype, progress=None):
        from .text_encoder import UMT5Encoder

        keep = TEXT_ENCODER_FP16_KEEP_FP32 if dtype == mx.float16 else ()
        model = UMT5Encoder(self.text_encoder_config)
        return load_into(model, read_weights(self.root / "text_encoder"), dtype, keep, progress)
