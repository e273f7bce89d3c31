"""Reading stored tensors from several threads (wan_engine/model_files/tensor_reader.py): the same arrays as `mx.load`, from
several files, on the default device; errors said in the caller's thread; the readers keep serving afterwards."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from wan_engine.model_files.loading import read_stored, stored_tensors
from wan_engine.model_files.tensor_reader import READER_THREADS, read_tensors


@pytest.fixture
def two_files(tmp_path):
    rng = np.random.default_rng(0)
    first = {f"a.{i}": mx.array(rng.standard_normal((i + 1, 33)).astype(np.float32)) for i in range(7)}
    first["codes"] = mx.array(rng.integers(0, 2**32, (5, 8), dtype=np.uint32))
    second = {f"b.{i}": mx.array(rng.standard_normal((64, i + 2))).astype(mx.bfloat16) for i in range(6)}
    mx.save_safetensors(str(tmp_path / "weights-00001-of-00002.safetensors"), first)
    mx.save_safetensors(str(tmp_path / "weights-00002-of-00002.safetensors"), second)
    return tmp_path, {**first, **second}


def test_the_same_arrays_as_mx_load_from_several_files(two_files):
    folder, expected = two_files
    read = read_stored(stored_tensors(folder), set(expected) - {"a.3"})
    assert set(read) == set(expected) - {"a.3"}
    for name, value in read.items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape
        assert mx.array_equal(value, expected[name]).item(), name
    threads = [t for t in threading.enumerate() if t.name == "wan-tensor-reader"]
    assert len(threads) == READER_THREADS  # the work was shared; the readers stay for the next load


def test_an_error_in_a_reader_is_raised_here_and_the_readers_keep_serving(two_files, tmp_path_factory):
    folder, expected = two_files
    cut = tmp_path_factory.mktemp("damaged") / "cut.safetensors"
    whole = (folder / "weights-00001-of-00002.safetensors").read_bytes()
    cut.write_bytes(whole[:-200])  # the last tensors' bytes are missing
    tensors = {"a.6": (cut, "a.6", 7 * 33 * 4), "a.0": (cut, "a.0", 33 * 4)}
    with pytest.raises(RuntimeError, match="exceeding the size of the file"):
        read_tensors(tensors)
    again = read_stored(stored_tensors(folder), ["a.6", "b.5"])
    assert mx.array_equal(again["a.6"], expected["a.6"]).item()
    assert mx.array_equal(again["b.5"], expected["b.5"]).item()


def test_nothing_asked_reads_nothing(two_files):
    folder, _ = two_files
    assert read_stored(stored_tensors(folder), []) == {}


def test_the_readers_keep_nothing_once_the_caller_lets_go(two_files):
    folder, expected = two_files
    mx.clear_cache()
    before = mx.get_active_memory()
    read = read_stored(stored_tensors(folder), expected)
    assert mx.get_active_memory() - before == pytest.approx(sum(v.nbytes for v in expected.values()), rel=0.5)
    del read
    assert mx.get_active_memory() == before
