"""The Script menu (sample.scripts): every X/Y/Z cell is the generate() call its labels state, bitwise; A1111's range
syntax; SD upscale's tiling round trip and the upstream API case; prompt matrix and prompt-file lines; the API's
script routes and its 4xx answers."""
import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from sample import GenerationParams, default_model, generate, load_checkpoint
from sample.infotext import parse_infotext
from sample.scripts import SCRIPTS, Script, ScriptArg, ScriptError, find_script, register_script, run_script
from sample.scripts.prompt_matrix import combinations
from sample.scripts.prompts_from_file import parse_line, parse_lines
from sample.scripts.sd_upscale import blend_tiles, tile_starts
from sample.scripts.xyz_plot import AXES, axes_for, expand_values, split_values


@pytest.fixture(scope="module")
def model():
    return default_model()


BASE = GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=3, cfg_scale=5, seed=77)


def _axis(label: str, mode: str = "txt2img") -> int:
    return [axis.label for axis in axes_for(mode)].index(label)


# ----- X/Y/Z plot -------------------------------------------------------------------------------------------------

def test_every_xyz_cell_is_the_generate_call_its_labels_state_bitwise(model):
    args = [_axis("Steps"), "2-3", None, _axis("Prompt S/R"), "red, blue", None, _axis("CFG Scale"), "3, 7.5", None]
    result = run_script(model, BASE, "x/y/z plot", args, progress=False)
    assert len(result.images) == 1 + 2 * 2 * 2  # the grid, then every cell
    cells = result.images[1:]
    index = 0
    for cfg in (3.0, 7.5):  # Z outermost, then Y, then X: A1111's cell order
        for colour in ("red", "blue"):
            for steps in (2, 3):
                stated = dataclasses.replace(BASE, steps=steps, cfg_scale=cfg, prompt=f"a {colour} circle")
                direct = generate(model, stated, progress=False)
                assert cells[index].tobytes() == direct.images[0].tobytes(), (steps, colour, cfg)
                assert result.infotexts[1 + index] == direct.infotexts[0]
                index += 1
    # Two Z values: the main grid holds the two labelled sub-grids side by side, wider than 2x2 cells each.
    assert result.images[0].width > 2 * 2 * 64 and result.images[0].height > 2 * 64
    grid_info = parse_infotext(result.infotexts[0])
    assert (grid_info["Script"], grid_info["X Type"], grid_info["X Values"], grid_info["Y Type"],
            grid_info["Z Values"]) == ("X/Y/Z plot", "Steps", "2-3", "Prompt S/R", "3, 7.5")


def test_xyz_checkpoint_axis_loads_each_model_once_and_matches_it(tmp_path, model):
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"tiny-{seed}.safetensors"))
        ldm.save_model(ldm.create_model("tiny"), paths[-1])
    loads = []

    def load(name):
        loads.append(name)
        return load_checkpoint(name)

    params = dataclasses.replace(BASE, steps=2, width=64, height=64)
    args = [_axis("Seed"), "1, 2", None, _axis("Checkpoint name"), ",".join(paths), None]
    result = run_script(model, params, "x/y/z plot", args, load_model=load, progress=False)
    assert loads == paths  # the checkpoint axis is iterated outermost
    for i, (path, seed) in enumerate((p, s) for p in paths for s in (1, 2)):
        direct = generate(load_checkpoint(path), dataclasses.replace(params, seed=seed), progress=False)
        assert result.images[1 + i].tobytes() == direct.images[0].tobytes()
        assert parse_infotext(result.infotexts[1 + i])["Model"] == Path(path).stem


@pytest.mark.parametrize("kind, text, expected", [
    ("int", "1-5", [1, 2, 3, 4, 5]),
    ("int", "1-10 (+3)", [1, 4, 7, 10]),
    ("int", "10-1 (-4)", [10, 6, 2]),
    ("int", "1-10 [4]", [1, 4, 7, 10]),
    ("int", "8, 12, 1-2", [8, 12, 1, 2]),
    ("float", "0.5-1.5 (+0.5)", [0.5, 1.0, 1.5]),
    ("float", "1-2 [3]", [1.0, 1.5, 2.0]),
    ("str", '"a, b", c', ["a, b", "c"]),
])
def test_axis_values_follow_a1111_range_syntax(kind, text, expected):
    axis = next(axis for axis in AXES if axis.kind == kind)
    assert expand_values(axis, split_values(text), "X values") == expected


def test_seed_axis_fixes_minus_one_unless_told_to_keep_it(model):
    args = [_axis("Seed"), "-1, 5", None]
    result = run_script(model, dataclasses.replace(BASE, steps=1), "x/y/z plot", args, progress=False)
    drawn, kept = result.seeds[1:]
    assert drawn != -1 and kept == 5
    assert parse_infotext(result.infotexts[0])["Fixed X Values"] == f"{drawn}, 5"
    kept_random = run_script(model, dataclasses.replace(BASE, steps=1), "x/y/z plot",
                             args + [None] * 9 + [True], progress=False)
    assert "Fixed X Values" not in parse_infotext(kept_random.infotexts[0])


@pytest.mark.parametrize("args, message", [
    ([_axis("Sigma Churn"), "0, 1"], "'Sigma Churn' is not supported here"),
    ([_axis("Steps"), "4, many"], "'many' is not an integer"),
    ([_axis("Steps"), "1-5 (+0)"], "the step of '1-5 \\(\\+0\\)' is 0"),
    ([_axis("Prompt S/R"), "green, blue"], "did not find 'green'"),
    ([_axis("Sampler"), "Euler, Warp"], "unknown sampler 'Warp'"),
    (["Steps", ""], "no values given for Steps"),
    ([_axis("Prompt S/R"), ", red"], "the first value is the text to search for"),
    ([_axis("Steps"), "2", None, _axis("Size"), "64, 72"], "cell \\(Steps: 2, Size: 72\\): width 72 does not fit"),
    ([_axis("Clip skip"), "1, 9"], "clip_skip 9 is beyond this model's text encoder"),
    (["Colour", "1"], "'X type' must be one of Nothing, Seed"),
    ([_axis("Steps")] + [None] * 20, "takes at most 16 script_args"),
])
def test_bad_xyz_arguments_say_what_is_valid_before_anything_runs(model, args, message):
    with pytest.raises(ScriptError, match=message):
        run_script(model, BASE, "x/y/z plot", args, progress=False)


def test_xyz_work_is_bounded_by_the_sum_of_its_cells(model):
    limit = BASE.work() * 3  # three cells of the base job
    with pytest.raises(ScriptError, match="4 cells needs .* more than this server's limit"):
        run_script(model, BASE, "x/y/z plot", [_axis("Seed"), "1-4"], max_work=limit, progress=False)


def test_size_axis_and_hires_upscaler_choices(model):
    result = run_script(model, dataclasses.replace(BASE, steps=1), "x/y/z plot",
                        [_axis("Size"), "64x32, 32", None], progress=False)
    assert [image.size for image in result.images[1:]] == [(64, 32), (32, 32)]
    labels = [axis.label for axis in axes_for("img2img")]
    assert "Hires upscaler" not in labels and "Denoising" in labels and labels.count("Sampler") == 1


# ----- SD upscale -------------------------------------------------------------------------------------------------

def test_tiles_cover_the_image_with_at_least_the_overlap():
    assert tile_starts(128, 64, 8) == [0, 32, 64]
    assert tile_starts(64, 64, 8) == [0]
    for length, tile, overlap in ((200, 64, 16), (1000, 512, 64), (97, 32, 0)):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_blending_tiles_cut_from_an_image_gives_the_image_back():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8))
    xs, ys = tile_starts(140, 64, 16), tile_starts(100, 48, 8)
    tiles = [image.crop((x, y, x + 64, y + 48)) for y in ys for x in xs]
    assert blend_tiles(tiles, xs, ys, image.size).tobytes() == image.tobytes()


def test_sd_upscale_doubles_the_image_and_its_first_tile_is_an_img2img_call(model):
    init = generate(model, dataclasses.replace(BASE, steps=2), progress=False).images[0].resize((80, 80))
    params = dataclasses.replace(BASE, steps=4, init_images=[init], width=64, height=64, denoising_strength=0.5)
    result = run_script(model, params, "sd upscale", ["", 16, "Lanczos", 2.0], progress=False)
    image = result.images[0]
    assert image.size == (160, 160)
    info = parse_infotext(result.infotexts[0])
    assert (info["SD upscale overlap"], info["SD upscale upscaler"]) == ("16", "Lanczos")
    # Tile 0 (seed 77) is img2img of the upscaled image's corner; where no other tile overlaps it, it is kept as is.
    corner = init.resize((160, 160), Image.LANCZOS).crop((0, 0, 64, 64))
    tile = generate(model, dataclasses.replace(params, init_images=[corner]), progress=False).images[0]
    second_start = tile_starts(160, 64, 16)[1]
    assert image.crop((0, 0, second_start, second_start)).tobytes() == \
        tile.crop((0, 0, second_start, second_start)).tobytes()


def test_sd_upscale_uses_a_model_upscaler_from_the_folder(model, tmp_path):
    from ldm.checkpoint import save_state_dict
    from random_weights import randomize_weights
    from sample.upscalers import upscale_to
    from sample.upscalers.srvgg import SRVGGNetCompact

    folder = tmp_path / "upscalers"
    (folder / "RealESRGAN").mkdir(parents=True)
    torch.manual_seed(0)
    save_state_dict(randomize_weights(SRVGGNetCompact(3, 3, features=8, num_conv=2, scale=2)).state_dict(),
                    folder / "RealESRGAN" / "compact-x2.safetensors")
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    params = dataclasses.replace(BASE, steps=2, init_images=[init], width=64, height=64, denoising_strength=0.5)
    # Chosen by name and by its index in the folder's list (built-ins first, as /sdapi/v1/upscalers lists them).
    by_name = run_script(model, params, "sd upscale", ["", 16, "compact-x2", 2.0], progress=False,
                         upscaler_dir=folder)
    index = find_script("sd upscale", "img2img").args[2].choice_list("img2img", {"upscaler_dir": folder}).index(
        "compact-x2")
    by_index = run_script(model, params, "sd upscale", ["", 16, index, 2.0], progress=False, upscaler_dir=folder)
    assert by_name.images[0].tobytes() == by_index.images[0].tobytes()
    assert parse_infotext(by_name.infotexts[0])["SD upscale upscaler"] == "compact-x2"
    # Tile 0 is img2img of the model-upscaled image's corner.
    corner = upscale_to(init, "compact-x2", (96, 96), folder).crop((0, 0, 64, 64))
    tile = generate(model, dataclasses.replace(params, init_images=[corner]), progress=False).images[0]
    keep = tile_starts(96, 64, 16)[1]
    assert by_name.images[0].crop((0, 0, keep, keep)).tobytes() == tile.crop((0, 0, keep, keep)).tobytes()


def test_sd_upscale_is_an_img2img_script_only(model):
    with pytest.raises(ScriptError, match="not a txt2img script"):
        run_script(model, BASE, "sd upscale", ["", 8, "Lanczos", 2.0])
    with pytest.raises(ScriptError, match="'Upscaler' must be one of None, Lanczos, Nearest"):
        run_script(model, dataclasses.replace(BASE, init_images=[Image.new("RGB", (64, 64))]), "sd upscale",
                   ["", 8, "Bicubic", 2.0])


# ----- prompt matrix and prompts from file ------------------------------------------------------------------------

def test_prompt_matrix_prompts_are_every_subset_of_the_parts():
    parts, prompts = combinations("a circle|red|small, |left", False, ", ")
    assert parts == ["a circle", "red", "small, ", "left"]
    assert prompts == ["a circle", "a circle, red", "a circle, small", "a circle, red, small", "a circle, left",
                       "a circle, red, left", "a circle, small, left", "a circle, red, small, left"]
    assert combinations("x|y", True, " ")[1] == ["x", "y x"]


def test_prompt_matrix_images_are_generate_calls_with_those_prompts(model):
    params = dataclasses.replace(BASE, prompt="a circle|red|on the left", steps=2)
    result = run_script(model, params, "prompt matrix", [False, True], progress=False)
    assert len(result.images) == 5 and result.seeds[1:] == [77, 78, 79, 80]
    direct = generate(model, dataclasses.replace(params, prompt="a circle, on the left", seed=79), progress=False)
    assert result.images[3].tobytes() == direct.images[0].tobytes()
    assert result.images[0].width > 2 * 64  # the grid with its labels


def test_prompt_file_lines_parse_as_a1111_options():
    assert parse_line('--prompt "a red circle" on the left --steps 10 --cfg_scale 5.5 --sampler_name "euler a"') == {
        "prompt": "a red circle on the left", "steps": 10, "cfg_scale": 5.5, "sampler_name": "Euler a"}
    assert parse_line("a plain prompt") == {"prompt": "a plain prompt"}
    assert parse_line("--n_iter 2 --tiling true --outpath_samples /etc --negative_prompt x") == {
        "batch_count": 2, "tiling": True, "negative_prompt": "x"}
    with pytest.raises(ScriptError, match="prompts line 3: unknown option --colour"):
        parse_lines("a\n\n--colour red")
    with pytest.raises(ScriptError, match="line 1: --steps 'ten'"):
        parse_lines("--steps ten")


def test_prompts_from_file_iterates_the_seed_and_joins_the_request_prompt(model):
    params = dataclasses.replace(BASE, prompt="blue", steps=2)
    text = 'a circle\n--prompt "a square" --steps 1 --seed 9'
    result = run_script(model, params, "prompts from file or textbox", [True, False, "end", text], progress=False)
    assert result.seeds == [77, 9]
    assert [parse_infotext(t)["Prompt"] for t in result.infotexts] == ["blue a circle", "blue a square"]
    direct = generate(model, dataclasses.replace(params, prompt="blue a circle"), progress=False)
    assert result.images[0].tobytes() == direct.images[0].tobytes()


# ----- registry -----------------------------------------------------------------------------------------------------

def test_a_registered_script_is_listed_and_run_by_name(model):
    def run(job, params, args):
        (times,) = args
        return job.generate(dataclasses.replace(params, batch_count=int(times)))

    register_script(Script("Repeat", (ScriptArg("Times", 2, "number", 1, 4, 1),), run, img2img=False))
    try:
        assert find_script("REPEAT", "txt2img").info("txt2img")["args"][0] == {
            "label": "Times", "value": 2, "minimum": 1, "maximum": 4, "step": 1, "choices": None}
        assert len(run_script(model, dataclasses.replace(BASE, steps=1), "repeat", [], progress=False).images) == 2
        with pytest.raises(ScriptError, match="'Times' must be in \\[1, 4\\], got 9"):
            run_script(model, BASE, "repeat", [9])
    finally:
        del SCRIPTS["repeat"]
    with pytest.raises(ScriptError, match="script 'repeat' not found; scripts for txt2img: 'prompt matrix'"):
        run_script(model, BASE, "repeat", [])


# ----- the API ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from oracles import import_oracle
    httpx = import_oracle("httpx")
    from webui_server import start_server, write_models

    models = tmp_path_factory.mktemp("models")
    write_models(str(models))
    # Work limit: the upstream SD upscale case (16 tiles of 64x64 at 2 img2img steps) fits, a 400-cell plot does not.
    server = start_server(tmp_path_factory.mktemp("webui"), max_work=200_000, models_dir=str(models))
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
    server.stop()


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_scripts_and_script_info_list_the_registry_as_a1111_does(client):
    listing = client.get("/sdapi/v1/scripts").json()
    # ControlNet, the one always-on script, is listed last (tests/test_webui_controlnet.py).
    assert listing == {"txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot", "controlnet"],
                       "img2img": ["prompt matrix", "prompts from file or textbox", "sd upscale", "x/y/z plot",
                                   "controlnet"]}
    info = client.get("/sdapi/v1/script-info").json()
    upscale = next(entry for entry in info if entry["name"] == "sd upscale")
    assert upscale["is_img2img"] and not upscale["is_alwayson"]
    assert [arg["label"] for arg in upscale["args"]] == [
        upscale["args"][0]["label"], "Tile overlap", "Upscaler", "Scale Factor"]
    assert upscale["args"][1] == {"label": "Tile overlap", "value": 64, "minimum": 0, "maximum": 256, "step": 16,
                                  "choices": None}
    xyz = [entry for entry in info if entry["name"] == "x/y/z plot"]
    assert [entry["is_img2img"] for entry in xyz] == [False, True]
    assert "Hires steps" in xyz[0]["args"][0]["choices"] and "Hires steps" not in xyz[1]["args"][0]["choices"]


def test_upstream_sd_upscale_case_answers_200_with_an_image_twice_the_size(client):
    # A1111's test_img2img_sd_upscale_performed body, with a 96-pixel init image (its own file is not shipped here).
    init = Image.new("RGB", (96, 96), (30, 120, 200))
    body = {"init_images": [_png(init)], "prompt": "example prompt", "steps": 3, "width": 64, "height": 64,
            "denoising_strength": 0.75, "sampler_index": "Euler a", "seed": -1, "cfg_scale": 7, "eta": 0,
            "include_init_images": False, "script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 1 and _decode(images[0]).size == (192, 192)


def test_xyz_plot_over_the_api_returns_the_grid_then_cells_equal_to_plain_requests(client):
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg_scale": 5,
            "script_name": "X/Y/Z plot", "script_args": [_axis("CFG Scale"), "3, 9", None]}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    infotexts = json.loads(response.json()["info"])["infotexts"]
    assert len(images) == 3 and parse_infotext(infotexts[0])["X Type"] == "CFG Scale"
    for cfg, image in zip((3, 9), images[1:]):
        plain = client.post("/sdapi/v1/txt2img", json=dict(body, script_name=None, script_args=[], cfg_scale=cfg))
        assert _decode(plain.json()["images"][0]).tobytes() == _decode(image).tobytes()


def test_xyz_checkpoint_axis_over_the_api_uses_the_listed_models_and_leaves_the_setting(client):
    before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    body = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 3,
            "script_name": "x/y/z plot", "script_args": ["Checkpoint name", "tiny-a, tiny-b.safetensors"]}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    infotexts = json.loads(response.json()["info"])["infotexts"]
    assert [parse_infotext(text)["Model"] for text in infotexts[1:]] == ["tiny-a", "tiny-b"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
    plain = client.post("/sdapi/v1/txt2img", json=dict(body, script_name=None, script_args=[]))
    assert parse_infotext(json.loads(plain.json()["info"])["infotexts"][0])["Model"] == "tiny-shapes"
    missing = client.post("/sdapi/v1/txt2img", json=dict(body, script_args=["Checkpoint name", "tiny-a, tiny-z"]))
    assert missing.status_code == 400 and "model 'tiny-z' not found; available:" in missing.json()["detail"]


@pytest.mark.parametrize("route, body, message", [
    ("txt2img", {"script_name": "loopback"}, "script 'loopback' not found; scripts for txt2img: 'prompt matrix'"),
    ("txt2img", {"script_name": "sd upscale"}, "'sd upscale' is not a txt2img script"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": [4, "1-many"]}, "'1-many' is not an integer"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": [99]}, "'X type' must be one of"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": [1, "1-400"], "steps": 20},
     "more than this server's limit"),
    ("txt2img", {"script_name": "prompt matrix", "script_args": [False, False, "sideways"]},
     "'Prompt type' must be one of positive, negative"),
    ("img2img", {"script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 1.0], "width": 128, "height": 128},
     "smaller than one tile"),
])
def test_bad_scripts_get_a_4xx_that_says_what_is_valid(client, route, body, message):
    body = dict({"prompt": "x", "steps": 2, "width": 64, "height": 64}, **body)
    if route == "img2img":
        body["init_images"] = [_png(Image.new("RGB", (64, 64)))]
    response = client.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("kind, text", [("int", "1-99999999999"), ("int", "1-2 [5000]"), ("float", "0-1 (+0.00001)"),
                                        ("permutations", "a, b, c, d, e, f, g, h")])
def test_a_range_too_large_for_a_plot_is_refused_before_it_is_made(kind, text):
    axis = next(axis for axis in AXES if axis.kind == kind)
    with pytest.raises(ScriptError, match="more than the 1000 cells a plot may have"):
        expand_values(axis, split_values(text), "X values")


def test_script_progress_counts_every_planned_generation(model):
    from sample.scripts import ScriptJob
    from sample.webui.monitor import StepMonitor
    from sample.webui.worker import JobControl

    calls, controls = [], []

    def hooks(params, call, total):
        calls.append((call, total))
        control = JobControl(job=None)
        controls.append(control)
        return {"callback": StepMonitor(control, params, part=(call, total))}

    job = ScriptJob(model, {"progress": False}, hooks=hooks)
    find_script("x/y/z plot", "txt2img").run(job, dataclasses.replace(BASE, steps=2),
                                             find_script("x/y/z plot", "txt2img").arguments([1, "1-3"], "txt2img"))
    assert calls == [(0, 3), (1, 3), (2, 3)]
    # After its last step the second of three calls stands at two thirds of the request.
    assert [round(control.fraction, 4) for control in controls] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]


# ----- the commands -------------------------------------------------------------------------------------------------

def test_txt2img_command_runs_a_script_and_saves_the_grid_then_the_cells(tmp_path, capsys):
    from sample import txt2img

    status = txt2img.main(["a red circle", "--steps", "1", "--seed", "5", "--no-progress", "--outdir", str(tmp_path),
                           "--script", "X/Y/Z plot", "--script-args", '["CFG Scale", "3, 9"]'])
    assert status == 0, capsys.readouterr().err
    paths = capsys.readouterr().out.splitlines()
    assert len(paths) == 3
    assert [parse_infotext(Image.open(p).info["parameters"]).get("CFG scale") for p in paths] == ["3", "3", "9"]


@pytest.mark.parametrize("argv, message", [
    (["--script", "loopback"], "script 'loopback' not found; scripts for txt2img:"),
    (["--script", "x/y/z plot", "--script-args", "[Steps]"], "--script-args must be a JSON list"),
    (["--script", "x/y/z plot", "--script-args", '{"x": 1}'], "--script-args must be a JSON list"),
    (["--script", "x/y/z plot", "--script-args", '["Steps", "1-many"]'], "'1-many' is not an integer"),
])
def test_script_mistakes_in_the_command_exit_2_with_one_line(tmp_path, capsys, argv, message):
    from sample import txt2img

    status = txt2img.main(["x", "--steps", "1", "--no-progress", "--outdir", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_choice_axes_take_a1111s_values_list_unless_text_inputs_are_chosen():
    from sample.scripts.xyz_plot import plan_axis

    sampler = axes_for("txt2img")[_axis("Sampler")]
    assert plan_axis(sampler, "Heun", ["Euler", "DDIM"], False, False, "X values", False) == ["Euler", "DDIM"]
    assert plan_axis(sampler, "Heun", ["Euler", "DDIM"], True, False, "X values", False) == ["Heun"]
    prompts = axes_for("txt2img")[_axis("Prompt S/R")]
    assert plan_axis(prompts, "red, blue\ngreen, pink", None, False, True, "X values", False) == [
        "red, blue", "green, pink"]  # "Use raw text lines": one value per line, commas kept


def test_an_interrupted_plot_keeps_the_cells_made_and_leaves_the_rest_black(model):
    from sample import Interrupted

    steps_seen = []

    def interrupt_in_the_second_cell(step):
        steps_seen.append(step.i)
        if len(steps_seen) > 2:  # two steps per cell: the third step is the second cell's first
            raise Interrupted()

    result = run_script(model, dataclasses.replace(BASE, steps=2), "x/y/z plot", [_axis("Seed"), "1-3"],
                        progress=False, callback=interrupt_in_the_second_cell)
    assert result.interrupted and len(steps_seen) == 3  # the third cell was never started
    first, second, third = result.images[1:]
    direct = generate(model, dataclasses.replace(BASE, steps=2, seed=1), progress=False)
    assert first.tobytes() == direct.images[0].tobytes()
    assert second.getextrema() == third.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_sd_upscale_redraws_batch_size_tiles_at_a_time_with_the_same_seeds(model):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    params = dataclasses.replace(BASE, steps=2, init_images=[init], width=32, height=32, denoising_strength=0.5)
    one, batched = (run_script(model, dataclasses.replace(params, batch_size=size), "sd upscale",
                               ["", 8, "Nearest", 2.0], progress=False) for size in (1, 4))
    assert batched.images[0].size == one.images[0].size == (80, 80)  # 3x3 tiles: batches of 4, 4 and 1
    # The same tiles and seeds; a batched UNet call rounds differently in the last float bits, nothing more.
    difference = np.abs(np.asarray(one.images[0], dtype=int) - np.asarray(batched.images[0], dtype=int))
    assert difference.max() <= 2, difference.max()
