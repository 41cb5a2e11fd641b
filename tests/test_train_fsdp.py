"""FSDP2 training (distributed = "fsdp") on gloo (CPU) under torchrun: 2 sharded processes against 1 unsharded one
with the same global batch, DCP checkpoints resumed at the same and at another world size, and train.export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ldm
from ldm.checkpoint import read_state_dict
from train.export import consolidate
from train.trainer import Trainer
from train_support import fast_config, pretrained_file, single_process, torchrun, write_images

REPO = Path(__file__).resolve().parents[1]
# Same samples and noise per global batch; only the order of float reductions differs (reduce-scatter vs batch).
TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def options(model: Path) -> dict:
    # Adam's epsilon is large for the reason test_train_ddp gives (compare gradients, not the signs of round-off).
    return dict(model=str(model), architecture={}, max_steps=3, lr=1e-2, adam_epsilon=1e-2, train_text_encoder=True,
                min_snr_gamma=5.0, ema_decay=0.5, save_every=2, keep_checkpoints=3)


def losses(output: Path) -> torch.Tensor:
    return torch.tensor([json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process FSDP run (checkpoints at steps 2 and 3) and a 1-process DDP-mode run with the doubled batch."""
    root = tmp_path_factory.mktemp("fsdp")
    write_images(root / "images", 4, sizes=((16, 16),))
    model = pretrained_file(root / "base.safetensors")
    torchrun(2, fast_config(root / "images", root / "fsdp", batch_size=1, distributed="fsdp", **options(model)))
    single_process(fast_config(root / "images", root / "one", batch_size=2, **options(model)))
    return root, model


def test_two_fsdp_processes_match_one_process_and_export_consolidates(runs):
    root, model = runs
    sharded, single = read_state_dict(root / "fsdp" / "model.safetensors"), read_state_dict(root / "one" /
                                                                                           "model.safetensors")
    base = read_state_dict(model)
    assert sharded.keys() == single.keys() == base.keys()
    assert max((single[k] - base[k]).abs().max().item() for k in base) > 1e-3  # the training changed the weights
    for key in sharded:
        torch.testing.assert_close(sharded[key], single[key], **TOLERANCE, msg=key)
    torch.testing.assert_close(losses(root / "fsdp"), losses(root / "one"), **TOLERANCE)

    # The checkpoint holds shards and no weights file; the command consolidates it in one process, no torchrun.
    checkpoint = root / "fsdp" / "checkpoint-3"
    assert {p.name for p in checkpoint.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt",
                                                      "state.json"}
    out = root / "exported.safetensors"
    result = subprocess.run([sys.executable, "-m", "train.export", str(checkpoint), "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = read_state_dict(out)
    assert exported.keys() == single.keys()
    for key in exported:  # the run's own final file is this same consolidation: bitwise
        assert torch.equal(exported[key], sharded[key]), key
    loaded = ldm.load_model(out, device="cpu")  # strict: every original key, nothing else
    assert torch.equal(loaded.state_dict()["model.diffusion_model.out.2.weight"],
                       exported["model.diffusion_model.out.2.weight"])


def test_resume_at_the_same_world_size_is_bitwise(runs):
    root, model = runs
    config = fast_config(root / "images", root / "resumed", batch_size=1, distributed="fsdp",
                         resume=str(root / "fsdp" / "checkpoint-2"), **options(model))
    torchrun(2, config)
    a, b = read_state_dict(root / "resumed" / "model.safetensors"), read_state_dict(root / "fsdp" /
                                                                                   "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_at_another_world_size_reads_every_shard(runs):
    """2 -> 1 process: the shards are re-cut (here: joined) exactly; the run then goes on (not bitwise: the data
    position and the per-rank generators are re-derived for the new world size)."""
    root, model = runs
    checkpoint = root / "fsdp" / "checkpoint-2"
    config = fast_config(root / "images", root / "one-from-two", batch_size=1, distributed="fsdp",
                         resume=str(checkpoint), **options(model))
    trainer = Trainer(config)
    saved = {}
    consolidated = consolidate(checkpoint, root / "step2.safetensors")  # EMA values of step 2
    ema = read_state_dict(consolidated)
    for name, p in trainer.ema.shadow.items():
        key = name.removeprefix("model.")
        torch.testing.assert_close(p, ema[key], atol=0, rtol=0, msg=name)
        saved[name] = p.clone()
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(trainer.trainable) and all(s["step"].item() == 2 for s in state.values())
    result = trainer.run()
    assert result.step == 3 and result.weights.is_file()
    assert any(not torch.equal(trainer.ema.shadow[name], value) for name, value in saved.items())


def test_lora_with_bf16_fsdp_and_gradient_checkpointing_matches_one_fp32_process(runs, tmp_path):
    """LoRA on the sharded frozen model (its down projections broadcast from rank 0 first, as DDP would), with FSDP's
    bf16 mixed precision and checkpointed blocks, against one fp32 process with the same global batch. Tolerance:
    bf16 keeps 8 mantissa bits, so each forward and backward op rounds at ~2^-9 relative; three steps of lr 1e-2 move
    the adapters by O(1e-2), of which these errors are a small part (measured max 2.7e-4 on 2-core shared CPU); a
    rank mixing its own initialisation into the shards differs by ~0.3."""
    root, model = runs
    lora = dict(model=str(model), architecture={}, method="lora", max_steps=3, lr=1e-2, adam_epsilon=1e-2,
                ema_decay=0.5, train_text_encoder=True, gradient_checkpointing=True)
    torchrun(2, fast_config(root / "images", tmp_path / "fsdp", batch_size=1, distributed="fsdp",
                            fsdp_param_dtype="bf16", **lora))
    single = single_process(fast_config(root / "images", tmp_path / "one", batch_size=2, **lora))
    sharded, reference = read_state_dict(tmp_path / "fsdp" / "lora.safetensors"), read_state_dict(single.weights)
    assert sharded.keys() == reference.keys()
    for key in sharded:
        torch.testing.assert_close(sharded[key], reference[key], atol=2e-3, rtol=1e-2, msg=key)


@pytest.mark.slow
def test_resume_with_four_processes(runs):
    """2 -> 4 processes on gloo: each parameter cut in four shards; ends at step 3 with a loadable export."""
    root, model = runs
    # The 4-process global batch is 4: twice the 2-process one, so the checkpoint's data position is re-derived.
    write_images(root / "images4", 8, sizes=((16, 16),))
    config = fast_config(root / "images4", root / "four", batch_size=1, distributed="fsdp",
                         resume=str(root / "fsdp" / "checkpoint-2"), **options(model))
    torchrun(4, config, timeout=600)
    state = json.loads((root / "four" / "checkpoint-3" / "state.json").read_text())
    assert state["world_size"] == 4 and state["step"] == 3
    assert (root / "four" / "checkpoint-3" / "__3_0.distcp").is_file()
    ldm.load_model(root / "four" / "model.safetensors", device="cpu")


def test_export_writes_an_ordinary_checkpoint_with_its_ema_values(runs, tmp_path):
    """The one-process run's final file holds the EMA values of step 3 in save_precision: the export of its
    checkpoint-3 is that file, bitwise."""
    root, _ = runs
    out = consolidate(root / "one" / "checkpoint-3", tmp_path / "step3.safetensors")
    exported, final = read_state_dict(out), read_state_dict(root / "one" / "model.safetensors")
    assert exported.keys() == final.keys()
    for key in exported:
        assert torch.equal(exported[key], final[key]), key
    trained = read_state_dict(root / "one" / "checkpoint-3" / "model.safetensors")  # the raw values differ
    assert not torch.equal(trained["model.diffusion_model.out.2.weight"], final["model.diffusion_model.out.2.weight"])


def test_export_refuses_what_is_not_a_complete_checkpoint(runs, tmp_path, capsys):
    from train.export import main
    root, model = runs
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    state = json.loads((root / "one" / "checkpoint-3" / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(state))
    assert main([str(folder)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"python -m train.export: error: {folder} is not a complete checkpoint: model.safetensors, ema.safetensors "
        "missing (and no .metadata of a sharded one)"]
    (folder / "state.json").write_text(json.dumps({**state, "config": {**state["config"], "ema_decay": 0.0}}))
    assert main([str(folder)]) == 2
    assert "without EMA (ema_decay = 0): its weights file is already the export" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "has no state.json: give a checkpoint-<step> folder" in capsys.readouterr().err


def test_fsdp_configuration_errors(tmp_path):
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="distributed = 'fsdp' shards the methods full, dreambooth, lora"):
        fast_config(tmp_path, tmp_path / "out", method="vae", distributed="fsdp").validate()
    with pytest.raises(ConfigError, match="fp16 loss scaling is not wired for FSDP"):
        fast_config(tmp_path, tmp_path / "out", mixed_precision="fp16", distributed="fsdp").validate()
    with pytest.raises(ConfigError, match="forgetting monitor .* FSDP's shards"):
        fast_config(tmp_path, tmp_path / "out", distributed="fsdp", retention_prompts=["a red circle"]).validate()
    with pytest.raises(ConfigError, match="fsdp_param_dtype='fp8' is not one of fp32, bf16, fp16"):
        fast_config(tmp_path, tmp_path / "out", fsdp_param_dtype="fp8").validate()


def test_fsdp_units_are_the_blocks_innermost_first(monkeypatch):
    from ldm.model import LatentDiffusion
    from ldm.unet import SpatialTransformer
    from train import distributed
    from train.trainer import preset_with_architecture
    from train_support import FAST_ARCHITECTURE
    model = LatentDiffusion(preset_with_architecture("tiny", FAST_ARCHITECTURE))
    unet, text = model.unet, model.cond_stage_model.transformer.text_model.encoder.layers
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    assert distributed.fsdp_units(model, text_trained=False) == blocks
    assert distributed.fsdp_units(model, text_trained=True) == [*text, *blocks]
    monkeypatch.setattr(distributed, "FSDP_UNIT_CLASSES", {SpatialTransformer})
    units = distributed.fsdp_units(model, text_trained=False)
    attention = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert attention and units == attention + blocks  # fully_shard goes bottom-up: the nested ones first


def test_a_damaged_shard_is_one_error_naming_the_folder(runs, tmp_path):
    import shutil
    from train.export import ExportError
    root, model = runs
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(root / "fsdp" / "checkpoint-2", folder)
    shard_file = folder / "__1_0.distcp"
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    with pytest.raises(ExportError, match=f"{folder} cannot be read as this run's sharded checkpoint .*resume from an "
                                          "older checkpoint-<step> folder"):
        consolidate(folder)
    config = fast_config(root / "images", tmp_path / "out", batch_size=1, distributed="fsdp", resume=str(folder),
                         **options(model))
    with pytest.raises(ValueError, match=f"{folder} cannot be read"):
        Trainer(config)


@pytest.mark.cuda
def test_cpu_offload_matches_fsdp_on_the_gpus(tmp_path):
    """fsdp_cpu_offload (FSDP2's CPUOffloadPolicy: shards, gradients and the AdamW step on the CPU) against the same
    2-process FSDP run with everything on the GPUs. Needs 2 CUDA devices (NCCL takes one per rank); CPUOffloadPolicy
    cannot run on a CPU-only machine. Tolerance: only where the AdamW arithmetic runs differs (CPU vs GPU kernels)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    write_images(tmp_path / "images", 4, sizes=((16, 16),))
    model = pretrained_file(tmp_path / "base.safetensors")
    for name, offload in (("gpu", False), ("offload", True)):
        torchrun(2, fast_config(tmp_path / "images", tmp_path / name, batch_size=1, distributed="fsdp",
                                device="cuda", fsdp_cpu_offload=offload, **options(model)))
    a, b = (read_state_dict(tmp_path / name / "model.safetensors") for name in ("gpu", "offload"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
