"""`python -m train.memory`: parameter counts of the real modules and the bytes-per-parameter rules of docs/SCALE.md."""
import pytest

import ldm
from ldm.model import LatentDiffusion
from train.lora import LoRANetwork, target_layers
from train.memory import GIB, largest_unet_block, lora_parameters, main, memory_table


def test_counts_are_those_of_the_built_modules_and_the_rules_are_applied():
    model = LatentDiffusion(ldm.get_preset("tiny"))
    network = LoRANetwork(target_layers(model, conv=False, text_encoder=False), 4, 1.0)
    assert lora_parameters(model, 4) == sum(p.numel() for p in network.parameters() if p.requires_grad)
    unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    everything = sum(p.numel() for p in model.parameters())
    block = largest_unet_block(model)
    full_ddp, full_fsdp = memory_table("tiny", "full", 4, [1, 8], ema=True)
    assert (full_ddp["trained"], full_ddp["frozen"]) == (unet, everything - unet)
    # DDP: 4 weight + 4 grad + 8 Adam + 4 EMA + 4 bucket per trained parameter, 4 per frozen one.
    assert full_ddp["ddp_gib"] * GIB == pytest.approx(unet * 24 + (everything - unet) * 4)
    # FSDP over 8: the 20 sharded bytes / 8, plus one block gathered twice in bf16 with its bf16 gradients.
    assert full_fsdp["fsdp_gib"] * GIB == pytest.approx(unet * 20 / 8 + block * 6 + (everything - unet) * 4)
    lora = memory_table("tiny", "lora", 4, [8], ema=False)[0]
    assert lora["frozen"] == everything and lora["ddp_gib"] * GIB == pytest.approx(lora["trained"] * 20 + everything * 4)
    # FSDP shards the frozen UNet with its blocks (one gathered twice in bf16); VAE and text stay whole.
    assert lora["fsdp_gib"] * GIB == pytest.approx(lora["trained"] * 16 / 8 + unet * 4 / 8 + block * 4
                                                   + (everything - unet) * 4)


def test_the_table_command(capsys):
    assert main(["--preset", "tiny", "--method", "full", "--gpus", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| preset |") and lines[2].startswith("| tiny | full | 2 |")
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "nope"])
    assert exit_info.value.code == 2
