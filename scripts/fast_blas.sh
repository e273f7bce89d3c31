# Sourced: preload OpenBLAS where Debian's libopenblas0-pthread is installed. MLX's Linux CPU build links a
# reference BLAS; OpenBLAS makes its float32 matmuls ~35x faster. Harmless elsewhere.
blas=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libblas.so.3
if [ -f "$blas" ]; then export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"; fi
