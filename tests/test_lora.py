"""LoRA adapters (wan_engine/model_files/lora.py) against diffusers' own Wan LoRA loading (peft) on tiny random snapshots.

The files are written here in each layout diffusers' `WanLoraLoaderMixin` reads, with the key names the tools
write (ComfyUI / original Wan `diffusion_model.*` with lora_down/lora_up or lora_A/lora_B, alpha, diff, diff_b;
musubi-tuner `lora_unet_*`; diffusers/PEFT `transformer.*` with its saved LoraConfig), random and of several ranks.
The module-name tables come from wan_engine.model_files.weights; diffusers converts the same files with its own code, so a wrong
table shows as a parity failure.
"""

import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import run_cli
from test_pipeline import noise_for
from tiny_snapshots import TinySpec, build_snapshot, reference_frames, sample_image
from wan_engine import Engine, GenerationRequest
from wan_engine.errors import WanError
from wan_engine.model_files.loading import Snapshot
from wan_engine.model_files.lora import transformer_shapes
from wan_engine.model_files.packages import convert
from wan_engine.outputs.video import read_metadata
from wan_engine.model_files.weights import WAN_BLOCK_LAYERS, WAN_TOP_LAYERS, wan_layer_name

BAR = 2e-3  # the bar on decoded frames, max abs
PROMPT, NEGATIVE = "a paper boat on a stream", "blurry"
# The tiny models' layers that the original Wan code names (TI2V has no image-to-video cross-attention).
BLOCK_MODULES = {wan: ours for wan, ours in WAN_BLOCK_LAYERS.items() if "img" not in wan}


def shapes_of(snapshot) -> dict:
    return transformer_shapes(Snapshot.open(snapshot).transformer_config)


def pair(rng, shape, rank):
    """A random (down, up) pair for a weight of `shape` (PyTorch layout), scaled to change the model visibly."""
    down = rng.standard_normal((rank, *shape[1:])).astype(np.float32) * 0.3
    up = rng.standard_normal((shape[0], rank, *(1,) * (len(shape) - 2))).astype(np.float32) * 0.3
    return down, up


def blocks(shapes) -> int:
    return len({key.split(".")[1] for key in shapes if key.startswith("blocks.")})


def comfy_lora(path, shapes, seed, rank, down="lora_down", up="lora_up", alpha=True):
    """ComfyUI / Kijai / original Wan names: every block linear (ranks vary by module), `.alpha` on the blocks, the
    top-level LoRAs diffusers maps, and diff / diff_b updates, some of which diffusers applies and some it drops."""
    rng = np.random.default_rng(seed)
    tensors = {}

    def add(module, layer, module_rank, with_alpha):
        a, b = pair(rng, shapes[f"{layer}.weight"], module_rank)
        tensors[f"diffusion_model.{module}.{down}.weight"], tensors[f"diffusion_model.{module}.{up}.weight"] = a, b
        if with_alpha:
            tensors[f"diffusion_model.{module}.alpha"] = np.array(module_rank * 0.75, np.float32)

    for i in range(blocks(shapes)):
        for j, (module, layer) in enumerate(BLOCK_MODULES.items()):
            add(f"blocks.{i}.{module}", f"blocks.{i}.{layer}", rank + j % 3, alpha)
    for module in ("time_projection.1", "text_embedding.0", "time_embedding.2"):
        add(module, WAN_TOP_LAYERS[module], rank, False)
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2", "time_projection.1", "text_embedding.0",
                   "time_embedding.2", "head.head", "patch_embedding"):  # diffusers drops patch_embedding's
        out = shapes[f"{wan_layer_name(module) or module}.weight"][0]
        tensors[f"diffusion_model.{module}.diff_b"] = rng.standard_normal(out).astype(np.float32) * 0.1
    head = shapes["proj_out.weight"]
    tensors["diffusion_model.head.head.diff"] = rng.standard_normal(head).astype(np.float32) * 0.05
    dim = shapes["blocks.0.attn1.to_q.weight"][0]
    for module, shape in [("blocks.0.norm3", (dim,)), ("blocks.1.self_attn.norm_q", (dim,)),
                          ("blocks.0.modulation", (1, 6, dim)), ("blocks.1.self_attn.k", (dim, dim))]:
        tensors[f"diffusion_model.{module}.diff"] = rng.standard_normal(shape).astype(np.float32)  # dropped
    save_file(tensors, path)
    return path


def musubi_lora(path, shapes, seed, rank):
    """musubi-tuner / kohya: every block linear with lora_down / lora_up / alpha, the names with '_' for '.'."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(blocks(shapes)):
        for module, layer in BLOCK_MODULES.items():
            name = f"lora_unet_blocks_{i}_{module.replace('.', '_')}"
            a, b = pair(rng, shapes[f"blocks.{i}.{layer}.weight"], rank)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.array(rank * 2.0, np.float32)
    save_file(tensors, path)
    return path


def peft_tensors(shapes, seed, rank) -> dict:
    """diffusers / PEFT keys: attention and feed-forward of block 0, the output projection, the patch embedding
    (a Conv3d LoRA) and a lora_B bias; `proj_out` at half the rank."""
    rng = np.random.default_rng(seed)
    tensors = {}
    layers = [f"blocks.0.{layer}" for layer in BLOCK_MODULES.values()] + ["proj_out", "patch_embedding"]
    for layer in layers:
        a, b = pair(rng, shapes[f"{layer}.weight"], rank // 2 if layer == "proj_out" else rank)
        tensors[f"transformer.{layer}.lora_A.weight"], tensors[f"transformer.{layer}.lora_B.weight"] = a, b
    tensors["transformer.blocks.0.ffn.net.2.lora_B.bias"] = rng.standard_normal(
        shapes["blocks.0.ffn.net.2.weight"][0]).astype(np.float32) * 0.1
    return tensors


def peft_lora(path, shapes, seed, rank):
    """As diffusers' `save_lora_weights` writes it, with its LoraConfig: alpha / r = 1.5, proj_out's 2 / (rank/2)."""
    tensors = peft_tensors(shapes, seed, rank)
    targets = sorted({key.split(".lora_")[0].removeprefix("transformer.") for key in tensors})
    config = {"r": rank, "lora_alpha": 1.5 * rank, "rank_pattern": {"proj_out": rank // 2},
              "alpha_pattern": {"proj_out": 2}, "lora_bias": True, "target_modules": targets}
    metadata = {f"transformer.{k}": v for k, v in config.items()}
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return path


def engine_frames(engine, loras, width=96, height=64, frames=9, steps=3, guidance=5.0, image=None, noise=None):
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, frames=frames,
                                steps=steps, guidance=guidance, image=image, latents=noise, keep_frames=True,
                                loras=[(str(path), strength) for path, strength in loras])
    *events, result = engine.generate(request)
    return result, events


@pytest.mark.parametrize("case", ["t2v", "i2v"])
def test_two_loras_match_diffusers(case, snapshots, tmp_path):
    """T2V: ComfyUI names with alpha, diff, diff_b + musubi-tuner. I2V: diffusers/PEFT with its LoraConfig + ComfyUI
    names as lora_A / lora_B without alpha. Different ranks and strengths, one negative."""
    shapes = shapes_of(snapshots["small"])
    if case == "t2v":
        loras = [(comfy_lora(tmp_path / "comfy.safetensors", shapes, 1, rank=4), 0.8),
                 (musubi_lora(tmp_path / "musubi.safetensors", shapes, 2, rank=3), 0.6)]
        image = None
    else:
        loras = [(peft_lora(tmp_path / "peft.safetensors", shapes, 3, rank=4), 0.7),
                 (comfy_lora(tmp_path / "comfy-ab.safetensors", shapes, 4, 2, "lora_A", "lora_B", alpha=False), -0.5)]
        image = sample_image()
    noise = noise_for("small", 96, 64, 9)
    expected = reference_frames(snapshots["small"], PROMPT, NEGATIVE, 96, 64, 9, 3, 5.0, noise, image=image,
                                loras=loras)
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    plain, _ = engine_frames(engine, [], image=image, noise=noise)
    result, events = engine_frames(engine, loras, image=image, noise=noise)
    assert np.abs(result.frames - expected).max() < BAR
    assert np.abs(result.frames - plain.frames).max() > 0.05  # the LoRAs change the video
    assert [lora["strength"] for lora in result.settings["loras"]] == [strength for _, strength in loras]
    messages = [e.message for e in events if e.stage == "load"]
    assert any(m.startswith("reading the LoRA") for m in messages)
    assert any("the transformer holds 2 LoRAs" in m for m in messages)


def test_old_diffusers_names_read_as_peft_names(snapshots, tmp_path):
    """diffusers' older `.lora.down` / `.lora.up` names load as PEFT's `lora_A` / `lora_B`."""
    shapes = shapes_of(snapshots["small"])
    tensors = peft_tensors(shapes, 5, 2)
    save_file(tensors, tmp_path / "peft.safetensors")
    old = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in tensors.items()}
    save_file(old, tmp_path / "old.safetensors")
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    noise = noise_for("small", 64, 64, 5)
    new_result, _ = engine_frames(engine, [(tmp_path / "peft.safetensors", 1.0)], 64, 64, 5, 1, noise=noise)
    old_result, _ = engine_frames(engine, [(tmp_path / "old.safetensors", 1.0)], 64, 64, 5, 1, noise=noise)
    assert np.array_equal(new_result.frames, old_result.frames)


def test_changing_the_adapter_set_reloads_exactly(snapshots, tmp_path):
    """Adding, removing and reweighting LoRAs on one engine gives the frames of each set bit for bit."""
    shapes = shapes_of(snapshots["wide"])  # bfloat16 weights on disk, computed in float32
    comfy = comfy_lora(tmp_path / "comfy.safetensors", shapes, 6, rank=3)
    musubi = musubi_lora(tmp_path / "musubi.safetensors", shapes, 7, rank=2)
    engine = Engine(snapshots["wide"], dtype="float32", output_dir=tmp_path)
    noise = noise_for("wide", 64, 64, 5)

    def frames(loras):
        return engine_frames(engine, loras, 64, 64, 5, 2, noise=noise)[0].frames

    none, one = frames([]), frames([(comfy, 1.0)])
    both, reweighted = frames([(comfy, 1.0), (musubi, 0.5)]), frames([(comfy, 0.3)])
    assert np.array_equal(frames([]), none)
    assert np.array_equal(frames([(comfy, 1.0)]), one)
    assert np.array_equal(frames([(musubi, 0.5), (comfy, 1.0)][::-1]), both)
    fresh = Engine(snapshots["wide"], dtype="float32", output_dir=tmp_path)
    assert np.array_equal(engine_frames(fresh, [(comfy, 0.3)], 64, 64, 5, 2, noise=noise)[0].frames, reweighted)
    differences = [np.abs(a - b).max() for a, b in [(none, one), (one, both), (one, reweighted)]]
    assert min(differences) > 1e-3
    # low-ram releases the transformer after each run: the next run loads it afresh and fuses again (its layers are
    # too narrow to quantize here, and its other settings give the same numbers up to round-off)
    low_ram = Engine(snapshots["wide"], dtype="float32", preset="low-ram", output_dir=tmp_path)
    for _ in range(2):
        frames = engine_frames(low_ram, [(comfy, 0.3)], 64, 64, 5, 2, noise=noise)[0].frames
        assert np.abs(frames - reweighted).max() < 1e-4


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory):
    """A tiny snapshot whose linears are 64 wide (the q8 group size) and its q8 package."""
    root = tmp_path_factory.mktemp("quantizable")
    snapshot = build_snapshot(root / "snapshot", TinySpec(heads=2, head_dim=32, ffn_dim=128, seed=2))
    return snapshot, convert(snapshot, root / "q8", "q8", False)


def test_q8_lora_is_close_and_fused_as_documented(quantizable, tmp_path):
    snapshot, package = quantizable
    path = comfy_lora(tmp_path / "comfy.safetensors", shapes_of(snapshot), 8, rank=4)
    strength, noise = 0.9, noise_for("small", 64, 64, 5)
    full = Engine(snapshot, dtype="float32", output_dir=tmp_path)
    plain = engine_frames(full, [], 64, 64, 5, 2, noise=noise)[0].frames
    fused = engine_frames(full, [(path, strength)], 64, 64, 5, 2, noise=noise)[0].frames
    # blocks.0.attn1.to_q, rank 4 with alpha 3: its update is strength * 0.75 * up @ down
    lora = load_file(path)
    update = mx.array(strength * 0.75 * (lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
                                         @ lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]))

    # quantized while loading the full-precision snapshot (as the low-RAM preset does): quantize(W + update)
    preset = tmp_path / "q8.json"
    preset.write_text(json.dumps({"transformer_quantization": {"bits": 8, "group_size": 64}}))
    on_load = Engine(snapshot, dtype="float32", preset=str(preset), output_dir=tmp_path)
    quantized = engine_frames(on_load, [(path, strength)], 64, 64, 5, 2, noise=noise)[0].frames
    assert np.abs(quantized - fused).max() < 0.05 * np.abs(fused - plain).max()
    weight = Snapshot.open(snapshot).read("transformer")[0]["blocks.0.attn1.to_q.weight"]
    expect_quantized(on_load, mx.quantize(weight + update, 64, 8))

    # a q8 package stores the layer quantized: quantize(dequantize(Wq) + update)
    q8 = Engine(package, dtype="float32", output_dir=tmp_path)
    engine_frames(q8, [(path, strength)], 64, 64, 5, 1, noise=noise)
    stored = Snapshot.open(package).read("transformer")[0]
    weight = mx.dequantize(*(stored[f"blocks.0.attn1.to_q.{part}"] for part in ("weight", "scales", "biases")), 64, 8)
    expect_quantized(q8, mx.quantize(weight.astype(mx.float32) + update, 64, 8))


def expect_quantized(engine, expected):
    layer = engine.parts["transformer"].blocks[0].attn1.to_q
    assert (layer.group_size, layer.bits) == (64, 8)
    codes, scales, biases = expected  # the same up to the round-off of the update's product
    assert np.array_equal(np.array(layer.weight), np.array(codes))
    assert np.allclose(np.array(layer.scales), np.array(scales), rtol=1e-5, atol=0)
    assert np.allclose(np.array(layer.biases), np.array(biases), rtol=1e-5, atol=1e-7)


def bad_files(folder, shapes) -> dict:
    """name -> (file, what its message must say besides the file's name)."""
    rng = np.random.default_rng(9)
    q = "transformer.blocks.0.attn1.to_q"
    a, b = pair(rng, shapes["blocks.0.attn1.to_q.weight"], 4)
    cases = {
        "unknown-format": ({"model.layers.0.mlp.weight": a}, "'model.layers.0.mlp.weight' is not a LoRA key"),
        "no-matching-key": ({"text_encoder.encoder.block.0.q.lora_A.weight": a},
                            "no weights for this transformer (its first key is 'text_encoder.encoder"),
        "wrong-shape": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": np.zeros((4, 48), np.float32),
                         "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b},
                        "'diffusion_model.blocks.0.self_attn.q.lora_down.weight' has shape (4, 48), "
                        "blocks.0.attn1.to_q needs (rank, 32)"),
        "rank-mismatch": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b[:, :3]},
                          f"'{q}.lora_B.weight' has rank 3 but '{q}.lora_A.weight' has rank 4"),
        "missing-layer": ({"transformer.blocks.7.attn1.to_q.lora_A.weight": a,
                           "transformer.blocks.7.attn1.to_q.lora_B.weight": b},
                          "adapts blocks.7.attn1.to_q, which this transformer does not have"),
        "half-a-pair": ({f"{q}.lora_A.weight": a}, f"'{q}.lora_A.weight': blocks.0.attn1.to_q has down"),
        "unknown-module": ({"lora_unet_blocks_0_self_attn_qkv.lora_down.weight": a},
                           "'lora_unet_blocks_0_self_attn_qkv.lora_down.weight' is not 'lora_unet_<module>.<part>'"),
    }
    files = {}
    for name, (tensors, message) in cases.items():
        save_file(tensors, folder / f"{name}.safetensors")
        files[name] = (folder / f"{name}.safetensors", message)
    whole = (folder / "wrong-shape.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) - 100])
    files["truncated"] = (folder / "truncated.safetensors", "is truncated")
    return files


def test_bad_files_are_refused_by_name_and_change_nothing(snapshots, tmp_path):
    shapes = shapes_of(snapshots["small"])
    good = musubi_lora(tmp_path / "good.safetensors", shapes, 10, rank=2)
    engine = Engine(snapshots["small"], dtype="float32", output_dir=tmp_path)
    noise = noise_for("small", 64, 64, 5)
    before = engine_frames(engine, [(good, 1.0)], 64, 64, 5, 1, noise=noise)[0].frames
    for name, (path, message) in bad_files(tmp_path, shapes).items():
        with pytest.raises(WanError) as error:
            engine_frames(engine, [(good, 0.5), (path, 1.0)], 64, 64, 5, 1, noise=noise)
        assert path.name in str(error.value) and message in str(error.value), name
    assert np.array_equal(engine_frames(engine, [(good, 1.0)], 64, 64, 5, 1, noise=noise)[0].frames, before)
    for reference, strength, message in [(tmp_path / "absent.safetensors", 1.0, "no such file"),
                                         (good, float("nan"), "strength is not allowed")]:
        with pytest.raises(WanError, match=message):
            engine_frames(engine, [(reference, strength)], 64, 64, 5, 1)


def test_cli_lora_from_a_path_and_the_hub_offline_recorded_in_the_sidecar(snapshots, no_torch_env, tmp_path):
    shapes = shapes_of(snapshots["small"])
    local = comfy_lora(tmp_path / "style:v2.safetensors", shapes, 11, rank=2)  # ':' in an existing file's name
    repo = tmp_path / "hub" / "models--someone--wan-loras"
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "snapshots" / revision / "motion").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    hub_file = musubi_lora(repo / "snapshots" / revision / "motion" / "lora.safetensors", shapes, 12, rank=3)
    env = {**no_torch_env, "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = tmp_path / "video.mp4"
    proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "a kite", "--width", 64, "--height", 64,
                    "--frames", 5, "--steps", 1, "--seed", 3, "--output", out, "--lora", local,
                    "--lora", "someone/wan-loras/motion/lora.safetensors:0.25"], env)
    assert proc.returncode == 0, proc.stderr
    expected = [
        {"name": str(local), "sha256": hashlib.sha256(local.read_bytes()).hexdigest(), "strength": 1.0},
        {"name": "someone/wan-loras/motion/lora.safetensors",
         "sha256": hashlib.sha256(hub_file.read_bytes()).hexdigest(), "strength": 0.25},
    ]
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["loras"] == expected
    assert json.loads(read_metadata(out)["comment"])["loras"] == expected
    proc = run_cli(["generate", "--model", snapshots["small"], "--prompt", "a kite", "--output", tmp_path / "x.mp4",
                    "--lora", "someone/wan-loras/absent.safetensors"], env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the Hub file someone/wan-loras/absent.safetensors is not in the Hugging Face cache and HF_HUB_OFFLINE")
