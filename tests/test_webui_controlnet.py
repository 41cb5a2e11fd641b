"""The sd-webui-controlnet API over a real server: /controlnet/* routes and `alwayson_scripts.controlnet` units in
txt2img / img2img, with a random ControlNet for the default model in a temporary --controlnet-dir."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from controlnet_helpers import save_random_controlnet, shapes_image
from oracles import import_oracle
from webui_server import start_server

httpx = import_oracle("httpx")

import ldm  # noqa: E402
from sample.controlnet import BUILTIN_CONTROLNETS, run_preprocessor  # noqa: E402
from sample.infotext import parse_infotext  # noqa: E402
from sample.models import default_model  # noqa: E402
from sample.webui.preview import encode_png  # noqa: E402

BODY = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 3, "steps": 4, "width": 64, "height": 64,
        "cfg_scale": 5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ControlNet")
    save_random_controlnet(default_model().model, folder, "shapes_random")
    return folder


@pytest.fixture(scope="module")
def server(controlnet_dir, tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("webui"), controlnet_dir=str(controlnet_dir))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def image_b64(image: Image.Image) -> str:
    return encode_png(image)


def decoded(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def api_unit(**fields) -> dict:
    return {"enabled": True, "image": image_b64(shapes_image(64)), "module": "canny", "model": "shapes_random",
            "weight": 1.0, "processor_res": 256, "control_mode": "Balanced", "resize_mode": "Crop and Resize",
            **fields}


def txt2img(client, *units, **body):
    scripts = {"controlnet": {"args": list(units)}} if units else {}
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, **body, "alwayson_scripts": scripts})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_listings_answer_as_sd_webui_controlnet(client, controlnet_dir):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 8}
    listing = client.get("/sdapi/v1/scripts").json()
    assert listing["txt2img"][-1] == listing["img2img"][-1] == "controlnet"
    path = controlnet_dir / "shapes_random.safetensors"
    # The folder's files, then the ControlNets shipped with the package.
    assert client.get("/controlnet/model_list").json() == {"model_list": [
        f"shapes_random [{ldm.legacy_model_hash(path)}]",
        *(f"{name} [{ldm.legacy_model_hash(file)}]" for name, file in BUILTIN_CONTROLNETS.items())]}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][:3] == ["none", "invert", "canny"]
    canny = modules["module_detail"]["canny"]["sliders"]
    assert [s["name"] for s in canny] == ["Preprocessor Resolution", "Canny Low Threshold", "Canny High Threshold"]
    assert [s["value"] for s in canny] == [512, 100, 200]
    assert "downloaded weights" in modules["unavailable"]["openpose"]


def test_detect_returns_the_preprocessor_map(client):
    image = shapes_image(64)
    reply = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                    "controlnet_input_images": [image_b64(image)],
                                                    "controlnet_processor_res": 128, "controlnet_threshold_a": 50,
                                                    "controlnet_threshold_b": 150})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["info"] == "Success"
    assert np.array_equal(decoded(body["images"][0]), run_preprocessor("canny", image, 128, 50, 150))


@pytest.mark.parametrize("body, message", [
    ({"controlnet_module": "openpose"}, "downloaded weights"),
    ({"controlnet_module": "nope"}, "unknown preprocessor 'nope'"),
    ({"controlnet_module": "canny", "controlnet_input_images": []}, "controlnet_input_images is empty"),
    ({"controlnet_module": "canny", "controlnet_processor_res": 9000}, r"processor_res must be in \[64, 2048\]"),
    ({"controlnet_module": "inpaint"}, "needs a mask"),
])
def test_detect_refuses_bad_requests_with_400(client, body, message):
    body = {"controlnet_input_images": [image_b64(shapes_image(64))], **body}
    reply = client.post("/controlnet/detect", json=body)
    assert reply.status_code == 400
    assert re.search(message, reply.json()["detail"]), reply.json()["detail"]


def test_txt2img_applies_units_records_them_and_weight_zero_changes_nothing(client):
    plain = txt2img(client)
    controlled = txt2img(client, api_unit())
    assert not np.array_equal(decoded(plain["images"][0]), decoded(controlled["images"][0]))
    infotext = parse_infotext(decoded_infotext(controlled["images"][0]))
    assert infotext["ControlNet 0"].startswith("Module: canny, Model: shapes_random [")
    assert "Processor Res: 256" in infotext["ControlNet 0"]
    zero = txt2img(client, api_unit(weight=0), api_unit(enabled=False, model="not checked"))
    assert np.array_equal(decoded(plain["images"][0]), decoded(zero["images"][0]))
    # input_image and numeric control_mode, as older clients send them.
    legacy = txt2img(client, api_unit(image=None, input_image=image_b64(shapes_image(64)), control_mode=0))
    assert np.array_equal(decoded(controlled["images"][0]), decoded(legacy["images"][0]))


def decoded_infotext(data: str) -> str:
    return Image.open(io.BytesIO(base64.b64decode(data))).info["parameters"]


def test_img2img_unit_without_image_uses_the_init_image(client):
    body = {**BODY, "init_images": [image_b64(shapes_image(64))], "denoising_strength": 0.8}
    plain = client.post("/sdapi/v1/img2img", json=body).json()
    controlled = client.post("/sdapi/v1/img2img", json={
        **body, "alwayson_scripts": {"controlnet": {"args": [api_unit(image=None)]}}}).json()
    assert not np.array_equal(decoded(plain["images"][0]), decoded(controlled["images"][0]))


@pytest.mark.parametrize("unit, message", [
    (api_unit(model="missing"), r"controlnet unit 0: ControlNet model 'missing' not found .* available: "
                                r"shapes_random \["),
    (api_unit(control_mode="Louder"), "control_mode must be one of"),
    (api_unit(guidance_start=0.9, guidance_end=0.1), "0 <= start <= end <= 1"),
    (api_unit(image="bm90IGFuIGltYWdl"), "controlnet unit 0 image is not a decodable base64 image"),
    (api_unit(wieght=1), "unknown ControlNet unit field 'wieght'"),
    (api_unit(image=None), "ControlNet unit 0 has no control image"),
])
def test_bad_units_are_refused_with_400_naming_the_field(client, unit, message):
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert reply.status_code == 400 and re.search(message, reply.json()["detail"]), reply.text
