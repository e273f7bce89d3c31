"""Where MLX keeps the GPU kernels it compiles, so a machine compiles each one once.

MLX's CUDA backend compiles its JIT kernels (fused elementwise graphs, quantized matmuls, ...) with NVRTC the first
time a process needs them, which costs seconds to a minute on the first video, and keeps the results in
MLX_PTX_CACHE_DIR; by default a folder under the temporary directory, which a reboot may empty. We keep them beside
our other caches instead (unless the user chose a folder), so only the first run on a machine compiles. Metal's
kernels ship compiled in MLX; the CPU backend keeps its own under the temporary directory.
"""

import os

import mlx.core as mx

from .cache_files import cache_root


def keep_compiled_kernels() -> None:
    """Point MLX's kernel cache at the cache root. Call before the first kernel is compiled: MLX reads the
    variable once."""
    os.environ.setdefault("MLX_PTX_CACHE_DIR", str(cache_root() / "mlx-kernels" / mx.__version__))
