"""The kept prompt tokenizer (wan_engine/model_files/tokenizer.py): the same ids and masks as the transformers tokenizer the
reference calls, read back in a process that imports neither transformers nor PyTorch, rebuilt when its folder
changes or its entry is damaged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, T5TokenizerFast

from wan_engine.model_files.demo import build_tokenizer
from wan_engine.model_files.tokenizer import load_prompt_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "A corgi surfing a wave at sunset, cinematic",
    "  runs   of  spaces\tand\ttabs  ",
    "UPPER lower 123 !?#$%&'()*+,-./:;<=>@[\\]^_`{|}~",
    "unknown characters: é ü ß 漢字 🙂",
    "<pad> </s> <unk> written out",
    "",
    " ".join(["a much longer prompt that goes on"] * 60),  # past 16 and 512 tokens: cut
]


@pytest.fixture(params=["plain", "t5"])
def folder(request, tmp_path) -> Path:
    """A tokenizer folder as the demo writes it (`PreTrainedTokenizerFast`), or as transformers' T5 class saves it
    (the class Wan2.2's `tokenizer/` names: it sets up T5's pre-tokenizer, template and <extra_id_N> tokens)."""
    build_tokenizer(400, tmp_path / "plain")
    if request.param == "plain":
        return tmp_path / "plain"
    T5TokenizerFast.from_pretrained(str(tmp_path / "plain")).save_pretrained(str(tmp_path / "t5"))
    return tmp_path / "t5"


@pytest.mark.parametrize("max_length", [16, 512])
def test_kept_tokenizer_matches_transformers(folder, tmp_path, max_length):
    reference = AutoTokenizer.from_pretrained(str(folder))
    expected = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    load_prompt_tokenizer(folder, tmp_path / "kept")  # built with transformers and kept
    kept = load_prompt_tokenizer(folder, tmp_path / "kept")  # read back
    ids, mask = kept.batch(PROMPTS, max_length)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert mask[:, :-1].sum() < mask.size  # padding happened
    counts = [len(reference(p, add_special_tokens=True, truncation=False)["input_ids"]) for p in PROMPTS]
    assert [kept.count(p) for p in PROMPTS] == counts
    assert max(counts) > 512  # the long prompt is counted uncut
    assert kept.count(PROMPTS[-1]) == counts[-1]  # after a batch, which cut it to max_length: uncut again


def test_a_later_process_reads_it_without_transformers_or_torch(tmp_path):
    folder = tmp_path / "tokenizer"
    build_tokenizer(400, folder)
    expected = load_prompt_tokenizer(folder, tmp_path / "kept").batch(PROMPTS, 64)[0]
    script = (
        "import json, sys\n"
        "from wan_engine.model_files.tokenizer import load_prompt_tokenizer\n"
        f"ids, _ = load_prompt_tokenizer({str(folder)!r}, {str(tmp_path / 'kept')!r}).batch({PROMPTS!r}, 64)\n"
        "imported = [m for m in ('transformers', 'torch') if m in sys.modules]\n"
        "print(json.dumps({'ids': ids.tolist(), 'imported': imported}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["imported"] == []
    np.testing.assert_array_equal(np.array(found["ids"]), expected)


def test_rebuilt_when_its_folder_changes_or_its_entry_is_damaged(tmp_path, caplog):
    folder = tmp_path / "tokenizer"
    build_tokenizer(400, folder)
    kept = tmp_path / "kept"
    first = load_prompt_tokenizer(folder, kept).count("hello there")
    assert first == len(AutoTokenizer.from_pretrained(str(folder))("hello there")["input_ids"])
    (entry,) = kept.iterdir()
    entry.write_bytes(entry.read_bytes()[:-10])  # cut short
    assert load_prompt_tokenizer(folder, kept).count("hello there") == first  # rebuilt
    assert f"{entry} is damaged" in caplog.text
    assert entry.is_file()  # kept again

    build_tokenizer(110, folder)  # another vocabulary in the same folder: no letter pairs
    smaller = load_prompt_tokenizer(folder, kept).count("hello there")
    assert smaller == len(AutoTokenizer.from_pretrained(str(folder))("hello there")["input_ids"]) > first
    assert len(list(kept.iterdir())) == 2  # one entry per version of the folder
