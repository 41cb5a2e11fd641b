"""Prompts -> the UNet's conditioning, A1111's way: 75-token chunks, emphasis weights, embeddings, SDXL vectors.

Each chunk (BOS + 75 tokens + EOS) goes through the text encoder on its own and the outputs are concatenated along
the token axis, so a prompt of k chunks gives context [B, 77·k, D] (cross-attention accepts any length). Emphasis
("Original" in A1111) multiplies each token's output vector by its weight, then rescales the whole tensor so its mean
is what it was before weighting.
"""
import contextlib

import torch

from ldm.model import SDXLConditioner
from ldm.tokenizer import EOS

from .prompts import PromptChunk, chunk_prompt


def text_towers(model) -> list:
    """The model's text encoders: [CLIP-L, OpenCLIP-bigG] for SDXL, [the one encoder] otherwise."""
    return list(model.conditioner.embedders) if model.is_sdxl else [model.cond_stage_model]


def token_embedding(tower) -> torch.nn.Embedding:
    return tower.transformer.text_model.embeddings.token_embedding if hasattr(tower, "transformer") \
        else tower.model.token_embedding


@contextlib.contextmanager
def _embeddings_placed(tower, tower_index: int, chunks: list[PromptChunk]):
    """While active, the tower's token embedding output for row b has chunks[b]'s embedding vectors at their
    positions (A1111's EmbeddingsWithFixes)."""
    placements = [(row, position, embedding.vectors[tower_index])
                  for row, chunk in enumerate(chunks) for position, embedding in chunk.embeddings]
    if not placements:
        yield
        return

    def place(module, inputs, output):
        # output: [B, 77, width]
        output = output.clone()
        for row, position, vectors in placements:
            output[row, position:position + vectors.shape[0]] = vectors.to(output)
        return output

    handle = token_embedding(tower).register_forward_hook(place)
    try:
        yield
    finally:
        handle.remove()


def _encode_chunks(tower, tower_index: int, chunks: list[PromptChunk], clip_skip: int):
    """One chunk per row -> (weighted context [B, 77, width], pooled [B, E] or None)."""
    device = token_embedding(tower).weight.device
    tokens = torch.tensor([chunk.tokens for chunk in chunks], device=device)
    if tower.pad_token_id != EOS:
        # OpenCLIP pads with 0: everything after the first EOS becomes padding.
        first_eos = (tokens == EOS).int().argmax(dim=1, keepdim=True)  # [B, 1]
        positions = torch.arange(tokens.shape[1], device=device)
        tokens = tokens.masked_fill(positions > first_eos, tower.pad_token_id)
    with _embeddings_placed(tower, tower_index, chunks):
        out = tower.encode_tokens(tokens, clip_skip)
    context, pooled = out if isinstance(out, tuple) else (out, None)
    context = context.float()
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=torch.float32)[..., None]
    if torch.all(weights == 1):
        # Nothing to rescale; the ratio below would be 0/0 for an encoder whose outputs average exactly zero (an
        # untrained tower: LayerNorm with zero bias).
        return context, pooled
    weighted = context * weights
    # "Original" emphasis: keep the mean of the whole batch of outputs unchanged.
    weighted = weighted * (context.mean() / weighted.mean())
    return weighted, pooled


class PromptEncoder:
    """Encodes the prompts of a job with one model, embeddings database and Clip skip.

    `encode(texts)` takes the plain prompts of one prompt's schedule (they are encoded together, so emphasis is
    normalised over that batch, as A1111 does) and returns {"context": [T, 77·k, D]} plus "y" [T, 2816] for SDXL.
    SDXL's size conditioning uses `size` (height, width) for both original and target size, crop (0, 0); an empty
    negative prompt on SDXL is encoded as zeros (A1111). Clip skip does not apply to SDXL, whose towers already use
    their penultimate layer (A1111 ignores it there as well).
    """

    def __init__(self, model, embeddings=None, clip_skip: int = 1):
        self.model = model
        self.towers = text_towers(model)
        self.is_sdxl = model.is_sdxl
        self.embeddings = embeddings
        self.clip_skip = 1 if self.is_sdxl else clip_skip
        self.tokenizer = self.towers[0].tokenizer
        self.used_embeddings: dict[str, object] = {}  # name -> Embedding, for the infotext's "TI hashes"

    @torch.no_grad()
    def encode(self, texts: list[str], size: tuple[int, int] | None = None,
               is_negative: bool = False) -> dict[str, torch.Tensor]:
        per_text = [chunk_prompt(text, self.tokenizer, self.embeddings)[0] for text in texts]
        for chunks in per_text:
            for chunk in chunks:
                self.used_embeddings.update((e.name, e) for _, e in chunk.embeddings)
        empty = chunk_prompt("", self.tokenizer)[0][0]
        count = max(len(chunks) for chunks in per_text)
        contexts, pooled = [], None
        for tower_index, tower in enumerate(self.towers):
            parts = []
            for i in range(count):
                batch = [chunks[i] if i < len(chunks) else empty for chunks in per_text]
                context, chunk_pooled = _encode_chunks(tower, tower_index, batch, self.clip_skip)
                parts.append(context)
                if i == 0 and chunk_pooled is not None:
                    pooled = chunk_pooled.float()  # SDXL's pooled vector comes from the first chunk (A1111)
            contexts.append(torch.cat(parts, dim=1))
        context = torch.cat(contexts, dim=-1)
        if not self.is_sdxl:
            return {"context": context}
        if is_negative and all(text == "" for text in texts):
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        height, width = size
        return {"context": context, "y": SDXLConditioner.vector(pooled, (height, width), (0, 0), (height, width))}
