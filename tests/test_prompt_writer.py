"""The prompt writer (wan_engine/prompting) against transformers on a tiny random Qwen2 instruct model the test
builds: the same tokens, greedy, with Wan's system prompt through the same chat template; Wan's post-processing;
the command line; and what is said when the extras or the model are missing."""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from gradio_client import Client
from playwright.sync_api import expect

from app_server import running_app
from browser import chromium
from conftest import run_cli
from tiny_qwen import character_tokenizer
from wan_engine.errors import WanError
from wan_engine.prompting.writer import MAX_NEW_TOKENS, PromptWriter, postprocess, system_prompt

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROPE_THETA = 1000000.0  # Qwen2.5's
# Qwen2.5's chat template, without its tool-calling branches (neither side uses them)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
PROMPTS = ["a cat on a sofa", "两只猫在打架"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2 instruct model in the Hugging Face layout: a character tokenizer over the characters of
    Wan's system prompts, Qwen's special tokens and chat template; weights large enough that greedy choices are
    clear-cut (no near ties for round-off to flip)."""
    folder = tmp_path_factory.mktemp("tiny-qwen")
    tokenizer, vocab = character_tokenizer(SPECIALS, CHAT_TEMPLATE, PROMPTS)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    eos = vocab["<|im_end|>"]
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         initializer_range=0.3, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
                         pad_token_id=vocab["<|endoftext|>"],
                         rope_parameters={"rope_theta": ROPE_THETA, "rope_type": "default"})
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=vocab["<|endoftext|>"])
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())  # Qwen2.5's own files say it at the top
    (folder / "config.json").write_text(json.dumps({**saved, "rope_theta": ROPE_THETA}))
    return folder, model, AutoTokenizer.from_pretrained(folder)  # as Wan loads it: from the files


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("language", ["en", "zh"])
def test_greedy_writing_is_transformers_token_for_token(tiny_qwen, prompt, language):
    folder, model, tokenizer = tiny_qwen
    instructions = system_prompt(False, language)
    messages = [{"role": "system", "content": instructions}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = output[0, inputs.input_ids.shape[1]:].tolist()
    if expected and expected[-1] == model.config.eos_token_id:
        expected = expected[:-1]
    writer = PromptWriter(model=str(folder))
    ours = writer.tokens(prompt, instructions)
    assert ours == expected and len(ours) > 10
    assert writer.write(prompt, language=language) == postprocess(
        tokenizer.decode(expected, skip_special_tokens=True), prompt)


def test_a_seed_samples_and_is_repeatable(tiny_qwen):
    writer = PromptWriter(model=str(tiny_qwen[0]))
    instructions = system_prompt(False)
    first, again = writer.tokens(PROMPTS[0], instructions, seed=3), writer.tokens(PROMPTS[0], instructions, seed=3)
    assert first == again and first != writer.tokens(PROMPTS[0], instructions)


@pytest.mark.parametrize("written,expected", [
    ("  A fluffy grey cat naps on a green velvet sofa, soft daylight from a window.\n", "A fluffy grey cat naps on a "
     "green velvet sofa, soft daylight from a window."),
    ("\n\n", "a cat on a sofa"),  # nothing written: Wan falls back to the original prompt
    ("第一行\n第二行", "第一行\n第二行"),
])
def test_wans_post_processing(written, expected):
    assert postprocess(written, "a cat on a sofa") == expected


def test_wans_system_prompts_are_the_ones_ti2v_5b_uses():
    assert "Prompt" in system_prompt(False, "en") and "英文" in system_prompt(False, "en")
    assert system_prompt(True, "zh") != system_prompt(False, "zh")
    with pytest.raises(WanError, match="language 'fr' is not allowed: choose en or zh"):
        system_prompt(False, "fr")


def test_the_command_line_writes_a_prompt(tiny_qwen, no_torch_env):
    proc = run_cli(["improve-prompt", "--prompt", PROMPTS[0], "--prompt-model", tiny_qwen[0]], no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == PromptWriter(model=str(tiny_qwen[0])).write(PROMPTS[0])


def test_generate_records_the_original_and_the_written_prompt(tiny_qwen, no_torch_env, tmp_path):
    out = tmp_path / "improved.mp4"
    proc = run_cli(["generate", "--model", "demo", "--prompt", PROMPTS[0], "--improve-prompt", "--prompt-model",
                    tiny_qwen[0], "--width", 96, "--height", 64, "--frames", 5, "--steps", 2, "--output", out],
                   no_torch_env)
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    written = PromptWriter(model=str(tiny_qwen[0])).write(PROMPTS[0])
    assert sidecar["settings"]["prompt"] == written
    assert sidecar["prompt_writer"] == {"original": PROMPTS[0], "model": str(tiny_qwen[0]), "seed": None}


def test_a_missing_model_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WanError, match="not on this machine and HF_HUB_OFFLINE is set: download it once online"):
        PromptWriter(model="someone/not-downloaded-4bit").write("a cat")


def test_missing_extras_are_named_with_how_to_add_them(no_torch_env, tmp_path):
    site = tmp_path / "no-extras"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['mlx_lm'] = None\nsys.modules['mlx_vlm'] = None\n")
    env = {**no_torch_env, "PYTHONPATH": os.pathsep.join([str(site), no_torch_env["PYTHONPATH"]])}
    proc = run_cli(["improve-prompt", "--prompt", "a cat"], env)
    assert proc.returncode == 1
    assert "the prompt writer needs mlx-lm, not installed here: pip install -r requirements-prompt.txt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def writing_app(tiny_qwen, tmp_path_factory):
    """The app with the tiny model as its prompt writer."""
    with running_app(tmp_path_factory.mktemp("writing-app"), ["--prompt-model", str(tiny_qwen[0]), "--no-warmup"]) \
            as server:
        yield server


def test_improve_prompt_through_the_api_and_the_page(writing_app, tiny_qwen):
    expected = PromptWriter(model=str(tiny_qwen[0])).write(PROMPTS[0])
    written, status = Client(writing_app.url, verbose=False).predict(api_name="/improve_prompt", prompt=PROMPTS[0])
    assert written == expected and "Written" in status
    with chromium() as browser:
        page = browser.new_page()
        page.goto(writing_app.url)
        prompt = page.get_by_label("Prompt", exact=True).filter(visible=True)
        prompt.fill(PROMPTS[0])
        page.get_by_role("button", name="Improve prompt").filter(visible=True).click()
        expect(page.get_by_text("Written: edit it if you like").first).to_be_visible(timeout=60_000)
        expect(prompt).to_have_value(expected)  # in the box for editing; nothing generated
    assert not list(writing_app.output_dir.glob("wan-*.mp4"))


def test_without_the_extras_the_page_says_how_to_add_them(tmp_path):
    site = tmp_path / "no-extras"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['mlx_lm'] = None\nsys.modules['mlx_vlm'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    with running_app(tmp_path, ["--no-warmup"], env=env) as server, chromium() as browser:
        page = browser.new_page()
        page.goto(server.url)
        expect(page.get_by_text("pip install -r requirements-prompt.txt").first).to_be_visible(timeout=30_000)
        expect(page.get_by_role("button", name="Improve prompt")).to_have_count(0)
