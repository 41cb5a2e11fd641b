"""The page's Styles menu and Checkpoint Merger tab in headless chromium: save the prompts as a style, generate with
it chosen (the infotext carries the styled prompt), delete it; merge two models and find the result in the
checkpoint list."""
import csv
import json
import os

import pytest

from browser import CHROMIUM, Browser
from webui_server import start_server, write_models

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (Debian: apt-get install -y chromium)", allow_module_level=True)

from sample.infotext import parse_infotext  # noqa: E402


def _js(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)})"


def _options(browser: Browser, selector: str) -> list[str]:
    return browser.evaluate(f"Array.from({_js(selector)}.options, o => o.value)")


def test_styles_menu_and_checkpoint_merger(tmp_path):
    models = tmp_path / "models"
    write_models(str(models))
    server = start_server(tmp_path, models_dir=str(models), styles_file=str(tmp_path / "styles.csv"))
    try:
        with Browser() as browser:
            browser.navigate(server.url + "/")
            browser.wait_for("document.body.dataset.ready === 'true'")

            # Save the current prompts as a style; both tabs' menus offer it.
            browser.type_text("#txt2img_prompt", "{prompt}, on a checkerboard")
            browser.type_text("#txt2img_style_name", "board")
            browser.click("#txt2img_style_create")
            browser.wait_for(f"{_js('#img2img_styles')}.options.length === 1")
            assert _options(browser, "#txt2img_styles") == ["board"]
            with open(tmp_path / "styles.csv", newline="", encoding="utf-8-sig") as file:
                assert list(csv.DictReader(file)) == [
                    {"name": "board", "prompt": "{prompt}, on a checkerboard", "negative_prompt": ""}]

            # Generate with the style chosen: its text wraps the prompt.
            browser.evaluate(f"{_js('#txt2img_prompt')}.value = 'a red circle'")
            browser.evaluate(f"{_js('#txt2img_styles')}.options[0].selected = true")
            browser.evaluate("setValue('txt2img_steps', 2)")
            browser.click("#txt2img_generate")
            browser.wait_for(f"{_js('#txt2img_html_info')}.textContent.includes('checkerboard')", timeout=60)
            infotext = parse_infotext(browser.evaluate(f"{_js('#txt2img_html_info')}.textContent"))
            assert infotext["Prompt"] == "a red circle, on a checkerboard"

            browser.click("#txt2img_style_delete")
            browser.wait_for(f"{_js('#txt2img_styles')}.options.length === 0")

            # Checkpoint Merger: A and B at 0.5, saved as float16; the new model joins the quicksettings list.
            browser.click("#tab_modelmerger_button")
            browser.wait_for(f"!{_js('#tab_modelmerger')}.hidden")
            titles = _options(browser, "#modelmerger_primary_model_name")
            a = next(title for title in titles if title.startswith("tiny-a"))
            b = next(title for title in titles if title.startswith("tiny-b"))
            browser.evaluate(f"{_js('#modelmerger_primary_model_name')}.value = {json.dumps(a)}")
            browser.evaluate(f"{_js('#modelmerger_secondary_model_name')}.value = {json.dumps(b)}")
            browser.evaluate("setValue('modelmerger_interp_amount', 0.5)")
            browser.type_text("#modelmerger_custom_name", "half-half")
            browser.click("#modelmerger_save_as_half")
            browser.click("#modelmerger_merge")
            browser.wait_for(f"{_js('#modelmerger_result')}.textContent.includes('Checkpoint saved')", timeout=60)
            assert (models / "half-half.safetensors").is_file()
            browser.wait_for(f"Array.from({_js('#setting_sd_model_checkpoint')}.options)"
                             ".some(o => o.value.startsWith('half-half.safetensors'))")
            assert not browser.evaluate(f"{_js('#modelmerger_result')}.classList.contains('error')")
            browser.screenshot(str(tmp_path / "webui_merger.png"))
    finally:
        server.stop()
