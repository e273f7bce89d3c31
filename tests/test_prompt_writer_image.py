"""The prompt writer's picture path (image to video: Qwen2.5-VL on mlx-vlm) against transformers on a tiny random
Qwen2.5-VL the test builds in Qwen's published layout: the same tokens, greedy, for Wan's messages (system prompt;
the picture, then the prompt) through the same chat template, with the picture sized as Wan sizes it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoTokenizer, GenerationConfig,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)

from conftest import run_cli
from tiny_qwen import character_tokenizer
from wan_engine.errors import WanError
from wan_engine.prompting.writer import MAX_NEW_TOKENS, PromptWriter, postprocess, system_prompt

pytest.importorskip("mlx_vlm")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# Qwen2.5-VL-Instruct's chat template (chat_template.json), whole
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# Qwen2.5-VL-3B-Instruct's preprocessor_config.json (Wan overrides its pixel bounds when it loads the processor)
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}
WAN_PIXELS = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}  # Wan's QwenPromptExpander
MROPE_SECTION = [2, 3, 3]  # a quarter of the head's 16 dimensions each for time, then 3/8 for height and width
PROMPTS = ["a cat on a sofa", "两只猫在打架"]


@pytest.fixture(scope="module")
def tiny_qwen_vl(tmp_path_factory):
    """A tiny random Qwen2.5-VL in the layout of Qwen's own files: the weights as transformers saves them, config.json
    with the text model's settings at the top (mrope in rope_scaling), generation_config.json ending on <|im_end|>
    or <|endoftext|>, a character tokenizer over the system prompts' characters with Qwen's special tokens, Qwen's
    chat template and preprocessor_config.json. Weights large enough that greedy choices are clear-cut."""
    folder = tmp_path_factory.mktemp("tiny-qwen-vl")
    tokenizer, vocab = character_tokenizer(SPECIALS, CHAT_TEMPLATE, PROMPTS)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))

    torch.manual_seed(0)
    ends = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                initializer_range=0.3, bos_token_id=None, eos_token_id=ends[0], pad_token_id=ends[1],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=56,
                  fullatt_block_indexes=[1], initializer_range=0.3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                              video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                              vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=ends[1])
    model.save_pretrained(folder)  # the weights in Qwen's names (visual.*, model.layers.*, lm_head)
    # config.json as Qwen's own: transformers 5 nests the text model's settings, which mlx-vlm 0.7 does not read
    saved = json.loads((folder / "config.json").read_text())
    text_saved = {key: value for key, value in saved.pop("text_config").items()
                  if key not in ("model_type", "layer_types", "rope_parameters", "dtype")}
    vision_saved = {key: value for key, value in saved.pop("vision_config").items()
                    if key not in ("model_type", "rope_parameters")}
    (folder / "config.json").write_text(json.dumps({
        **saved, **text_saved, "vision_config": vision_saved, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION}}))
    # as Wan loads them: from the files (the processor's pixel bounds Wan's)
    return (folder, Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval(),
            AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder, **WAN_PIXELS))


def fetch_image(picture: Image.Image) -> Image.Image:
    """qwen_vl_utils' fetch_image (Wan's process_vision_info) for a picture given without sizes, with
    transformers' smart_resize: multiples of 28 with 4 to 16384 patches of 28x28."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    height, width = smart_resize(picture.height, picture.width, 28, 4 * 28 * 28, 16384 * 28 * 28)
    return picture.resize((width, height))


def wan_tokens(tiny_qwen_vl, prompt: str, instructions: str, picture: Image.Image) -> list[int]:
    """Wan's extend_with_img, greedy: its messages through the chat template, process_vision_info, the processor,
    generate with 512 new tokens. transformers' Qwen2_5_VLProcessor needs torchvision (its video processor), which
    has no build for a CPU-only torch on PyPI: its steps for one picture are done here (as processing_qwen2_5_vl
    does them)."""
    _, model, tokenizer, image_processor = tiny_qwen_vl
    messages = [{"role": "system", "content": [{"type": "text", "text": instructions}]},
                {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs = image_processor(images=[fetch_image(picture)], return_tensors="pt")
    image_tokens = int(image_inputs["image_grid_thw"][0].prod()) // image_processor.merge_size ** 2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
    inputs = tokenizer([text], padding=True, return_tensors="pt")
    mm_token_type_ids = (inputs.input_ids == model.config.image_token_id).int()  # 1 at the picture's tokens
    with torch.no_grad():
        output = model.generate(**inputs, **image_inputs, mm_token_type_ids=mm_token_type_ids,
                                max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = output[0, inputs.input_ids.shape[1]:].tolist()
    if expected and expected[-1] in model.generation_config.eos_token_id:
        expected = expected[:-1]
    return expected


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture: colours varying across it, so that a resize changes it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


# sizes: 504x420 after fetch_image, within Wan's bounds (270 image tokens); 56x56, raised to Wan's 256 tokens;
# 1204x1008, lowered to Wan's 1280 at most
@pytest.mark.parametrize("prompt,language,size", [(PROMPTS[0], "en", (500, 410)), (PROMPTS[1], "zh", (64, 48)),
                                                  (PROMPTS[0], "zh", (1200, 1000))])
def test_greedy_writing_with_a_picture_is_transformers_token_for_token(tiny_qwen_vl, tmp_path, prompt, language,
                                                                       size):
    folder, _, tokenizer, _ = tiny_qwen_vl
    path = tmp_path / "first.png"
    picture(*size).save(path)
    instructions = system_prompt(True, language)
    expected = wan_tokens(tiny_qwen_vl, prompt, instructions, Image.open(path).convert("RGB"))
    writer = PromptWriter(image_model=str(folder))
    ours = writer.picture_tokens(prompt, instructions, path)
    assert ours == expected and len(ours) > 10
    assert writer.write(prompt, image=path, language=language) == postprocess(
        tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False), prompt)


def test_a_seed_samples_and_is_repeatable_with_a_picture(tiny_qwen_vl):
    writer = PromptWriter(image_model=str(tiny_qwen_vl[0]))
    instructions, image = system_prompt(True), picture(500, 410)
    first = writer.picture_tokens(PROMPTS[0], instructions, image, seed=3)
    assert first == writer.picture_tokens(PROMPTS[0], instructions, image, seed=3)
    assert first != writer.picture_tokens(PROMPTS[0], instructions, image)


def test_the_command_line_writes_a_prompt_for_a_picture(tiny_qwen_vl, no_torch_env, tmp_path):
    path = tmp_path / "first.png"
    picture(500, 410).save(path)
    proc = run_cli(["improve-prompt", "--prompt", PROMPTS[0], "--image", path, "--prompt-model", tiny_qwen_vl[0]],
                   no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == PromptWriter(image_model=str(tiny_qwen_vl[0])).write(PROMPTS[0], image=path)


def test_a_picture_that_cannot_be_read_is_said_before_loading(tmp_path):
    writer = PromptWriter(image_model=str(tmp_path / "no-model"))
    with pytest.raises(WanError, match="does not exist"):
        writer.write(PROMPTS[0], image=tmp_path / "missing.png")
    Image.new("RGB", (402, 2)).save(tmp_path / "strip.png")
    with pytest.raises(WanError, match="too narrow for the prompt writer"):
        writer.write(PROMPTS[0], image=tmp_path / "strip.png")
    assert not writer.loaded
