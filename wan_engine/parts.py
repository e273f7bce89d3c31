"""The parts an engine holds loaded (tokenizer, text encoder, transformer, VAE) and the memory policy that decides
which may stay loaded beside which.

A memory preset (presets.py) is plain data; `MemoryPolicy.from_preset` turns it, once, into the few decisions the
stages need, named for what they do. `LoadedParts` applies them: loading a part first releases the parts the policy
does not keep beside it, so the stages only say what they need. It also keeps the transformer's LoRAs: which set
its weights hold, fused in place (model_files/lora.py).
"""

import gc
import logging
import os
import time
from dataclasses import dataclass

import mlx.core as mx

from .model_files.converted import ConvertedWeights
from .model_files.loading import Snapshot
from .model_files.lora import AdapterSet, adapter_set, fuse, read_lora, transformer_shapes
from .model_files.streamed_blocks import StreamedBlocks
from .model_files.tiny_decoder import find_tiny_decoder, load_tiny_decoder, local_tiny_decoder
from .model_files.tokenizer import load_prompt_tokenizer
from .errors import WanError
from .presets import Preset
from .record import gib
from .record import Stage
from .request import ProgressEvent

LARGE_PARTS = ("text_encoder", "transformer", "vae")
ROOMY_GIB = 40.0  # memory from which a preset that may keep the text encoder keeps it: a 64 GiB Mac's working set
log = logging.getLogger("wan_engine")


def machine_memory_gib() -> tuple[float, str]:
    """(GiB, what they are) the engine's device can hold: Metal's recommended working set, a GPU's memory, or on a
    CPU the machine's physical memory."""
    if mx.metal.is_available():
        return mx.metal.device_info()["max_recommended_working_set_size"] / 2**30, "Metal's recommended working set"
    info = mx.device_info()
    if (total := info.get("total_memory") or info.get("memory_size")) and mx.default_device() == mx.gpu:
        return total / 2**30, "the GPU's memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "the machine's memory"


def roomy_machine() -> tuple[bool, str]:
    """Whether the machine has the memory to spend on speed beyond what a preset needs, and what it has."""
    memory, what = machine_memory_gib()
    roomy = memory >= ROOMY_GIB
    return roomy, f"{what} is {memory:.0f} GiB, {'at least' if roomy else 'under'} the {ROOMY_GIB:.0f} GiB"


def keep_text_encoder(preset: Preset, roomy: tuple[bool, str]) -> tuple[bool, str]:
    """Whether the text encoder stays loaded between videos, and why (said in the log and the sidecar)."""
    if not preset.release_text_encoder:
        return True, f"the {preset.name} preset keeps it"
    if preset.keep_resident is not None:
        return preset.keep_resident, f"the {preset.name} preset's keep_resident is {str(preset.keep_resident).lower()}"
    keep, memory = roomy
    return keep, f"{memory} that keep it beside the rest"


@dataclass(frozen=True)
class MemoryPolicy:
    """What may stay loaded, stage by stage."""
    one_large_part_at_a_time: bool  # the transformer, the VAE and a whole text encoder never sit together
    release_text_encoder_after_use: bool  # the prompt-embedding cache covers repeated prompts
    text_encoder_decision: str  # why it is kept or released (the log and the sidecar say it)
    stream_text_encoder: bool  # its blocks read one at a time from its converted copy: it fits beside the rest
    load_transformer_between_videos: bool  # Engine.prepare_next loads it again, in place of the VAE
    clear_cache_between_stages: bool  # return MLX's freed buffers to the system after each stage
    decode_queued_ahead: bool  # a whole-frame VAE decode keeps its next piece of work queued (models/vae.py): 5% faster
    # for 2.2 GiB more at 1280x704 (bench/README.md), so only where the machine has the room

    @classmethod
    def from_preset(cls, preset: Preset) -> "MemoryPolicy":
        roomy = roomy_machine()
        keep, why = keep_text_encoder(preset, roomy)
        log.info("the text encoder %s between videos: %s", "stays loaded" if keep else "is released", why)
        log.info("the VAE decode %s: %s", "keeps its next piece queued" if roomy[0] else "waits for each piece", roomy[1])
        return cls(
            one_large_part_at_a_time=preset.release_transformer_before_decode,
            release_text_encoder_after_use=not keep, text_encoder_decision=why,
            stream_text_encoder=preset.stream_text_encoder,
            load_transformer_between_videos=preset.reload_transformer_after_video,
            clear_cache_between_stages=preset.clear_cache_between_stages, decode_queued_ahead=roomy[0],
        )

    def make_room_for(self, part: str) -> tuple[str, ...]:
        """The parts to release before `part` loads whole (a streamed text encoder needs no room)."""
        if not self.one_large_part_at_a_time or part not in LARGE_PARTS:
            return ()
        return tuple(other for other in LARGE_PARTS if other != part)


class LoadedParts:
    """The loaded parts of one model in one dtype, loaded as the preset says (converted copies kept on disk,
    quantized, compiled) and released as the memory policy says."""

    def __init__(self, snapshot: Snapshot, dtype, preset: Preset, converted: ConvertedWeights, tokenizers_folder,
                 download_progress=None, tiny_decoder: str | None = None):
        self.snapshot, self.dtype, self.preset, self.converted = snapshot, dtype, preset, converted
        self.policy = MemoryPolicy.from_preset(preset)
        self.tokenizers_folder = tokenizers_folder
        self.download_progress = download_progress  # Hub LoRAs are fetched when a request names them
        self.tiny_decoder = tiny_decoder  # where its weights are, when given (model_files/tiny_decoder.py)
        self.loaded: dict = {}
        self.fused = AdapterSet()  # the LoRAs the loaded transformer holds
        self.transformer_shapes = transformer_shapes(snapshot.transformer_config)

    def __contains__(self, name: str) -> bool:
        return name in self.loaded

    def __getitem__(self, name: str):
        return self.loaded[name]

    def load(self, name: str, clock=None):
        """Load `name` unless it is loaded, first releasing what the policy keeps apart from it; yields progress
        events; returns the part. `clock` (record.StageClock) counts the time as loading."""
        if name in self.loaded:
            return self.loaded[name]
        label = name.replace("_", " ")
        start = time.perf_counter()
        yield ProgressEvent(Stage.LOAD, f"loading the {label}")
        preset, origin = self.preset, "its files"

        def make_room():
            if others := self.policy.make_room_for(name):
                self.release(*others)

        if name == "tokenizer":
            part = load_prompt_tokenizer(self.snapshot.root / "tokenizer", self.tokenizers_folder)
        elif name == "tiny_decoder":  # small (tens of MiB): kept beside anything
            path = find_tiny_decoder(self.tiny_decoder, self.snapshot.root, self.download_progress)
            part, origin = load_tiny_decoder(path, self.dtype), str(path)
        elif name == "text_encoder":
            # Streamed from its converted copy it fits beside the transformer; whole (no copy yet), it may not.
            streamed = self.policy.stream_text_encoder
            if not streamed:
                make_room()
            part, origin = self.converted.load(name, self.dtype, preset.text_encoder_quantization,
                                               stream_blocks=streamed, make_room=make_room)
        else:
            make_room()
            quantization = preset.transformer_quantization if name == "transformer" else None
            part, origin = self.converted.load(name, self.dtype, quantization)
        if name == "transformer":
            self.fused = AdapterSet()  # a fresh transformer holds the snapshot's weights
            part.block_lookahead = preset.block_lookahead
            if preset.compile:
                part.compile()
        self.loaded[name] = part
        elapsed = time.perf_counter() - start
        if clock is not None:
            clock.loading(elapsed)
        yield ProgressEvent(Stage.LOAD, f"loaded the {label} from {origin} in {elapsed:.1f} s", elapsed_s=elapsed,
                            memory_gib=gib(mx.get_active_memory()))
        return part

    def release(self, *names: str) -> None:
        """Drop loaded parts (all when no name is given) and return their memory to the system."""
        dropped = [self.loaded.pop(name) for name in names or list(self.loaded) if name in self.loaded]
        if dropped:
            del dropped
            gc.collect()  # a part's compiled graphs may hold it in reference cycles
            mx.clear_cache()

    def tiny_decoder_on_disk(self) -> bool:
        """Whether the tiny decoder can load without a download (live previews use it only then)."""
        return "tiny_decoder" in self.loaded or local_tiny_decoder(self.tiny_decoder, self.snapshot.root) is not None

    def streamed_read_s(self) -> float:
        """Seconds a streamed text encoder spent reading its blocks since last asked: loading, as a whole load is."""
        blocks = self.loaded["text_encoder"].encoder.block
        if not isinstance(blocks, StreamedBlocks):
            return 0.0
        seconds, blocks.read_s = blocks.read_s, 0.0
        return seconds

    # -- LoRA adapters ---------------------------------------------------------------------------------------------
    def read_loras(self, pairs: list):
        """A request's LoRAs ((reference, strength) pairs), read and checked against the transformer before anything
        is loaded or fused, so a bad file changes nothing. Yields progress events; returns the LoRAs."""
        loras = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise WanError(f"LoRA {item!r} is not allowed: give (path or owner/repo/file.safetensors, strength)")
            yield ProgressEvent(Stage.LOAD, f"reading the LoRA {item[0]}")
            loras.append(read_lora(item[0], item[1], self.transformer_shapes, self.download_progress))
        return loras

    def fuse_loras(self, loras: list, clock=None):
        """Make the loaded transformer hold exactly `loras` (reloading the layers an earlier set changed); nothing
        to do when it holds them already. Yields progress events."""
        wanted = adapter_set(loras)
        if wanted.identity == self.fused.identity:
            return
        start = time.perf_counter()
        model = self.loaded["transformer"]
        # until done, a failure leaves every layer either set touches to be reloaded by the next run
        self.fused = AdapterSet(None, self.fused.layers | wanted.layers)
        reloaded = 0
        for reloaded, total in fuse(self.snapshot, model, self.dtype, loras, self.fused):
            yield ProgressEvent(Stage.LOAD, "fusing LoRAs", reloaded, total, memory_gib=gib(mx.get_active_memory()))
        self.fused = wanted
        if self.preset.compile:
            model.compile()  # compiled blocks hold the weights they were traced with
        elapsed = time.perf_counter() - start
        if clock is not None:
            clock.loading(elapsed)
        ignored = sum(len(lora.ignored) for lora in loras)
        yield ProgressEvent(Stage.LOAD, f"the transformer holds {len(loras)} LoRAs: {reloaded} layers reloaded in "
                            f"{elapsed:.1f} s" + (f", {ignored} keys ignored as diffusers ignores them" if ignored else ""),
                            elapsed_s=elapsed, memory_gib=gib(mx.get_active_memory()))
