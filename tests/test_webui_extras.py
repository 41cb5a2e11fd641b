"""The Extras API (extra-single-image, extra-batch-images), the upscaler listings and model upscalers in hires fix,
over a real server on 127.0.0.1 with a folder of upscaler models in A1111's layout. A1111's own upstream cases
(test/test_extras.py) are replayed first."""
import base64
import io
import json
import re

import pytest
import torch
from PIL import Image

from oracles import import_oracle
from random_weights import randomize_weights
from webui_server import start_server

httpx = import_oracle("httpx")

from ldm.checkpoint import save_state_dict  # noqa: E402
from sample.upscalers import upscale  # noqa: E402
from sample.upscalers.srvgg import SRVGGNetCompact  # noqa: E402


@pytest.fixture(scope="module")
def upscalers_dir(tmp_path_factory):
    """RealESRGAN/compact-x2.pth (BasicSR's {"params_ema": ...} wrapping) and SwinIR/broken.safetensors."""
    folder = tmp_path_factory.mktemp("upscalers")
    (folder / "RealESRGAN").mkdir()
    (folder / "SwinIR").mkdir()
    torch.manual_seed(0)
    weights = randomize_weights(SRVGGNetCompact(3, 3, features=8, num_conv=2, scale=2)).state_dict()
    torch.save({"params_ema": weights}, folder / "RealESRGAN" / "compact-x2.pth")
    save_state_dict({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, folder / "SwinIR" / "broken.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(upscalers_dir, tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("webui"), upscalers_dir=str(upscalers_dir))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _image(width=24, height=16, seed=0) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decode(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


# ----- A1111's upstream test/test_extras.py, replayed -----------------------------------------------------------

def test_upstream_simple_upscaling_performed(client):
    payload = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
               "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
               "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None",
               "extras_upscaler_2_visibility": 0, "image": _b64(_image())}
    response = client.post("/sdapi/v1/extra-single-image", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    result = _decode(body["image"])
    assert result.tobytes() == _image().resize((48, 32), Image.LANCZOS).tobytes()
    assert body["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"
    assert result.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"


@pytest.mark.parametrize("payload", [{}, {"model": "clip"}], ids=["png_info_performed", "interrogate_performed"])
def test_upstream_image_only_requests_return_the_image(client, payload):
    # Upstream posts just the image (and an ignored "model") to extra-single-image: upscaler_1 "None" keeps it.
    response = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image()), **payload})
    assert response.status_code == 200, response.text
    assert _decode(response.json()["image"]).tobytes() == _image().tobytes()


# ----- listings -------------------------------------------------------------------------------------------------

def test_upscalers_are_listed_with_a1111s_fields(client, upscalers_dir):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert listed == [
        {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
        {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
        {"name": "Nearest", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
        {"name": "compact-x2", "model_name": "RealESRGAN compact",
         "model_path": str(upscalers_dir / "RealESRGAN" / "compact-x2.pth"), "model_url": None, "scale": 2},
        {"name": "broken", "model_name": None, "model_path": str(upscalers_dir / "SwinIR" / "broken.safetensors"),
         "model_url": None, "scale": None}]
    assert client.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "compact-x2", "path": str(upscalers_dir / "RealESRGAN" / "compact-x2.pth"), "scale": 2}]
    assert client.get("/internal/config").json()["upscalers"] == [
        "Latent", "Latent (nearest)", "None", "Lanczos", "Nearest", "compact-x2", "broken"]


# ----- extras ---------------------------------------------------------------------------------------------------

def test_a_model_upscaler_gives_what_the_library_gives(client, upscalers_dir):
    body = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(_image()), "upscaler_1": "compact-x2", "upscaling_resize": 3}).json()
    assert _decode(body["image"]).tobytes() == upscale(_image(), "compact-x2", 3, upscalers_dir).tobytes()
    assert "Postprocess upscaler: compact-x2" in body["html_info"]


def test_resize_to_covers_the_target_and_crops_its_centre(client):
    body = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(_image()), "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 40,
        "upscaler_1": "Nearest"}).json()
    result = _decode(body["image"])
    # 24x16 -> scale max(40/24, 40/16) = 2.5 -> 60x40, centre 40x40 kept.
    expected = _image().resize((60, 40), Image.NEAREST).crop((10, 0, 50, 40))
    assert result.tobytes() == expected.tobytes()
    assert body["html_info"] == ("<p>Postprocess upscale to: 40x40, Postprocess crop to: 40x40, "
                                 "Postprocess upscaler: Nearest</p>")
    uncropped = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(_image()), "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 40,
        "upscaling_crop": False, "upscaler_1": "Nearest"}).json()
    assert _decode(uncropped["image"]).size == (60, 40)


def test_a_second_upscaler_is_blended_in_by_its_visibility(client):
    body = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(_image()), "upscaler_1": "Lanczos", "upscaler_2": "Nearest",
        "extras_upscaler_2_visibility": 0.25}).json()
    expected = Image.blend(_image().resize((48, 32), Image.LANCZOS), _image().resize((48, 32), Image.NEAREST), 0.25)
    assert _decode(body["image"]).tobytes() == expected.tobytes()
    assert body["html_info"].endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest</p>")


def test_batch_images_are_upscaled_in_order_keeping_their_infotext(client):
    from sample.webui.preview import encode_png
    first = encode_png(_image(seed=1), "a prompt\nSteps: 3, Seed: 7")
    body = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": first, "name": "one.png"}, {"data": _b64(_image(10, 10, seed=2)), "name": "two.png"}],
        "upscaler_1": "Lanczos", "upscaling_resize": 1.5})
    assert body.status_code == 200, body.text
    images = [_decode(data) for data in body.json()["images"]]
    assert [image.size for image in images] == [(36, 24), (15, 15)]
    assert images[0].tobytes() == _image(seed=1).resize((36, 24), Image.LANCZOS).tobytes()
    assert images[0].info["parameters"] == "a prompt\nSteps: 3, Seed: 7"
    assert images[1].info["postprocessing"] == "Postprocess upscale by: 1.5, Postprocess upscaler: Lanczos"


@pytest.mark.parametrize("route,body,message", [
    ("extra-single-image", {"gfpgan_visibility": 0.5}, "face restoration is not available"),
    ("extra-single-image", {"codeformer_visibility": 1}, "GFPGAN or CodeFormer weights"),
    ("extra-single-image", {"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1: unknown upscaler 'R-ESRGAN 4x\\+'; "
                                                          "available: None, Lanczos, Nearest, compact-x2, broken"),
    ("extra-single-image", {"upscaler_1": "broken"}, "broken.safetensors: not a known upscaler model"),
    ("extra-single-image", {"image": "bm90IGFuIGltYWdl"}, "image is not a decodable base64 image"),
    ("extra-batch-images", {"imageList": []}, "imageList is empty"),
    ("interrogate", {"model": "clip"}, "CLIP interrogator is not available.*BLIP"),
])
def test_what_cannot_be_done_gets_a_readable_400(client, route, body, message):
    payload = {"image": _b64(_image()), **body} if route == "extra-single-image" else {**body}
    response = client.post(f"/sdapi/v1/{route}", json=payload)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["detail"])


def test_the_work_bound_applies_to_extras(client, server, monkeypatch):
    monkeypatch.setattr(server.service, "max_work", 48 * 32 * 2 - 1)
    response = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(_image()), "upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 1})
    assert response.status_code == 400
    assert "3,072 upscaled pixels" in response.json()["detail"]


# ----- hires fix ------------------------------------------------------------------------------------------------

def test_hires_fix_takes_a_model_upscaler_by_name(client):
    common = {"prompt": "a red circle", "steps": 2, "seed": 5, "width": 64, "height": 64, "enable_hr": True,
              "hr_scale": 2, "hr_second_pass_steps": 1, "denoising_strength": 0.5}
    response = client.post("/sdapi/v1/txt2img", json={**common, "hr_upscaler": "compact-x2"})
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert "Hires upscaler: compact-x2" in info["infotexts"][0]
    lanczos = client.post("/sdapi/v1/txt2img", json={**common, "hr_upscaler": "Lanczos"}).json()
    assert _decode(body["images"][0]).size == _decode(lanczos["images"][0]).size
    assert _decode(body["images"][0]).tobytes() != _decode(lanczos["images"][0]).tobytes()

    refused = client.post("/sdapi/v1/txt2img", json={**common, "hr_upscaler": "4x-UltraSharp"})
    assert refused.status_code == 400
    assert ("unknown hires upscaler '4x-UltraSharp'; valid: Latent, Latent (nearest), None, Lanczos, Nearest, "
            "compact-x2, broken") in refused.json()["detail"]
