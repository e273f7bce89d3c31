"""The text encoder's blocks read one at a time from its converted copy (wan_engine/model_files/streamed_blocks.py): the same
embeddings as the whole encoder, in 8 bits and in full precision, while the device holds about one block of them."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from tiny_snapshots import TinySpec, build_snapshot
from wan_engine.model_files.converted import ConvertedWeights
from wan_engine.model_files.loading import Snapshot
from wan_engine.model_files.streamed_blocks import StreamedBlocks
from wan_engine.models.text_encoder import encode_prompts
from wan_engine.model_files.tokenizer import load_prompt_tokenizer

PROMPTS = ["a paper boat on a pond", "", "zz zz zz, a fox; a fox!"]
Q8 = {"bits": 8, "group_size": 64}
LAYERS = 6


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    spec = TinySpec(text_dim=256, text_layers=LAYERS)
    return Snapshot.open(build_snapshot(tmp_path_factory.mktemp("model") / "m", spec))


def embeddings(encoder, snapshot, tmp_path):
    tokenizer = load_prompt_tokenizer(snapshot.root / "tokenizer", tmp_path / "tokenizers")
    return encode_prompts(encoder, tokenizer, PROMPTS, max_length=64)


def block_bytes(encoder) -> int:
    return sum(v.nbytes for _, v in tree_flatten(encoder.encoder.block[0].parameters()))


@pytest.mark.parametrize("quantize", [Q8, None], ids=["q8", "float32-in-a-bf16-run"])
def test_streamed_blocks_give_the_same_embeddings_holding_about_one_block(snapshot, tmp_path, quantize):
    dtype = mx.bfloat16 if quantize is None else mx.float32  # a bf16 run of the fp32 snapshot: its copy is kept
    converted = ConvertedWeights(snapshot, tmp_path / "converted")
    manifest = converted.entry("text_encoder", dtype, quantize) / "MANIFEST"
    assert not manifest.exists()
    whole, origin = converted.load("text_encoder", dtype, quantize, stream_blocks=True)
    assert origin == "the model's files, converted and kept for next time"  # no copy yet: loaded whole
    assert manifest.is_file()
    mx.reset_peak_memory()
    expected = embeddings(whole, snapshot, tmp_path)
    mx.eval(expected)
    whole_peak = mx.get_peak_memory()  # the encoder and its activations
    one_block = block_bytes(whole)
    del whole
    mx.clear_cache()

    before = mx.get_active_memory()
    streamed, origin = converted.load("text_encoder", dtype, quantize, stream_blocks=True)
    assert origin == "its converted copy, a block at a time"
    assert isinstance(streamed.encoder.block, StreamedBlocks) and len(streamed.encoder.block) == LAYERS
    assert mx.get_active_memory() - before < one_block  # the blocks stayed in the copy
    mx.reset_peak_memory()
    assert mx.array_equal(embeddings(streamed, snapshot, tmp_path), expected)
    assert mx.get_peak_memory() < whole_peak - (LAYERS - 2) * one_block  # about two blocks held, not six


def test_stored_tensors_without_every_block_are_refused(snapshot):
    with pytest.raises(ValueError, match="blocks"):
        StreamedBlocks(snapshot.text_encoder_config, {}, {}, mx.float32, ())
