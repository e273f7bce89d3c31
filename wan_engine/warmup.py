"""The first video's one-time costs, paid before anyone waits for a video.

A fresh process's first video pays, beside the video itself: loading the parts (on the first run on a machine, also
converting them: converted.py keeps the result on disk), compiling the GPU kernels its shapes need (kept per machine:
kernel_cache.py), building MLX's compiled graphs and the GPU libraries' plans (per process), and growing MLX's
allocator cache. `warm_up` runs one small generation through the real code, so that all of it is done: the parts
stay loaded as the preset leaves them after a run, and the video is written to a temporary folder and removed.

Its size is small but not tiny: enough tokens that matrix products take the paths a real run takes (a handful of
tokens would run the matrix-vector kernels instead), few enough that it costs a fraction of a real video. The
prompts are encoded by the text encoder, never taken from the embedding cache, so that its kernels compile too.
"""

import shutil
import tempfile
from pathlib import Path

from .engine import Engine
from .request import GenerationRequest, Result

WARM_UP = dict(prompt="a short warm-up clip of a quiet harbour", width=256, height=256, frames=5, steps=2, seed=0)


def warm_up(engine: Engine):
    """Run the warm-up generation; yields its ProgressEvents and returns its Result (timings, MLX peak; its files
    are gone). Writes nothing that stays: no video in the history, no prompt embedding in the cache."""
    folder = Path(tempfile.mkdtemp(prefix="wan-warm-up-"))
    try:
        request = GenerationRequest(**WARM_UP, output=str(folder / "warm-up.mp4"))
        for item in engine.generate(request, use_prompt_cache=False):
            if isinstance(item, Result):
                return item
            yield item
    finally:
        shutil.rmtree(folder, ignore_errors=True)
