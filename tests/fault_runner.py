"""Run one real generation on the demo model and SIGKILL this very process at a chosen moment, as a crash, a power
cut or an impatient `kill -9` would end it:

    python tests/fault_runner.py OUTPUT.mp4 MOMENT

MOMENT: `denoise` (the first denoising step), `decode` (the second decoded chunk: the first one's frames are with
ffmpeg), `saving` (the video checked and the sidecar written, both still under partial names) or `landing` (the
video renamed into place, its sidecar not yet). `none` lets the run finish. The engine is the real one; only the
moment of death is chosen.
"""

import os
import signal
import sys
from pathlib import Path

from wan_engine import Engine, GenerationRequest

output, moment = Path(sys.argv[1]), sys.argv[2]


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


original_replace = Path.replace


def replace_then_maybe_die(self, target):
    """Path.replace as the engine's landing calls it: the video first, then the sidecar."""
    if moment == "saving" and Path(target) == output:
        die()
    if moment == "landing" and Path(target) == output.with_suffix(".json"):
        die()
    return original_replace(self, target)


Path.replace = replace_then_maybe_die
engine = Engine("demo", dtype="float32")
request = GenerationRequest(prompt="a paper boat", width=64, height=64, frames=9, steps=3, seed=1, output=str(output))
seen = []
for event in engine.generate(request):
    print(getattr(event, "stage", "result"), flush=True)
    seen.append(getattr(event, "stage", None))
    # the first chunk's frames go to ffmpeg as the second is handed to the device: die when the MP4 has begun
    if seen.count(moment) == (2 if moment == "decode" else 1):
        die()
