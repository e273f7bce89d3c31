"""The offline demo model: a tiny random Wan2.2 TI2V of the real architecture, in the Diffusers layout.

Built on first use with numpy, safetensors and tokenizers (no torch, no download), deterministically, and cached
on disk. It goes through exactly the loading and generation code the real model does, and makes a short clip in
seconds on a laptop CPU. Its weights are random, so its videos are noise-like: it demonstrates the app, not the
model.
"""

import hashlib
import json
import logging
import math
import shutil
import string
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from .cache_files import cache_root, partial_name, stale_partials
from ..models.config import TextEncoderConfig, TransformerConfig, VAEConfig
from .weights import to_diffusers_layout

log = logging.getLogger("wan_engine")
DEMO_VERSION = 3  # 2: with a manifest of checksums; 3: with a tiny decoder
MANIFEST = "MANIFEST.json"
DEMO_NOTICE = "demo model: random weights, so the video is noise-like; it shows the app working, not Wan2.2"

TRANSFORMER = dict(
    patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48,
    text_dim=64, freq_dim=64, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
VAE = dict(
    base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)
TEXT_ENCODER = dict(
    d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, model_type="umt5", architectures=["UMT5EncoderModel"],
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
)
SCHEDULER = dict(
    _class_name="UniPCMultistepScheduler", num_train_timesteps=1000, solver_order=2,
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, solver_type="bh2",
    lower_order_final=True, final_sigmas_type="zero", predict_x0=True,
)
MODEL_INDEX = {
    "_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": None, "expand_timesteps": True,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": [None, None], "vae": ["diffusers", "AutoencoderKLWan"],
}
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2, as in T5's / UMT5's vocabulary


def build_tokenizer(vocab_size: int, path=None):
    """A small T5-like tokenizer: SentencePiece-style Unigram over single characters and `▁`-prefixed letters
    and letter pairs. Like T5's: `▁` marks a word start (so runs of spaces yield extra `▁` tokens), unknown
    characters become `<unk>`, and `</s>` ends every sequence. Saved to `path` (if given) as a folder that
    `AutoTokenizer.from_pretrained(path)` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    pieces = [PAD, EOS, UNK, "▁"] + alphabet
    pieces += ["▁" + a for a in string.ascii_lowercase]
    pieces += ["▁" + a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    if vocab_size < 4 + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is too small for the base alphabet")
    # Equal scores per piece: the segmentation with the fewest pieces wins, so pairs beat single letters.
    vocab = [(piece, -1.0) for piece in pieces[:vocab_size]]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    if path is not None:
        wrapped.save_pretrained(path)
    return wrapped


def random_weights(module, rng: np.random.Generator) -> dict:
    """Diffusers-layout float32 weights for every parameter of `module`: fan-in scaled normals for matrices and
    kernels, ones for norm scales, small normals for biases and tables."""
    weights = {}
    for key, param in tree_flatten(module.parameters()):
        shape = tuple(param.shape)
        if key.endswith((".gamma",)) or "norm" in key and key.endswith(".weight"):
            value = np.ones(shape)
        elif key.endswith(".weight") and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
            if key == "shared.weight":
                value = rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) * 0.05
        weights[key] = to_diffusers_layout(key, value.astype(np.float32))
    return weights


def save_sharded(weights: dict, folder: Path, stem: str, shards: int) -> None:
    """Save like `save_pretrained` does: `stem-0000i-of-0000n.safetensors` plus `stem.safetensors.index.json`."""
    from safetensors.numpy import save_file

    keys = list(weights)
    per_shard = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i * per_shard:(i + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_demo_snapshot(root: Path, seed: int = 0) -> None:
    """Write the demo snapshot into the (empty) folder `root`."""
    import mlx.core as mx

    from ..models.text_encoder import UMT5Encoder
    from ..models.transformer import WanTransformer
    from ..models.vae import WanVAE

    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer(800, root / "tokenizer")
    text_config = {**TEXT_ENCODER, "vocab_size": len(tokenizer)}
    parts = {
        "text_encoder": (text_config, UMT5Encoder(TextEncoderConfig.from_dict(text_config)), "model", 1),
        "transformer": (TRANSFORMER, WanTransformer(TransformerConfig.from_dict(TRANSFORMER)), "diffusion_pytorch_model", 2),
        "vae": (VAE, WanVAE(VAEConfig.from_dict(VAE)), "diffusion_pytorch_model", 2),
    }
    for name, (config, module, stem, shards) in parts.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_sharded(random_weights(module, rng), folder, stem, shards)
        del module
        mx.clear_cache()
    write_tiny_decoder(root / "tiny_decoder", rng)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (root / "DEMO.txt").write_text(DEMO_NOTICE + "\n")


def write_tiny_decoder(folder: Path, rng: np.random.Generator) -> None:
    """A random TAEW2.2 decoder (narrow: widths 32, 16, 8, 8) in the published layout."""
    from safetensors.numpy import save_file

    from ..models.taehv import WEIGHTS_FILE, TAEHVConfig, TAEHVDecoder

    weights = random_weights(TAEHVDecoder(TAEHVConfig(widths=(32, 16, 8, 8))), rng)  # torch's kernel order
    weights["decoder.22.bias"] += 0.5  # frames around mid-grey, as a trained decoder's are
    folder.mkdir()
    save_file({key: np.ascontiguousarray(value) for key, value in weights.items()}, str(folder / WEIGHTS_FILE))


def file_digests(root: Path) -> dict:
    """sha256 of every file under `root` but the manifest itself, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST
    }


def is_intact(root: Path) -> bool:
    """Whether the built demo model is whole: its manifest lists exactly its files, with their checksums."""
    try:
        return json.loads((root / MANIFEST).read_text()) == file_digests(root)
    except (OSError, ValueError):
        return False


def ensure_demo_model() -> Path:
    """The demo snapshot's folder, built on first use (into a partial folder, renamed when complete) and
    checked against its manifest on every use: a damaged copy (a file cut short or changed) is built again."""
    root = cache_root() / f"demo-v{DEMO_VERSION}"
    if root.is_dir():
        if is_intact(root):
            return root
        log.warning("the demo model in %s is damaged: building it again", root)
        shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    for abandoned, _ in stale_partials(root.parent):  # builds whose process was killed
        if abandoned.is_dir():
            shutil.rmtree(abandoned, ignore_errors=True)
    staging = partial_name(root)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_demo_snapshot(staging)
        (staging / MANIFEST).write_text(json.dumps(file_digests(staging), indent=2))
        try:
            staging.rename(root)
        except OSError:  # another process finished first: use its copy
            if not is_intact(root):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
