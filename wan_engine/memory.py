"""The memory of the whole process, beside MLX's own count.

MLX's peak (mx.get_peak_memory) counts the arrays it allocates; the process also holds Python, the libraries, the
tokenizer, file buffers and, on a GPU, the driver's share. On a Mac all of it comes out of the same unified memory,
so a user sees about the sum of the two.
"""

import resource
import sys


def process_peak_rss_gib() -> float:
    """The most physical memory this process has held at once so far, in GiB (getrusage's ru_maxrss is in KiB on
    Linux and in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)
