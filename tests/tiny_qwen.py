"""A character tokenizer for the tiny random Qwen models the prompt writer's tests build (text: Qwen2, picture:
Qwen2.5-VL): one token per character of Wan's system prompts and the tests' prompts, with Qwen's special tokens."""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from wan_engine.prompting.writer import system_prompt


def character_tokenizer(specials: list, chat_template: str, prompts: list) -> tuple:
    """(tokenizer, vocab): `specials` first (`specials[0]` pads, `<|im_end|>` ends; the others after the first are
    marked special), then `<unk>`, then every character of the system prompts and `prompts`."""
    characters = sorted(set("".join(system_prompt(image, language) for image in (False, True)
                                    for language in ("en", "zh")) + "".join(prompts) + "\n"))
    vocab = {token: i for i, token in enumerate(specials + ["<unk>"] + characters)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token=specials[0],
                                        unk_token="<unk>",
                                        additional_special_tokens=[s for s in specials[1:] if s != "<|im_end|>"])
    tokenizer.chat_template = chat_template
    return tokenizer, vocab
