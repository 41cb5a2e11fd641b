"""The A1111-compatible HTTP API, over a real server on 127.0.0.1: listings, settings, errors, auth, generation,
and the `webuiapi` client (an existing A1111 client) used unchanged."""
import base64
import io
import json
import os
import threading
import time
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from oracles import import_oracle
from webui_server import start_server, write_models

httpx = import_oracle("httpx")

import ldm  # noqa: E402
from sample.infotext import parse_infotext  # noqa: E402
from sample.models import BUILTIN_LORAS, DEFAULT_MODEL, default_model  # noqa: E402
from sample.webui.registry import Registry  # noqa: E402
from sample_helpers import registered_preset  # noqa: E402
from samplers import SAMPLERS, SCHEDULERS  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return folder, write_models(str(folder))


@pytest.fixture(scope="module")
def extra_networks(tmp_path_factory):
    """A LoRA folder with one file, and an embeddings folder with one embedding for the default model's text encoder
    and one for SD1's 768-wide one (which the default model must skip)."""
    width = ldm.load_model(DEFAULT_MODEL).preset.text[0].width
    folder = tmp_path_factory.mktemp("networks")
    (folder / "lora").mkdir()
    (folder / "embeddings").mkdir()
    save_file({"lora_unet_out_2.lora_down.weight": torch.zeros(1, 32, 3, 3),
               "lora_unet_out_2.lora_up.weight": torch.zeros(4, 1, 1, 1)},
              str(folder / "lora" / "flat.safetensors"), metadata={"ss_network_dim": "1"})
    save_file({"emb_params": torch.randn(2, width)}, str(folder / "embeddings" / "shapestyle.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(folder / "embeddings" / "sd1style.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(models, extra_networks, tmp_path_factory):
    folder, _ = models
    running = start_server(tmp_path_factory.mktemp("webui"), models_dir=str(folder),
                           lora_dir=str(extra_networks / "lora"), embeddings_dir=str(extra_networks / "embeddings"))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _png(image: Image.Image, text: str | None = None) -> str:
    from sample.webui.preview import encode_png
    return encode_png(image, text)


def _decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


# ----- listings and settings --------------------------------------------------------------------------------------

def test_lists_models_samplers_and_schedulers_as_a1111_does(client, models, server):
    _, paths = models
    listed = client.get("/sdapi/v1/sd-models").json()
    by_name = {m["model_name"]: m for m in listed}
    # The built-in default model is listed under the name its infotexts carry (sample.models.default_model).
    builtin = server.service.registry.builtin.model_name
    assert builtin == server.service.loaded.name != "default"
    assert set(by_name) == {builtin, "tiny-a", "tiny-b"}
    entry = by_name["tiny-a"]
    assert entry["title"] == f"tiny-a.safetensors [{ldm.model_hash(paths['a'])}]"
    assert entry["hash"] == ldm.model_hash(paths["a"]) and entry["sha256"].startswith(entry["hash"])
    assert [s["name"] for s in client.get("/sdapi/v1/samplers").json()] == list(SAMPLERS)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == list(SCHEDULERS)
    assert schedulers[2]["name"] == "karras" and schedulers[2]["default_rho"] == 7.0
    assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": "other.vae.safetensors",
                                                      "filename": paths["vae"]}]


def test_lists_loras_and_the_embeddings_that_fit_the_model(client, extra_networks):
    loras = client.get("/sdapi/v1/loras").json()
    # The folder's files, then the package's built-in LoRAs (sample.models.BUILTIN_LORAS; none before one ships).
    assert loras[0] == {"name": "flat", "alias": "flat", "path": str(extra_networks / "lora" / "flat.safetensors"),
                        "metadata": {"ss_network_dim": "1"}}
    assert [(lora["name"], lora["path"]) for lora in loras[1:]] == list(BUILTIN_LORAS.items())
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"] == {"shapestyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                   "shape": 80, "vectors": 2}}  # the default model's text width
    assert list(embeddings["skipped"]) == ["sd1style"]
    # The token counter counts an embedding's vectors, as A1111's does: 2 here, plus "a" and "cat".
    assert client.post("/internal/token-count", json={"text": "a shapestyle cat"}).json()["used"] == 4


def test_options_switch_the_checkpoint_and_refuse_unknown_ones(client, models, server):
    _, paths = models
    options = client.get("/sdapi/v1/options").json()
    builtin = server.service.registry.builtin.title
    assert options["sd_model_checkpoint"] == builtin and options["CLIP_stop_at_last_layers"] == 1
    title_b = f"tiny-b.safetensors [{ldm.model_hash(paths['b'])}]"
    try:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-b"}).status_code == 200
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == title_b
        assert options["sd_checkpoint_hash"] == server.service.loaded_file.sha256
        assert server.service.loaded.path == paths["b"]  # loaded, not just recorded

        refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd",
                                                         "CLIP_stop_at_last_layers": 2})
        assert refused.status_code == 400 and "'../../etc/passwd' not found" in refused.json()["detail"]
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing changed
        refused = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
        assert refused.status_code == 400 and "CLIP_stop_at_last_layers" in refused.json()["detail"]
        refused = client.post("/sdapi/v1/options", json={"outdir_txt2img_samples": "/tmp/elsewhere"})
        assert refused.status_code == 400 and "--outdir" in refused.json()["detail"]
        # Settings A1111 has and this server does not are ignored, as A1111 ignores unknown ones.
        assert client.post("/sdapi/v1/options", json={"some_extension_setting": 3}).status_code == 200
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": builtin})


def test_refresh_checkpoints_finds_a_new_file(client, models):
    folder, paths = models
    added = folder / "later.safetensors"
    added.write_bytes(open(paths["a"], "rb").read())
    try:
        assert "later" not in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert "later" in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    finally:
        added.unlink()
        client.post("/sdapi/v1/refresh-checkpoints")


def test_png_info_reads_the_parameters_chunk(client):
    text = "a red circle\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 13.5, Seed: 3056755576, " \
           "Size: 512x512, Model hash: 540e663c24, Model: aryan_test_mk3"
    body = client.post("/sdapi/v1/png-info", json={"image": _png(Image.new("RGB", (8, 8)), text)}).json()
    assert body["info"] == text
    assert body["parameters"] == parse_infotext(text)
    assert body["parameters"]["CFG scale"] == "13.5" and body["parameters"]["Size-1"] == "512"
    bad = client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert bad.status_code == 400 and "not a decodable base64 image" in bad.json()["detail"]


def test_token_counter_matches_the_reference_screen(client):
    counted = client.post("/internal/token-count",
                          json={"text": "a dog in manipal university jaipur hostel on a rainy day"}).json()
    assert counted == {"used": 13, "limit": 75}


def test_save_and_zip_keep_the_images_and_their_infotexts(client, server):
    text = "a red circle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 8x8"
    images = [_png(Image.new("RGB", (8, 8), (i * 50, 0, 0)), text) for i in range(2)]
    files = client.post("/internal/save", json={"images": images}).json()["files"]
    assert [os.path.dirname(f) for f in files] == [server.service.options()["outdir_save"]] * 2
    assert [os.path.basename(f)[6:] for f in files] == ["42-a red circle.png"] * 2
    assert int(os.path.basename(files[1])[:5]) == int(os.path.basename(files[0])[:5]) + 1
    assert Image.open(files[1]).info["parameters"] == text
    response = client.post("/internal/zip", json={"images": images})
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert [archive.read(name) for name in archive.namelist()] == [base64.b64decode(i) for i in images]


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="quicksettings"' in page.text
    assert client.get("/static/app.js").status_code == 200


# ----- refused requests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route, body, status, message", [
    ("txt2img", {"width": 100, "height": 64}, 400, "width must be a positive multiple of 8"),
    ("txt2img", {"steps": 0}, 400, "steps must be between 1"),
    ("txt2img", {"steps": 10 ** 6}, 400, "steps must be between 1"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"sampler_name": "Euler z"}, 400, "unknown sampler 'Euler z'"),
    ("txt2img", {"width": 64, "height": 64, "batch_size": 10 ** 6}, 400, "GiB"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing"}}, 400, "model 'missing' not found"),
    ("txt2img", {"override_settings": {"sd_vae": "../vae.pt"}}, 400, "VAE '../vae.pt' not found"),
    ("txt2img", {"prompt": "a cat <lora:../../secret:1>"}, 400, "LoRA name '../../secret' is not a file name"),
    ("txt2img", {"restore_faces": True}, 400, "Restore faces needs face-restoration weights"),
    ("img2img", {"init_images": ["bm90IGFuIGltYWdl"]}, 400, "init_images[0] is not a decodable base64 image"),
    ("img2img", {}, 400, "init_images is empty"),
    # Each of these answered 500 before (issue 23).
    ("txt2img", {"alwayson_scripts": {"x": "str"}}, 422, "alwayson_scripts.x"),
    ("txt2img", {"alwayson_scripts": {"x": [1]}}, 422, "alwayson_scripts.x"),
    ("txt2img", {"alwayson_scripts": {"x": 5}}, 422, "alwayson_scripts.x"),
    ("txt2img", {"alwayson_scripts": {"controlnet": {"args": [1]}}}, 400,
     "controlnet unit 0: a ControlNet unit must be a JSON object, got int"),
    ("txt2img", {"alwayson_scripts": {"dynamic prompts": {"args": [1]}}}, 400, "dynamic prompts: not available"),
    ("txt2img", {"width": 72, "height": 64, "steps": 1}, 400, "width 72 does not fit this model: its sizes are "
                                                              "multiples of 16 pixels"),
    ("txt2img", {"width": 8, "height": 64, "steps": 1}, 400, "nearest valid: 16"),
    ("txt2img", {"width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.125}, 400,
     "hires width (64 x hr_scale 1.125) 72 does not fit"),
    ("txt2img", {"prompt": "<lora:x:abc>", "steps": 1}, 400, "'abc' is not a number"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 12}, "steps": 1}, 400,
     "clip_skip 12 is beyond this model's text encoder: it allows 1 to 4"),
    ("txt2img", {"prompt": "(" * 5000, "width": 64, "height": 64, "steps": 1}, 400, "nest more than 100 deep"),
    ("txt2img", {"prompt": "[" * 5000, "width": 64, "height": 64, "steps": 1}, 400, "nest more than 100 deep"),
    ("txt2img", {"prompt": "[a:" * 2000, "width": 64, "height": 64, "steps": 1}, 400, "nest more than 100 deep"),
    ("txt2img", {"infotext": "a cat\nSteps: 5000, Sampler: Euler, Size: 64x64"}, 400,
     "steps must be between 1 and 1000, got 5000"),
    ("txt2img", {"width": 512, "height": 512, "steps": 1000, "n_iter": 5}, 400,
     "more than this server's limit of 1,258,291,200 (--max-work)"),
    ("txt2img", {"width": 64, "height": 64, "n_iter": 10 ** 6}, 400, "batch_count must be between 1 and 100"),
    ("options", {"CLIP_stop_at_last_layers": 12}, 400, "beyond the loaded model's text encoder: it allows 1 to 4"),
])
def test_bad_requests_get_a_readable_4xx_and_the_server_keeps_serving(client, route, body, status, message):
    response = client.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.get("/sdapi/v1/progress").status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ({"text": "(" * 5000}, 400, "nest more than 100 deep"),
    ({"text": "[a:" * 2000}, 400, "nest more than 100 deep"),
    ({"text": "[a|b]", "steps": 10 ** 9}, 422, "steps: Input should be less than or equal to 1000"),
])
def test_token_counter_refuses_prompts_it_cannot_parse(client, body, status, message):
    response = client.post("/internal/token-count", json=body)
    assert response.status_code == status and message in response.json()["detail"]


def test_page_config_gives_the_models_size_step_and_clip_skip_range(client):
    config = client.get("/internal/config").json()
    assert (config["size_step"], config["clip_skip_max"]) == (16, 4)  # tiny-shapes: 4x VAE, 3 UNet levels, 4 layers


def test_lone_surrogates_in_the_prompt_keep_the_images_and_become_replacement_characters(client, server):
    # Valid JSON ("\ud800" escaped, as json.dumps writes it by default), but no UTF-8 encoder accepts the string.
    body = json.dumps(dict(TXT2IMG, prompt="a red \ud800circle", save_images=True))
    response = client.post("/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    image = _decode(response.json()["images"][0])
    assert parse_infotext(image.info["parameters"])["Prompt"] == "a red \ufffdcircle"
    folder = server.service.options()["outdir_txt2img_samples"]
    saved = [name for _, _, names in os.walk(folder) for name in names if "\ufffdcircle" in name]
    assert saved  # the file name took the replacement character too


def test_a_sample_that_cannot_be_saved_still_comes_back_with_a_warning(client, server, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sample.webui.service.save_png", disk_full)
    response = client.post("/sdapi/v1/txt2img", json=dict(TXT2IMG, save_images=True))
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1
    assert "could not be saved on the server" in json.loads(response.json()["info"])["warnings"][0]


def test_decoding_an_upload_does_not_stall_the_other_routes(client, server, monkeypatch):
    """An img2img request's images are decoded off the event loop: while one decode is held, /progress answers."""
    from sample.webui import service as service_module
    decoding, release = threading.Event(), threading.Event()
    plain = service_module.decode_image

    def held_decode(*args, **kwargs):
        decoding.set()
        release.wait(timeout=60)
        return plain(*args, **kwargs)

    monkeypatch.setattr(service_module, "decode_image", held_decode)
    body = {"init_images": [_png(Image.new("RGB", (64, 64), "red"))], "prompt": "a red circle", "steps": 2,
            "denoising_strength": 0.5}
    answers = {}
    request = threading.Thread(target=lambda: answers.update(img2img=client.post("/sdapi/v1/img2img", json=body)))
    request.start()
    try:
        assert decoding.wait(timeout=60)
        with httpx.Client(base_url=server.url, timeout=10) as other:
            assert other.get("/sdapi/v1/progress").status_code == 200
    finally:
        release.set()
        request.join(timeout=120)
    assert answers["img2img"].status_code == 200, answers["img2img"].text


def test_presets_are_listed_with_their_checkpoint_and_their_loras_beside_the_users(tmp_path, extra_networks):
    with registered_preset(tmp_path, default_model().model):
        running = start_server(tmp_path, lora_dir=str(extra_networks / "lora"))
        try:
            with httpx.Client(base_url=running.url, timeout=120) as client:
                listed = client.get("/ldm/presets").json()
                loras = client.get("/sdapi/v1/loras").json()
            builtin = running.service.registry.builtin.title
        finally:
            running.stop()
    assert listed == [{"name": "test + LCM", "model": "default", "loras": [{"name": "test-lcm", "strength": 1.0}],
                       "prompt_tags": "<lora:test-lcm:1>", "sampler_name": "LCM", "scheduler": "Automatic",
                       "steps": 2, "cfg_scale": 1.0, "sd_model_checkpoint": builtin}]
    assert [lora["name"] for lora in loras] == ["flat", "test-lcm"]


def test_a_preset_of_the_default_model_is_not_offered_by_a_server_of_another_model(models):
    _, paths = models
    registry = Registry(model_path=paths["a"])
    assert registry.preset_checkpoint("default") is None
    assert registry.preset_checkpoint(paths["a"]).filename == paths["a"]
    registry = Registry()
    assert registry.preset_checkpoint("default") == registry.builtin


def test_loras_listing_reads_each_header_once_until_the_file_changes(client, extra_networks, monkeypatch):
    import sample.webui.service as service_module

    reads = []
    original = service_module.read_metadata
    monkeypatch.setattr(service_module, "read_metadata", lambda path: reads.append(path) or original(path))
    path = extra_networks / "lora" / "flat.safetensors"
    for expected_reads in (1, 2):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # "changed": read once more
        for _ in range(3):
            listed = client.get("/sdapi/v1/loras").json()
            assert listed[0]["metadata"] == {"ss_network_dim": "1"}
        assert len(reads) == expected_reads


def test_switching_to_a_broken_model_answers_400_and_keeps_the_working_one(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    weights = ldm.create_model("tiny").state_dict()
    # The text encoder's final norm, one element short: the file reads, its shapes do not fit the model.
    name = next(key for key in weights if key.endswith("final_layer_norm.weight"))
    weights[name] = weights[name][:-1]
    save_file({key: value.contiguous() for key, value in weights.items()}, str(folder / "broken.safetensors"))
    running = start_server(tmp_path, models_dir=str(folder))
    try:
        with httpx.Client(base_url=running.url, timeout=120) as client:
            before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
            for attempt in (lambda: client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"}),
                            lambda: client.post("/sdapi/v1/txt2img", json=dict(
                                TXT2IMG, override_settings={"sd_model_checkpoint": "broken"},
                                override_settings_restore_afterwards=False))):
                refused = attempt()
                assert refused.status_code == 400 and "cannot load model broken.safetensors" in \
                    refused.json()["detail"], refused.text
                assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
                assert client.post("/sdapi/v1/txt2img", json=TXT2IMG).status_code == 200  # still serving
    finally:
        running.stop()


def test_api_auth_guards_every_route(tmp_path):
    running = start_server(tmp_path, credentials={"alice": "s3cret"})
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            for path in ("/", "/sdapi/v1/options", "/static/app.js"):
                response = client.get(path)
                assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
            assert client.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
            assert client.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
            assert client.get("/", auth=("alice", "s3cret")).status_code == 200
    finally:
        running.stop()


# ----- generation -------------------------------------------------------------------------------------------------

TXT2IMG = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64,
           "sampler_name": "Euler a", "cfg_scale": 5, "seed": 1234}


def test_txt2img_matches_the_library_bitwise_and_embeds_the_infotext(client):
    from sample.generate import generate
    from sample.models import default_model
    from sample.params import GenerationParams

    response = client.post("/sdapi/v1/txt2img", json=dict(TXT2IMG, n_iter=2, batch_size=2))
    assert response.status_code == 200, response.text
    result = response.json()
    info = json.loads(result["info"])
    assert result["parameters"]["prompt"] == "a red circle" and result["parameters"]["n_iter"] == 2
    assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    images = [_decode(data) for data in result["images"]]
    assert len(images) == 4
    for image, infotext in zip(images, info["infotexts"]):
        assert image.info["parameters"] == infotext
    parsed = parse_infotext(info["infotexts"][2])
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Seed"], parsed["Steps"], parsed["Size-1"],
            parsed["Sampler"], parsed["CFG scale"]) == ("a red circle", "blurry", "1236", "3", "64", "Euler a", "5")

    # The same request through the library in one call: the server runs it batch by batch (so that skip and
    # interrupt act between batches) and must still give the same pixels.
    direct = generate(default_model(), GenerationParams(
        prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, sampler_name="Euler a",
        cfg_scale=5, seed=1234, batch_count=2, batch_size=2), progress=False)
    assert [image.tobytes() for image in images] == [image.tobytes() for image in direct.images]
    assert info["infotexts"] == direct.infotexts


def test_hires_fix_upscales_and_records_its_pass(client):
    body = dict(TXT2IMG, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2,
                denoising_strength=0.6)
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = _decode(response.json()["images"][0])
    parsed = parse_infotext(image.info["parameters"])
    assert image.size == (96, 96)
    assert (parsed["Hires upscale"], parsed["Hires steps"], parsed["Denoising strength"]) == ("1.5", "2", "0.6")


def test_vae_override_changes_the_decoder_and_is_recorded(client, models):
    _, paths = models
    plain = client.post("/sdapi/v1/txt2img", json=TXT2IMG).json()
    swapped = client.post("/sdapi/v1/txt2img",
                          json=dict(TXT2IMG, override_settings={"sd_vae": "other.vae.safetensors"})).json()
    infotext = json.loads(swapped["info"])["infotexts"][0]
    parsed = parse_infotext(infotext)
    assert (parsed["VAE"], parsed["VAE hash"]) == ("other.vae.safetensors", ldm.model_hash(paths["vae"]))
    assert _decode(plain["images"][0]).tobytes() != _decode(swapped["images"][0]).tobytes()
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"  # restored after the request
    try:
        kept = dict(TXT2IMG, override_settings={"sd_vae": "other.vae.safetensors", "CLIP_stop_at_last_layers": 2},
                    override_settings_restore_afterwards=False)
        assert client.post("/sdapi/v1/txt2img", json=kept).status_code == 200
        options = client.get("/sdapi/v1/options").json()
        assert (options["sd_vae"], options["CLIP_stop_at_last_layers"]) == ("other.vae.safetensors", 2)
    finally:
        client.post("/sdapi/v1/options", json={"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1})


def test_img2img_and_inpainting_answer_with_images_of_the_requested_size(client):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"init_images": [_png(init)], "prompt": "a blue square", "steps": 4, "denoising_strength": 0.5,
            "width": 64, "height": 48, "seed": 5, "sampler_name": "Euler"}
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert plain.status_code == 200, plain.text
    image = _decode(plain.json()["images"][0])
    assert image.size == (64, 48)
    assert parse_infotext(image.info["parameters"])["Denoising strength"] == "0.5"
    assert plain.json()["parameters"]["init_images"] is None  # A1111 echoes them only with include_init_images

    inpaint = client.post("/sdapi/v1/img2img", json=dict(body, mask=_png(mask), height=64, inpainting_fill=1,
                                                          inpaint_full_res=False, include_init_images=True))
    assert inpaint.status_code == 200, inpaint.text
    result = _decode(inpaint.json()["images"][0]).convert("RGB")
    assert inpaint.json()["parameters"]["init_images"] == [body["init_images"][0]]
    # Outside the mask (and its blur) the init image stays; inside it was repainted.
    assert result.getpixel((2, 2)) == pytest.approx((200, 40, 40), abs=12)
    assert result.getpixel((32, 32)) != pytest.approx((200, 40, 40), abs=12)


def test_webuiapi_client_works_unchanged(server):
    webuiapi = import_oracle("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a green triangle", width=64, height=64, seed=77, cfg_scale=6)
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [77] and result.parameters["prompt"] == "a green triangle"
    assert parse_infotext(result.image.info["parameters"])["Seed"] == "77"

    again = api.img2img(images=[result.image], prompt="a green triangle", width=64, height=64, seed=78,
                        denoising_strength=0.4, mask_image=Image.new("L", (64, 64), 255))
    assert again.image.size == (64, 64) and again.info["all_seeds"] == [78]

    info = api.png_info(result.image)
    assert info.info == result.image.info["parameters"]  # webuiapi keeps a non-JSON info as text

    names = api.util_get_model_names()
    assert any(name.startswith("tiny-b.safetensors [") for name in names)
    try:
        api.util_set_model("tiny-b.safetensors", find_closest=True)
        assert api.util_get_current_model().startswith("tiny-b.safetensors [")
    finally:
        api.set_options({"sd_model_checkpoint": server.service.registry.builtin.title})
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert api.get_progress()["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)


# ----- queue, progress, interrupt ---------------------------------------------------------------------------------

def _submit_in_order(server, bodies):
    """POSTs each body from its own thread, the next only once the previous one is in the server's queue, so the
    order of arrival is known. Returns (threads, results: index -> (finish time, response))."""
    results = {}

    def post(index, body):
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.post("/sdapi/v1/txt2img", json=body)
            results[index] = (time.monotonic(), response)

    threads = []
    for index, body in enumerate(bodies):
        thread = threading.Thread(target=post, args=(index, body))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 30
        while server.service.worker.position(body["force_task_id"])[0] == "unknown":
            assert time.monotonic() < deadline, "request never reached the queue"
            time.sleep(0.005)
    return threads, results


def test_parallel_requests_are_all_answered_in_order_of_arrival(server, client):
    bodies = [dict(TXT2IMG, seed=10 + i, steps=6, force_task_id=f"task(order-{i})") for i in range(4)]
    threads, results = _submit_in_order(server, bodies)
    # While the first runs, progress reports it and the three waiting behind it.
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["queued"] + (progress["state"]["job_count"] > 0) >= 1
    for thread in threads:
        thread.join(timeout=120)
    finished = sorted(results, key=lambda index: results[index][0])
    assert finished == [0, 1, 2, 3]
    for index, (_, response) in results.items():
        assert response.status_code == 200
        assert json.loads(response.json()["info"])["all_seeds"] == [10 + index]


def _wait_for_steps(client, steps: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= steps:
            return progress
        assert time.monotonic() < deadline, progress
        time.sleep(0.01)


def test_progress_reports_fraction_eta_and_a_live_preview_then_interrupt_stops_only_that_job(server, client):
    long_job = dict(TXT2IMG, steps=400, force_task_id="task(long)")
    next_job = dict(TXT2IMG, seed=99, force_task_id="task(next)")
    threads, results = _submit_in_order(server, [long_job, next_job])
    progress = _wait_for_steps(client, 3)
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert progress["state"]["sampling_steps"] == 400 and progress["state"]["job"] == "task(long)"
    preview = _decode(progress["current_image"])
    assert preview.size[0] > 0
    assert client.post("/internal/progress", json={"id_task": "task(next)"}).json()["queued"] is True

    assert client.post("/sdapi/v1/interrupt").status_code == 200
    for thread in threads:
        thread.join(timeout=60)
    stopped = results[0][1].json()
    assert json.loads(stopped["info"])["interrupted"] is True and stopped["images"] == []
    assert json.loads(results[1][1].json()["info"])["all_seeds"] == [99]  # the queued job ran normally
    assert client.post("/internal/progress", json={"id_task": "task(long)"}).json()["completed"] is True
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_skip_drops_the_current_batch_and_keeps_the_others(server, client):
    job = dict(TXT2IMG, steps=40, n_iter=2, seed=500, force_task_id="task(skip)")
    threads, results = _submit_in_order(server, [job])
    _wait_for_steps(client, 2)
    assert client.post("/sdapi/v1/skip").status_code == 200
    threads[0].join(timeout=120)
    assert json.loads(results[0][1].json()["info"])["all_seeds"] == [501]


def test_interrupt_after_a_finished_batch_answers_200_with_that_batchs_images(server, client):
    job = dict(TXT2IMG, steps=200, n_iter=3, seed=700, force_task_id="task(partial)")
    threads, results = _submit_in_order(server, [job])
    deadline = time.monotonic() + 120
    while (state := client.get("/sdapi/v1/progress").json()["state"])["job_no"] < 1 or state["sampling_step"] < 1:
        assert time.monotonic() < deadline, state
        time.sleep(0.01)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    threads[0].join(timeout=120)
    response = results[0][1]
    assert response.status_code == 200, response.text  # as A1111: the finished images, not an error
    body = response.json()
    info = json.loads(body["info"])
    assert info["interrupted"] is True and info["all_seeds"] == [700] and len(body["images"]) == 1
    assert parse_infotext(info["infotexts"][0])["Seed"] == "700"
