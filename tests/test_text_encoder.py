"""UMT5 encoder and prompt encoding against transformers' UMT5EncoderModel and diffusers' WanPipeline."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.pipelines.wan import pipeline_wan
from mlx.utils import tree_flatten
from wan_engine.model_files.demo import build_tokenizer
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from wan_engine.models import text_encoder
from wan_engine.models.config import TextEncoderConfig
from wan_engine.model_files.loading import TEXT_ENCODER_FP16_KEEP_FP32
from wan_engine.models.text_encoder import (
    UMT5Encoder,
    clamp_inf_fp16,
    encode_prompts,
    prompt_clean,
    relative_position_bucket,
)
from wan_engine.model_files.tokenizer import load_prompt_tokenizer
from wan_engine.model_files.weights import load_into

CONFIGS = {
    # heads x d_kv == d_model, few buckets, short max_distance (sequences reach the log-spaced buckets)
    "small": dict(vocab_size=256, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16),
    # heads x d_kv != d_model, umt5-xxl's bucketing
    "wide": dict(vocab_size=1000, d_model=64, d_kv=16, num_heads=2, num_layers=3, d_ff=96,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128),
}
FP32_ATOL = 2e-5  # float32 round-off on O(1) outputs of a few layers

ODD_PROMPTS = [
    "  A  cat &amp;amp; a dog\n\t baking   a cake ",  # double-escaped entity, runs of whitespace
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39;&nbsp;y",
    "tabs\tand\u00a0nbsp\u3000wide\u2009thin\u2028line",  # Unicode whitespace
    "sep\x1crecord\x1fchars",  # `\s` of `regex` (diffusers) does not match these, `re`'s would; ftfy drops them
    "next\x85line caf\u00c3\u00a9 sch\u00c3\u00b6n",  # NEL and mojibake: ftfy changes them
    "a fairly long prompt that runs well past sixteen tokens so the tokenizer truncates it",
    "",
    "x",
]


def torch_umt5(config: dict, seed: int = 0) -> UMT5EncoderModel:
    """A float32 UMT5EncoderModel with every weight random (layer norms too, so a missing scale shows)."""
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**config, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.2)
            elif name == "shared.weight" or "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
            else:  # linear layers: unit-variance outputs
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def mlx_umt5(model: UMT5EncoderModel, dtype=mx.float32, keep_fp32=()) -> UMT5Encoder:
    ours = UMT5Encoder(TextEncoderConfig.from_dict(model.config.to_dict()))
    return load_into(ours, {k: v.numpy() for k, v in model.state_dict().items()}, dtype, keep_fp32)


def random_batch(vocab_size: int, lengths=(40, 27), seed: int = 1):
    """Random ids, right-padded with id 0 and a 0 mask after each row's length."""
    gen = np.random.default_rng(seed)
    L = max(lengths)
    mask = (np.arange(L)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    input_ids = gen.integers(3, vocab_size, size=(len(lengths), L)) * mask
    return input_ids, mask


def run_torch(model, input_ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids), torch.from_numpy(mask)).last_hidden_state
    return out.float().numpy()


def run_mlx(model, input_ids, mask) -> np.ndarray:
    out = model(mx.array(input_ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("num_buckets,max_distance", [(8, 16), (32, 128), (32, 16)])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
    config = dict(CONFIGS["small"], relative_attention_num_buckets=num_buckets,
                  relative_attention_max_distance=max_distance)
    attention = UMT5EncoderModel(UMT5Config(**config)).encoder.block[0].layer[0].SelfAttention
    relative_position = torch.arange(-1100, 1100)  # beyond 512 tokens either way
    expected = attention._relative_position_bucket(relative_position).numpy()
    ours = relative_position_bucket(mx.array(relative_position.numpy().astype(np.int32)), num_buckets, max_distance)
    np.testing.assert_array_equal(np.array(ours), expected)


def test_parameter_names_are_the_checkpoint_keys(tmp_path):
    model = torch_umt5(CONFIGS["small"])
    model.save_pretrained(tmp_path)
    saved = mx.load(str(tmp_path / "model.safetensors"))
    ours = UMT5Encoder(TextEncoderConfig.from_file(tmp_path / "config.json"))
    assert set(dict(tree_flatten(ours.parameters()))) == set(saved)
    load_into(ours, saved)  # strict on names and shapes
    input_ids, mask = random_batch(256)
    np.testing.assert_array_equal(run_mlx(ours, input_ids, mask), run_mlx(mlx_umt5(model), input_ids, mask))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", CONFIGS)
def test_encoder_matches_transformers_fp32(name, attn_implementation):
    model = torch_umt5(CONFIGS[name])
    model.set_attn_implementation(attn_implementation)
    input_ids, mask = random_batch(CONFIGS[name]["vocab_size"])
    expected = run_torch(model, input_ids, mask)
    ours = run_mlx(mlx_umt5(model), input_ids, mask)
    assert np.abs(ours - expected).max() < FP32_ATOL  # every position, padded ones included


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("torch_dtype,dtype", [(torch.bfloat16, mx.bfloat16), (torch.float16, mx.float16)])
def test_encoder_half_precision_follows_transformers(tmp_path, torch_dtype, dtype, attn_implementation):
    """In half precision we should sit as close to transformers as transformers sits to its own float32 result.

    transformers' `from_pretrained` keeps `wo` in float32 when loading float16 (not bfloat16), so the residual
    stream turns float32 after the first feed-forward; our loader keeps the same weights in float32.
    (With eager attention in bfloat16 on the CPU we match transformers bit for bit; the bar allows other devices.)
    """
    model = torch_umt5(CONFIGS["wide"])
    input_ids, mask = random_batch(CONFIGS["wide"]["vocab_size"])
    reference = run_torch(model, input_ids, mask)
    keep_fp32 = TEXT_ENCODER_FP16_KEEP_FP32 if dtype == mx.float16 else ()
    out = mlx_umt5(model, dtype, keep_fp32)(mx.array(input_ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    assert out.dtype == dtype

    model.save_pretrained(tmp_path)
    half = UMT5EncoderModel.from_pretrained(tmp_path, dtype=torch_dtype, attn_implementation=attn_implementation)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == (
        torch.float32 if torch_dtype == torch.float16 else torch_dtype
    )
    expected = run_torch(half, input_ids, mask)
    transformers_error = np.abs(expected - reference).max()
    assert np.abs(np.array(out.astype(mx.float32)) - expected).max() <= transformers_error


def test_clamp_inf_fp16_matches_transformers():
    values = np.array([[1.0, 65504.0, -65504.0, 3.0], [np.inf, -np.inf, 65000.0, -2.0]], np.float16)
    for x in (values[:1], values):
        hidden_states = torch.from_numpy(x)
        max_dtype = torch.finfo(hidden_states.dtype).max  # transformers' UMT5Block, verbatim
        clamp_value = torch.where(torch.isinf(hidden_states).any(), max_dtype - 1000, max_dtype)
        expected = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        ours = clamp_inf_fp16(mx.array(x))
        assert ours.dtype == mx.float16
        np.testing.assert_array_equal(np.array(ours), expected.numpy())


@pytest.mark.parametrize("use_ftfy", [True, False])
@pytest.mark.parametrize("prompt", ODD_PROMPTS)
def test_prompt_clean_matches_diffusers(prompt, use_ftfy, monkeypatch):
    # Both use ftfy only when it is installed; try each way (the ftfy way needs it installed).
    ftfy = pytest.importorskip("ftfy") if use_ftfy else None
    monkeypatch.setattr(text_encoder, "ftfy", ftfy)
    monkeypatch.setattr(pipeline_wan, "ftfy", ftfy, raising=False)
    monkeypatch.setattr(pipeline_wan, "is_ftfy_available", lambda: use_ftfy)
    assert prompt_clean(prompt) == pipeline_wan.prompt_clean(prompt)


@pytest.mark.parametrize("max_length", [16, 512])
def test_encode_prompts_matches_diffusers(tmp_path, max_length):
    build_tokenizer(320, tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    model = torch_umt5(dict(CONFIGS["small"], vocab_size=320))

    # `_get_t5_prompt_embeds` only reads these attributes of the pipeline.
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        expected = pipeline_wan.WanPipeline._get_t5_prompt_embeds(
            pipe, prompt=ODD_PROMPTS, max_sequence_length=max_length
        ).numpy()
    kept = load_prompt_tokenizer(tmp_path / "tokenizer", tmp_path / "tokenizers")  # the engine's tokenizer
    ours = encode_prompts(mlx_umt5(model), kept, ODD_PROMPTS, max_length=max_length)
    ours = np.array(ours)

    assert ours.shape == expected.shape == (len(ODD_PROMPTS), max_length, 32)
    real_rows = np.any(expected != 0, axis=-1)
    np.testing.assert_array_equal(np.any(ours != 0, axis=-1), real_rows)  # identical lengths and zero padding
    assert real_rows[ODD_PROMPTS.index("")].sum() == 1  # just </s>
    if max_length == 16:
        assert real_rows[ODD_PROMPTS.index(ODD_PROMPTS[4])].all()  # the long prompt was truncated
    assert np.abs(ours - expected).max() < FP32_ATOL
