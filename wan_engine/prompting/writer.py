"""`PromptWriter`: a short prompt rewritten by an instruct model with Wan's system prompt, as Wan's
`QwenPromptExpander` does it: the messages [system, user] through the model's chat template, up to 512 new tokens,
special tokens left out of the text. Greedy by default; a seed samples with Qwen2.5's own settings (temperature 0.7,
top-p 0.8, top-k 20), as Wan's extender samples. The model loads on the first prompt and stays until `release`.

Default models, 4-bit MLX conversions of Wan's own choices (`Qwen2.5_3B`, `QwenVL2.5_3B`): about 2 GiB and 3 GiB, so
they run beside nothing else on a 16 GiB Mac; the writer is released before the video model needs the memory.
"""

import gc
import json
import os
from importlib.util import find_spec
from pathlib import Path

import mlx.core as mx

from ..errors import WanError

TEXT_MODEL = "mlx-community/Qwen2.5-3B-Instruct-4bit"
IMAGE_MODEL = "mlx-community/Qwen2.5-VL-3B-Instruct-4bit"
MAX_NEW_TOKENS = 512  # Wan's QwenPromptExpander
SAMPLING = {"temp": 0.7, "top_p": 0.8, "top_k": 20}  # Qwen2.5-Instruct's generation_config
SYSTEM_PROMPTS = json.loads((Path(__file__).parent / "system_prompts.json").read_text(encoding="utf-8"))
LANGUAGES = ("en", "zh")
EXTRAS = "pip install -r requirements-prompt.txt"


def installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ValueError:  # present in sys.modules as None: made unimportable
        return False


def extras_missing(image: bool = False) -> str | None:
    """What to install for the writer (mlx-lm; mlx-vlm too for a picture), or None when it is there."""
    needed = ["mlx_lm", "mlx_vlm"] if image else ["mlx_lm"]
    missing = [name.replace("_", "-") for name in needed if not installed(name)]
    if not missing:
        return None
    return f"the prompt writer needs {' and '.join(missing)}, not installed here: {EXTRAS}"


def system_prompt(image: bool, language: str = "en") -> str:
    """Wan's system prompt for TI2V-5B's task (`decide_system_prompt`): text or image to video, in `language`."""
    if language not in LANGUAGES:
        raise WanError(f"language {language!r} is not allowed: choose en or zh (the written prompt's language)")
    return SYSTEM_PROMPTS["image" if image else "text"][language]


def postprocess(written: str, original: str) -> str:
    """The written prompt as Wan's generate.py takes it: stripped, and the original prompt when the writer gave
    nothing (Wan falls back to it when the extension fails)."""
    written = written.strip()
    return written or original


class PromptWriter:
    def __init__(self, model: str | None = None, image_model: str | None = None):
        self.models = {False: model or TEXT_MODEL, True: image_model or IMAGE_MODEL}
        self.loaded = {}  # image? -> (model, tokenizer or processor)

    def load(self, image: bool = False) -> None:
        """Load the writer's model (text or picture), downloading it once; WanError saying what to get offline."""
        if image in self.loaded:
            return
        if message := extras_missing(image):
            raise WanError(message)
        name = self.models[image]
        try:
            if image:
                from mlx_vlm import load
            else:
                from mlx_lm import load
            self.loaded[image] = load(name)
        except Exception as error:  # a missing model, offline, or files that are not a model: said in one line
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            how = (f"it is not on this machine and HF_HUB_OFFLINE is set: download it once online (python -m "
                   f"wan_engine improve-prompt --prompt-model {name} ...), or give a local folder") if offline else (
                   f"{type(error).__name__}: {str(error)[:200]}")
            raise WanError(f"could not load the prompt writer's model {name}: {how}") from None

    def release(self) -> None:
        """Drop the models and return their memory (before the video model needs it)."""
        self.loaded.clear()
        gc.collect()
        mx.clear_cache()

    def write(self, prompt: str, image=None, language: str = "en", seed: int | None = None) -> str:
        """`prompt` rewritten for the video model (for image to video, looking at `image`, a path)."""
        if not prompt or not prompt.strip():
            raise WanError("the prompt is empty: write a few words for the writer to build on")
        instructions = system_prompt(image is not None, language)
        self.load(image is not None)
        if image is not None:
            written = self._write_with_picture(prompt, instructions, str(image), seed)
        else:
            written = self._write(prompt, instructions, seed)
        return postprocess(written, prompt)

    def _write(self, prompt: str, instructions: str, seed: int | None) -> str:
        tokens = self.tokens(prompt, instructions, seed)
        return self.loaded[False][1].decode(tokens, skip_special_tokens=True)

    def tokens(self, prompt: str, instructions: str, seed: int | None = None) -> list[int]:
        """The text model's new tokens for `prompt` under the system prompt `instructions`, its end token left out."""
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        self.load(False)
        model, tokenizer = self.loaded[False]
        messages = [{"role": "system", "content": instructions}, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens = mx.array(tokenizer.encode(text))  # as transformers' tokenizer([text]) does: its special tokens
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(**SAMPLING) if seed is not None else make_sampler(temp=0.0)
        generated = [response.token for response in stream_generate(
            model, tokenizer, tokens, max_tokens=MAX_NEW_TOKENS, sampler=sampler)]
        if generated and generated[-1] in tokenizer.eos_token_ids:
            generated = generated[:-1]
        return generated

    def _write_with_picture(self, prompt: str, instructions: str, image: str, seed: int | None) -> str:
        from mlx_vlm import generate
        from mlx_vlm.prompt_utils import apply_chat_template

        model, processor = self.loaded[True]
        text = apply_chat_template(processor, model.config, [{"role": "system", "content": instructions},
                                                              {"role": "user", "content": prompt}], num_images=1)
        if seed is not None:
            mx.random.seed(seed)
        settings = dict(SAMPLING, temperature=SAMPLING["temp"]) if seed is not None else {"temperature": 0.0}
        settings.pop("temp", None)
        return generate(model, processor, text, image=[image], max_tokens=MAX_NEW_TOKENS, verbose=False,
                        **settings).text
