"""Evaluating a fine-tune without merging by hand: model specs (`BASE+LORA[:STRENGTH]+EMBEDDING`), `sample.lora`'s
public `applied` / `merge` / `save_merged`, and the specs in `metrics.compare` and `python -m shapes judge`."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm
import metrics.compare as compare
from sample import (LoraError, ModelSpec, applied, load_checkpoint, load_lora, load_model_spec, parse_model_spec,
                    save_merged)
from sample_helpers import one_thread, random_tiny  # noqa: F401  (autouse fixture)
from shapes.__main__ import main as shapes_main

ATTENTION_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
TEXT_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random checkpoint, a LoRA for it (a UNet and a text-encoder layer, alpha 1 of rank 2) and an
    embedding."""
    root = tmp_path_factory.mktemp("specs")
    loaded = random_tiny()
    ldm.save_model(loaded.model, root / "base.safetensors")
    generator = torch.Generator().manual_seed(0)
    unet_k = loaded.model.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.weight
    text_q = loaded.model.cond_stage_model.transformer.text_model.encoder.layers[0].self_attn.q_proj.weight
    state = {}
    for name, weight in ((ATTENTION_K, unet_k), (TEXT_Q, text_q)):
        state[f"{name}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(root / "style.safetensors"))
    width = text_q.shape[1]
    save_file({"emb_params": torch.randn(2, width, generator=generator)}, str(root / "shiny.safetensors"))
    return root


def test_spec_parses_base_loras_strengths_and_embeddings():
    assert parse_model_spec("a.safetensors") == ModelSpec("a.safetensors")
    assert parse_model_spec("default+x.safetensors:0.8+e.pt") == ModelSpec(
        "default", (("x.safetensors", 0.8), ("e.pt", None)))
    assert parse_model_spec("m.ckpt+dir:with:colons/x.pt") == ModelSpec("m.ckpt", (("dir:with:colons/x.pt", None),))
    with pytest.raises(ValueError, match=r"BASE\[\+FILE\[:STRENGTH\]\]"):
        parse_model_spec("m.ckpt++x.pt")


def test_a_half_precision_file_is_loaded_in_fp32_on_a_cpu_unless_asked(files, tmp_path):
    # CPU kernels are slow in fp16 (an fp16 shapes model sampled about 11x slower), so a spec of a file saved in fp16
    # is upcast, as the default model is; an explicit dtype is kept.
    ldm.save_model(load_checkpoint(files / "base.safetensors").model.half(), tmp_path / "half.safetensors")
    upcast, _ = load_model_spec(str(tmp_path / "half.safetensors"))
    assert {p.dtype for p in upcast.model.parameters()} == {torch.float32}
    kept = load_checkpoint(tmp_path / "half.safetensors", dtype=torch.float16)
    assert {p.dtype for p in kept.model.parameters()} == {torch.float16}
    # fp16 -> fp32 is exact: the weights are the fp16 file's.
    upcast_weights = dict(upcast.model.named_parameters())
    assert all(torch.equal(upcast_weights[k].half(), v) for k, v in kept.model.named_parameters())


def test_spec_with_a_lora_equals_the_saved_merge_bitwise(files, tmp_path):
    spec = f"{files / 'base.safetensors'}+{files / 'style.safetensors'}:0.7"
    loaded, embeddings = load_model_spec(spec, dtype=torch.float32)
    base = load_checkpoint(files / "base.safetensors", dtype=torch.float32)
    lora = load_lora(files / "style.safetensors")
    save_merged(base.model, [(lora, 0.7, 0.7)], tmp_path / "merged.safetensors")
    merged = load_checkpoint(tmp_path / "merged.safetensors", dtype=torch.float32).model.state_dict()
    from_spec, plain = loaded.model.state_dict(), base.model.state_dict()
    assert embeddings is None and loaded.name == "base+style"
    assert merged.keys() == from_spec.keys() and all(torch.equal(merged[k], from_spec[k]) for k in merged)
    # save_merged left the loaded model as it was, and the LoRA changed exactly its two layers, by 0.7·alpha/rank·up@down
    changed = sorted(k for k in plain if not torch.equal(plain[k], from_spec[k]))
    assert changed == ["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                       "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]
    parts = lora.layers[ATTENTION_K]
    expected = plain[changed[1]] + 0.7 * 0.5 * parts["lora_up.weight"] @ parts["lora_down.weight"]
    torch.testing.assert_close(from_spec[changed[1]], expected, rtol=1e-6, atol=1e-6)


def test_applied_restores_every_weight_bitwise_even_when_the_block_raises(files):
    loaded = load_checkpoint(files / "base.safetensors", dtype=torch.float32)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    lora = load_lora(files / "style.safetensors")
    with pytest.raises(RuntimeError, match="inside"):
        with applied(loaded.model, [(lora, 1.0, 1.0)]) as messages:
            assert messages == []
            assert not torch.equal(loaded.model.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.weight,
                                   before["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k."
                                          "weight"])
            raise RuntimeError("inside")
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_spec_loads_embeddings_and_refuses_a_strength_on_them(files):
    loaded, embeddings = load_model_spec(f"{files / 'base.safetensors'}+{files / 'shiny.safetensors'}")
    assert list(embeddings.embeddings) == ["shiny"] and loaded.name == "base"
    with pytest.raises(ValueError, match="only LoRAs take a :STRENGTH"):
        load_model_spec(f"{files / 'base.safetensors'}+{files / 'shiny.safetensors'}:0.5")


def test_spec_brings_a_loras_bundled_embedding_unless_an_embedding_file_has_its_name(files, tmp_path):
    from safetensors.torch import load_file
    state = load_file(str(files / "style.safetensors"))
    bundled = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    save_file({**state, "bundle_emb.shiny.emb_params": bundled, "bundle_emb.glossy.emb_params": bundled.clone()},
              str(tmp_path / "bundling.safetensors"))
    base = files / "base.safetensors"
    _, embeddings = load_model_spec(f"{base}+{tmp_path / 'bundling.safetensors'}")
    assert sorted(embeddings.embeddings) == ["glossy", "shiny"]
    assert torch.equal(embeddings.embeddings["shiny"].vectors[0], bundled)
    # Whichever comes first in the spec, the embedding file's "shiny" wins, as the embeddings folder's does.
    for spec in (f"{base}+{files / 'shiny.safetensors'}+{tmp_path / 'bundling.safetensors'}",
                 f"{base}+{tmp_path / 'bundling.safetensors'}+{files / 'shiny.safetensors'}"):
        with pytest.warns(UserWarning, match="embedding shiny bundled in LoRA bundling skipped"):
            _, embeddings = load_model_spec(spec)
        assert sorted(embeddings.embeddings) == ["glossy", "shiny"]
        assert embeddings.embeddings["shiny"].vectors[0].shape == (2, 64)


def test_save_merged_refuses_a_lora_for_another_model(files, tmp_path):
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.ones(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.ones(4, 2)}, str(tmp_path / "other.safetensors"))
    base = load_checkpoint(files / "base.safetensors")
    with pytest.raises(LoraError, match="match nothing"):
        save_merged(base.model, [(load_lora(tmp_path / "other.safetensors"), 1.0, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_compare_with_a_lora_spec_draws_what_the_manual_merge_draws(files, tmp_path, capsys):
    base = load_checkpoint(files / "base.safetensors", dtype=torch.float32)
    save_merged(base.model, [(load_lora(files / "style.safetensors"), 0.5, 0.5)], tmp_path / "merged.safetensors")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert compare.main(["--prompts", str(tmp_path / "prompts.txt"),
                         "--model", f"manual={tmp_path / 'merged.safetensors'}",
                         "--model", f"{files / 'base.safetensors'}+{files / 'style.safetensors'}:0.5",
                         "--model", f"plain={files / 'base.safetensors'}", "--steps", "2", "--seeds", "3",
                         "--width", "32", "--height", "32", "--device", "cpu", "--outdir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    manual, spec, plain = (Image.open(tmp_path / "out" / label / "0000-3.png")
                           for label in ("manual", "base+style", "plain"))
    assert manual.tobytes() == spec.tobytes() and manual.tobytes() != plain.tobytes()
    assert "Model: base+style" in spec.info["parameters"]


def test_shapes_judge_takes_a_model_spec(files, tmp_path, capsys):
    arguments = ["judge", "--n", "2", "--steps", "1", "--grid", ""]
    assert shapes_main([*arguments, "--model", f"{files / 'base.safetensors'}+{files / 'style.safetensors'}:0.5",
                        "--outdir", str(tmp_path / "spec")]) == 0
    assert shapes_main([*arguments, "--model", str(files / "base.safetensors"), "--lora",
                        str(files / "style.safetensors"), "--lora-strength", "0.5",
                        "--outdir", str(tmp_path / "flag")]) == 0
    capsys.readouterr()
    for index in range(2):
        assert (Image.open(tmp_path / "spec" / f"{index:05d}.png").tobytes()
                == Image.open(tmp_path / "flag" / f"{index:05d}.png").tobytes())


def test_merge_lora_command_writes_the_specs_weights(files, tmp_path, capsys):
    from sample.merge_lora import main as merge_lora
    spec = f"{files / 'base.safetensors'}+{files / 'style.safetensors'}:0.7"
    from_spec = load_model_spec(spec, dtype=torch.float32)[0].model.state_dict()
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        out = tmp_path / f"merged-{precision}.safetensors"
        assert merge_lora([spec, "--out", str(out), "--precision", precision]) == 0
        assert f"{out}: {spec} merged, {precision}" in capsys.readouterr().out
        merged = load_checkpoint(out, dtype=dtype)
        # Infotexts of images made with the file name the LoRA it holds.
        assert merged.name == "base+style"
        weights = merged.model.state_dict()
        assert weights.keys() == from_spec.keys()
        assert all(torch.equal(weights[k], v.to(dtype) if k != "alphas_cumprod" else v) for k, v in from_spec.items())


def test_merge_lora_command_refuses_in_one_line_and_notes_bundled_embeddings(files, tmp_path, capsys):
    from safetensors.torch import load_file

    from sample.merge_lora import main as merge_lora
    base, out = files / "base.safetensors", tmp_path / "out.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.ones(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.ones(4, 2)}, str(tmp_path / "other.safetensors"))
    for spec, message in ((str(base), "names no LoRA to merge"),
                          (f"{base}+{files / 'shiny.safetensors'}", "shiny.safetensors is an embedding"),
                          (f"{base}+{tmp_path / 'other.safetensors'}", "match nothing in this model"),
                          (f"{base}+{tmp_path / 'missing.safetensors'}", "file not found")):
        assert merge_lora([spec, "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("python -m sample.merge_lora: error: ") and message in error
        assert error.count("\n") == 1 and not out.exists()
    save_file({**load_file(str(files / "style.safetensors")), "bundle_emb.glossy.emb_params": torch.randn(1, 64)},
              str(tmp_path / "bundling.safetensors"))
    assert merge_lora([f"{base}+{tmp_path / 'bundling.safetensors'}", "--out", str(out)]) == 0
    assert "embedding(s) glossy bundled with the LoRA" in capsys.readouterr().err and out.exists()
