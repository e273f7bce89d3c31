"""Writes a Diffusers snapshot as mlx-gen 0.38.0 saves a Wan2.2 TI2V package (`mlxgen prepare -q 8` with the
published policy), following ../shared/mlxgen-package-layout.md: mlx-gen key names, channels-last convolutions,
q8 attention / feed-forward linears (group 64, affine) from BF16 weights, `rope.freqs_*` tables, safetensors header
metadata, `N.safetensors` shards with `model.safetensors.index.json`, and text_encoder/, scheduler/,
model_index.json copied and tokenizer/ re-saved by transformers. No config.json for transformer/ and vae/ unless
`with_configs`.

Checked against mlx-gen 0.38.0's own saver on a tiny snapshot: the same keys, shapes, dtypes, header metadata,
index files, tokenizer files and tensor values, except the values of the `rope.freqs_*` tables (every loader,
mlx-gen's and ours, recomputes those).
"""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from wan_engine.model_files.loading import read_weights

MLXGEN_VERSION = "0.38.0"
Q8_LAYERS = re.compile(r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.[01])")


def transformer_tensors(weights: dict, head_dim: int, rope_max_seq_len: int) -> dict:
    out = {}
    for key, value in weights.items():
        key = key.replace(".ffn.net.0.proj.", ".ffn.net.0.").replace(".ffn.net.2.", ".ffn.net.1.")
        value = value.astype(mx.bfloat16)  # mlx-gen casts to its BF16 precision before quantizing
        if key == "patch_embedding.weight":
            value = value.transpose(0, 2, 3, 4, 1)
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and Q8_LAYERS.fullmatch(layer):
            out[key], out[f"{layer}.scales"], out[f"{layer}.biases"] = mx.quantize(value, 64, 8)
        else:
            out[key] = value
    # mlx-gen saves its rotary tables because they are module attributes (float32, one row per position).
    angles = np.outer(np.arange(rope_max_seq_len), 10000.0 ** -(np.arange(0, head_dim, 2) / head_dim))
    out["rope.freqs_cos"] = mx.array(np.cos(angles).repeat(2, axis=1).astype(np.float32))
    out["rope.freqs_sin"] = mx.array(np.sin(angles).repeat(2, axis=1).astype(np.float32))
    return out


def vae_tensors(weights: dict) -> dict:
    causal_convs = {k.removesuffix(".weight") for k, v in weights.items() if k.endswith(".weight") and v.ndim == 5}
    out = {}
    for key, value in weights.items():
        layer, _, name = key.rpartition(".")
        value = value.astype(mx.bfloat16)
        if value.ndim == 5:
            value = value.transpose(0, 2, 3, 4, 1)
        elif value.ndim == 4 and name == "weight":
            value = value.transpose(0, 2, 3, 1)
        if layer in causal_convs:
            key = f"{layer}.conv3d.{name}"
        elif name == "gamma":
            key = f"{layer}.weight"
        out[key.replace(".resample.1.", ".resample_conv.")] = value
    return out


def save_component(tensors: dict, folder: Path, quantization_level: str) -> None:
    folder.mkdir(parents=True)
    metadata = {"quantization_level": quantization_level, "mflux_version": MLXGEN_VERSION}
    mx.save_safetensors(str(folder / "0.safetensors"), tensors, metadata=metadata)
    index = {"metadata": metadata, "weight_map": {key: "0.safetensors" for key in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_mlxgen_package(snapshot: Path, out: Path, with_configs: bool = False) -> Path:
    from transformers import T5TokenizerFast

    snapshot, out = Path(snapshot), Path(out)
    config = json.loads((snapshot / "transformer" / "config.json").read_text())
    transformer, _ = read_weights(snapshot / "transformer")
    save_component(transformer_tensors(transformer, config["attention_head_dim"], config["rope_max_seq_len"]),
                   out / "transformer", "8")
    vae, _ = read_weights(snapshot / "vae")
    save_component(vae_tensors(vae), out / "vae", "None")
    for name in ("text_encoder", "scheduler"):
        shutil.copytree(snapshot / name, out / name)
    shutil.copy2(snapshot / "model_index.json", out / "model_index.json")
    # mlx-gen loads the tokenizer as T5TokenizerFast (which adds T5's 100 <extra_id_N> tokens) and saves that.
    tokenizer = T5TokenizerFast.from_pretrained(str(snapshot / "tokenizer"), local_files_only=True)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "README.md").write_text("# Wan2.2 TI2V (mlx-gen q8 layout, written by the tests)\n")
    if with_configs:
        for name in ("transformer", "vae"):
            shutil.copy2(snapshot / name / "config.json", out / name / "config.json")
    return out
