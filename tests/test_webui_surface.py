"""The rest of A1111's API surface over a live server: ordinary options (stored, type-checked, unknown names listed),
cmd-flags, hypernetworks, prompt styles (load, list, apply, save, delete) and the native-resolution default, plus our
POST /sdapi/v1/merge."""
import base64
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from oracles import import_oracle
from webui_server import start_server, write_models

httpx = import_oracle("httpx")

from sample.infotext import parse_infotext  # noqa: E402
from sample.webui.__main__ import a1111_cmd_flags, build_parser  # noqa: E402
from sample.webui.options import STORED_OPTIONS  # noqa: E402

FAST = {"prompt": "a red circle", "steps": 2, "seed": 5}
FLAGS = {"api": True, "port": 7860, "ckpt_dir": "models"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("surface")
    (folder / "styles.csv").write_text("name,prompt,negative_prompt\nframed,\"{prompt}, in a frame\",blurry\n",
                                       encoding="utf-8")
    return folder, write_models(str(folder / "models"))


@pytest.fixture(scope="module")
def server(folders):
    folder, _ = folders
    running = start_server(folder, models_dir=str(folder / "models"), styles_file=str(folder / "styles.csv"),
                           cmd_flags=FLAGS)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


# ----- options ----------------------------------------------------------------------------------------------------

def test_options_have_a1111s_ordinary_keys_with_its_defaults(client):
    options = client.get("/sdapi/v1/options").json()
    for name, default in {"send_seed": True, "send_size": True, "samples_format": "png", "samples_save": True,
                          "jpeg_quality": 80, "eta_noise_seed_delta": 0, "eta_ancestral": 1.0,
                          "img2img_fix_steps": False, "enable_pnginfo": True, "CLIP_stop_at_last_layers": 1,
                          "sd_vae": "Automatic", "outdir_samples": ""}.items():
        assert options[name] == default, name
    assert options["outdir_txt2img_samples"].endswith("txt2img-images")
    assert options["sd_model_checkpoint"] and set(STORED_OPTIONS) <= set(options)


def test_stored_options_read_back_and_wrong_types_are_refused(client):
    values = {"eta_noise_seed_delta": 31337, "jpeg_quality": 95, "eta_ancestral": 0.5, "send_size": False,
              "samples_filename_pattern": "[seed]", "quicksettings_list": ["sd_model_checkpoint", "sd_vae"]}
    before = client.get("/sdapi/v1/options").json()
    assert client.post("/sdapi/v1/options", json=values).json() is None  # A1111's answer when all names are known
    after = client.get("/sdapi/v1/options").json()
    assert {name: after[name] for name in values} == values
    for name, wrong in (("send_seed", "yes"), ("jpeg_quality", 9.5), ("eta_ancestral", True),
                        ("quicksettings_list", "sd_vae")):
        response = client.post("/sdapi/v1/options", json={name: wrong, "send_size": True})
        assert response.status_code == 400 and name in response.json()["detail"], response.text
    assert client.get("/sdapi/v1/options").json()["send_size"] is False  # nothing changed by a refused request
    client.post("/sdapi/v1/options", json={name: before[name] for name in values})


def test_unknown_options_are_ignored_and_listed(client):
    response = client.post("/sdapi/v1/options", json={"send_seed": False, "sned_seed": True, "no_such": 1})
    assert response.status_code == 200
    assert response.json()["ignored"] == ["sned_seed", "no_such"]
    assert "sned_seed" in response.headers["warning"] and response.headers["warning"].startswith("299 ")
    options = client.get("/sdapi/v1/options").json()
    assert options["send_seed"] is False and "sned_seed" not in options and "no_such" not in options
    client.post("/sdapi/v1/options", json={"send_seed": True})
    # Names that cannot stand in a header as they are (found by the fuzz test: "\r" closed the connection).
    response = client.post("/sdapi/v1/options", json={"\r": None, "naïve \"x\"": 1})
    assert response.status_code == 200 and response.json()["ignored"] == ["\r", "naïve \"x\""]
    assert response.headers["warning"] == "299 - \"unknown options ignored: \\r, na\\u00efve \\'x\\'\""


def test_unknown_override_settings_are_listed_in_the_answer(client):
    body = client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"CLIP_stop_at_last_layrs": 2}}).json()
    assert json.loads(body["info"])["warnings"] == [
        "override_settings: unknown options ignored: CLIP_stop_at_last_layrs"]


def test_output_folders_stay_fixed(client):
    response = client.post("/sdapi/v1/options", json={"outdir_extras_samples": "/tmp/elsewhere"})
    assert response.status_code == 400 and "--outdir" in response.json()["detail"]


def test_enable_pnginfo_off_sends_images_without_their_infotext(client):
    client.post("/sdapi/v1/options", json={"enable_pnginfo": False})
    try:
        body = client.post("/sdapi/v1/txt2img", json=FAST).json()
    finally:
        client.post("/sdapi/v1/options", json={"enable_pnginfo": True})
    assert "parameters" not in _image(body["images"][0]).info
    assert json.loads(body["info"])["infotexts"][0].startswith("a red circle")  # still reported in info
    body = client.post("/sdapi/v1/txt2img", json=FAST).json()
    assert _image(body["images"][0]).info["parameters"].startswith("a red circle")


# ----- native resolution ------------------------------------------------------------------------------------------

def test_requests_without_a_size_use_the_models_native_resolution(client, server):
    native = server.service.loaded.model.preset.resolution
    body = client.post("/sdapi/v1/txt2img", json=FAST).json()
    assert _image(body["images"][0]).size == (native, native)
    assert (json.loads(body["info"])["width"], json.loads(body["info"])["height"]) == (native, native)
    init = io.BytesIO()
    Image.new("RGB", (40, 24), (10, 200, 30)).save(init, format="PNG")
    body = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": [base64.b64encode(init.getvalue()).decode()],
                                                  "denoising_strength": 0.5}).json()
    assert _image(body["images"][0]).size == (native, native)
    body = client.post("/sdapi/v1/txt2img", json={**FAST, "width": 32, "height": 48}).json()
    assert _image(body["images"][0]).size == (32, 48)  # an explicit size still wins


# ----- listings ---------------------------------------------------------------------------------------------------

def test_cmd_flags_and_hypernetworks(client):
    assert client.get("/sdapi/v1/cmd-flags").json() == FLAGS
    assert client.get("/sdapi/v1/hypernetworks").json() == []


def test_cmd_flags_use_a1111_names_and_hide_passwords():
    flags = a1111_cmd_flags(build_parser().parse_args(
        ["--host", "0.0.0.0", "--models-dir", "m", "--api-auth", "ann:secret,bob:hunter2", "--styles-file", "s.csv"]))
    assert flags["listen"] is True and flags["server_name"] == "0.0.0.0" and flags["port"] == 7860
    assert flags["ckpt_dir"] == "m" and flags["vae_dir"].endswith("VAE") and flags["styles_file"] == "s.csv"
    assert flags["api_auth"] == "ann:***,bob:***" and "secret" not in json.dumps(flags)
    assert a1111_cmd_flags(build_parser().parse_args([]))["listen"] is False
    assert a1111_cmd_flags(build_parser().parse_args(["--precision", "bf16"]))["precision"] == "bf16"


def test_a_bf16_server_loads_bfloat16_weights_and_draws_what_float32_draws(tmp_path):
    """`--precision bf16` (WebUIService(dtype=...)): the model is held in bfloat16 and a job's image is the float32
    server's within a few levels of 255."""
    images = []
    for dtype in (None, torch.bfloat16):
        running = start_server(tmp_path, dtype=dtype)
        try:
            with httpx.Client(base_url=running.url, timeout=300) as client:
                response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4, "seed": 5,
                                                                   "sampler_name": "Euler"})
            assert response.status_code == 200, response.text
            assert running.service.loaded.model.dtype == (dtype or torch.float32)
            png = base64.b64decode(response.json()["images"][0])
            images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16))
        finally:
            running.stop()
    difference = np.abs(images[0] - images[1])
    assert difference.mean() < 1.0 and difference.max() <= 16


# ----- styles -----------------------------------------------------------------------------------------------------

def test_styles_are_listed_applied_saved_and_deleted(client, folders):
    folder, _ = folders
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "framed", "prompt": "{prompt}, in a frame", "negative_prompt": "blurry"}]
    body = client.post("/sdapi/v1/txt2img", json={**FAST, "styles": ["framed"]}).json()
    infotext = parse_infotext(_image(body["images"][0]).info["parameters"])
    assert infotext["Prompt"] == "a red circle, in a frame" and infotext["Negative prompt"] == "blurry"

    listed = client.post("/internal/styles", json={"name": "wide, \"quoted\"", "prompt": "wide shot",
                                                   "negative_prompt": ""}).json()
    assert [style["name"] for style in listed] == ["framed", "wide, \"quoted\""]
    with open(folder / "styles.csv", newline="", encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file))
    assert rows[1] == {"name": "wide, \"quoted\"", "prompt": "wide shot", "negative_prompt": ""}
    assert client.post("/sdapi/v1/txt2img", json={**FAST, "styles": ["nope"]}).status_code == 400

    assert [s["name"] for s in client.post("/internal/styles/delete", json={"name": "wide, \"quoted\""}).json()] \
        == ["framed"]
    response = client.post("/internal/styles/delete", json={"name": "gone"})
    assert response.status_code == 400 and "framed" in response.json()["detail"]


# ----- merge ------------------------------------------------------------------------------------------------------

def test_merge_route_writes_a_listed_checkpoint_with_its_recipe(client, folders):
    _, paths = folders
    response = client.post("/sdapi/v1/merge", json={"primary_model_name": "tiny-a", "secondary_model_name": "tiny-b",
                                                    "multiplier": 0.25, "save_as_half": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"].endswith("0.75(tiny-a) + 0.25(tiny-b).safetensors")
    assert body["title"] in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    with safe_open(body["filename"], "pt") as merged:
        recipe = json.loads(merged.metadata()["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.25 and recipe["save_as_half"]
    assert body["hash"] == body["sha256"][:10] == body["title"][-11:-1]
    # The new model generates.
    assert client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {
        "sd_model_checkpoint": body["title"]}}).status_code == 200


def test_merge_route_refuses_what_cannot_be_merged(client, server):
    builtin = server.service.registry.builtin.title
    cases = [({"primary_model_name": "tiny-a", "secondary_model_name": builtin}, "different architectures"),
             ({"primary_model_name": "tiny-a", "interp_method": "Add difference", "secondary_model_name": "tiny-b"},
              "needs A, B and C"),
             ({"primary_model_name": "tiny-a", "secondary_model_name": "tiny-b", "custom_name": "../up"},
              "not a file name"),
             ({"primary_model_name": "tiny-a", "secondary_model_name": "missing"}, "not found"),
             ({"primary_model_name": "tiny-a", "interp_method": "Average"}, "unknown merge mode")]
    for body, expected in cases:
        response = client.post("/sdapi/v1/merge", json=body)
        assert response.status_code == 400 and expected in response.json()["detail"], (body, response.text)
