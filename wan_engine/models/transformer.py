"""Wan2.2 TI2V-5B diffusion transformer: diffusers `WanTransformer3DModel` in MLX (`WanTransformer`).

Module and parameter names equal the diffusers `state_dict()` keys, so a checkpoint loads with
`wan_engine.model_files.weights.load_into` (which only moves the patch-embedding kernel to channels-last).

The engine is channels-last: latents are (B, F, H, W, C). A run computes two things once and reuses them for all
denoising steps (the pipeline calls the model twice per step):

    rope = model.rope(F, H, W)                                  # 3-D rotary tables for the latent grid
    context = model.cross_attention_kv(model.embed_text(text))  # each block's cross-attention keys / values
    velocity = model(latents, timestep, context, rope)          # per step; timestep (B,) or (B, F)

Alone, every token is the process's own (`AllTokens`). In a group of processes `model.shard(tokens)` swaps in the
group's token share (wan_engine.parallel.share.TokenShare), with the same methods: each process runs the blocks on
its own tokens of each timestep group (with their own rotary positions), self-attention gathers every process's keys
and values, and the output is gathered whole. The forward passes are the same code either way.

Dtypes follow diffusers exactly: the compute dtype (`model.dtype`) is the patch embedding's weight dtype, while
layer norms, the adaLN modulation (`scale_shift_table` + timestep projection) and the residual updates around
self-attention and the feed-forward run in float32, then cast back.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import TransformerConfig
from .fused import affine_layer_norm, modulated_layer_norm, rms_norm_rope
from .rope import rope_axis_dims, rope_tables


@mx.compile  # one kernel, compiled per shape: a shapeless compile runs ~5x slower on CUDA for the FFN's activations
def gelu_tanh(x: mx.array) -> mx.array:
    """torch `gelu(approximate="tanh")` as PyTorch's kernel computes it, operation for operation, in float32 (its
    bfloat16 kernel computes in float32 too)."""
    x32 = x.astype(mx.float32)
    inner = 0.7978845608028654 * (x32 + 0.044715 * (x32 * x32 * x32))  # sqrt(2 / pi)
    return (0.5 * x32 * (1 + mx.tanh(inner))).astype(x.dtype)


def timestep_embedding(timestep: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """diffusers `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin], float32."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    # exp in float64, rounded: PyTorch's float32 exp is (nearly) correctly rounded, MLX's is often 1 ulp off, and
    # with timesteps near 1000 that ulp shows in the angles.
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    angles = timestep.astype(mx.float32)[..., None] * freqs
    emb = mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class FP32LayerNorm(nn.Module):
    """diffusers `FP32LayerNorm`: a layer norm computed in float32 and returned in the input's dtype (diffusers casts
    back). The adaLN norms, without parameters, run together with their modulation (`modulated_layer_norm`) and
    take only `eps` from here."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = mx.ones((dim,))
            self.bias = mx.zeros((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self:
            return affine_layer_norm(x, self.weight, self.bias, self.eps)
        return mx.fast.layer_norm(x.astype(mx.float32), None, None, self.eps).astype(x.dtype)


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class PixArtAlphaTextProjection(nn.Module):
    """diffusers `PixArtAlphaTextProjection(act_fn="gelu_tanh")`: linear_1 -> GELU(tanh) -> linear_2."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class WanTimeTextImageEmbedding(nn.Module):
    """Timestep and text conditioning (diffusers' image branch is Wan2.1-I2V only and not ported)."""

    def __init__(self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int):
        super().__init__()
        self.time_freq_dim = time_freq_dim
        self.time_embedder = TimestepEmbedding(time_freq_dim, dim)
        self.time_proj = nn.Linear(dim, time_proj_dim)
        self.text_embedder = PixArtAlphaTextProjection(text_embed_dim, dim)

    def embed_time(self, timestep: mx.array, dtype: mx.Dtype) -> tuple:
        """timestep (B, G) -> temb (B, G, dim) and timestep_proj (B, G, 6 * dim), both in `dtype`."""
        emb = timestep_embedding(timestep, self.time_freq_dim)
        # diffusers keeps time_embedder in float32 and feeds it in its own dtype, then casts temb to the compute dtype.
        temb = self.time_embedder(emb.astype(self.time_embedder.linear_1.weight.dtype)).astype(dtype)
        return temb, self.time_proj(nn.silu(temb))


class AllTokens:
    """The token layout of a process alone: all tokens are its own, so nothing is split or gathered."""

    def own(self, x: mx.array, rope: tuple) -> tuple:
        """(B, groups, tokens, dim) and the rotary tables -> this process's tokens and their tables."""
        return x, rope

    def gather_keys(self, keys: mx.array) -> mx.array:
        """(B, own tokens, heads, head_dim) -> those of every process's tokens."""
        return keys

    def gather_tokens(self, x: mx.array) -> mx.array:
        """(B, groups, own tokens, C) -> (B, groups, tokens, C)."""
        return x

    def block_done(self) -> None:
        """A block's work (or one of its residual steps) was evaluated."""


ALL_TOKENS = AllTokens()


class WanAttention(nn.Module):
    """diffusers `WanAttention` + `WanAttnProcessor`: q/k RMS-normed across all heads, 3-D RoPE in self-attention."""

    tokens = ALL_TOKENS  # self-attention's token layout: WanTransformer.shard sets a group's

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = [nn.Linear(dim, dim)]  # diffusers' to_out.1 is a parameterless Dropout
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x: mx.array) -> mx.array:
        """(B, ..., dim) -> (B, L, heads, head_dim), flattening all token axes into L."""
        return x.reshape(x.shape[0], -1, self.heads, x.shape[-1] // self.heads)

    def _normed_heads(self, x: mx.array, norm: nn.RMSNorm, rope: tuple = None) -> mx.array:
        """Projected queries or keys -> RMS-normed heads (B, L, heads, head_dim), rotated when `rope` is given."""
        if rope is None:
            return self._heads(norm(x))
        return rms_norm_rope(x, norm.weight, norm.eps, rope, self.heads)

    def key_value(self, states: mx.array, rope: tuple = None) -> tuple:
        """Keys and values (B, heads, L, head_dim) of `states` (of every process's tokens, in a group's
        self-attention); cross-attention computes these once per run."""
        k, v = self._normed_heads(self.to_k(states), self.norm_k, rope), self._heads(self.to_v(states))
        k, v = self.tokens.gather_keys(k), self.tokens.gather_keys(v)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, kv: tuple = None, rope: tuple = None) -> mx.array:
        """Self-attention over x's tokens (with `rope`; in a group, x's queries over every process's tokens), or
        cross-attention to precomputed `kv`. Keeps x's shape."""
        q = self._normed_heads(self.to_q(x), self.norm_q, rope)
        k, v = self.key_value(x, rope) if kv is None else kv
        out = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=self.scale)
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(x.shape))


class GELU(nn.Module):
    """diffusers `GELU(approximate="tanh")`, the feed-forward's input projection + activation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: net = [GELU, Dropout, Linear]."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        # The parameterless Identity stands in for diffusers' Dropout so the output layer is named `net.2`.
        self.net = [GELU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


class WanTransformerBlock(nn.Module):
    """diffusers `WanTransformerBlock`: adaLN-modulated self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps)
        self.attn1 = WanAttention(dim, num_heads, eps)
        self.attn2 = WanAttention(dim, num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps)
        self.scale_shift_table = mx.zeros((1, 6, dim))

    def __call__(self, x: mx.array, timestep_proj: mx.array, kv: tuple, rope: tuple) -> mx.array:
        """x (B, G, N, dim): tokens grouped by timestep (G = 1, or one per frame); timestep_proj (B, G, 6, dim)."""
        for step in self.steps():
            x = step(x, timestep_proj, kv, rope)
        return x

    def steps(self) -> tuple:
        """The block's three residual steps, each (x, timestep_proj, kv, rope) -> x; a low-memory run evaluates
        after each one."""
        return self.self_attention, self.cross_attention, self.feed_forward

    def modulation(self, timestep_proj: mx.array, first: int) -> list:
        """Three of the six adaLN terms from `first` on: (shift, scale, gate) of self-attention (0) or of the
        feed-forward (3). Float32 in diffusers (scale_shift_table is kept in float32, temb is upcast)."""
        modulation = self.scale_shift_table.astype(mx.float32) + timestep_proj.astype(mx.float32)
        # only the three terms used are split off: mx.compile fails on a split whose outputs are not all used
        return mx.split(modulation[:, :, first:first + 3], 3, axis=2)

    def self_attention(self, x: mx.array, timestep_proj: mx.array, kv: tuple, rope: tuple) -> mx.array:
        shift, scale, gate = self.modulation(timestep_proj, 0)
        norm_x = modulated_layer_norm(x, scale, shift, self.norm1.eps)
        return (x.astype(mx.float32) + self.attn1(norm_x, rope=rope) * gate).astype(x.dtype)

    def cross_attention(self, x: mx.array, timestep_proj: mx.array, kv: tuple, rope: tuple) -> mx.array:
        # diffusers adds this residual in the compute dtype, not float32
        norm_x = self.norm2(x)
        return x + self.attn2(norm_x, kv=kv)

    def feed_forward(self, x: mx.array, timestep_proj: mx.array, kv: tuple, rope: tuple) -> mx.array:
        shift, scale, gate = self.modulation(timestep_proj, 3)
        norm_x = modulated_layer_norm(x, scale, shift, self.norm3.eps)
        return (x.astype(mx.float32) + self.ffn(norm_x).astype(mx.float32) * gate).astype(x.dtype)


class WanTransformer(nn.Module):
    """diffusers `WanTransformer3DModel`. The loader keeps diffusers' `_keep_in_fp32_modules` parameters float32
    (`loading.TRANSFORMER_FP32_PARAMETERS`); the explicit casts below make the forward correct either way."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.image_dim is not None or config.added_kv_proj_dim is not None:
            raise NotImplementedError("image_dim / added_kv_proj_dim (Wan2.1 image-to-video) are not supported")
        rope_axis_dims(config.attention_head_dim)  # fail early on a head size the rotary embedding cannot split
        self.config = config
        dim = config.inner_dim
        out_channels = config.out_channels * math.prod(config.patch_size)

        self.patch_embedding = nn.Conv3d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(dim, config.freq_dim, 6 * dim, config.text_dim)
        self.blocks = [
            WanTransformerBlock(dim, config.ffn_dim, config.num_attention_heads, config.cross_attn_norm, config.eps)
            for _ in range(config.num_layers)
        ]
        self.norm_out = FP32LayerNorm(dim, config.eps)
        self.proj_out = nn.Linear(dim, out_channels)
        self.scale_shift_table = mx.zeros((1, 2, dim))
        self.tokens = ALL_TOKENS  # whose tokens this process runs: all of them, or a group's share (`shard`)
        self._compiled_blocks = None  # set by compile(): token layout -> each block's compiled steps
        # True: blocks run one ahead (fastest, two blocks' activations); False: each residual step of a block is
        # evaluated on its own (least memory). Set before compile().
        self.block_lookahead = True

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: the patch embedding's (diffusers' pipeline casts its inputs to the transformer dtype)."""
        return self.patch_embedding.weight.dtype

    def compile(self) -> None:
        """Run each block (or, without `block_lookahead`, each of its residual steps) as an `mx.compile`d graph: its
        many float32 elementwise steps (modulation, norms, gates, residuals) fuse into few kernels. The weights are
        captured as constants, so call this after loading. A group's token shares compile theirs on first use."""
        self._compiled_blocks = {}

    def shard(self, tokens=None) -> None:
        """Run the tokens of `tokens`, a group's token share (wan_engine.parallel.share.TokenShare), from the next
        call on; None: all of them again."""
        self.tokens = tokens or ALL_TOKENS
        for block in self.blocks:
            block.attn1.tokens = self.tokens

    def _block_steps(self, block: WanTransformerBlock) -> tuple:
        return (block,) if self.block_lookahead else block.steps()

    def _steps(self) -> list:
        """Each block's steps, compiled (once per token layout: the graphs hold its exchanges) after compile()."""
        if self._compiled_blocks is None:
            return [self._block_steps(block) for block in self.blocks]
        if self.tokens not in self._compiled_blocks:
            self._compiled_blocks[self.tokens] = [[mx.compile(step) for step in self._block_steps(block)]
                                                  for block in self.blocks]
        return self._compiled_blocks[self.tokens]

    def _token_grid(self, num_frames: int, height: int, width: int) -> tuple:
        p_t, p_h, p_w = self.config.patch_size
        return num_frames // p_t, height // p_h, width // p_w

    def rope(self, num_frames: int, height: int, width: int) -> tuple:
        """Rotary tables (rope.rope_tables) for a latent grid (F, H, W)."""
        grid = self._token_grid(num_frames, height, width)
        if max(grid) > self.config.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={self.config.rope_max_seq_len}")
        return rope_tables(self.config.attention_head_dim, grid)

    def embed_text(self, encoder_hidden_states: mx.array) -> mx.array:
        """Text-encoder states (B, L, text_dim) -> context (B, L, dim) in the compute dtype."""
        embedder = self.condition_embedder.text_embedder
        return embedder(encoder_hidden_states.astype(embedder.linear_1.weight.dtype))

    def cross_attention_kv(self, context: mx.array) -> list:
        """Context (B, L, dim) from `embed_text` -> each block's cross-attention (key, value), (B, heads, L, hd)."""
        return [block.attn2.key_value(context) for block in self.blocks]

    def __call__(self, latents: mx.array, timestep: mx.array, context, rope: tuple,
                 block_residual: "BlockResidual | None" = None) -> mx.array:
        """One denoiser evaluation.

        latents: (B, F, H, W, in_channels). timestep: (B,) one per sample, or (B, F // p_t) one per latent frame
        (diffusers' per-token `expand_timesteps` input is constant within a frame, so the timestep embedding and the
        modulation are computed per frame and broadcast over its tokens). context: `cross_attention_kv(...)` output,
        or the `embed_text(...)` array. rope: `self.rope(F, H, W)`. block_residual: a step cache's hold on the
        blocks (`BlockResidual`): they are skipped and its residual added, or they run and it keeps theirs.
        Returns (B, F, H, W, out_channels) in the compute dtype.
        """
        dtype = self.dtype
        batch, num_frames, height, width, _ = latents.shape
        f, h, w = self._token_grid(num_frames, height, width)
        if isinstance(context, mx.array):
            context = self.cross_attention_kv(context)

        x = self.patch_embedding(latents.astype(dtype))  # (B, f, h, w, dim)

        timestep = timestep.reshape(timestep.shape[0], -1)  # (B, G): G = 1, or f frames
        groups = timestep.shape[1]
        if groups not in (1, f):
            raise ValueError(f"timestep has {groups} values per sample; expected 1 or {f} (one per latent frame)")
        temb, timestep_proj = self.condition_embedder.embed_time(timestep, dtype)
        timestep_proj = timestep_proj.reshape(*timestep.shape, 6, -1)  # (B, G, 6, dim)

        x = x.reshape(batch, groups, -1, x.shape[-1])  # (B, G, tokens per group, dim)
        x, rope = self.tokens.own(x, rope)  # this process's tokens of each group, and their rotary positions
        if block_residual is not None and block_residual.skip:
            x = x + block_residual.residual  # diffusers' MagCache head hook: block 0's input + the kept residual
        else:
            entry = x
            x = self._run_blocks(x, timestep_proj, context, rope)
            if block_residual is not None:
                block_residual.residual = x - entry

        # Output norm with the final float32 modulation, projection, unpatchify
        shift, scale = mx.split(self.scale_shift_table.astype(mx.float32) + temb[:, :, None], 2, axis=2)
        x = modulated_layer_norm(x, scale, shift, self.norm_out.eps)
        x = self.proj_out(x)
        x = self.tokens.gather_tokens(x)

        p_t, p_h, p_w = self.config.patch_size
        x = x.reshape(batch, f, h, w, p_t, p_h, p_w, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(batch, f * p_t, h * p_h, w * p_w, -1)

    def _run_blocks(self, x: mx.array, timestep_proj: mx.array, context: list, rope: tuple) -> mx.array:
        """The blocks on x (B, G, N, dim), evaluated piece by piece: a GPU backend keeps every intermediate buffer of
        the work it was given until that work completes, so one graph of all blocks would hold all their activations
        (16 GiB at 1280x704x17). With `block_lookahead` the next block is queued while one runs (two blocks' worth,
        no idle GPU); without, each residual step is evaluated on its own (the largest step's worth). In a group,
        each evaluation holds this process's key / value exchange: the token share hears of its progress."""
        pending = None
        for steps, kv in zip(self._steps(), context):
            for step in steps:
                x = step(x, timestep_proj, kv, rope)
                if not self.block_lookahead:
                    mx.eval(x)
                    self.tokens.block_done()
            if self.block_lookahead:
                mx.async_eval(x)
                if pending is not None:
                    mx.eval(pending)
                    self.tokens.block_done()
                pending = x
        return x


class BlockResidual:
    """A step cache's hold on the transformer's blocks (sampling/magcache.py), one per branch of the guidance pair:
    with `skip`, a call adds `residual` (the blocks' output minus their input, kept from an earlier step) to block
    0's input instead of running the blocks; without, it runs them and keeps their residual here."""

    def __init__(self):
        self.skip = False
        self.residual: mx.array | None = None
