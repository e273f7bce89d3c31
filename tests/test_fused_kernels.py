"""The CUDA kernels of wan_engine/models/fused.py against the MLX operations they replace (which the rest of the
suite holds to diffusers). They run only where MLX's CUDA build sees a GPU: on the device machine,
`python3 -m pytest tests/test_fused_kernels.py`; elsewhere these tests are skipped."""

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from wan_engine.models import fused
from wan_engine.models.rope import rope_tables
from wan_engine.models.transformer import WanTransformerBlock

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="the kernels run on MLX's CUDA backend only")


@pytest.fixture
def mlx_operations(monkeypatch):
    """Call fn with the kernels switched off: the MLX operations' result."""
    def run(fn, *args):
        monkeypatch.setattr(fused, "USE_CUDA_KERNELS", False)
        try:
            return fn(*args)
        finally:
            monkeypatch.setattr(fused, "USE_CUDA_KERNELS", True)
    return run


def difference(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.mark.parametrize("dtype, tolerance", [(mx.float32, 2e-5), (mx.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, head_dim, grid", [(24, 128, (2, 3, 5)), (2, 48, (3, 2, 2)), (3, 12, (1, 1, 7))])
def test_rms_norm_rope_matches_the_mlx_operations(mlx_operations, dtype, tolerance, heads, head_dim, grid):
    assert fused.cuda_kernels_apply()
    tokens = grid[0] * grid[1] * grid[2]
    x = (3 * mx.random.normal((2, tokens, heads * head_dim))).astype(dtype)
    weight = (1 + 0.2 * mx.random.normal((heads * head_dim,))).astype(dtype)
    rope = rope_tables(head_dim, grid)
    kernel = fused.rms_norm_rope(x, weight, 1e-6, rope, heads)
    reference = mlx_operations(fused.rms_norm_rope, x, weight, 1e-6, rope, heads)
    assert kernel.shape == reference.shape == (2, tokens, heads, head_dim)
    assert difference(kernel, reference) <= tolerance * max(1.0, mx.abs(reference).max().item())


@pytest.mark.parametrize("dtype, tolerance", [(mx.float32, 2e-5), (mx.bfloat16, 5e-2)])
@pytest.mark.parametrize("groups, tokens, dim", [(1, 37, 3072), (5, 8, 96), (3, 2, 40)])
def test_modulated_layer_norm_matches_the_mlx_operations(mlx_operations, dtype, tolerance, groups, tokens, dim):
    x = (4 + 3 * mx.random.normal((2, groups, tokens, dim))).astype(dtype)  # a mean far from 0
    scale, shift = (0.3 * mx.random.normal((2, groups, 1, dim)) for _ in range(2))
    kernel = fused.modulated_layer_norm(x, scale, shift, 1e-6)
    reference = mlx_operations(fused.modulated_layer_norm, x, scale, shift, 1e-6)
    assert kernel.dtype == dtype and kernel.shape == x.shape
    assert difference(kernel, reference) <= tolerance


@pytest.mark.parametrize("dtype, tolerance", [(mx.float32, 2e-5), (mx.bfloat16, 5e-2)])
@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.bfloat16])
def test_affine_layer_norm_matches_the_mlx_operations(mlx_operations, dtype, tolerance, weight_dtype):
    x = (4 + 3 * mx.random.normal((2, 3, 11, 3072))).astype(dtype)
    weight, bias = ((1 + 0.3 * mx.random.normal((3072,))).astype(weight_dtype) for _ in range(2))
    kernel = fused.affine_layer_norm(x, weight, bias, 1e-6)
    reference = mlx_operations(fused.affine_layer_norm, x, weight, bias, 1e-6)
    assert kernel.dtype == dtype and kernel.shape == x.shape
    assert difference(kernel, reference) <= tolerance


def test_a_compiled_block_matches_the_mlx_operations(mlx_operations):
    """The kernels inside a compiled block (the engine's way), per-frame timestep groups, in float32."""
    dim, heads, grid = 96, 2, (3, 2, 4)
    block = WanTransformerBlock(dim, 4 * dim, heads, cross_attn_norm=True, eps=1e-6)
    block.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.2, block.parameters()))
    x = mx.random.normal((2, grid[0], grid[1] * grid[2], dim))
    timestep_proj = mx.random.normal((2, grid[0], 6, dim)) * 0.2
    kv = block.attn2.key_value(mx.random.normal((2, 7, dim)))
    rope = rope_tables(dim // heads, grid)
    with_kernels = mx.compile(lambda *args: block(*args))  # two functions: MLX keeps one trace per function
    without = mx.compile(lambda *args: block(*args))
    kernel = with_kernels(x, timestep_proj, kv, rope)
    reference = mlx_operations(without, x, timestep_proj, kv, rope)
    assert difference(kernel, reference) <= 1e-4
