"""A1111's own API test cases (AUTOMATIC1111/stable-diffusion-webui test/test_txt2img.py, test_img2img.py,
test_utils.py, test_extras.py) replayed against a live server with the built-in default model: the same request
bodies and the same expectations (HTTP 200), with one documented exception: `restore_faces` is answered 400 with a
message saying no face restoration model is installed. (Upstream's test_extras.py posts its png-info and interrogate
bodies to extra-single-image too; they are replayed as written.)
"""
import base64
import io

import pytest
from PIL import Image, ImageDraw

from oracles import import_oracle
from webui_server import start_server

httpx = import_oracle("httpx")



def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def img2img_basic_image_base64() -> str:
    """Stands in for upstream's test_files/img2img_basic.png: a 64x64 picture with a shape on it."""
    image = Image.new("RGB", (64, 64), (200, 220, 240))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return _data_url(image)


@pytest.fixture(scope="module")
def mask_basic_image_base64() -> str:
    """Stands in for test_files/mask_basic.png: white (repaint) over the left half."""
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    return _data_url(mask)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("a1111-cases"))
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def requests(base_url):
    """httpx in the role of `requests` (the same get/post(url, json=...) calls), with a generous timeout."""
    with httpx.Client(timeout=300) as client:
        yield client


# ----- test_txt2img.py --------------------------------------------------------------------------------------------

@pytest.fixture()
def url_txt2img(base_url):
    return f"{base_url}/sdapi/v1/txt2img"


@pytest.fixture()
def simple_txt2img_request():
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
            "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
            "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
            "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
            "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}


def test_txt2img_simple_performed(requests, url_txt2img, simple_txt2img_request):
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_with_negative_prompt_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["negative_prompt"] = "example negative prompt"
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_with_complex_prompt_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["prompt"] = "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_not_square_image_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["height"] = 128
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_with_hrfix_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["enable_hr"] = True
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_with_tiling_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["tiling"] = True
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_with_restore_faces_is_refused_with_the_reason(requests, url_txt2img, simple_txt2img_request):
    """Upstream expects 200 (it has GFPGAN/CodeFormer weights); here no face restorer exists, so the documented
    answer is a 400 that says so, not an image silently made without it."""
    simple_txt2img_request["restore_faces"] = True
    response = requests.post(url_txt2img, json=simple_txt2img_request)
    assert response.status_code == 400
    assert "face-restoration weights" in response.json()["detail"]


@pytest.mark.parametrize("sampler", ["PLMS", "DDIM", "UniPC"])
def test_txt2img_with_vanilla_sampler_performed(requests, url_txt2img, simple_txt2img_request, sampler):
    simple_txt2img_request["sampler_index"] = sampler
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_multiple_batches_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["n_iter"] = 2
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


def test_txt2img_batch_performed(requests, url_txt2img, simple_txt2img_request):
    simple_txt2img_request["batch_size"] = 2
    assert requests.post(url_txt2img, json=simple_txt2img_request).status_code == 200


# ----- test_img2img.py --------------------------------------------------------------------------------------------

@pytest.fixture()
def url_img2img(base_url):
    return f"{base_url}/sdapi/v1/img2img"


@pytest.fixture()
def simple_img2img_request(img2img_basic_image_base64):
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
            "include_init_images": False, "init_images": [img2img_basic_image_base64], "inpaint_full_res": False,
            "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
            "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
            "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
            "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
            "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}


def test_img2img_simple_performed(requests, url_img2img, simple_img2img_request):
    assert requests.post(url_img2img, json=simple_img2img_request).status_code == 200


def test_inpainting_masked_performed(requests, url_img2img, simple_img2img_request, mask_basic_image_base64):
    simple_img2img_request["mask"] = mask_basic_image_base64
    assert requests.post(url_img2img, json=simple_img2img_request).status_code == 200


def test_inpainting_with_inverted_masked_performed(requests, url_img2img, simple_img2img_request,
                                                   mask_basic_image_base64):
    simple_img2img_request["mask"] = mask_basic_image_base64
    simple_img2img_request["inpainting_mask_invert"] = True
    assert requests.post(url_img2img, json=simple_img2img_request).status_code == 200


def test_img2img_sd_upscale_performed(requests, url_img2img, simple_img2img_request):
    simple_img2img_request["script_name"] = "sd upscale"
    simple_img2img_request["script_args"] = ["", 8, "Lanczos", 2.0]
    assert requests.post(url_img2img, json=simple_img2img_request).status_code == 200


# ----- test_utils.py ----------------------------------------------------------------------------------------------

def test_options_write(requests, base_url):
    url_options = f"{base_url}/sdapi/v1/options"
    response = requests.get(url_options)
    assert response.status_code == 200
    pre_value = response.json()["send_seed"]
    assert requests.post(url_options, json={"send_seed": (not pre_value)}).status_code == 200
    response = requests.get(url_options)
    assert response.status_code == 200
    assert response.json()["send_seed"] == (not pre_value)
    requests.post(url_options, json={"send_seed": pre_value})


@pytest.mark.parametrize("url", [
    "sdapi/v1/cmd-flags",
    "sdapi/v1/samplers",
    "sdapi/v1/upscalers",
    "sdapi/v1/sd-models",
    "sdapi/v1/hypernetworks",
    "sdapi/v1/face-restorers",
    "sdapi/v1/realesrgan-models",
    "sdapi/v1/prompt-styles",
    "sdapi/v1/embeddings",
])
def test_get_api_url(requests, base_url, url):
    assert requests.get(f"{base_url}/{url}").status_code == 200


# ----- test_extras.py ---------------------------------------------------------------------------------------------

def test_simple_upscaling_performed(requests, base_url, img2img_basic_image_base64):
    payload = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
               "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
               "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None",
               "extras_upscaler_2_visibility": 0, "image": img2img_basic_image_base64}
    assert requests.post(f"{base_url}/sdapi/v1/extra-single-image", json=payload).status_code == 200


def test_png_info_performed(requests, base_url, img2img_basic_image_base64):
    payload = {"image": img2img_basic_image_base64}
    assert requests.post(f"{base_url}/sdapi/v1/extra-single-image", json=payload).status_code == 200


def test_interrogate_performed(requests, base_url, img2img_basic_image_base64):
    payload = {"image": img2img_basic_image_base64, "model": "clip"}
    assert requests.post(f"{base_url}/sdapi/v1/extra-single-image", json=payload).status_code == 200
