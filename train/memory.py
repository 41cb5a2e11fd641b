"""python -m train.memory — model-state memory per GPU of a training setup, from the models' parameter counts.

    python -m train.memory [--preset sd15] [--method full|lora] [--lora-rank 32] [--gpus 8 64] [--ema]

The models are built on PyTorch's "meta" device (shapes only, no memory), their parameters counted, and the bytes per
parameter of this trainer's setup applied (fp32 master weights, AdamW, bf16 autocast; see docs/SCALE.md):

    trained parameter     4 weight + 4 gradient + 8 AdamW (m, v) [+ 4 EMA]
      DDP                 all of it on every GPU, + 4 for DDP's gradient buckets
      FSDP (full shard)   divided by the GPU count, + the largest sharded unit (one UNet block) gathered in bf16,
                          twice (the running block and the prefetched next one), + its bf16 gradients
    frozen parameter      4 (fp32, as the trainer loads every model; VAE and text encoders are not sharded)
      FSDP, LoRA          the frozen UNet is sharded with its blocks: 4 / GPU count, + the largest block gathered in
                          bf16 twice (no gradients: only the adapters train)

Activations come on top and depend on batch, resolution and activation checkpointing, not on parameter counts:
measure them with `python -m benchmarks.train_step` on one GPU.
"""
import argparse
import sys

import torch
from torch import nn

import ldm
from ldm.model import LatentDiffusion

from .lora import target_layers

GIB = 1024 ** 3


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(model: LatentDiffusion, rank: int) -> int:
    """Parameters of rank-`rank` adapters on the UNet's attention layers (train.lora's targets): r·(in + out) each."""
    total = 0
    for layer in target_layers(model, conv=False, text_encoder=False).values():
        if isinstance(layer, nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        else:  # 1x1 convolutions (SD1's proj_in / proj_out)
            total += rank * (layer.in_channels + layer.out_channels)
    return total


def largest_unet_block(model: LatentDiffusion) -> int:
    """Parameters of the largest FSDP unit: one of input_blocks[i], middle_block, output_blocks[i]."""
    unet = model.model.diffusion_model
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    return max(count(block) for block in blocks)


def memory_table(preset: str, method: str, lora_rank: int, gpus: list[int], ema: bool) -> list[dict]:
    with torch.device("meta"):
        model = LatentDiffusion(ldm.get_preset(preset))
    unet, everything = count(model.model.diffusion_model), count(model)
    block = largest_unet_block(model)
    if method == "full":
        trained, frozen = unet, everything - unet
    else:  # LoRA: the adapters train, the whole model is frozen
        trained, frozen = lora_parameters(model, lora_rank), everything
    per_trained = 16 + (4 if ema else 0)
    rows = []
    for n in gpus:
        ddp = trained * (per_trained + 4) + frozen * 4
        if method == "full":  # the UNet's blocks are the FSDP units: gathered twice in bf16, with bf16 gradients
            fsdp = trained * per_trained / n + block * (2 + 2 + 2) + frozen * 4
        else:  # FSDP shards the frozen UNet's blocks too (train.distributed.shard); the adapters ride along
            fsdp = trained * per_trained / n + unet * 4 / n + block * (2 + 2) + (frozen - unet) * 4
        rows.append({"preset": preset, "method": method if method == "full" else f"lora r{lora_rank}", "gpus": n,
                     "trained": trained, "frozen": frozen, "ddp_gib": ddp / GIB, "fsdp_gib": fsdp / GIB})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", help="model preset(s) (default: sd15 and sdxl-base)")
    parser.add_argument("--method", choices=("full", "lora"), action="append", help="(default: full and lora)")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="GPU counts (default 8 64)")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the trained weights")
    args = parser.parse_args(argv)
    if min(args.gpus) < 1 or args.lora_rank < 1:
        parser.error("--gpus and --lora-rank must be >= 1")
    print("| preset | method | GPUs | trained params | frozen params | DDP GiB/GPU | FSDP GiB/GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.preset or ["sd15", "sdxl-base"]:
        for method in args.method or ["full", "lora"]:
            try:
                rows = memory_table(preset, method, args.lora_rank, args.gpus, args.ema)
            except ValueError as error:
                parser.error(str(error))
            for row in rows:
                print(f"| {row['preset']} | {row['method']} | {row['gpus']} | {row['trained'] / 1e6:.1f} M | "
                      f"{row['frozen'] / 1e6:.1f} M | {row['ddp_gib']:.1f} | {row['fsdp_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
