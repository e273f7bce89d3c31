"""The text encoder's token table left in its file (wan_engine/model_files/mapped_embedding.py): the engine's text encoder
gives the same embeddings as one holding the whole table, in full precision and 8 bits, and holds less memory."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from tiny_snapshots import TinySpec, build_snapshot
from wan_engine.model_files.converted import ConvertedWeights
from wan_engine.model_files.loading import Snapshot
from wan_engine.model_files.mapped_embedding import MappedEmbedding
from wan_engine.models.text_encoder import encode_prompts
from wan_engine.model_files.tokenizer import load_prompt_tokenizer

PROMPTS = ["a paper boat on a pond", "", "zz zz zz, a fox; a fox!"]
Q8 = {"bits": 8, "group_size": 64}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return Snapshot.open(build_snapshot(tmp_path_factory.mktemp("model") / "m", TinySpec(text_dim=64)))


def embeddings(encoder, snapshot, tmp_path):
    tokenizer = load_prompt_tokenizer(snapshot.root / "tokenizer", tmp_path / "tokenizers")
    return encode_prompts(encoder, tokenizer, PROMPTS, max_length=64)


def test_full_precision_table_stays_in_the_file_with_the_same_embeddings(snapshot, tmp_path):
    whole = snapshot.load_text_encoder(mx.float32)
    assert isinstance(whole.shared, nn.Embedding)
    whole_bytes = sum(value.nbytes for _, value in tree_flatten(whole.parameters()))
    expected = embeddings(whole, snapshot, tmp_path)
    mx.eval(expected)
    del whole
    mx.clear_cache()

    before = mx.get_active_memory()
    mapped = ConvertedWeights(snapshot, tmp_path / "converted").load("text_encoder", mx.float32)[0]
    held = mx.get_active_memory() - before
    assert isinstance(mapped.shared, MappedEmbedding)
    vocab, width = snapshot.text_encoder_config.vocab_size, snapshot.text_encoder_config.d_model
    table = vocab * width * 4  # float32
    assert table > whole_bytes / 10  # no small part of the encoder
    assert held == pytest.approx(whole_bytes - table, rel=0.01)  # the device holds all but the table
    assert mx.array_equal(embeddings(mapped, snapshot, tmp_path), expected)
    assert not (tmp_path / "converted").exists()  # stored as it runs: nothing converted, nothing kept


def test_quantized_table_is_read_from_the_converted_copy_with_the_same_embeddings(snapshot, tmp_path):
    converted = ConvertedWeights(snapshot, tmp_path / "converted")
    first, origin = converted.load("text_encoder", mx.float32, Q8)
    assert origin == "the model's files, converted and kept for next time"
    assert isinstance(first.shared, nn.QuantizedEmbedding)  # quantized as it loads: whole, then kept with the rest
    expected = embeddings(first, snapshot, tmp_path)

    later, origin = converted.load("text_encoder", mx.float32, Q8)
    assert origin == "its converted copy"
    assert isinstance(later.shared, MappedEmbedding) and later.shared.quantization == {**Q8, "mode": "affine"}
    assert mx.array_equal(embeddings(later, snapshot, tmp_path), expected)


def test_packages_and_converted_copies_still_hold_the_whole_table(snapshot):
    assert isinstance(snapshot.load_text_encoder(mx.float32).shared, nn.Embedding)  # what convert writes out
    assert isinstance(snapshot.load_text_encoder(mx.float32, quantize=Q8).shared, nn.QuantizedEmbedding)
