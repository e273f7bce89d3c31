"""Tiny stand-ins for the Wan2.2 snapshot's components, built offline, shared by the tests."""

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2, as in T5's / umt5's vocabulary


def build_tokenizer(vocab_size: int, path=None) -> PreTrainedTokenizerFast:
    """A small T5-like tokenizer: a SentencePiece-style Unigram over single characters and `▁`-prefixed letters and
    letter pairs.

    Like T5's: `▁` marks a word start (so runs of spaces yield extra `▁` tokens), unknown characters become
    `<unk>`, and `</s>` is appended to every sequence. Saved to `path` (if given) as a folder that
    `AutoTokenizer.from_pretrained(path)` loads.
    """
    pieces = [PAD, EOS, UNK, "▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["▁" + a for a in string.ascii_lowercase]
    pieces += ["▁" + a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    if vocab_size < 4 + len(string.ascii_letters + string.digits + string.punctuation):
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
