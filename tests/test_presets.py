"""Built-in LoRAs (found by `<lora:name:w>` after the user's LoRA folder, in generate(), the commands, model specs and
the web UI) and generation presets (sample.models.PRESETS: `--preset`, GET /ldm/presets). The presets here use a
random LoRA for the embedded model, registered through the public API, so they run whether or not the package
ships tiny-shapes-lcm."""
import pytest
from PIL import Image

from sample import generate
from sample.infotext import parse_infotext
from sample.lora import find_lora, load_lora, lora_files
from sample.models import (BUILTIN_LORAS, PRESETS, SHAPES_LCM_LORA, GenerationPreset, default_model,
                           load_model_spec, register_preset)
from sample.params import GenerationParams
from sample.txt2img import main as txt2img
from sample_helpers import one_thread, registered_preset, write_random_lora  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def shapes():
    return default_model()


@pytest.fixture
def preset(shapes, tmp_path):
    with registered_preset(tmp_path, shapes.model) as registered:
        yield registered


def _params(prompt: str, **fields) -> GenerationParams:
    return GenerationParams(**{"prompt": prompt, "sampler_name": "LCM", "steps": 2, "cfg_scale": 1.0, "seed": 5,
                               **fields})


def test_shipped_lcm_preset_is_offered_exactly_when_its_lora_file_is_installed():
    assert ("tiny-shapes + LCM" in PRESETS) == SHAPES_LCM_LORA.is_file()
    if SHAPES_LCM_LORA.is_file():
        shipped = PRESETS["tiny-shapes + LCM"]
        assert (shipped.model, shipped.sampler_name, shipped.steps, shipped.cfg_scale, shipped.loras) == \
            ("default", "LCM", 2, 1.0, (("tiny-shapes-lcm", 1.0),))
        assert BUILTIN_LORAS["tiny-shapes-lcm"] == str(SHAPES_LCM_LORA)


def test_builtin_lora_is_found_after_the_users_folder_and_a_user_file_of_that_name_wins(preset, shapes, tmp_path):
    builtin = BUILTIN_LORAS["test-lcm"]
    assert find_lora(None, "test-lcm") == builtin
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    write_random_lora(user / "sub" / "other.safetensors", shapes.model, seed=1)
    assert lora_files(user) == [("other", str(user / "sub" / "other.safetensors")), ("test-lcm", builtin)]
    mine = write_random_lora(user / "test-lcm.safetensors", shapes.model, seed=2)
    assert find_lora(user, "test-lcm") == mine
    assert [name for name, _ in lora_files(user)] == ["other", "test-lcm"]  # the built-in one is shadowed
    assert find_lora(user, "missing") is None


def test_registering_a_missing_lora_or_controlnet_file_raises_and_offers_nothing(tmp_path):
    from sample.controlnet.units import BUILTIN_CONTROLNETS, register_controlnet
    from sample.models import register_lora
    for register, registry, kind in ((register_lora, BUILTIN_LORAS, "LoRA"),
                                     (register_controlnet, BUILTIN_CONTROLNETS, "ControlNet")):
        before = dict(registry)
        with pytest.raises(FileNotFoundError, match=f"{kind} file not found: .*absent.safetensors"):
            register(tmp_path / "absent.safetensors")
        assert registry == before


def test_preset_lora_tag_works_without_a_lora_folder_and_its_infotext_reproduces_the_image(preset, shapes):
    prompt = preset.prompt_with_loras("a red circle")
    assert prompt == "a red circle <lora:test-lcm:1>"
    assert preset.prompt_with_loras(prompt) == prompt  # a pasted-back prompt does not get the tag twice
    result = generate(shapes, _params(prompt), progress=False)
    info = parse_infotext(result.infotexts[0])
    assert (info["Prompt"], info["Sampler"], info["Steps"], info["CFG scale"]) == (prompt, "LCM", "2", "1")
    assert info["Lora hashes"] == f"test-lcm: {load_lora(BUILTIN_LORAS['test-lcm']).shorthash}"
    again = generate(shapes, result.infotexts[0], progress=False)
    assert again.images[0].tobytes() == result.images[0].tobytes()
    plain = generate(shapes, _params("a red circle"), progress=False)
    assert plain.images[0].tobytes() != result.images[0].tobytes()


def test_user_lora_of_a_builtin_name_is_the_one_applied(preset, shapes, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    mine = write_random_lora(user / "test-lcm.safetensors", shapes.model, seed=3)
    result = generate(shapes, _params("a red circle <lora:test-lcm:1>"), progress=False, lora_dir=user)
    assert parse_infotext(result.infotexts[0])["Lora hashes"] == f"test-lcm: {load_lora(mine).shorthash}"


def test_model_spec_names_a_builtin_lora_without_a_path(preset, shapes):
    merged, _ = load_model_spec("default+test-lcm")
    assert merged.name == f"{shapes.name}+test-lcm"
    applied = generate(shapes, _params("a red circle <lora:test-lcm:1>"), progress=False)
    spec_image = generate(merged.model, _params("a red circle"), progress=False)
    assert spec_image.images[0].tobytes() == applied.images[0].tobytes()


def test_register_preset_refuses_what_it_cannot_load(preset, tmp_path):
    with pytest.raises(FileNotFoundError, match="not among the built-in LoRAs"):
        register_preset(GenerationPreset("x", "LCM", 2, 1.0, loras=(("nowhere", 1.0),)))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        register_preset(GenerationPreset("x", "LCM", 2, 1.0, model=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match="unknown sampler"):
        register_preset(GenerationPreset("x", "Fast", 2, 1.0))
    assert "x" not in PRESETS


def _infotext(path: str) -> dict:
    return parse_infotext(Image.open(path).info["parameters"])


def test_cli_preset_sets_sampler_steps_cfg_and_lora_and_flags_override_it(preset, tmp_path, capsys):
    outdir = str(tmp_path / "out")
    common = ["--seed", "5", "--outdir", outdir, "--no-progress"]
    assert txt2img(["--preset", "test + LCM", "a red circle", *common]) == 0
    info = _infotext(capsys.readouterr().out.splitlines()[-1])
    assert (info["Prompt"], info["Sampler"], info["Steps"], info["CFG scale"]) == \
        ("a red circle <lora:test-lcm:1>", "LCM", "2", "1")
    assert info["Lora hashes"].startswith("test-lcm: ")
    assert txt2img(["--preset", "test + LCM", "--steps", "3", "--cfg-scale", "1.5", "a red circle", *common]) == 0
    info = _infotext(capsys.readouterr().out.splitlines()[-1])
    assert (info["Sampler"], info["Steps"], info["CFG scale"]) == ("LCM", "3", "1.5")


def test_cli_unknown_preset_is_a_one_line_usage_error(preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        txt2img(["--preset", "turbo", "a red circle"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown preset 'turbo'; available: test + LCM" in error
