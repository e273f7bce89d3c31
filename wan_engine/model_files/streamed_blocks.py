"""The text encoder's blocks left in their converted copy and read one at a time while it runs (the low-RAM preset).

UMT5-XXL's 24 blocks hold 4.6 GiB in 8 bits; a prompt needs each of them once, one after another. Read a block at
a time, the encoder holds about two blocks (0.4 GiB) instead of all of them, so it fits beside the resident
transformer: the low-RAM preset keeps the transformer loaded between videos (engine.prepare_next) and a new prompt
reads only the encoder's blocks, never the transformer again. The numbers are the same: the same stored tensors go
into the same layers, and the stack already evaluates block by block.

`StreamedBlocks` stands in for `UMT5Stack.block` (a list the stack iterates): iterating it yields each block, made
afresh, quantized as its copy stores it, its tensors read by the reader threads (tensor_reader.py); the previous
block is dropped as the stack moves on.
"""

import re
import time
from collections import defaultdict
from pathlib import Path

from .quantize import quantize_as_stored
from .tensor_reader import read_tensors
from ..models.text_encoder import UMT5Block
from .weights import load_into

BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")


class StreamedBlocks:
    """UMT5's blocks, read from `stored` (name -> StoredTensor of the whole encoder) as the stack reaches each."""

    def __init__(self, config, stored: dict, quantized: dict, dtype, keep_fp32: tuple):
        self.config, self.dtype, self.keep_fp32 = config, dtype, keep_fp32
        self.sources = defaultdict(dict)  # block index -> its parameter name -> (file, name in the file, bytes)
        for name, tensor in stored.items():
            if found := BLOCK_KEY.fullmatch(name):
                self.sources[int(found[1])][found[2]] = (Path(tensor.path), name, tensor.nbytes)
        self.quantized = defaultdict(dict)  # block index -> its layer path -> quantization
        for path, spec in quantized.items():
            if found := BLOCK_KEY.fullmatch(path):
                self.quantized[int(found[1])][found[2]] = spec
        self.read_s = 0.0  # time spent reading blocks, which the engine counts as loading, not encoding
        if sorted(self.sources) != list(range(config.num_layers)):
            raise ValueError(f"the stored encoder has blocks {sorted(self.sources)[:5]}..., the model expects "
                             f"{config.num_layers}")

    def __len__(self) -> int:
        return self.config.num_layers

    def __iter__(self):
        for index in range(self.config.num_layers):
            start = time.perf_counter()
            block = quantize_as_stored(UMT5Block(self.config), self.quantized[index])
            load_into(block, read_tensors(self.sources[index]), self.dtype, self.keep_fp32, channels_last=True)
            self.read_s += time.perf_counter() - start
            yield block
            del block  # before the next is read: at most the block running and the one being read are held
