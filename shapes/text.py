"""Stage 2 of the shapes recipe: teach the text encoder to read its caption's structure before the UNet uses it.

    python -m shapes text --model outputs/tiny-shapes-vae/model.safetensors --data data/shapes \\
        --out outputs/tiny-shapes-text/model.safetensors

Why (docs/SHAPES.md, "Why positions were not learnt: the probes"): Stable Diffusion's text encoder arrives trained
(CLIP's contrastive pre-training put each caption's content into its end-of-text token); ours starts random. Trained
jointly with the UNet by the denoising loss alone, a position or relation word changes its own token but hardly the
end-of-text and padding tokens that make up most of the 77 the UNet's cross-attention spreads over, so the UNet never
sees it and never learns to place objects, and the text encoder gains nothing from spreading a word the UNet ignores:
a saddle that 4800 steps did not leave. This stage stands in for CLIP's pre-training on a domain whose captions have
a grammar: every token from the first end-of-text on must predict the layout the caption describes (parsed by
`shapes.captions.parse_caption`: the shape, colour and size of the object at the left, right, top, bottom, center, or
anywhere; "none or not said" is a class of its own), one linear head per field, cross-entropy averaged over fields and
tokens. The heads are discarded; the encoder goes back into a copy of the checkpoint (autoencoder and UNet untouched),
and stage 3 keeps it frozen, as Stable Diffusion keeps CLIP frozen.

The one module of `shapes` that needs torch, the models (`ldm`) and the data-set readers of `train`; `import shapes`
does not load it.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import ldm
from ldm.clip import FrozenCLIPEmbedder
from ldm.tokenizer import EOS
from train.data import SkipReport, source_items

from .captions import CaptionError, parse_caption
from .world import COLOURS, SIZE_NAMES, shape_names

# The caption is read as a layout: which object is where. Each role has a shape, a colour and a size, each with one
# more class than values ("no such object, or not said"). A two-object caption fills two opposite roles ("A above B":
# A on top, B at the bottom); a one-object caption fills the role of its position word, or "anywhere" without one.
# Roles rather than "first object, second object, relation": what the UNet must draw at the top is then one feature
# of the padding tokens, which it can map to the image linearly; with a relation class it would have to combine
# that class with the attributes of the right object first, and in probes it did not learn to (docs/SHAPES.md).
ROLES = ("left", "right", "top", "bottom", "center", "anywhere")
PAIR_ROLES = {"above": ("top", "bottom"), "below": ("bottom", "top"), "left of": ("left", "right"),
              "right of": ("right", "left")}


def object_fields() -> dict[str, tuple[str, ...]]:
    """The values of each field of an object: every shape known now (registered ones too), colour and size."""
    return {"shape": shape_names(), "colour": COLOURS, "size_name": SIZE_NAMES}


def field_classes() -> tuple[int, ...]:
    """Classes of each field, role by role: one per value, plus "no such object, or not said"."""
    return tuple(len(values) + 1 for values in object_fields().values()) * len(ROLES)


def caption_targets(text: str) -> list[int]:
    """The class of every field for `text`: for each role of ROLES the shape, colour and size of the object the
    caption puts there (the last class of a field: no object there, or not said). Raises CaptionError for a caption
    outside the shapes grammar."""
    expectation = parse_caption(text)
    if expectation.relation is not None:
        placed = dict(zip(PAIR_ROLES[expectation.relation], expectation.objects))
    else:
        only = expectation.objects[0]
        placed = {only.position or "anywhere": only}
    targets = []
    for role in ROLES:
        said = placed.get(role)
        for field, values in object_fields().items():
            value = getattr(said, field) if said is not None else None
            targets.append(values.index(value) if value is not None else len(values))
    return targets


class StructureHeads(nn.Module):
    """One linear classifier per field over a token's final hidden state: [..., width] -> per-field logits."""

    def __init__(self, width: int, classes: tuple[int, ...]):
        super().__init__()
        self.classes = classes
        self.proj = nn.Linear(width, sum(classes))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(hidden).split(self.classes, dim=-1)


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
    return loss / len(heads.classes), right / (count.item() * len(heads.classes))


def pretrain_text_encoder(encoder: FrozenCLIPEmbedder, captions: list[str], steps: int = 1000,
                          batch_size: int = 256, lr: float = 1e-3, warmup_steps: int = 30, held_out: int = 1000,
                          seed: int = 0, progress: bool = True) -> dict:
    """Train `encoder` in place on the caption-structure task (AdamW, linear warm-up then constant lr, gradient
    norm clipped to 1). The first `held_out` captions are only measured. Returns the held-out loss and accuracy."""
    if not isinstance(encoder, FrozenCLIPEmbedder):
        raise TypeError(f"the caption-structure stage trains an SD1-style CLIP text encoder; this model's is "
                        f"{type(encoder).__name__}")
    if len(captions) <= held_out:
        raise ValueError(f"{len(captions)} parsable captions leave none to train on after the {held_out} held out; "
                         "render more images (python -m shapes make --n) or lower held_out")
    torch.manual_seed(seed)
    targets = torch.tensor([caption_targets(caption) for caption in captions])
    tokens = encoder.tokenizer(captions)
    heads = StructureHeads(encoder.transformer.text_model.embeddings.token_embedding.embedding_dim, field_classes())
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


class NoCaptionsError(ValueError):
    """A data set none of whose captions the shapes grammar reads."""


def train_text_stage(model_path: str, data: str, out: str, steps: int = 1000, batch_size: int = 256, lr: float = 1e-3,
                     held_out: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Stage 2 on files: load `model_path`, train its text encoder on the parsable captions of `data`, write the
    whole checkpoint to `out`. Returns the held-out result with the caption counts and the file written."""
    captions, rejected = parsable_captions(data)
    if not captions:
        raise NoCaptionsError(f"no caption of {data} is in the shapes grammar ({rejected} rejected); this stage needs "
                              "captions written by `python -m shapes make`")
    model = ldm.load_model(model_path, dtype=torch.float32)
    result = pretrain_text_encoder(model.cond_stage_model, captions, steps=steps, batch_size=batch_size, lr=lr,
                                   held_out=held_out, seed=seed, progress=progress)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    ldm.save_model(model, out)
    return {**result, "captions": len(captions), "rejected": rejected, "written": out}
