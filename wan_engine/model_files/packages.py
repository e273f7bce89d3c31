"""Writing a Wan Studio package: `python -m wan_engine convert --model SRC --output DIR --quantize {bf16,q8,q4}`.

A package is a Diffusers-layout folder that `Snapshot.open` reads like any snapshot: `model_index.json`,
`scheduler/` and `tokenizer/` copied, each part's `config.json`, its weights as safetensors shards (with an
index when there are several) in bfloat16 with Diffusers key names and PyTorch layouts, and the record
`wan_studio_package.json`. Linears that the quantization policy (quantize.py) picks are stored as MLX packs them:
`X.weight` (uint32), `X.scales`, `X.biases`, and their ordinary `X.bias`.

The package is written into a temporary folder beside the output and renamed when it is complete, so a failed or
interrupted conversion leaves nothing behind; free disk space is checked before anything is written.
"""

import gc
import json
import secrets
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..version import __version__
from ..errors import WanError
from .loading import PACKAGE_FORMAT, PACKAGE_RECORD, PACKAGE_VERSION, Snapshot
from .quantize import BITS, POLICIES, is_quantized, quantization, quantize_layers
from .weights import to_diffusers_layout

QUANTIZE_CHOICES = ("bf16", *BITS)
SHARD_BYTES = 2 * 2**30  # as mlx-gen and Diffusers split large parts
WEIGHTS_STEM = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
COPIED = ("model_index.json", "scheduler", "tokenizer")
SLACK_BYTES = 2**20  # headers, index and config files


def quantization_plan(quantize: str, quantize_text_encoder: bool) -> dict:
    """component -> quantization record (or None) for a --quantize choice."""
    if quantize not in QUANTIZE_CHOICES:
        raise WanError(f"--quantize {quantize} is not allowed: choose one of {', '.join(QUANTIZE_CHOICES)}")
    record = quantization(BITS[quantize]) if quantize in BITS else None
    return {"transformer": record, "text_encoder": record if quantize_text_encoder else None}


def build_models(source: Snapshot) -> dict:
    """component -> its model, lazily initialised (nothing is computed or allocated until evaluated)."""
    return {part: source.new_model(part) for part in ("transformer", "vae", "text_encoder")}


def stored_bytes(value: mx.array) -> int:
    """Bytes a parameter takes in a package: packed codes as they are, everything else in bfloat16."""
    return value.nbytes if value.dtype == mx.uint32 else value.size * 2


def estimate_bytes(source: Snapshot, plan: dict) -> int:
    """The package's size, from the shapes of the lazily built, quantized models (no weight is read)."""
    models = build_models(source)
    total = SLACK_BYTES
    for part, model in models.items():
        if plan.get(part):
            quantize_layers(model, POLICIES[part], plan[part]["bits"], plan[part]["group_size"])
        total += sum(stored_bytes(value) for _, value in tree_flatten(model.parameters()))
    for name in COPIED:
        path = source.root / name
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise WanError(
            f"not enough disk space in {folder}: the package needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB is free"
        )


def package_tensors(model) -> dict:
    """Parameter name -> the tensor to store: Diffusers layout in bfloat16, packed quantized codes as they are."""
    tensors = {}
    for key, value in tree_flatten(model.parameters()):
        tensors[key] = value if value.dtype == mx.uint32 else to_diffusers_layout(key, value).astype(mx.bfloat16)
    return tensors


def write_weights(tensors: dict, folder: Path, stem: str, progress=None) -> None:
    """Save like Diffusers' `save_pretrained`: one `stem.safetensors`, or `stem-0000i-of-0000n.safetensors`
    shards of at most SHARD_BYTES plus `stem.safetensors.index.json`. `progress(done, total)` per tensor."""
    shards, size = [{}], 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    done = 0
    for name, shard in zip(names, shards):
        for value in shard.values():  # evaluate tensor by tensor, to report progress
            mx.eval(value)
            done += 1
            if progress:
                progress(done, len(tensors))
        # "pt": transformers and diffusers read safetensors files only with this format tag.
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_for_package(source: Snapshot, part: str, plan: dict, progress):
    """The part's model in bfloat16, quantized as `plan` says (from full precision or as stored)."""
    wanted = plan.get(part)
    if part == "vae":
        model = source.load_vae(mx.bfloat16, progress)
    elif part == "transformer":
        model = source.load_transformer(mx.bfloat16, progress, wanted)
    else:
        model = source.load_text_encoder(mx.bfloat16, progress, wanted)
    bits = {layer.bits for _, layer in model.named_modules() if is_quantized(layer)}
    if bits and bits != {(wanted or {}).get("bits")}:
        raise WanError(
            f"{source.root / part} is already quantized ({', '.join(f'{b}-bit' for b in sorted(bits))}): "
            "convert from the full-precision model for another quantization"
        )
    return model


def write_package(source: Snapshot, folder: Path, plan: dict, source_name: str, progress=None) -> None:
    """Write the package into the empty `folder`. `progress(stage, done, total)`."""

    def report(stage: str):
        return (lambda done, total: progress(stage, done, total)) if progress else None

    for part in ("transformer", "vae", "text_encoder"):
        model = load_for_package(source, part, plan, report(f"read {part}"))
        (folder / part).mkdir()
        (folder / part / "config.json").write_text(json.dumps(source.config(part), indent=2))
        write_weights(package_tensors(model), folder / part, WEIGHTS_STEM[part], report(f"write {part}"))
        del model
        gc.collect()
        mx.clear_cache()
    for name in COPIED:
        path = source.root / name
        if path.is_dir():
            shutil.copytree(path, folder / name)
        else:
            shutil.copy2(path, folder / name)
    record = {
        "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "quantization": plan, "source": source_name,
        "engine_version": __version__,
    }
    (folder / PACKAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def convert(model, output, quantize: str = "q8", quantize_text_encoder: bool = False, progress=None,
            source_name: str = None) -> Path:
    """Convert the model folder `model` (any format Snapshot reads) into a Wan Studio package at `output`.
    `progress(stage, done, total)` is called per tensor read and written; `source_name` (default: the folder)
    is recorded as the package's source. Returns the package folder."""
    plan = quantization_plan(quantize, quantize_text_encoder)
    source = Snapshot.open(model)
    output = Path(output)
    if output.exists():
        raise WanError(f"--output {output} already exists: choose a new folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(output.parent, estimate_bytes(source, plan))
    staging = output.parent / f".{output.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()  # with the user's usual permissions (tempfile.mkdtemp's would be owner-only)
    try:
        write_package(source, staging, plan, source_name or str(model), progress)
        staging.rename(output)
    except OSError as e:
        raise WanError(f"writing the package {output} failed: {e.strerror or e}; nothing was kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
