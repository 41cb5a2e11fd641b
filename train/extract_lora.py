"""A LoRA extracted from a fine-tune: the difference between a fine-tuned checkpoint and its base, per adaptable
layer, truncated to a low rank by SVD, written as a kohya file that `<lora:name:weight>` applies.

    python -m train.extract_lora --base BASE.safetensors --tuned TUNED.safetensors --out NAME.safetensors \\
        [--rank 64] [--conv-rank 0] [--text-encoder] [--precision fp16]

For each layer W [out, in(, k, k)] that train.lora would adapt (the same targets and names: the cross-attention
transformers' Linear and 1×1 layers; with --conv-rank the ResBlocks' and resamplers' convolutions as LoCon; with
--text-encoder the CLIP text tower's attention and MLP layers), ΔW = W_tuned − W_base is flattened to [out, in·k·k]
and factored as U S Vᵀ; the file keeps up = U_r S_r [out, r(, 1, 1)], down = V_rᵀ [r, in(, k, k)] and alpha = r, so
that applying it at strength 1 adds U_r S_r V_rᵀ, the best rank-r approximation of ΔW in the Frobenius norm
(Eckart & Young 1936). Layers whose ΔW is zero are left out. What a LoRA cannot hold — the change of biases,
normalisations, embeddings and of untargeted layers — is lost, and the report says how much of the change that is.

The report gives two fractions of squared Frobenius norm: `kept`, the share of the targeted layers' change that the
rank-r factors reproduce (1 − Σ tail σ² / Σ σ²), and `outside`, the share of the whole change (UNet and text
encoder) that lies in tensors no LoRA layer covers.
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm import load_model
from ldm.checkpoint import CheckpointError
from ldm.merge import OneLineArgumentParser
from ldm.model import LatentDiffusion
from sample.conditioning import text_towers

from .lora import kohya_metadata, save_kohya, target_layers
from .trainer import DTYPES


@dataclass
class Extraction:
    """The kohya tensors and how well they hold the fine-tune's change."""
    tensors: dict[str, torch.Tensor]
    rank: int
    conv_rank: int
    targeted_energy: float = 0.0   # Σ ‖ΔW‖² over the targeted layers
    kept_energy: float = 0.0       # Σ ‖U_r S_r V_rᵀ‖² over the same layers
    outside_energy: float = 0.0    # Σ ‖Δ‖² over every other tensor of the networks
    layers: list[str] = field(default_factory=list)

    @property
    def kept(self) -> float:
        return self.kept_energy / self.targeted_energy if self.targeted_energy else 1.0

    @property
    def outside(self) -> float:
        total = self.targeted_energy + self.outside_energy
        return self.outside_energy / total if total else 0.0

    def metadata(self) -> dict[str, str]:
        """kohya's network metadata (alpha = rank: the factors carry the scale), with the extraction's figures."""
        return {**kohya_metadata(self.rank, self.rank, self.conv_rank, self.conv_rank),
                "ldm.extracted_kept": f"{self.kept:.6f}", "ldm.extracted_outside": f"{self.outside:.6f}"}


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r], down [r, in·k·k], Σ σ² kept) of the rank-r truncated SVD of delta flattened to [out, in·k·k]."""
    matrix = delta.flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r], float((s[:r] ** 2).sum())


def extract_lora(base: LatentDiffusion, tuned: LatentDiffusion, rank: int, conv_rank: int = 0,
                 text_encoder: bool = False) -> Extraction:
    """The LoRA that best approximates `tuned` − `base` at `rank` (and `conv_rank` for 3×3 convolutions; 0: none).
    Both models must share one architecture; ValueError says what differs."""
    if rank < 1 or conv_rank < 0:
        raise ValueError(f"rank must be at least 1 and conv rank at least 0, got {rank} and {conv_rank}")
    if (base.preset.unet, base.preset.text) != (tuned.preset.unet, tuned.preset.text):
        raise ValueError(f"the tuned model ({tuned.preset.name}) is not the base's architecture ({base.preset.name}): "
                         "a LoRA holds the change of a fine-tune of the same model")
    base_layers = target_layers(base, conv=conv_rank > 0, text_encoder=text_encoder)
    tuned_layers = target_layers(tuned, conv=conv_rank > 0, text_encoder=text_encoder)
    extraction = Extraction({}, rank, conv_rank)
    covered = set()
    for name, layer in base_layers.items():
        covered.add(id(layer.weight))
        delta = tuned_layers[name].weight.detach().float() - layer.weight.detach().float()
        energy = float((delta ** 2).sum())
        if energy == 0.0:
            continue
        is_3x3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)  # only offered with conv_rank > 0
        up, down, kept = _factor(delta, conv_rank if is_3x3 else rank)
        extraction.targeted_energy += energy
        extraction.kept_energy += kept
        if delta.ndim == 4:
            up, down = up[:, :, None, None], down.reshape(down.shape[0], *delta.shape[1:])
        extraction.tensors[f"{name}.lora_up.weight"] = up.contiguous()
        extraction.tensors[f"{name}.lora_down.weight"] = down.contiguous()
        extraction.tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        extraction.layers.append(name)
    # The rest of the change: every other tensor of the networks the LoRA adapts (the autoencoder never changes).
    networks = [base.unet, *text_towers(base)] if text_encoder else [base.unet]
    in_networks = {id(p) for network in networks for p in network.parameters()}
    tuned_parameters = dict(tuned.named_parameters())
    for qualified, parameter in base.named_parameters():
        if id(parameter) in in_networks and id(parameter) not in covered:
            difference = tuned_parameters[qualified].detach().float() - parameter.detach().float()
            extraction.outside_energy += float((difference ** 2).sum())
    if not extraction.layers:
        raise ValueError("the two models have the same weights in every layer a LoRA covers: nothing to extract")
    return extraction


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m train.extract_lora",
        description="Extract a LoRA (kohya format) from a fine-tuned checkpoint: the difference from its base, "
                    "per layer, truncated to a low rank by SVD.")
    parser.add_argument("--base", required=True, metavar="MODEL", help="the checkpoint the fine-tune started from")
    parser.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned checkpoint")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the LoRA file to write")
    parser.add_argument("--rank", type=int, default=64, help="rank of the Linear and 1x1 layers' factors (default 64)")
    parser.add_argument("--conv-rank", type=int, default=0,
                        help="rank of the 3x3 convolutions' factors (LoCon); 0 leaves them out (default)")
    parser.add_argument("--text-encoder", action="store_true",
                        help="also extract the CLIP text tower's change (SD1 / SDXL's first tower)")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="precision of the written factors (default fp16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        base, tuned = (load_model(path, dtype=torch.float32) for path in (args.base, args.tuned))
        extraction = extract_lora(base, tuned, args.rank, args.conv_rank, args.text_encoder)
        # As a run's save_precision: fp32 (absent from DTYPES) keeps the float32 factors.
        save_kohya(extraction.tensors, args.out, DTYPES.get(args.precision), extraction.metadata())
    except (CheckpointError, OSError, ValueError) as error:  # OSError: a file missing, unreadable or unwritable
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {len(extraction.layers)} layers at rank {args.rank}"
          + (f" (3x3 convolutions {args.conv_rank})" if args.conv_rank else "")
          + f", {size / 2**20:.2f} MiB; the factors keep {extraction.kept:.1%} of the targeted layers' change; "
          f"{extraction.outside:.1%} of the whole change lies outside any LoRA layer and is not in the file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
