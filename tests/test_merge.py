"""The checkpoint merger (ldm.merge): exact arithmetic on random tensors, A1111's recipe metadata, architecture
checks, the inpainting rule, the command's errors, and peak memory while streaming two ~120 MB files."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm
from ldm.checkpoint import CheckpointError, TensorFile, legacy_model_hash, model_hash, read_state_dict, save_streamed
from ldm.merge import MERGE_METHODS, MergeError, main, merge_checkpoints, register_merge_method

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _checkpoint(seed: int, in_channels: int = 4) -> dict[str, torch.Tensor]:
    """A few keys of each kind an SD file has: network weights, a schedule buffer, an integer buffer, EMA."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {UNET_IN: randn(8, in_channels, 3, 3), "model.diffusion_model.out.2.bias": randn(4),
            "first_stage_model.decoder.conv_out.weight": randn(3, 8, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": randn(16),
            POSITION_IDS: torch.arange(77)[None], "alphas_cumprod": torch.linspace(0.99, 0.01, 10) + seed,
            "model_ema.decay": torch.tensor(0.999)}


def _save(tmp_path, name: str, tensors: dict, metadata: dict | None = None) -> str:
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=metadata)
    return path


def test_weighted_sum_and_add_difference_are_exact_on_random_tensors(tmp_path):
    a, b, c = _checkpoint(1), _checkpoint(2), _checkpoint(3)
    paths = [_save(tmp_path, f"{n}.safetensors", t) for n, t in zip("abc", (a, b, c))]
    m = 0.35
    merge_checkpoints(*paths[:2], out=str(tmp_path / "ws.safetensors"), mode="Weighted sum", multiplier=m)
    merge_checkpoints(*paths, out=str(tmp_path / "ad.safetensors"), mode="Add difference", multiplier=m)
    merge_checkpoints(paths[0], out=str(tmp_path / "none.safetensors"), mode="No interpolation")
    weighted, difference = load_file(str(tmp_path / "ws.safetensors")), load_file(str(tmp_path / "ad.safetensors"))
    for key in (UNET_IN, "model.diffusion_model.out.2.bias", "first_stage_model.decoder.conv_out.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        # float32 throughout: bitwise the same as the formula written out.
        assert torch.equal(weighted[key], a[key] * (1 - m) + b[key] * m), key
        assert torch.equal(difference[key], a[key] + (b[key] - c[key]) * m), key
    for merged in (weighted, difference, load_file(str(tmp_path / "none.safetensors"))):
        # Not network weights: A's, copied; the EMA of A alone is not the merge's and is left out.
        assert torch.equal(merged["alphas_cumprod"], a["alphas_cumprod"])
        assert torch.equal(merged[POSITION_IDS], a[POSITION_IDS]) and merged[POSITION_IDS].dtype == torch.int64
        assert "model_ema.decay" not in merged
    assert all(torch.equal(t, a[k]) for k, t in load_file(str(tmp_path / "none.safetensors")).items())


def test_fp16_and_baked_in_vae(tmp_path):
    a, b = _checkpoint(1), _checkpoint(2)
    vae = {"decoder.conv_out.weight": torch.full((3, 8, 3, 3), 0.25)}  # A1111's VAE folder: bare keys
    paths = [_save(tmp_path, f"{n}.safetensors", t) for n, t in (("a", a), ("b", b), ("v", vae))]
    out = str(tmp_path / "half.safetensors")
    merge_checkpoints(paths[0], paths[1], out=out, multiplier=0.5, fp16=True, vae=paths[2])
    merged = load_file(out)
    assert merged[UNET_IN].dtype == torch.float16
    assert torch.equal(merged[UNET_IN], (a[UNET_IN] * 0.5 + b[UNET_IN] * 0.5).half())
    assert torch.equal(merged["first_stage_model.decoder.conv_out.weight"], vae["decoder.conv_out.weight"].half())
    assert merged[POSITION_IDS].dtype == torch.int64  # only floating tensors become fp16
    with pytest.raises(MergeError, match=r"does not fit A: 'decoder.conv_out.weight' is \[3, 4, 3, 3\]"):
        bad = _save(tmp_path, "bad-vae.safetensors", {"decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)})
        merge_checkpoints(paths[0], paths[1], out=str(tmp_path / "x.safetensors"), vae=bad)


def test_a_pickled_ckpt_merges_like_a_safetensors_file(tmp_path):
    a, b = _checkpoint(1), _checkpoint(2)
    torch.save({"state_dict": a}, str(tmp_path / "a.ckpt"))  # Lightning's wrapper, as original SD files have it
    b_path = _save(tmp_path, "b.safetensors", b)
    result = merge_checkpoints(str(tmp_path / "a.ckpt"), b_path, out=str(tmp_path / "ab.safetensors"),
                               multiplier=0.5)
    assert torch.equal(load_file(result.path)[UNET_IN], a[UNET_IN] * 0.5 + b[UNET_IN] * 0.5)


def test_recipe_metadata_and_model_hash_follow_a1111(tmp_path):
    a = _save(tmp_path, "a.safetensors", _checkpoint(1), {"ldm.prediction": "eps", "ldm.name": "a"})
    b = _save(tmp_path, "b.safetensors", _checkpoint(2))
    c = _save(tmp_path, "c.safetensors", _checkpoint(3))
    out = str(tmp_path / "merged.safetensors")
    result = merge_checkpoints(a, b, c, out=out, mode="add difference", multiplier=0.7, fp16=True)
    with safe_open(out, "pt") as opened:
        metadata = opened.metadata()
    recipe = json.loads(metadata["sd_merge_recipe"])
    sha = {name: hashlib.sha256(open(path, "rb").read()).hexdigest()
           for name, path in (("a", a), ("b", b), ("c", c), ("out", out))}
    assert recipe == {"type": "webui", "primary_model_hash": sha["a"], "secondary_model_hash": sha["b"],
                      "tertiary_model_hash": sha["c"], "interp_method": "Add difference", "multiplier": 0.7,
                      "save_as_half": True, "custom_name": "merged", "config_source": 0, "bake_in_vae": "None",
                      "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = json.loads(metadata["sd_merge_models"])
    assert models[sha["b"]] == {"name": "b.safetensors", "legacy_hash": legacy_model_hash(b), "sd_merge_recipe": None}
    assert set(models) == {sha["a"], sha["b"], sha["c"]}
    assert metadata["format"] == "pt" and metadata["ldm.prediction"] == "eps" and "ldm.name" not in metadata
    # The infotext's "Model hash" of images made with the result: the first 10 hex digits of the file's sha256.
    assert result.sha256 == sha["out"] and result.model_hash == model_hash(out) == sha["out"][:10]
    assert result.recipe == recipe


def test_mismatched_architectures_are_refused_naming_the_key_and_shapes(tmp_path):
    a = _save(tmp_path, "a.safetensors", _checkpoint(1))
    wider = _checkpoint(2)
    wider["model.diffusion_model.out.2.bias"] = torch.zeros(8)
    b = _save(tmp_path, "b.safetensors", wider)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(MergeError, match=r"'model.diffusion_model.out.2.bias' is \[4\] in A but \[8\] in B"):
        merge_checkpoints(a, b, out=out)
    fewer = _checkpoint(2)
    del fewer["first_stage_model.decoder.conv_out.weight"]
    with pytest.raises(MergeError, match=r"B .* has no 'first_stage_model.decoder.conv_out.weight', which A has"):
        merge_checkpoints(a, _save(tmp_path, "fewer.safetensors", fewer), out=out)
    with pytest.raises(MergeError, match="Add difference needs model C"):
        merge_checkpoints(a, b, out=out, mode="Add difference")
    assert not os.path.exists(out)


def test_inpainting_a_with_a_normal_b_merges_the_first_four_input_channels(tmp_path):
    a, b, c = _checkpoint(1, in_channels=9), _checkpoint(2), _checkpoint(3)
    paths = [_save(tmp_path, f"{n}.safetensors", t) for n, t in zip("abc", (a, b, c))]
    out = str(tmp_path / "inpaint.safetensors")
    result = merge_checkpoints(*paths, out=out, mode="Add difference", multiplier=1.0)
    merged = load_file(out)[UNET_IN]
    assert result.is_inpainting and result.recipe["is_inpainting"]
    assert merged.shape == (8, 9, 3, 3)
    assert torch.equal(merged[:, :4], a[UNET_IN][:, :4] + (b[UNET_IN] - c[UNET_IN]) * 1.0)
    assert torch.equal(merged[:, 4:], a[UNET_IN][:, 4:])  # mask and masked-image channels are A's
    with pytest.raises(MergeError, match="make the inpainting model A"):
        merge_checkpoints(paths[1], paths[0], out=str(tmp_path / "wrong.safetensors"))


def test_a_registered_merge_method_is_used_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr("ldm.merge.MERGE_METHODS", dict(MERGE_METHODS))
    register_merge_method("Elementwise max", 2, lambda a, b, c, m: torch.maximum(a, b))
    a, b = _checkpoint(1), _checkpoint(2)
    paths = [_save(tmp_path, f"{n}.safetensors", t) for n, t in (("a", a), ("b", b))]
    result = merge_checkpoints(*paths, out=str(tmp_path / "max.safetensors"), mode="elementwise-max")
    assert torch.equal(load_file(result.path)[UNET_IN], torch.maximum(a[UNET_IN], b[UNET_IN]))
    with pytest.raises(ValueError, match="exists"):
        register_merge_method("Weighted sum", 2, lambda a, b, c, m: a)


def test_merged_tiny_models_load_as_models(tmp_path):
    torch.manual_seed(1)
    ldm.save_model(ldm.create_model("tiny"), str(tmp_path / "a.safetensors"))
    torch.manual_seed(2)
    ldm.save_model(ldm.create_model("tiny"), str(tmp_path / "b.safetensors"))
    out = str(tmp_path / "ab.safetensors")
    merge_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), out=out, multiplier=0.5)
    model = ldm.load_model(out)
    a = ldm.load_model(str(tmp_path / "a.safetensors")).state_dict()
    b = ldm.load_model(str(tmp_path / "b.safetensors")).state_dict()
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and key != "alphas_cumprod":
            assert torch.equal(tensor, a[key] * 0.5 + b[key] * 0.5), key


def test_command_reports_user_errors_on_one_line(tmp_path, capsys):
    a = _save(tmp_path, "a.safetensors", _checkpoint(1))
    odd = _checkpoint(2)
    odd[UNET_IN] = torch.zeros(8, 3, 3, 3)
    b = _save(tmp_path, "b.safetensors", odd)
    cases = [([a, b, "--out", str(tmp_path / "o.safetensors")], "is [8, 4, 3, 3] in A but [8, 3, 3, 3] in B"),
             ([a, str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.safetensors")], "file not found"),
             ([a, a, "--mode", "sum", "--out", str(tmp_path / "o.safetensors")], "unknown merge mode 'sum'"),
             ([a, a, "--out", a], "is one of the inputs"),
             ([a, a, "--out", str(tmp_path / "o.ckpt")], "must be a .safetensors file")]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("python -m ldm.merge: error:") and expected in err[0], err
    assert main([a, a, "--mode", "weighted-sum", "--out", str(tmp_path / "ok.safetensors")]) == 0
    assert f"[{model_hash(tmp_path / 'ok.safetensors')}]" in capsys.readouterr().out


def test_tensor_file_reads_what_read_state_dict_reads(tmp_path):
    tensors = _checkpoint(4)
    path = _save(tmp_path, "x.safetensors", tensors, {"note": "kept"})
    torch.save(tensors, str(tmp_path / "x.ckpt"))
    for source in (path, str(tmp_path / "x.ckpt")):
        whole = read_state_dict(source)
        with TensorFile(source) as opened:
            assert sorted(opened.keys()) == sorted(whole)
            for key in whole:
                assert opened.shape(key) == tuple(whole[key].shape) and opened.dtype(key) == whole[key].dtype
                assert torch.equal(opened.read(key), whole[key])
    assert TensorFile(path).metadata == {"note": "kept"}
    (tmp_path / "cut.safetensors").write_bytes(open(path, "rb").read()[:40])
    with pytest.raises(CheckpointError, match="not a valid .safetensors file"):
        TensorFile(str(tmp_path / "cut.safetensors"))


def test_save_streamed_refuses_a_tensor_unlike_its_layout_and_leaves_no_file(tmp_path):
    layout = {"w": torch.empty(2, 3, device="meta"), "b": torch.empty(3, device="meta")}
    out = str(tmp_path / "s.safetensors")
    save_streamed(layout, lambda name: torch.ones(layout[name].shape), out)
    assert {k: v.shape for k, v in load_file(out).items()} == {"w": (2, 3), "b": (3,)}
    with pytest.raises(CheckpointError, match=r"'b' was planned as torch.float32 \[3\] but is torch.float16 \[3\]"):
        save_streamed(layout, lambda name: torch.ones(layout[name].shape, dtype=torch.float16),
                      str(tmp_path / "t.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


def test_peak_memory_stays_near_one_model_while_merging_two_files(tmp_path):
    """Two 120 MB files (24 tensors of 5 MB) written and merged in a fresh process: the peak resident memory grows by
    less than one model's size over the merge (loading A and B whole would add two; measured 21-62 MiB for 114 MiB
    models, depending on how the allocator reuses the freed tensors)."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {REPO_ROOT!r})
        from ldm.checkpoint import save_streamed
        from ldm.merge import merge_checkpoints
        names = [f"model.diffusion_model.block.{{i}}.weight" for i in range(24)]
        layout = {{n: torch.empty(1250, 1000, device="meta") for n in names}}
        for seed, path in ((1, "a"), (2, "b")):
            save_streamed(layout, lambda n, s=seed: torch.full((1250, 1000), float(s + len(n))),
                          {str(tmp_path)!r} + f"/{{path}}.safetensors")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        merge_checkpoints({str(tmp_path / 'a.safetensors')!r}, {str(tmp_path / 'b.safetensors')!r},
                          out={str(tmp_path / 'ab.safetensors')!r}, multiplier=0.5)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    growth, model_bytes = int(run.stdout.split()[-1]), 24 * 1250 * 1000 * 4
    assert growth < model_bytes, \
        f"peak memory grew {growth / 2**20:.0f} MiB while merging {model_bytes / 2**20:.0f} MiB models"
    with safe_open(str(tmp_path / "ab.safetensors"), "pt") as merged:
        name = "model.diffusion_model.block.3.weight"
        assert torch.equal(merged.get_tensor(name), torch.full((1250, 1000), 0.5 * (1 + 2 + 2 * len(name))))
