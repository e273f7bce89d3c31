"""The memory of the whole process, beside MLX's own count.

MLX's peak (mx.get_peak_memory) counts the arrays it allocates; the process also holds Python, the libraries, the
tokenizer, file buffers and, on a GPU, the driver's share. On a Mac all of it comes out of the same unified memory,
so a user sees about the sum of the two.
"""

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def process_peak_rss_gib() -> float:
    """The most physical memory this process has held at once so far, in GiB.

    On Linux: the kernel's high-water mark of this process's resident set (VmHWM). Not getrusage's ru_maxrss, which
    Linux carries over from the parent through fork and exec: a process started by one that held 5.8 GiB reports at
    least 5.8 GiB (bench_cold_start's child processes did, started by the bench that built the model with PyTorch).
    Elsewhere getrusage's (macOS gives it in bytes).
    """
    if STATUS.is_file():
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)
