"""`PromptWriter`: a short prompt rewritten by an instruct model with Wan's system prompt, as Wan's
`QwenPromptExpander` does it: the messages [system, user] through the model's chat template, up to 512 new tokens,
special tokens left out of the text. Greedy by default; a seed samples with Qwen2.5's own settings (temperature 0.7,
top-p 0.8, top-k 20), as Wan's extender samples. The model loads on the first prompt and stays until `release`.
With a picture (image to video), Qwen2.5-VL on mlx-vlm as Wan's `extend_with_img`: the user's message holds the picture
then the prompt, the picture sized as Wan's `process_vision_info` and processor size it.

Default models, 4-bit MLX conversions of Wan's own choices (`Qwen2.5_3B`, `QwenVL2.5_3B`): about 2 GiB and 3 GiB, so
they run beside nothing else on a 16 GiB Mac; the writer is released before the video model needs the memory.
"""

import gc
import json
import math
import os
from importlib.util import find_spec
from pathlib import Path

import mlx.core as mx
from PIL import Image

from ..errors import WanError
from ..images import describe, open_image

TEXT_MODEL = "mlx-community/Qwen2.5-3B-Instruct-4bit"
IMAGE_MODEL = "mlx-community/Qwen2.5-VL-3B-Instruct-4bit"
MAX_NEW_TOKENS = 512  # Wan's QwenPromptExpander
SAMPLING = {"temp": 0.7, "top_p": 0.8, "top_k": 20}  # Qwen2.5-Instruct's generation_config
SYSTEM_PROMPTS = json.loads((Path(__file__).parent / "system_prompts.json").read_text(encoding="utf-8"))
LANGUAGES = ("en", "zh")
EXTRAS = "pip install -r requirements-prompt.txt"
# The picture as Wan hands it to Qwen2.5-VL: qwen_vl_utils' fetch_image snaps it to multiples of 28 (14-pixel patches,
# merged 2x2) within its bounds, then Wan's processor (min_pixels, max_pixels) keeps 256 to 1280 image tokens.
IMAGE_FACTOR = 28
FETCH_PIXELS = (4 * 28 * 28, 16384 * 28 * 28)
PROCESSOR_PIXELS = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}
MAX_RATIO = 200


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


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen_vl_utils' smart_resize: the size nearest (height, width) in multiples of 28 with its area within
    [min_pixels, max_pixels], the aspect kept as well as may be."""
    h_bar = max(IMAGE_FACTOR, round(height / IMAGE_FACTOR) * IMAGE_FACTOR)
    w_bar = max(IMAGE_FACTOR, round(width / IMAGE_FACTOR) * IMAGE_FACTOR)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / IMAGE_FACTOR) * IMAGE_FACTOR
        w_bar = math.floor(width / beta / IMAGE_FACTOR) * IMAGE_FACTOR
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / IMAGE_FACTOR) * IMAGE_FACTOR
        w_bar = math.ceil(width * beta / IMAGE_FACTOR) * IMAGE_FACTOR
    return h_bar, w_bar


def fetch_image(image) -> Image.Image:
    """The picture (a path or a PIL image) as Wan's `process_vision_info` gives it to the processor: the one the video
    model sees (upright, RGB), resized (bicubic) by `smart_resize`."""
    picture = open_image(image)
    if max(picture.size) / min(picture.size) > MAX_RATIO:  # Qwen's processor refuses it
        raise WanError(f"the image {describe(image)} is too narrow for the prompt writer: its sides may differ "
                       f"{MAX_RATIO} times at most, these are {picture.width}x{picture.height}")
    height, width = smart_resize(picture.height, picture.width, *FETCH_PIXELS)
    return picture.resize((width, height), Image.Resampling.BICUBIC)


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
        """`prompt` rewritten for the video model (for image to video, looking at `image`, a path or a PIL image)."""
        if not prompt or not prompt.strip():
            raise WanError("the prompt is empty: write a few words for the writer to build on")
        instructions = system_prompt(image is not None, language)
        if image is not None:
            written = self._write_with_picture(prompt, instructions, image, seed)
        else:
            self.load(False)
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

    def _write_with_picture(self, prompt: str, instructions: str, image, seed: int | None) -> str:
        tokens = self.picture_tokens(prompt, instructions, image, seed)
        # as Wan's extend_with_img decodes
        return self.loaded[True][1].decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def picture_tokens(self, prompt: str, instructions: str, image, seed: int | None = None) -> list[int]:
        """The picture model's new tokens for `prompt` and the picture `image` (a path or a PIL image) under the
        system prompt `instructions`, its end token left out; Wan's `extend_with_img` on mlx-vlm."""
        picture = fetch_image(image)  # before the model loads: a bad picture is said at once
        self.load(True)
        from mlx_vlm import generate
        from mlx_vlm.sample_utils import make_sampler

        model, processor = self.loaded[True]
        messages = [{"role": "system", "content": [{"type": "text", "text": instructions}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(**SAMPLING) if seed is not None else make_sampler(temp=0.0)
        # the picture's sizing goes to the processor with the call (mlx-vlm's load takes no processor settings)
        result = generate(model, processor, text, image=[picture], max_tokens=MAX_NEW_TOKENS, sampler=sampler,
                          **PROCESSOR_PIXELS)
        generated = list(result.token_ids or [])
        # the end tokens are the model's generation_config's (Qwen2.5-VL: <|im_end|> and <|endoftext|>)
        if generated and generated[-1] in processor.tokenizer.stopping_criteria.eos_token_ids:
            generated = generated[:-1]
        return generated
