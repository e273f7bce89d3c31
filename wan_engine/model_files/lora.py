"""LoRA adapters on the transformer: read as diffusers 0.42.1's Wan loader reads them, fused into the weights.

Formats. diffusers' `WanLoraLoaderMixin.load_lora_weights` (loaders/lora_pipeline.py, lora_conversion_utils.py,
peft.py) tells three layouts apart by their keys, and so do we:
- a key starts with `diffusion_model.`: the original Wan module names (ComfyUI, Kijai's wrapper, lightx2v), e.g.
  `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` (or `.lora_A` / `.lora_B`), an
  optional `.alpha` (the update is scaled by alpha / rank), `.diff_b` (added to the layer's bias) and `.diff` (a full
  weight update: diffusers applies `head.head.diff` only and drops the others, the norms' included);
- a key starts with `lora_unet_`: musubi-tuner / kohya, the same names with `_` for `.`, e.g.
  `lora_unet_blocks_0_self_attn_q.lora_down.weight`, with `.alpha`;
- otherwise diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`
  (and diffusers' older `.lora.down` / `.to_q_lora.up` names). The file's `lora_adapter_metadata` (peft's LoraConfig:
  r, lora_alpha, rank and alpha patterns, rsLoRA) scales each layer by alpha / r; without it the scale is 1.
Keys that diffusers drops are dropped here too and counted in the load message: other parts' (`text_encoder.`),
DoRA's `dora_scale`, the full `.diff` updates above, `time_projection` biases of a file without its LoRA weights.
Anything else that maps onto no layer of this transformer, or does not fit it, is refused with a `WanError`
naming the file and the key, before any weight changes.

Strength, as `pipe.set_adapters(names, adapter_weights=strengths)`: each adapter adds strength * scale * up @ down
to a layer's weight and strength * scale * bias to its bias, in the order given.

Fusing. Steps cost what they cost without a LoRA because the updates are added to the weights. A changed layer is
reloaded from the snapshot's files (`mx.load` maps them lazily, so only that layer is read) and its checkpoint
tensors plus the updates, in float32, are loaded as loading loads the checkpoint: cast to the model's dtype, and
quantized when the layer is. Changing the adapter set reloads the layers the old set changed the same way, without
updates, so they hold exactly what a fresh load gives (subtracting the update back would not be exact in bfloat16).
One layer is converted at a time: the transformer never exists twice.

Quantized layers (q8 / q4, the low-RAM preset or a package): from a full-precision snapshot the fused layer is
quantize(W + update), one quantization as without a LoRA. From a package that stores the layer quantized, the
weights the model computes with are dequantized first: quantize(dequantize(Wq) + update) with the layer's bits and
group size, a second rounding of at most half a quantization step. Both cost one dequantize or read, one matrix
product (out x rank x in) and one quantize per changed layer, once per adapter-set change, and no memory beyond
that layer.
"""

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import WanError
from .hub import download_file, looks_like_hub_file
from .loading import check_safetensors
from .weights import (
    OLD_DIFFUSERS_LORA_NAMES, musubi_layer_name, rename_key, to_diffusers_layout, to_mlx_layout, wan_layer_name,
)

FORMATS = (
    "diffusers/PEFT 'transformer.<layer>.lora_A.weight / lora_B.weight / lora_B.bias', musubi-tuner/kohya "
    "'lora_unet_<module>.lora_down.weight / lora_up.weight / alpha', or ComfyUI/original Wan "
    "'diffusion_model.<module>.lora_down.weight / lora_up.weight / lora_A.weight / lora_B.weight / alpha / diff / "
    "diff_b'"
)
DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "bias"}
WAN_PARTS = {
    "lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
    "alpha": "alpha", "diff": "weight", "diff_b": "bias",
}
IGNORED = None  # what a key's parser returns for keys that diffusers drops


class UnreadableKey(Exception):
    """A key that no format can read, or that names no layer of this transformer; the message says why."""


@dataclass
class LayerUpdate:
    """What one file does to one layer, in PyTorch layout: weight += scale * alpha / rank * up @ down (or + scale *
    a full weight update), bias += scale * bias (diffusers folds alpha / rank into up and down, not into the bias).
    `keys` names the file's key behind each part, for messages."""

    keys: dict = field(default_factory=dict)  # part -> key
    tensors: dict = field(default_factory=dict)  # part -> array: up (out, rank[, 1, 1, 1]), down (rank, in[, k...]),
    # weight (a full update), bias (out,), alpha (one number)
    scale: float = 1.0  # peft's lora_alpha / r from the file's LoraConfig

    def weight_update(self):
        """scale * up @ down (the kernel shape for a convolution), or scale * the full update; float32, lazy."""
        parts = self.tensors
        if "weight" in parts:
            return self.scale * parts["weight"].astype(mx.float32)
        if "down" not in parts:
            return None
        up, down = parts["up"].astype(mx.float32), parts["down"].astype(mx.float32)
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (self.scale * alpha_scale(self) * product).reshape(up.shape[0], *down.shape[1:])

    def bias_update(self):
        return self.scale * self.tensors["bias"].astype(mx.float32) if "bias" in self.tensors else None


@dataclass
class Lora:
    name: str  # the reference as given: a path, or `owner/repo/path/in/repo` on the Hub
    path: Path
    sha256: str
    strength: float
    layers: dict  # our layer path -> LayerUpdate
    ignored: list  # keys diffusers drops too

    def record(self) -> dict:
        """What a video's settings say about this LoRA, so that the CLI reproduces the video."""
        return {"name": self.name, "sha256": self.sha256, "strength": self.strength}


@dataclass(frozen=True)
class AdapterSet:
    """The LoRAs a loaded transformer holds fused ((sha256, strength) in order) and the layers they changed."""

    identity: tuple = ()
    layers: frozenset = frozenset()


def adapter_set(loras: list) -> AdapterSet:
    return AdapterSet(tuple((lora.sha256, lora.strength) for lora in loras),
                      frozenset(layer for lora in loras for layer in lora.layers))


# -- reading --------------------------------------------------------------------------------------------------------
def parse_lora(argument: str, folder: Path | None = None) -> tuple[str, float]:
    """"REF[:STRENGTH]" (the CLI's --lora, an item of the app's `loras`) -> (REF, STRENGTH), 1.0 when no strength
    is given. An existing file's name is taken whole, even with ':' in it. `folder` (the app's loras/ folder): a
    REF naming a file in it becomes that file's path."""
    reference, colon, strength = argument.rpartition(":")
    if Path(argument).expanduser().is_file() or not colon:
        reference, strength = argument, "1"
    try:
        value = float(strength)
    except ValueError:
        reference, value = argument, 1.0  # a ':' that is part of the name; read_lora says if no such file exists
    if folder is not None and reference and (Path(folder) / reference).is_file():
        reference = str(Path(folder) / reference)
    return reference, value


def resolve(reference: str, progress=None) -> Path:
    """A LoRA file: a local path as given (even one holding ':'), else a Hub file `owner/repo/path/in/repo`."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise WanError(f"LoRA {reference} is a folder: give its .safetensors file")
    if looks_like_hub_file(reference):
        return download_file(reference, progress)
    raise WanError(f"LoRA {reference}: no such file, and not a Hub file written owner/repo/path/in/repo.safetensors")


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached by size and modification time: a LoRA used run after run is hashed once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def transformer_shapes(config) -> dict:
    """Parameter name -> shape in PyTorch layout, from a transformer built lazily from `config` (nothing computed)."""
    from ..models.transformer import WanTransformer

    return {key: tuple(to_diffusers_layout(key, value).shape)
            for key, value in tree_flatten(WanTransformer(config).parameters())}


def read_lora(reference, strength: float, shapes: dict, progress=None) -> Lora:
    """Read one LoRA file and check every key against the transformer's parameter `shapes` (`transformer_shapes`).
    Raises WanError naming the file and the first offending key; reads no weight beyond the file's header."""
    name = str(reference)
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        strength = math.nan
    if not math.isfinite(strength):
        raise WanError(f"LoRA {name}: its strength is not allowed: it must be a finite number (1.0: as trained)")
    path = resolve(name, progress)
    header = check_safetensors(path)
    try:
        tensors = mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as e:
        raise WanError(f"LoRA {name} cannot be read: {e}") from None
    keys = sorted(tensors)
    if not keys:
        raise WanError(f"LoRA {name} holds no tensors: it is not a LoRA of any format ({FORMATS})")
    parse = key_parser(keys)
    layers, ignored = {}, []
    for key in keys:
        try:
            entry = parse(key)
        except UnreadableKey as why:
            raise WanError(f"LoRA {name}: key {key!r} {why}; allowed: {FORMATS}") from None
        if entry is IGNORED:
            ignored.append(key)
            continue
        layer, part = entry
        update = layers.setdefault(layer, LayerUpdate())
        if part in update.keys:
            raise WanError(f"LoRA {name}: keys {update.keys[part]!r} and {key!r} are both the {part} of {layer}")
        update.keys[part], update.tensors[part] = key, tensors[key]
    if not layers:
        raise WanError(f"LoRA {name} holds no weights for this transformer (its first key is {keys[0]!r}); "
                       f"allowed: {FORMATS}")
    config = peft_config(header, name)
    for layer, update in layers.items():
        check_update(name, layer, update, shapes)
        update.scale = peft_scaling(config, layer)
    if config and not config.get("lora_bias", False):  # peft makes no bias for lora_B then: diffusers drops them
        for layer, update in layers.items():
            if "bias" in update.tensors:
                ignored.append(update.keys.pop("bias"))
                del update.tensors["bias"]
    return Lora(name, path, file_sha256(path), strength, layers, ignored)


def key_parser(keys: list):
    """The function that maps one key of this file to (our layer, part), IGNORED, or raises UnreadableKey; the
    format is chosen from all the keys, as diffusers chooses it."""
    if any(key.startswith("diffusion_model.") for key in keys):
        modules = [key.removeprefix("diffusion_model.") for key in keys]
        return functools.partial(wan_entry, prefix="diffusion_model.", to_wan_name=lambda module: module,
                                 time_projection_lora=has_time_projection_lora(modules))
    if any(key.startswith("lora_unet_") for key in keys):
        return functools.partial(wan_entry, prefix="lora_unet_", to_wan_name=musubi_layer_name,
                                 time_projection_lora=True)
    return diffusers_entry


def has_time_projection_lora(modules: list) -> bool:
    """diffusers drops `time_projection` keys (AccVideo's biases) unless the file holds its LoRA weights."""
    return any(m.startswith("time_projection") and m.endswith(".weight") for m in modules)


def diffusers_entry(key: str):
    if "lora" not in key:
        raise UnreadableKey("is not a LoRA key (diffusers' Wan loader wants 'lora' in every key)")
    key = rename_key(key, OLD_DIFFUSERS_LORA_NAMES)
    if not key.startswith("transformer.") or "dora_scale" in key:
        return IGNORED  # another part's, or DoRA's scale, which diffusers drops
    if "lora_magnitude_vector" in key:
        raise UnreadableKey("belongs to a DoRA adapter: only LoRA updates are fused here")
    match = re.fullmatch(r"transformer\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", key)
    if not match:
        raise UnreadableKey("is not a LoRA weight of a transformer layer")
    return match[1], DIFFUSERS_PARTS[match[2]]


def wan_entry(key: str, prefix: str, to_wan_name, time_projection_lora: bool):
    """A key in the original Wan names (`prefix` `diffusion_model.`) or musubi-tuner's (`lora_unet_`)."""
    match = re.fullmatch(rf"{re.escape(prefix)}(.+?)\.({'|'.join(map(re.escape, WAN_PARTS))})", key)
    module = match and to_wan_name(match[1])
    if not module:
        raise UnreadableKey(f"is not '{prefix}<module>.<part>' with a part of {', '.join(WAN_PARTS)}")
    part = WAN_PARTS[match[2]]
    layer = wan_layer_name(module)
    full_update = part in ("weight", "bias")
    if full_update and ("norm" in module or layer is None):
        return IGNORED  # diffusers drops norms' updates (zeros in the files it met) and those of unmapped layers
    if part == "weight" and module != "head.head":
        return IGNORED  # diffusers applies no full weight update but the head's
    if module.startswith("time_projection") and not time_projection_lora:
        return IGNORED
    if layer is None:
        raise UnreadableKey(f"adapts {module}, a module diffusers maps onto no transformer layer")
    return layer, part


def peft_config(header: dict, name: str) -> dict | None:
    """The transformer's LoRA config that diffusers saves in the file (`lora_adapter_metadata`), or None."""
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise WanError(f"LoRA {name}: its lora_adapter_metadata is not valid JSON") from None
    config = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    if config.get("use_dora"):
        raise WanError(f"LoRA {name} is a DoRA adapter (use_dora in its metadata): only LoRA updates are fused here")
    return config or None


def pattern_value(patterns: dict, layer: str, default):
    """peft's `get_pattern_key`: the first pattern that matches the end of `layer` at a dot, else the default."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default


def peft_scaling(config: dict | None, layer: str) -> float:
    """lora_alpha / r of `layer` (peft's LoraConfig defaults: 8 and 8); 1 without a config, as diffusers then makes
    every module's alpha equal its rank."""
    if config is None:
        return 1.0
    rank = pattern_value(config.get("rank_pattern") or {}, layer, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def alpha_scale(update: LayerUpdate) -> float:
    """kohya's alpha / rank, which diffusers folds into the weights; 1 without an alpha."""
    if "alpha" not in update.tensors:
        return 1.0
    return float(update.tensors["alpha"].astype(mx.float32).item()) / update.tensors["down"].shape[0]


def check_update(name: str, layer: str, update: LayerUpdate, shapes: dict) -> None:
    """Every part of `update` fits `layer` of the transformer, or WanError naming the first key that does not."""
    first_key = min(update.keys.values())
    weight_shape = shapes.get(f"{layer}.weight")
    if weight_shape is None:
        raise WanError(f"LoRA {name}: key {first_key!r} adapts {layer}, which this transformer does not have "
                       "(is the LoRA for another model?)")
    parts = update.tensors
    if ("up" in parts) != ("down" in parts) or ("alpha" in parts and "down" not in parts):
        present = ", ".join(sorted(parts))
        raise WanError(f"LoRA {name}: key {first_key!r}: {layer} has {present} but a LoRA needs both its down (A) and "
                       "up (B) matrices")
    out_dim, in_shape = weight_shape[0], weight_shape[1:]
    kernel = (1,) * len(in_shape[1:])  # a convolution's up matrix is a 1x1x1 kernel
    if "down" in parts:
        down, up = parts["down"], parts["up"]
        if down.ndim != 1 + len(in_shape) or tuple(down.shape[1:]) != in_shape:
            raise shape_error(name, update.keys["down"], down, f"(rank, {', '.join(map(str, in_shape))})", layer)
        if up.ndim != 2 + len(kernel) or up.shape[0] != out_dim or tuple(up.shape[2:]) != kernel:
            raise shape_error(name, update.keys["up"], up, f"({out_dim}, rank{', 1' * len(kernel)})", layer)
        if up.shape[1] != down.shape[0]:
            raise WanError(f"LoRA {name}: key {update.keys['up']!r} has rank {up.shape[1]} but "
                           f"{update.keys['down']!r} has rank {down.shape[0]}: up (B) is (out, rank), down (A) "
                           "(rank, in), with the same rank")
    if "alpha" in parts and parts["alpha"].size != 1:
        raise shape_error(name, update.keys["alpha"], parts["alpha"], "one number", layer)
    if "weight" in parts and tuple(parts["weight"].shape) != weight_shape:
        raise shape_error(name, update.keys["weight"], parts["weight"], str(weight_shape), layer)
    if "bias" in parts and (parts["bias"].shape != (out_dim,) or f"{layer}.bias" not in shapes):
        raise shape_error(name, update.keys["bias"], parts["bias"], f"({out_dim},)", layer)


def shape_error(name: str, key: str, value, allowed: str, layer: str) -> WanError:
    return WanError(f"LoRA {name}: key {key!r} has shape {tuple(value.shape)}, {layer} needs {allowed} "
                    "(is the LoRA for another model?)")


# -- fusing ---------------------------------------------------------------------------------------------------------
def fuse(snapshot, model, dtype, loras: list, previous: AdapterSet):
    """Give the loaded transformer `model` the snapshot's weights plus `loras`' updates (see the module docstring):
    the layers the LoRAs change and those `previous` changed are reloaded, one at a time. A generator of
    (done, total) layers; afterwards the model holds `adapter_set(loras)`."""
    checkpoint, _, channels_last = snapshot.read("transformer")
    modules = dict(model.named_modules())
    layers = sorted(adapter_set(loras).layers | previous.layers)
    for done, layer in enumerate(layers, start=1):
        names = [f"{layer}.{part}" for part in ("weight", "bias", "scales", "biases")]
        # popped, so that no tensor stays in memory once its layer is loaded
        tensors = {key: checkpoint.pop(key) for key in names if key in checkpoint}
        updates = [(lora.strength, lora.layers[layer]) for lora in loras if layer in lora.layers]
        if updates:
            tensors = updated(layer, tensors, updates, modules[layer], channels_last)
        snapshot.reload_transformer_layers(model, tensors, dtype, channels_last)
        yield done, len(layers)


def updated(layer: str, tensors: dict, updates: list, module, channels_last: bool) -> dict:
    """The layer's checkpoint tensors plus each (strength, LayerUpdate), in float32 and lazily; a weight stored
    quantized is dequantized to the values the model computes with (the loader quantizes the sum again)."""
    weight = tensors.pop(f"{layer}.weight")
    if f"{layer}.scales" in tensors:
        weight = mx.dequantize(weight, tensors.pop(f"{layer}.scales"), tensors.pop(f"{layer}.biases"),
                               module.group_size, module.bits, mode=module.mode)
    weight = weight.astype(mx.float32)
    for strength, update in updates:
        weight_update, bias_update = update.weight_update(), update.bias_update()
        if weight_update is not None:
            weight = weight + strength * (to_mlx_layout(f"{layer}.weight", weight_update) if channels_last
                                          else weight_update)
        if bias_update is not None:
            tensors[f"{layer}.bias"] = tensors[f"{layer}.bias"].astype(mx.float32) + strength * bias_update
    tensors[f"{layer}.weight"] = weight
    return tensors
