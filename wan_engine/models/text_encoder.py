"""UMT5 text encoder (Wan's umt5-xxl) and the prompt encoding of diffusers' `WanPipeline._get_t5_prompt_embeds`.

A port of transformers' `UMT5EncoderModel` (models/umt5/modeling_umt5.py). Class and attribute names follow it, so
the parameter names are the checkpoint keys (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...).
Unlike T5, UMT5 has a relative-position bias table in every layer, not just the first one.

Dtypes follow transformers op for op: the layer norm takes its statistics in float32 and rounds back to the weight
dtype, the feed-forward input is cast to `wo`'s dtype, and float16 activations are clamped after each sub-layer.
"""

import html
import math

import mlx.core as mx
import mlx.nn as nn
import regex  # diffusers cleans prompts with `regex`, whose `\s` differs from `re`'s (e.g. U+001C-U+001F)

from .config import TextEncoderConfig

try:  # diffusers fixes mojibake with ftfy only when it is installed; so do we
    import ftfy
except ImportError:
    ftfy = None


# ---------------------------------------------------------------------------------------------------------------
# Prompt cleaning: diffusers' pipeline_wan.basic_clean / whitespace_clean / prompt_clean, copied.


def basic_clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return regex.sub(r"\s+", " ", text).strip()


def prompt_clean(text: str) -> str:
    return whitespace_clean(basic_clean(text))


# ---------------------------------------------------------------------------------------------------------------
# Model


def gelu_new(x: mx.array) -> mx.array:
    """transformers' `NewGELUActivation`, the tanh approximation:
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))), rounded op for op as torch rounds it.
    """

    def times(constant: float, y: mx.array) -> mx.array:
        # torch multiplies a half-precision tensor by a Python float in float32 and rounds the product once; MLX
        # would round the constant to half precision first. (0.5 and 1.0 are exact, so they need no care.)
        return (constant * y.astype(mx.float32)).astype(y.dtype)

    cube = x * x * x  # torch's CPU kernel computes pow(x, 3.0) as x * x * x, rounding each product
    return 0.5 * x * (1.0 + mx.tanh(times(math.sqrt(2.0 / math.pi), x + times(0.044715, cube))))


def clamp_inf_fp16(hidden_states: mx.array) -> mx.array:
    """transformers' float16 overflow guard: clamp to the largest finite value (1000 lower if anything is inf)."""
    if hidden_states.dtype != mx.float16:
        return hidden_states
    max_dtype = mx.finfo(mx.float16).max
    clamp_value = mx.where(mx.isinf(hidden_states).any(), max_dtype - 1000, max_dtype).astype(mx.float16)
    return mx.clip(hidden_states, -clamp_value, clamp_value)


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """T5's bidirectional bucketing of `memory_position - query_position` (UMT5Attention._relative_position_bucket).

    Half the buckets are for keys after the query, half for keys before. Within each half, distances below
    `max_exact` get a bucket each and larger ones share log-spaced buckets up to `max_distance`. The float32 log and
    the truncating cast are as in transformers, so the bucket boundaries land on the same integers.
    """
    num_buckets //= 2
    relative_buckets = (relative_position > 0).astype(mx.int32) * num_buckets
    relative_position = mx.abs(relative_position)

    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # log(0) = -inf at distance 0 is harmless: `is_small` picks the exact bucket there.
    log_ratio = mx.log(relative_position.astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    relative_position_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(mx.int32)
    relative_position_if_large = mx.minimum(relative_position_if_large, num_buckets - 1)
    return relative_buckets + mx.where(is_small, relative_position, relative_position_if_large)


class UMT5LayerNorm(nn.Module):
    """T5's RMS norm: no mean, no bias; statistics in float32, rounded to a half-precision weight's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((hidden_size,))
        self.variance_epsilon = eps

    def __call__(self, hidden_states: mx.array) -> mx.array:
        # Written out rather than mx.fast.rms_norm: when `wo` is kept in float32 (float16 loads) the input is
        # float32 but the weight half, and transformers rounds to the weight's dtype before scaling.
        variance = mx.mean(mx.square(hidden_states.astype(mx.float32)), axis=-1, keepdims=True)
        hidden_states = hidden_states * mx.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (mx.float16, mx.bfloat16):
            hidden_states = hidden_states.astype(self.weight.dtype)
        return self.weight * hidden_states


class UMT5Attention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.n_heads = config.num_heads
        self.key_value_proj_dim = config.d_kv
        inner_dim = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, inner_dim, bias=False)
        self.o = nn.Linear(inner_dim, config.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def __call__(self, hidden_states: mx.array, position_buckets: mx.array, attention_mask: mx.array) -> mx.array:
        B, L, _ = hidden_states.shape

        def heads(x):  # (B, L, H * D) -> (B, H, L, D)
            return x.reshape(B, L, self.n_heads, self.key_value_proj_dim).transpose(0, 2, 1, 3)

        query, key, value = heads(self.q(hidden_states)), heads(self.k(hidden_states)), heads(self.v(hidden_states))
        position_bias = self.relative_attention_bias(position_buckets).transpose(2, 0, 1)[None]  # (1, H, L, L)
        # T5 does not scale q.k by 1/sqrt(d) (its initialisation accounts for it); the bias and the padding mask
        # are added to the scores.
        out = mx.fast.scaled_dot_product_attention(query, key, value, scale=1.0, mask=position_bias + attention_mask)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class UMT5LayerSelfAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.SelfAttention = UMT5Attention(config)
        self.layer_norm = UMT5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, hidden_states, position_buckets, attention_mask):
        return hidden_states + self.SelfAttention(self.layer_norm(hidden_states), position_buckets, attention_mask)


class UMT5DenseGatedActDense(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        hidden_states = gelu_new(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        # transformers may keep `wo` in float32 (`_keep_in_fp32_modules`); its input follows the weight's dtype
        # (a quantized `wo` packs its weight as uint32: its scales carry the dtype).
        return self.wo(hidden_states.astype(getattr(self.wo, "scales", self.wo.weight).dtype))


class UMT5LayerFF(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.DenseReluDense = UMT5DenseGatedActDense(config)
        self.layer_norm = UMT5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class UMT5Block(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layer = [UMT5LayerSelfAttention(config), UMT5LayerFF(config)]

    def __call__(self, hidden_states, position_buckets, attention_mask):
        hidden_states = clamp_inf_fp16(self.layer[0](hidden_states, position_buckets, attention_mask))
        return clamp_inf_fp16(self.layer[1](hidden_states))


class UMT5Stack(nn.Module):
    """The encoder stack. Its token embedding is the top-level `shared` (transformers ties `embed_tokens` to it)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.block = [UMT5Block(config) for _ in range(config.num_layers)]
        self.final_layer_norm = UMT5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, inputs_embeds: mx.array, attention_mask: mx.array) -> mx.array:
        L = inputs_embeds.shape[1]
        # Every layer has its own bias table, but the bucket of each (query, key) pair is the same for all.
        positions = mx.arange(L)
        position_buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        # Padded keys get the dtype's most negative value added to their scores, as in transformers' eager mask.
        key_is_real = (attention_mask > 0)[:, None, None, :]  # (B, 1, 1, L)
        additive_mask = mx.where(key_is_real, 0.0, mx.finfo(inputs_embeds.dtype).min).astype(inputs_embeds.dtype)

        hidden_states = inputs_embeds
        for layer_module in self.block:
            # Layer by layer: a GPU backend keeps a graph's intermediates (here each layer's attention scores and
            # position bias) until the graph's work completes.
            hidden_states = layer_module(hidden_states, position_buckets, additive_mask)
            mx.eval(hidden_states)
        return self.final_layer_norm(hidden_states)


class UMT5Encoder(nn.Module):
    """transformers' `UMT5EncoderModel`: `(input_ids (B, L), attention_mask (B, L)) -> last_hidden_state`."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.feed_forward_proj != "gated-gelu":
            raise ValueError(f"only UMT5's gated-gelu feed-forward is supported, got {config.feed_forward_proj!r}")
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = UMT5Stack(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        return self.encoder(self.shared(input_ids), attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding. `tokenizer`: a model_files.tokenizer.PromptTokenizer (its `count` and `batch`).


def count_tokens(tokenizer, prompt: str) -> int:
    """How many tokens `prompt` has after cleaning, with its end-of-text token, before any cut to the model's
    length (encode_prompts keeps the first max_length)."""
    return tokenizer.count(prompt_clean(prompt))


def encode_prompts(model: UMT5Encoder, tokenizer, prompts: list[str],
                   max_length: int = 512) -> mx.array:
    """diffusers' `WanPipeline._get_t5_prompt_embeds`: (B, max_length, d_model) embeddings, zero past each prompt."""
    input_ids, mask = (mx.array(a) for a in tokenizer.batch([prompt_clean(p) for p in prompts], max_length))
    prompt_embeds = model(input_ids, mask)
    # diffusers keeps the first `seq_len` rows of each prompt (seq_len = real tokens) and zero-pads the rest.
    seq_lens = (mask > 0).sum(axis=1)
    keep = mx.arange(max_length)[None, :] < seq_lens[:, None]
    return mx.where(keep[..., None], prompt_embeds, mx.zeros((), prompt_embeds.dtype))
