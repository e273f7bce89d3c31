"""The text encoder's token embedding left in its file, read a row per token a prompt uses.

UMT5-XXL's table is 256,384 x 4096: 2 GiB in bf16, 1 GiB in 8 bits, a fifth of the text encoder, of which one
prompt reads at most 512 rows. Loaded whole, it is read again on every load of the text encoder (each new prompt,
in both presets: they release the encoder after each), it adds its size to the peak while the encoder runs beside
the normal preset's transformer, and MLX's CUDA loader stages it whole in host memory on its way.

So when the files hold the table as it runs (in the compute dtype, or quantized as the model's layer is) the engine's
loads leave it there: `MappedEmbedding` maps the file with numpy (the page cache's pages, nothing copied) and takes
the rows a prompt uses, dequantized as `nn.QuantizedEmbedding` looks rows up, so the embeddings are the same numbers.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# safetensors dtype -> the numpy dtype of its bytes (numpy has no bfloat16: its bits, viewed by MLX), and MLX's
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}
MLX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32}


@dataclass
class StoredTensor:
    """Where a tensor lies in a safetensors file."""

    path: Path
    offset: int  # of its first byte in the file
    shape: tuple
    dtype: str  # the safetensors name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(NUMPY[self.dtype]).itemsize

    def rows(self, ids: np.ndarray) -> mx.array:
        mapped = np.memmap(self.path, NUMPY[self.dtype], "r", offset=self.offset, shape=self.shape)
        values = mx.array(np.ascontiguousarray(mapped[ids]))
        return values.view(mx.bfloat16) if self.dtype == "BF16" else values


class MappedEmbedding:
    """`nn.Embedding`, or `nn.QuantizedEmbedding` (`scales`, `biases` and `quantization` given), over a table in
    its file."""

    def __init__(self, weight: StoredTensor, scales: StoredTensor = None, biases: StoredTensor = None,
                 quantization: dict = None):
        self.weight, self.scales, self.biases, self.quantization = weight, scales, biases, quantization

    def __call__(self, ids: mx.array) -> mx.array:
        wanted, where = np.unique(np.array(ids).reshape(-1), return_inverse=True)
        table = self.weight.rows(wanted)
        if self.quantization is not None:
            q = self.quantization
            table = mx.dequantize(table, self.scales.rows(wanted), self.biases.rows(wanted), q["group_size"],
                                  q["bits"], mode=q["mode"])
        return table[mx.array(where.astype(np.int32)).reshape(ids.shape)]


def leave_in_file(model: nn.Module, name: str, weights: dict, stored: dict, dtype) -> bool:
    """Replace `model`'s embedding `name` by a MappedEmbedding when the files hold its table as it runs (`dtype`, or
    quantized as the layer is, its scales and biases in `dtype`), and take its tensors out of `weights` (which
    `load_into` then loads without it). False, and nothing changed, otherwise: a table to convert or quantize is
    loaded whole, as before, so a copy of the converted model (converted.py) holds it."""
    layer = getattr(model, name)
    weight = stored.get(f"{name}.weight")
    if weight is None or not isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
        return False
    if isinstance(layer, nn.QuantizedEmbedding):
        parts = [stored.get(f"{name}.scales"), stored.get(f"{name}.biases")]
        if weight.dtype != "U32" or None in parts or any(MLX.get(p.dtype) != dtype for p in parts):
            return False
        quantization = {"bits": layer.bits, "group_size": layer.group_size, "mode": layer.mode}
        mapped = MappedEmbedding(weight, *parts, quantization=quantization)
    elif MLX.get(weight.dtype) == dtype:
        mapped = MappedEmbedding(weight)
    else:
        return False
    for part in ("weight", "scales", "biases"):
        weights.pop(f"{name}.{part}", None)
    model.pop(name)  # an nn.Module is a dict of its children
    setattr(model, name, mapped)  # a plain attribute: not a parameter, never saved or counted
    return True
