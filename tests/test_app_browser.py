"""The page in a real browser (Debian's chromium, driven by Playwright) against the demo-model server: both tabs,
a prompt and Generate make a video, the layout fits a phone, image to video shows its size before generating,
Stop ends a run, the history puts a past run's settings back into the form, and the sampler, memory preset and
live-preview switch reach the run. Screenshots are saved under the
test session's temporary folder (printed with -s)."""

import os
import re

import pytest
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import expect

from browser import CHROMIUM, chromium
from test_lora import musubi_lora, shapes_of
from wan_engine.model_files.demo import ensure_demo_model

RUN_TIMEOUT_MS = 90_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium package is not installed")


@pytest.fixture(scope="module")
def browser(app_server):
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_server.url)
    expect(page.get_by_role("tab", name="Text to video")).to_be_visible(timeout=30_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def visible(locator):
    return locator.filter(visible=True)


def set_slider(page, label: str, value: int) -> None:
    """Type the value into the slider's number box. The page's load event may still be setting the model's
    defaults when a test starts (later, on a busy server), so the value is typed again until it holds."""
    field = visible(page.get_by_label(f"number input for {label}", exact=True))
    slider = visible(page.get_by_label(f"range slider for {label}", exact=True))
    for _ in range(5):
        field.fill(str(value))
        field.press("Tab")
        page.wait_for_timeout(300)
        if slider.input_value() == str(value):
            break
    expect(slider).to_have_value(str(value))


def generate_and_wait(page):
    visible(page.get_by_role("button", name="Generate", exact=True)).click()
    expect(page.locator("#result-video video")).to_have_attribute("src", re.compile(r"\.mp4$"), timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#progress")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)


def test_a_prompt_and_generate_make_a_video_on_a_desktop_and_a_phone(page, screenshots):
    expect(page.get_by_role("tab", name="Image to video")).to_be_visible()
    visible(page.get_by_label("Prompt", exact=True)).fill("a red kite over green hills")
    generate_and_wait(page)
    expect(page.locator("#progress")).to_contain_text("seed")
    expect(page.get_by_role("button", name="Download MP4")).to_be_visible()  # shown once the video is saved
    expect(page.get_by_role("button", name=re.compile(r"^Thumbnail 1 of"))).to_be_visible()  # and in the history
    page.screenshot(path=screenshots / "desktop.png", full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.get_by_role("button", name="Generate", exact=True)).to_be_in_viewport()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    page.screenshot(path=screenshots / "phone.png", full_page=True)
    print(f"\nscreenshots: {screenshots / 'desktop.png'} and {screenshots / 'phone.png'}")


def test_a_refused_request_says_why_in_its_status_line_and_covers_nothing(page):
    progress = page.locator("#progress")
    expect(progress).to_contain_text("Ready", timeout=RUN_TIMEOUT_MS)  # the warm-up's last word comes before
    prompt = visible(page.get_by_label("Prompt", exact=True))
    prompt.fill("   ")
    visible(page.get_by_role("button", name="Generate", exact=True)).click()
    expect(progress).to_contain_text("Failed: the prompt is empty: describe the video you want", timeout=30_000)
    expect(progress.locator(".error")).to_be_hidden()  # Gradio's badge would cover the line

    visible(page.get_by_role("button", name="Improve prompt")).click()
    expect(page.get_by_text("Failed: the prompt is empty: write a few words").first).to_be_visible(timeout=30_000)
    covers = page.locator("[data-testid=status-tracker] .error").filter(visible=True)
    expect(covers).to_have_count(0)  # the prompt box is not covered either
    prompt.click()  # a click reaches the box, not a cover over it
    page.keyboard.type("a kite")
    expect(prompt).to_have_value("   a kite")


def test_a_damaged_picture_is_refused_on_the_line_under_it_and_in_the_progress_line(page, tmp_path):
    whole = tmp_path / "whole.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    expect(page.locator("#progress")).to_contain_text("Ready", timeout=RUN_TIMEOUT_MS)
    page.get_by_role("tab", name="Image to video").click()
    page.locator("input[type=file]").set_input_files(cut)
    expect(page.get_by_text("This picture cannot be used: the image cut.png is damaged or cut short")).to_be_visible(
        timeout=15_000)
    visible(page.get_by_label("Prompt", exact=True)).fill("the meadow sways")
    visible(page.get_by_role("button", name="Generate", exact=True)).click()
    expect(page.locator("#progress")).to_contain_text("Failed: the image cut.png is damaged or cut short",
                                                      timeout=30_000)
    expect(page.locator("[data-testid=status-tracker] .error").filter(visible=True)).to_have_count(0)


def test_image_to_video_shows_its_size_before_generating(page, tmp_path, screenshots):
    picture = tmp_path / "wide.png"
    Image.new("RGB", (120, 80), (40, 160, 90)).save(picture)
    page.get_by_role("tab", name="Image to video").click()
    page.locator("input[type=file]").set_input_files(picture)  # the upload field's hidden input
    expect(page.get_by_text("Video size 96x64")).to_be_visible(timeout=15_000)
    visible(page.get_by_label("Resolution")).click()
    page.get_by_role("option", name="128x128").click()
    expect(page.get_by_text("Video size 160x96")).to_be_visible(timeout=15_000)  # the picture's 3:2 at 128x128's area
    visible(page.get_by_label("Prompt", exact=True)).fill("the meadow sways")
    generate_and_wait(page)
    page.screenshot(path=screenshots / "image-to-video.png", full_page=True)


def test_stop_ends_a_run_on_the_page(page, app_server):
    videos_before = set(app_server.output_dir.glob("wan-*.mp4"))
    visible(page.get_by_label("Prompt", exact=True)).fill("a slow sunrise")
    page.get_by_text("Advanced: steps").click()
    set_slider(page, "Steps", 100)
    set_slider(page, "Frames", 241)
    visible(page.get_by_role("button", name="Generate", exact=True)).click()
    expect(page.locator("#progress")).to_contain_text("Denoising", timeout=RUN_TIMEOUT_MS)
    visible(page.get_by_role("button", name="Stop", exact=True)).click()
    expect(page.locator("#progress")).to_contain_text("Stopped at step", timeout=30_000)
    assert set(app_server.output_dir.glob("wan-*.mp4")) == videos_before


def test_history_puts_a_past_runs_settings_back(page, app_server, tmp_path, screenshots):
    picture = tmp_path / "tall.png"
    Image.new("RGB", (80, 120), (200, 120, 40)).save(picture)
    Client(app_server.url, verbose=False).predict(
        api_name="/image_to_video", image=handle_file(picture), prompt="an orange tower", width=64, height=96,
        frames=5, steps=2, seed=33)
    page.reload()
    newest = page.get_by_role("button", name=re.compile(r"^Thumbnail 1 of"))
    expect(newest).to_be_visible(timeout=15_000)
    newest.click()
    expect(page.get_by_text("an orange tower").first).to_be_visible()  # its settings
    restore = page.get_by_role("button", name="Use these settings")
    expect(restore).to_be_enabled()
    page.screenshot(path=screenshots / "history.png", full_page=True)
    restore.click()
    # an image-to-video run: its tab opens with its prompt, seed, first frame and exact size
    expect(page.get_by_role("tab", name="Image to video", selected=True)).to_be_visible()
    expect(visible(page.get_by_label("Prompt", exact=True))).to_have_value("an orange tower")
    expect(page.get_by_text("Video size 64x96")).to_be_visible(timeout=15_000)


def test_sampler_memory_preset_and_preview_switch_reach_the_run(page):
    page.get_by_text("Sampler, memory and live preview").click()
    page.get_by_label("euler").check()
    page.get_by_label("low-ram").check()
    page.get_by_label("Live preview").uncheck()
    expect(page.locator("#live-preview")).to_be_hidden()
    visible(page.get_by_label("Prompt", exact=True)).fill("a windmill at dusk")
    generate_and_wait(page)
    page.get_by_text("Settings of this video (JSON)").click()
    settings = page.locator("#result-settings")
    expect(settings).to_contain_text('"euler"')
    expect(settings).to_contain_text('"low-ram"')


def test_the_fast_speed_sets_three_steps_without_guidance_and_reaches_the_run(page, screenshots):
    page.get_by_label("Fast (3 steps)").check()
    page.get_by_text("Advanced: steps").click()
    expect(visible(page.get_by_label("range slider for Steps", exact=True))).to_have_value("3")
    expect(visible(page.get_by_label("range slider for Guidance", exact=True))).to_have_value("1")
    page.get_by_text("Sampler, memory and live preview").click()
    expect(page.get_by_label("dmd")).to_be_checked()
    visible(page.get_by_label("Prompt", exact=True)).fill("a fast red kite")
    generate_and_wait(page)
    page.get_by_text("Settings of this video (JSON)").click()
    settings = page.locator("#result-settings")
    expect(settings).to_contain_text('"dmd"')
    expect(settings).to_contain_text('"steps": 3')
    page.screenshot(path=screenshots / "fast.png", full_page=True)
    page.get_by_label("Quality").check()  # and back: the sampler and its steps return
    expect(page.get_by_label("unipc")).to_be_checked()
    expect(visible(page.get_by_label("range slider for Steps", exact=True))).to_have_value("10")


def test_a_lora_picked_from_the_folder_reaches_the_run(page, app_server):
    folder = app_server.output_dir.parent / "loras"
    folder.mkdir(exist_ok=True)
    musubi_lora(folder / "watercolour.safetensors", shapes_of(ensure_demo_model()), seed=5, rank=2)
    page.reload()  # the list is read when the page loads
    visible(page.get_by_text("LoRA adapters")).click()
    visible(page.get_by_label("LoRAs")).click()
    page.get_by_role("option", name="watercolour.safetensors:1.0").click()
    visible(page.get_by_label("Prompt", exact=True)).fill("a watercolour harbour")
    generate_and_wait(page)
    page.get_by_text("Settings of this video (JSON)").click()
    expect(page.locator("#result-settings")).to_contain_text("watercolour.safetensors")


def test_the_balanced_speed_caches_steps_and_the_history_puts_it_back(page, app_server):
    page.get_by_label("Balanced (MagCache, about 2x)").check()
    page.get_by_text("Sampler, memory and live preview").click()
    expect(page.get_by_label("unipc")).to_be_checked()
    expect(page.get_by_label("magcache", exact=True)).to_be_checked()
    visible(page.get_by_label("Prompt", exact=True)).fill("a balanced lighthouse")
    page.get_by_text("Advanced: steps").click()
    set_slider(page, "Steps", 20)
    generate_and_wait(page)
    page.get_by_text("Settings of this video (JSON)").click()
    expect(page.locator("#result-settings")).to_contain_text('"magcache"')
    page.get_by_label("Quality (50 steps)").check()
    expect(page.get_by_label("none", exact=True)).to_be_checked()
    newest = page.get_by_role("button", name=re.compile(r"^Thumbnail 1 of"))
    expect(newest).to_be_visible(timeout=15_000)
    newest.click()
    expect(page.get_by_text("a balanced lighthouse").first).to_be_visible()
    page.get_by_role("button", name="Use these settings").click()
    expect(page.get_by_label("Balanced (MagCache, about 2x)")).to_be_checked()
    expect(page.get_by_label("magcache", exact=True)).to_be_checked()


def test_a_draft_shows_its_sharp_preview_and_finishes_in_full_quality(page, app_server):
    page.get_by_label("Draft", exact=True).check()
    visible(page.get_by_label("Prompt", exact=True)).fill("a drafted windmill")
    generate_and_wait(page)
    expect(page.locator("#progress")).to_contain_text("draft")
    preview = page.locator("#live-preview img")
    expect(preview).to_be_visible()
    size = preview.evaluate("image => [image.naturalWidth, image.naturalHeight]")
    assert size == [96, 64]  # the tiny decoder's picture at the video's size, not the latents' 6x4
    finish = page.locator("#finish-draft")
    expect(finish).to_be_visible()
    finish.click()
    expect(page.locator("#progress")).to_contain_text("finished from the draft", timeout=RUN_TIMEOUT_MS)
    expect(finish).to_be_hidden()
    assert len(list(app_server.output_dir.glob("wan-*-full.mp4"))) >= 1


def test_continue_this_video_tells_a_story_and_the_history_puts_it_back(page, app_server):
    visible(page.get_by_label("Prompt", exact=True)).fill("a lighthouse at dusk")
    generate_and_wait(page)
    page.locator("#continue-video").click()
    expect(page.locator("#extend-last-frame img")).to_be_visible(timeout=15_000)  # the source's last frame
    expect(visible(page.get_by_label("Prompt", exact=True))).to_have_value("")
    visible(page.get_by_label("Prompt", exact=True)).fill("the light turns on")
    page.get_by_label("Story", exact=True).check()
    page.locator("#next-segments textarea").fill("a ship passes\nthe night falls")
    visible(page.get_by_role("button", name="Generate", exact=True)).click()
    expect(page.locator("#progress")).to_contain_text("3 segments, continuing a video", timeout=RUN_TIMEOUT_MS)
    page.reload()
    newest = page.get_by_role("button", name=re.compile(r"^Thumbnail 1 of"))
    expect(newest).to_be_visible(timeout=15_000)
    newest.click()
    page.get_by_role("button", name="Use these settings").click()
    expect(visible(page.get_by_label("Prompt", exact=True))).to_have_value("the light turns on")
    expect(page.locator("#next-segments textarea")).to_have_value("a ship passes\nthe night falls")
