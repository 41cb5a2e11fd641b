"""A Stable Diffusion model assembled from parts: a base model's autoencoder, a CLIP file's text tower and a fresh UNet.

    python -m ldm.assemble --base ldm/data/tiny-shapes.safetensors --text-encoder shapes-clip.safetensors \\
        --out outputs/clip-unet/start.safetensors

The result keeps the base's autoencoder (weights and latent scale factor), its schedule, prediction type and default
resolution, and builds a randomly initialised UNet of the base's UNet sizes with `context_dim` = the text tower's
width; training the UNet over the frozen text tower is then an ordinary `method = "full"` run with
`train_text_encoder = false` (configs/tiny-shapes-clip-layout.toml).

The text tower goes in as Stable Diffusion 2 stores OpenCLIP: an OpenAI-layout CLIP file's text keys (those not under
`visual.`) are exactly `cond_stage_model.model.*` of an SD2-family checkpoint (ldm.clip.FrozenOpenCLIPEmbedder), so
nothing is converted and the model is an SD2-family model of custom size. That layout runs exact GELU and pads with
token 0, so the CLIP must have been trained that way (ldm.clip_model's activation "gelu", which method "clip" records
in the file). The UNet is conditioned as SD2 is: the penultimate block's states at all 77 positions, through
`ln_final` (the family's convention, which `ldm.presets.detect` reads back); contrastive training shaped the last
block's state at the end-of-text token, which the blocks before it feed. `--text-layer last` hands the UNet the
last block's states instead: under causal attention the state at position i is what the tower would compute as the
summary of the caption's first i tokens had it ended there, the kind of state contrastive training shaped (save_model
records the choice, as the metadata "ldm.text_layers").
"""
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import load_model, save_model
from .checkpoint import CheckpointError, read_metadata, read_state_dict
from .clip import LAYERS
from .merge import OneLineArgumentParser
from .model import LatentDiffusion
from .presets import TextEncoderConfig

# A CLIP file's keys of the image tower; everything else is the text tower (OpenAI's and open_clip's layout).
VISUAL = "visual."


def openclip_text_tower(path: str, layer: str = "penultimate") -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    """(the SD2-family text encoder config handing the UNet `layer`'s states, its `model.*` state dict without the
    prefix) of the text tower of an OpenAI-layout CLIP file; CheckpointError when the file has none or runs
    quick-GELU."""
    state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith(VISUAL)}
    metadata = read_metadata(path)
    activation = metadata.get("clip.activation", "quick_gelu")
    if activation != "gelu":
        raise CheckpointError(f"{path}: its text tower runs {activation} (OpenAI's CLIP models do); the SD2-family "
                              "text encoder runs exact GELU: use a CLIP trained with activation 'gelu' (method "
                              "'clip' records it in the file)")
    if "ln_final.weight" not in state_dict or "text_projection" not in state_dict:
        raise CheckpointError(f"{path}: not a CLIP file in OpenAI layout (no ln_final / text_projection; keys start "
                              f"with {sorted(state_dict)[:4]})")
    width = state_dict["ln_final.weight"].shape[0]
    layers = len({m.group(1) for k in state_dict if (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\..*", k))})
    heads = int(metadata.get("clip.text_heads", max(1, width // 64)))
    config = TextEncoderConfig(layout="openclip", width=width, layers=layers, heads=heads,
                               vocab_size=state_dict["token_embedding.weight"].shape[0],
                               context_length=state_dict["positional_embedding"].shape[0],
                               embed_dim=state_dict["text_projection"].shape[1], layer=layer)
    return config, state_dict


def assemble(base: LatentDiffusion, text_config: TextEncoderConfig, text_state: dict[str, torch.Tensor],
             seed: int = 0) -> LatentDiffusion:
    """`base`'s autoencoder and schedule + the given SD2-family text tower + a fresh UNet (seeded) of `base`'s UNet
    sizes with context_dim = the text width."""
    if base.is_sdxl:
        raise ValueError("the base must be an SD1/SD2-family model (one text tower); SDXL's UNet also takes a "
                         "pooled vector this assembly does not provide")
    preset = replace(base.preset, name="sd2-custom", family="sd2", text=(text_config,),
                     unet=replace(base.preset.unet, context_dim=text_config.width))
    torch.manual_seed(seed)
    model = LatentDiffusion(preset)
    model.first_stage_model.load_state_dict(base.first_stage_model.state_dict(), strict=True)
    model.cond_stage_model.model.load_state_dict(text_state, strict=True)
    model.scale_factor = base.scale_factor
    model.alphas_cumprod = base.alphas_cumprod.clone()
    return model


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m ldm.assemble",
        description="Assemble a model: a base model's autoencoder (and schedule, prediction, resolution), a CLIP "
                    "file's text tower as an SD2-family text encoder, and a fresh UNet of the base's sizes whose "
                    "context width is the text tower's.")
    parser.add_argument("--base", required=True, metavar="MODEL", help="the model whose autoencoder and UNet sizes "
                        "are taken (a .safetensors/.ckpt checkpoint)")
    parser.add_argument("--text-encoder", required=True, metavar="CLIP", help="an OpenAI-layout CLIP file trained "
                        "with exact GELU (method 'clip' writes one)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the model to write")
    parser.add_argument("--text-layer", choices=LAYERS, default="penultimate",
                        help="the text tower's block whose states condition the UNet (default penultimate, as SD2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the UNet's random initialisation")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        base = load_model(args.base, dtype=torch.float32)
        text_config, text_state = openclip_text_tower(args.text_encoder, args.text_layer)
        model = assemble(base, text_config, text_state, args.seed)
        save_model(model, args.out, name=Path(args.out).stem)
    except (CheckpointError, OSError, ValueError) as error:  # OSError: a file missing, unreadable or unwritable
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    parameters = sum(p.numel() for p in model.unet.parameters())
    print(f"{args.out}: text tower {text_config.width} wide, {text_config.layers} layers; fresh UNet of "
          f"{parameters / 1e6:.2f} M parameters (context_dim {text_config.width})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
