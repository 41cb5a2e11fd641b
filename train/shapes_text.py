"""Stage 2 of the shapes recipe: teach the text encoder to read its caption's structure before the UNet uses it.

    python -m train.shapes_text --model outputs/tiny-shapes-vae/model.safetensors --data data/shapes \\
        --out outputs/tiny-shapes-text/model.safetensors

Why (docs/SHAPES.md, "Why positions are not learnt: the probes"): Stable Diffusion's text encoder arrives trained
(CLIP's contrastive pre-training put each caption's content into its end-of-text token); ours starts random. Trained
jointly with the UNet by the denoising loss alone, a position or relation word changes its own token but hardly the
end-of-text and padding tokens that make up most of the 77 the UNet's cross-attention spreads over, so the UNet never
sees it and never learns to place objects, and the text encoder gains nothing from spreading a word the UNet ignores:
a saddle that 4800 steps did not leave. This stage stands in for CLIP's pre-training on a domain whose captions have
a grammar: every token from the first end-of-text on must predict the parsed caption (`metrics.shapes.parse_caption`:
for each of the two object slots its shape, colour, size and position, and the relation between them; "not said" is a
class of its own), one linear head per field, cross-entropy averaged over fields and tokens. The heads are discarded;
the encoder goes back into a copy of the checkpoint (autoencoder and UNet untouched), and stage 3 keeps it frozen, as
Stable Diffusion keeps CLIP frozen.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm.clip import FrozenCLIPEmbedder
from ldm.tokenizer import EOS
from metrics.shapes import CaptionError, parse_caption
from train.data import SkipReport, source_items
from train.shapes import COLOURS, SHAPES

# What a caption can say about each object; the relation is said of the pair. Each field has one more class than
# values: "the caption does not say" (a one-object caption says nothing about the second slot).
OBJECT_FIELDS = {"shape": SHAPES, "colour": COLOURS, "size_name": ("small", "large"),
                 "position": ("left", "right", "top", "bottom", "center")}
RELATIONS = ("above", "below", "left of", "right of")
OBJECT_SLOTS = 2
FIELD_CLASSES = tuple(len(values) + 1 for values in OBJECT_FIELDS.values()) * OBJECT_SLOTS + (len(RELATIONS) + 1,)


def caption_targets(text: str) -> list[int]:
    """The class of every field for `text`: per object slot shape, colour, size, position, then the relation; the
    last class of a field means "not said". Raises CaptionError for a caption outside the shapes grammar."""
    expectation = parse_caption(text)
    targets = []
    for slot in range(OBJECT_SLOTS):
        said = expectation.objects[slot] if slot < len(expectation.objects) else None
        for field, values in OBJECT_FIELDS.items():
            value = getattr(said, field) if said is not None else None
            targets.append(values.index(value) if value is not None else len(values))
    relation = expectation.relation
    targets.append(RELATIONS.index(relation) if relation is not None else len(RELATIONS))
    return targets


class StructureHeads(nn.Module):
    """One linear classifier per field over a token's final hidden state: [..., width] -> per-field logits."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, sum(FIELD_CLASSES))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(hidden).split(FIELD_CLASSES, dim=-1)


def structure_loss(encoder: FrozenCLIPEmbedder, heads: StructureHeads, tokens: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy of every field at every token from the first EOS on. tokens: [B, 77]; targets: [B, fields].
    Returns the loss (mean over fields of the per-token mean) and the share of (token, field) pairs predicted right."""
    hidden = encoder.encode_tokens(tokens)  # [B, 77, width]
    first_eos = (tokens == EOS).int().argmax(dim=1)
    supervised = (torch.arange(tokens.shape[1], device=tokens.device)[None] >= first_eos[:, None]).float()
    count = supervised.sum()
    loss, right = 0.0, 0.0
    for field, logits in enumerate(heads(hidden)):  # logits: [B, 77, classes]
        target = targets[:, field, None].expand_as(supervised)
        per_token = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = loss + (per_token * supervised).sum() / count
        right += ((logits.argmax(-1) == target).float() * supervised).sum().item()
    return loss / len(FIELD_CLASSES), right / (count.item() * len(FIELD_CLASSES))


def pretrain_text_encoder(encoder: FrozenCLIPEmbedder, captions: list[str], steps: int = 300,
                          batch_size: int = 256, lr: float = 1e-3, warmup_steps: int = 30, held_out: int = 1000,
                          seed: int = 0, progress: bool = True) -> dict:
    """Train `encoder` in place on the caption-structure task (AdamW, linear warm-up then constant lr, gradient
    norm clipped to 1). The first `held_out` captions are only measured. Returns the held-out loss and accuracy."""
    if not isinstance(encoder, FrozenCLIPEmbedder):
        raise TypeError(f"the caption-structure stage trains an SD1-style CLIP text encoder; this model's is "
                        f"{type(encoder).__name__}")
    if len(captions) <= held_out:
        raise ValueError(f"{len(captions)} parsable captions leave none to train on after the {held_out} held out; "
                         "render more images (train.shapes make --n) or lower held_out")
    torch.manual_seed(seed)
    targets = torch.tensor([caption_targets(caption) for caption in captions])
    tokens = encoder.tokenizer(captions)
    heads = StructureHeads(encoder.transformer.text_model.embeddings.token_embedding.embedding_dim)
    parameters = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    generator = torch.Generator().manual_seed(seed)
    encoder.requires_grad_(True).train()
    bar = tqdm(range(steps), desc="text structure", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        rows = held_out + torch.randint(len(captions) - held_out, (batch_size,), generator=generator)
        loss, accuracy = structure_loss(encoder, heads, tokens[rows], targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
    encoder.eval()
    with torch.no_grad():
        loss, accuracy = structure_loss(encoder, heads, tokens[:held_out], targets[:held_out])
    return {"held_out_captions": held_out, "loss": round(loss.item(), 4), "accuracy": round(accuracy, 4)}


def parsable_captions(data: str) -> tuple[list[str], int]:
    """The captions of a data set (any format `train` reads) that the shapes grammar parses, and how many did not."""
    captions, rejected = [], 0
    for item in source_items(data, "auto", SkipReport()):
        try:
            caption_targets(item.caption)
        except CaptionError:
            rejected += 1
            continue
        captions.append(item.caption)
    return captions, rejected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.shapes_text", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint whose text encoder is trained (stage 1's file)")
    parser.add_argument("--data", required=True, help="the shapes data set whose captions are read")
    parser.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=1000, help="captions only measured, not trained on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ldm  # here, so --help needs no model code
    model = ldm.load_model(args.model, dtype=torch.float32)
    captions, rejected = parsable_captions(args.data)
    if not captions:
        print(f"error: no caption of {args.data} is in the shapes grammar ({rejected} rejected); this stage needs "
              "captions written by `python -m train.shapes make`", file=sys.stderr)
        return 2
    result = pretrain_text_encoder(model.cond_stage_model, captions, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, held_out=args.held_out, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ldm.save_model(model, args.out)
    print({**result, "captions": len(captions), "rejected": rejected, "written": args.out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
