"""train.extract_lora: a fine-tune's change as a LoRA, by truncated SVD per layer."""
import copy
from dataclasses import replace

import pytest
import torch

import ldm
from ldm.checkpoint import read_metadata
from ldm.model import LatentDiffusion
from random_weights import randomize_weights
from sample.lora import applied, load_lora, lora_delta
from train.extract_lora import extract_lora, main
from train.lora import LoRANetwork, target_layers


@pytest.fixture(scope="module")
def base():
    with torch.random.fork_rng(devices=[]):
        return randomize_weights(ldm.create_model("tiny"), seed=0)


def _lora_tuned(base, rank: int, conv_rank: int = 0, seed: int = 1):
    """(base with a random kohya LoRA merged in, that LoRA's tensors): a fine-tune whose change has known rank."""
    network = LoRANetwork(target_layers(base, conv=conv_rank > 0, text_encoder=True), rank, float(rank),
                          conv_rank, float(conv_rank))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.copy_(0.1 * torch.randn(adapter.lora_up.weight.shape, generator=generator))
    network.remove()
    tensors = network.kohya_state_dict()
    tuned = copy.deepcopy(base)
    layers = target_layers(tuned, conv=conv_rank > 0, text_encoder=True)
    with torch.no_grad():
        for name, layer in layers.items():
            parts = {part: tensors[f"{name}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha")}
            layer.weight += lora_delta(parts, layer.weight.shape)
    return tuned, tensors


def _deltas(tensors: dict) -> dict:
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    return {name: {part: tensors[f"{name}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha")}
            for name in names}


def test_a_lora_merged_into_the_base_is_recovered_exactly_at_its_rank(base):
    tuned, original = _lora_tuned(base, rank=4, conv_rank=2)
    extraction = extract_lora(base, tuned, rank=4, conv_rank=2, text_encoder=True)
    assert extraction.kept == pytest.approx(1.0, abs=1e-6) and extraction.outside == 0.0
    expected, extracted = _deltas(original), _deltas(extraction.tensors)
    assert extracted.keys() == expected.keys()
    for name, parts in expected.items():
        shape = torch.Size([parts["lora_up.weight"].shape[0], *parts["lora_down.weight"].shape[1:]])
        torch.testing.assert_close(lora_delta(extracted[name], shape), lora_delta(parts, shape), atol=1e-5, rtol=0)


def test_truncation_keeps_the_top_singular_values_energy(base):
    # Eckart-Young: the rank-r factors keep exactly the r largest squared singular values of each layer's change.
    tuned, _ = _lora_tuned(base, rank=4)
    extraction = extract_lora(base, tuned, rank=2)
    total = kept = 0.0
    for name, layer in target_layers(base, conv=False, text_encoder=False).items():
        delta = target_layers(tuned, conv=False, text_encoder=False)[name].weight - layer.weight
        singular = torch.linalg.svdvals(delta.detach().flatten(1))
        total, kept = total + float((singular ** 2).sum()), kept + float((singular[:2] ** 2).sum())
        assert extraction.tensors[f"{name}.lora_down.weight"].shape[0] == 2
    assert extraction.kept == pytest.approx(kept / total, rel=1e-5) and extraction.kept < 0.99


def test_the_extracted_file_applied_at_generation_gives_the_tuned_weights(base, tmp_path):
    tuned, _ = _lora_tuned(base, rank=4, conv_rank=2)
    bias = "model.diffusion_model.out.0.bias"  # the final GroupNorm's: a change no LoRA layer holds
    with torch.no_grad():
        tuned.unet.out[0].bias += 0.5
    paths = {}
    for name, model in (("base", base), ("tuned", tuned)):
        paths[name] = tmp_path / f"{name}.safetensors"
        ldm.save_model(model, paths[name])
    out = tmp_path / "extracted.safetensors"
    assert main(["--base", str(paths["base"]), "--tuned", str(paths["tuned"]), "--out", str(out), "--rank", "4",
                 "--conv-rank", "2", "--text-encoder", "--precision", "fp32"]) == 0
    lora, metadata = load_lora(out), read_metadata(out)
    targeted = sum(float((t.weight - b.weight).detach().pow(2).sum()) for t, b in zip(
        target_layers(tuned, conv=True, text_encoder=True).values(),
        target_layers(base, conv=True, text_encoder=True).values()))
    outside = 0.5 ** 2 * tuned.unet.out[0].bias.numel()
    assert float(metadata["ldm.extracted_kept"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metadata["ldm.extracted_outside"]) == pytest.approx(outside / (outside + targeted), rel=1e-4)
    model = ldm.load_model(paths["base"])
    with torch.no_grad(), applied(model, [(lora, 1.0, 1.0)]) as messages:
        merged = {key: value.clone() for key, value in model.state_dict().items()}
    assert messages == []
    for key, value in tuned.state_dict().items():
        expected = base.state_dict()[key] if key == bias else value
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0, msg=key)


def test_refusals_exit_2_with_one_line(base, tmp_path, capsys):
    unet = base.preset.unet
    wider = LatentDiffusion(replace(base.preset, unet=replace(unet, model_channels=2 * unet.model_channels)))
    tuned, _ = _lora_tuned(base, rank=2)
    taken = tmp_path / "taken.safetensors"  # a folder where the file would go
    taken.mkdir()
    paths = {}
    for name, model in (("base", base), ("wider", wider), ("tuned", tuned)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        ldm.save_model(model, paths[name])
    out = tmp_path / "out.safetensors"
    cases = [(["--tuned", paths["wider"]], "is not the base's architecture"),
             (["--tuned", paths["base"]], "the two models have the same weights in every layer a LoRA covers"),
             (["--tuned", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
             (["--tuned", paths["base"], "--rank", "0"], "rank must be at least 1"),
             (["--tuned", paths["tuned"], "--out", str(taken)], "Is a directory")]
    for arguments, message in cases:
        assert main(["--base", paths["base"], "--out", str(out), *arguments]) == 2  # a later --out wins
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("python -m train.extract_lora: error: ") and message in line, line
    assert not out.exists()
