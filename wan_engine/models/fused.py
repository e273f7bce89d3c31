"""A transformer block's norms, each one pass over the tokens where MLX runs on CUDA.

MLX runs `mx.fast.rms_norm` / `layer_norm` and the compiled elementwise work around them (the queries' and keys'
RoPE, the adaLN modulation, the casts to float32 and back) as separate kernels, each a full pass over a block's
activations. Where the default device is a CUDA GPU, three kernels here take one pass each: the q / k RMS norm with
its RoPE, the adaLN layer norm with its modulation, and the cross-attention's affine layer norm (the adaLN kernel
with the norm's weight and bias). Elsewhere (the CPU, Metal) the functions run the same math in MLX operations.

On an H100 the 17-frame step (the guidance pair, 30 blocks) took 167.3 ms with the three kernels against 195.9 ms
without (bench/profile_gpu.py --part step, same run; 178.7 ms with the first two). The kernels round as diffusers does:
they compute in float32, cast the RMS-normed row to the weight's dtype before its product (diffusers' `RMSNorm`),
and round once at the end; tests/test_fused_kernels.py holds them to the MLX operations (which the parity tests
hold to diffusers) on the GPU machine.
"""

import mlx.core as mx

from .rope import apply_rope

# A switch for benchmarks (bench/profile_gpu.py times the step both ways): False runs the MLX operations everywhere.
USE_CUDA_KERNELS = True

_BLOCK_SUM = """
// The sum of every thread's `value` in the block (blockDim.x a multiple of 32, at most 1024), for every thread.
__device__ float block_sum(float value) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    __syncthreads();  // an earlier call's threads may still read partial[0]
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
    __syncthreads();
    value = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
    if (threadIdx.x < 32)
        for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    if (threadIdx.x == 0) partial[0] = value;
    __syncthreads();
    return partial[0];
}
"""

# One block of threads per token row: x (rows, DIM) with DIM = heads * HEAD_DIM; the rotary tables' row is the
# token's place among the TOKENS of its sample.
_RMS_NORM_ROPE = """
    const int row = blockIdx.x;
    const int token = row % TOKENS;
    const T* x_row = x + (size_t)row * DIM;
    T* out_row = out + (size_t)row * DIM;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < DIM; i += blockDim.x) {
        const float v = static_cast<float>(x_row[i]);
        squares += v * v;
    }
    const float rstd = rsqrtf(block_sum(squares) / DIM + EPS);
    for (int p = threadIdx.x; p < DIM / 2; p += blockDim.x) {
        const int i = 2 * p, j = i % HEAD_DIM;
        const float y0 = static_cast<float>(W(static_cast<float>(W(static_cast<float>(x_row[i]) * rstd)) *
                                              static_cast<float>(weight[i])));
        const float y1 = static_cast<float>(W(static_cast<float>(W(static_cast<float>(x_row[i + 1]) * rstd)) *
                                              static_cast<float>(weight[i + 1])));
        const float* c = cos_table + (size_t)token * HEAD_DIM + j;
        const float* s = sin_table + (size_t)token * HEAD_DIM + j;
        out_row[i] = T(y0 * c[0] + y1 * s[0]);
        out_row[i + 1] = T(y1 * c[1] + y0 * s[1]);
    }
"""

# One block of threads per token row: x (rows, DIM); GROUP_TOKENS rows share a (scale, shift) row. MODULATED
# multiplies the normed row by (1 + scale), as adaLN does; otherwise by scale (an affine norm's weight).
_LAYER_NORM = """
    const int row = blockIdx.x;
    const T* x_row = x + (size_t)row * DIM;
    const float* scale_row = scale + (size_t)(row / GROUP_TOKENS) * DIM;
    const float* shift_row = shift + (size_t)(row / GROUP_TOKENS) * DIM;
    T* out_row = out + (size_t)row * DIM;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < DIM; i += blockDim.x) sum += static_cast<float>(x_row[i]);
    const float mean = block_sum(sum) / DIM;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < DIM; i += blockDim.x) {
        const float d = static_cast<float>(x_row[i]) - mean;
        squares += d * d;
    }
    const float rstd = rsqrtf(block_sum(squares) / DIM + EPS);
    for (int i = threadIdx.x; i < DIM; i += blockDim.x) {
        const float normed = (static_cast<float>(x_row[i]) - mean) * rstd;
        const float factor = MODULATED ? 1.0f + scale_row[i] : scale_row[i];
        out_row[i] = T(normed * factor + shift_row[i]);
    }
"""

_THREADS = 256
_kernels = {}  # (name, eps) -> compiled kernel


def cuda_kernels_apply() -> bool:
    """Whether the functions below run their CUDA kernels: MLX's CUDA build with the GPU as default device."""
    return USE_CUDA_KERNELS and mx.default_device() == mx.gpu and mx.cuda.is_available()


def _kernel(name: str, inputs: list, source: str, eps: float):
    if (name, eps) not in _kernels:
        header = _BLOCK_SUM + f"constexpr float EPS = {float(eps)!r}f;\n"
        # MLX keeps one compiled module per kernel name and template arguments: each eps needs a name of its own
        unique = f"wan_{name}_{len(_kernels)}"
        _kernels[name, eps] = mx.fast.cuda_kernel(unique, inputs, ["out"], source, header=header)
    return _kernels[name, eps]


def rms_norm_rope(x: mx.array, weight: mx.array, eps: float, rope: tuple, heads: int) -> mx.array:
    """x (B, ..., dim) -> its rows RMS-normed over dim (times `weight`), as (B, L, heads, head_dim) rotated by
    `rope` (rope.rope_tables of the L tokens): diffusers' norm_q / norm_k and apply_rotary_emb."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    batch, tokens, dim = x.shape
    head_dim = dim // heads
    if not cuda_kernels_apply():
        return apply_rope(mx.fast.rms_norm(x, weight, eps).reshape(batch, tokens, heads, head_dim), *rope)
    if rope[0].shape[0] != tokens:
        raise ValueError(f"rotary tables for {rope[0].shape[0]} tokens, queries for {tokens}")
    kernel = _kernel("rms_norm_rope", ["x", "weight", "cos_table", "sin_table"], _RMS_NORM_ROPE, eps)
    (out,) = kernel(inputs=[x, weight, *rope],
                    template=[("T", x.dtype), ("W", weight.dtype), ("TOKENS", tokens), ("DIM", dim),
                              ("HEAD_DIM", head_dim)],
                    grid=(batch * tokens * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
                    output_shapes=[x.shape], output_dtypes=[x.dtype])
    return out.reshape(batch, tokens, heads, head_dim)


def modulated_layer_norm(x: mx.array, scale: mx.array, shift: mx.array, eps: float) -> mx.array:
    """x (B, G, N, dim), scale and shift (B, G, 1, dim) float32 -> layer_norm(x) * (1 + scale) + shift, computed in
    float32 and returned in x's dtype: diffusers' adaLN norm (FP32LayerNorm, then the modulation)."""
    if not cuda_kernels_apply():
        return (mx.fast.layer_norm(x.astype(mx.float32), None, None, eps) * (1 + scale) + shift).astype(x.dtype)
    return _layer_norm(x, scale, shift, eps, modulated=True)


def affine_layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """x (B, G, N, dim) -> layer_norm(x) * weight + bias, computed in float32 and returned in x's dtype: diffusers'
    `norm2(hidden_states.float()).type_as(hidden_states)` (an FP32LayerNorm with its affine parameters)."""
    weight, bias = weight.astype(mx.float32), bias.astype(mx.float32)
    if not cuda_kernels_apply():
        return mx.fast.layer_norm(x.astype(mx.float32), weight, bias, eps).astype(x.dtype)
    return _layer_norm(x, weight, bias, eps, modulated=False)


def _layer_norm(x: mx.array, scale: mx.array, shift: mx.array, eps: float, modulated: bool) -> mx.array:
    dim = x.shape[-1]
    kernel = _kernel("layer_norm", ["x", "scale", "shift"], _LAYER_NORM, eps)
    scale, shift = (mx.broadcast_to(a, (*x.shape[:2], 1, dim)).astype(mx.float32) for a in (scale, shift))
    (out,) = kernel(inputs=[x, scale, shift],
                    template=[("T", x.dtype), ("MODULATED", modulated), ("GROUP_TOKENS", x.shape[2]), ("DIM", dim)],
                    grid=(x.size // dim * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
                    output_shapes=[x.shape], output_dtypes=[x.dtype])
    return out
