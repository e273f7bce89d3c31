"""Convert a model part and SIGKILL this very process while its converted copy is being written, as a crash, a power
cut or an impatient `kill -9` would end it:

    python tests/converted_runner.py MODEL_FOLDER MOMENT

MOMENT: `weights` (half of the first weights file written), `manifest` (the weights whole, the manifest about to be
written) or `none` (the write finishes). The conversion is the real one (the transformer, 8-bit, float32) into
WAN_STUDIO_CACHE's `converted/`; only the moment of death is chosen.
"""

import os
import signal
import sys
from pathlib import Path

import mlx.core as mx

from wan_engine.model_files import converted
from wan_engine.model_files.cache_files import cache_root
from wan_engine.model_files.loading import Snapshot

model, moment = sys.argv[1], sys.argv[2]


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


save_safetensors = mx.save_safetensors


def save_half_then_die(path, arrays, metadata=None):
    save_safetensors(path, arrays, metadata=metadata)
    whole = Path(path).read_bytes()
    Path(path).write_bytes(whole[: len(whole) // 2])
    die()


if moment == "weights":
    mx.save_safetensors = save_half_then_die
if moment == "manifest":
    converted.write_entry = lambda *args: die()
weights = converted.ConvertedWeights(Snapshot.open(model), cache_root() / "converted")
_, origin = weights.load("transformer", mx.float32, {"bits": 8, "group_size": 64})
print(origin)
