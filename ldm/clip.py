"""Stable Diffusion's text encoders, in module trees that are the checkpoints' key spaces.

Both are CLIP's text tower (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", §2.4): a GPT-2-style pre-LayerNorm transformer with causal self-attention and a 4x-wide MLP over 77 token
positions. The released checkpoints store it in two layouts, so there are two classes:

- `FrozenCLIPEmbedder`: OpenAI CLIP ViT-L/14 in the Hugging Face transformers layout, as SD1.x stores it under
  `cond_stage_model.` and SDXL under `conditioner.embedders.0.`
  (`transformer.text_model.encoder.layers.N.self_attn.q_proj.weight`).
- `FrozenOpenCLIPEmbedder`: OpenCLIP ViT-H/14 (SD2.x, `cond_stage_model.`) and ViT-bigG/14 (SDXL,
  `conditioner.embedders.1.`) in open_clip's layout (`model.transformer.resblocks.N.attn.in_proj_weight`).

Which hidden state conditions the UNet differs per family. Both classes choose it with the same two arguments:
`layer` ("last" or "penultimate": the output of the last block or of the one before it) and `final_norm` (whether the
final LayerNorm is applied to that state):

    SD1.x      FrozenCLIPEmbedder()                                            last + final_layer_norm
    SD2.x      FrozenOpenCLIPEmbedder()                                        penultimate + ln_final
    SDXL .0    FrozenCLIPEmbedder(layer="penultimate", final_norm=False)       penultimate
    SDXL .1    FrozenOpenCLIPEmbedder(width=1280, layers=32, heads=20, embed_dim=1280,
                                      final_norm=False, return_pooled=True)   penultimate, and the pooled vector

`encode_tokens(tokens, clip_skip)` takes A1111's "Clip skip": clip_skip=n uses the hidden state n-1 blocks before that
base state, with the final LayerNorm applied to it exactly when `final_norm` is set (so SD1 with clip_skip=2 is the
penultimate state + final_layer_norm, as in A1111). The blocks after the chosen state are not run.
"""
import math
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kernels

from .tokenizer import CLIPTokenizer

LAYERS = ("last", "penultimate")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, §2): x · σ(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


# OpenAI's CLIP was trained with quick_gelu, OpenCLIP's ViT-H and ViT-bigG with the exact (erf) GELU.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention in which token i sees tokens 0..i only; q, k, v: [B, N, W] -> [B, N, W].

    This calls PyTorch's SDPA with `is_causal=True` rather than `kernels.attention`, which takes no mask: the text
    encoder runs once per prompt over 77 tokens, so it is no hot spot worth a kernel, and SDPA's own fused causal path
    is exact and needs no [N, N] mask tensor.
    """
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return rearrange(out, "b h n d -> b n (h d)")


class TextEncoder(nn.Module):
    """What both layouts share: the choice of hidden state, tokenization and the string-level `forward`.

    Subclasses build the `layers` transformer blocks and provide `encode_tokens(tokens, clip_skip)`.
    """

    def __init__(self, layers: int, layer: str, final_norm: bool, pad_token_id: int, context_length: int):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer={layer!r} is not one of {LAYERS}")
        self.num_layers = layers
        self.layer = layer
        self.final_norm = final_norm
        self.pad_token_id = pad_token_id
        self.context_length = context_length

    def blocks_to_run(self, clip_skip: int) -> int:
        """How many transformer blocks produce the hidden state that `clip_skip` selects."""
        base = self.num_layers if self.layer == "last" else self.num_layers - 1
        if not 1 <= clip_skip <= base:
            raise ValueError(f"clip_skip={clip_skip} is out of range: this encoder has {self.num_layers} layers and "
                             f"starts from the {self.layer} one, so clip_skip must be between 1 and {base}")
        return base - (clip_skip - 1)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be [batch, n] with n <= {self.context_length}; got shape "
                             f"{tuple(tokens.shape)} (split longer prompts into chunks of {self.context_length})")

    @cached_property
    def tokenizer(self) -> CLIPTokenizer:
        # Built on first use, so constructing a model (on the meta device too) never reads the BPE vocabulary.
        return CLIPTokenizer(pad_token_id=self.pad_token_id, context_length=self.context_length)

    def forward(self, texts: list[str]):
        """Tokenize `texts` (BOS + text + EOS, padded and truncated to context_length) and encode them."""
        device = next(self.parameters()).device
        return self.encode_tokens(self.tokenizer(texts).to(device))


# --- OpenAI CLIP in the transformers layout (SD1.x, SDXL embedders.0) ---------------------------------------------


class CLIPEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings; keys `token_embedding.weight`, `position_embedding.weight`.

    Some checkpoints also carry `embeddings.position_ids`, a buffer of transformers holding 0..76. Positions here are
    always 0..N-1 computed on the fly (a stored copy can only be redundant or wrong), so that key is not part of this
    module and a loader drops it.
    """

    def __init__(self, vocab_size: int, width: int, context_length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, N] -> [B, N, W]
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate `q_proj`, `k_proj`, `v_proj`, `out_proj`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, W] -> [B, N, W]
        return self.out_proj(causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    """W -> 4W -> W feed-forward; keys `fc1`, `fc2`."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width, activation)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, W]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of blocks, at key `encoder.layers.N`."""

    def __init__(self, width: int, layers: int, heads: int, activation: str):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, activation) for _ in range(layers))


class CLIPTextTransformer(nn.Module):
    """`text_model`: embeddings, encoder and `final_layer_norm`."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context_length: int, activation: str):
        super().__init__()
        self.embeddings = CLIPEmbeddings(vocab_size, width, context_length)
        self.encoder = CLIPEncoder(width, layers, heads, activation)
        self.final_layer_norm = nn.LayerNorm(width)


class CLIPTextModel(nn.Module):
    """Holds `text_model`, mirroring the transformers wrapper class that puts `text_model.` into every key."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context_length: int, activation: str):
        super().__init__()
        self.text_model = CLIPTextTransformer(vocab_size, width, layers, heads, context_length, activation)


class FrozenCLIPEmbedder(TextEncoder):
    """OpenAI CLIP's text transformer (ViT-L/14 by default) with keys `transformer.text_model.*`.

    `layer` / `final_norm` pick the output (see the module docstring); `pad_token_id` is the tokenizer's padding
    (SD1.x and SDXL pad with EOS, 49407). The name is the original's; gradients are left to the caller.
    """

    def __init__(self, vocab_size: int = 49408, width: int = 768, layers: int = 12, heads: int = 12,
                 context_length: int = 77, activation: str = "quick_gelu", layer: str = "last",
                 final_norm: bool = True, pad_token_id: int = 49407):
        super().__init__(layers, layer, final_norm, pad_token_id, context_length)
        self.transformer = CLIPTextModel(vocab_size, width, layers, heads, context_length, activation)

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens: [B, N] (N <= context_length, ids with BOS/EOS) -> the chosen hidden state [B, N, width]."""
        self.check_tokens(tokens)
        text_model = self.transformer.text_model
        x = text_model.embeddings(tokens)
        for block in text_model.encoder.layers[: self.blocks_to_run(clip_skip)]:
            x = block(x)
        return text_model.final_layer_norm(x) if self.final_norm else x


# --- OpenCLIP in open_clip's layout (SD2.x, SDXL embedders.1) ------------------------------------------------------


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention in torch.nn.MultiheadAttention's parameter layout, causal for text towers.

    Keys `in_proj_weight` [3W, W] and `in_proj_bias` [3W] hold the q, k, v projections stacked in that order, then
    `out_proj`. With causal=False (CLIP's image tower, metrics/clip.py) every token sees every token, through the
    project's attention dispatch.
    """

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, W] -> [B, N, W]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self.causal:
            return self.out_proj(causal_self_attention(q, k, v, self.heads))
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        return self.out_proj(rearrange(kernels.attention(q, k, v), "b h n d -> b n (h d)"))


class OpenCLIPMLP(nn.Module):
    """W -> 4W -> W feed-forward; keys `c_fc`, `c_proj` (GPT-2's names, kept by open_clip)."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, activation: str, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedSelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = OpenCLIPMLP(width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, W]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    """The stack of blocks, at key `transformer.resblocks.N`."""

    def __init__(self, width: int, layers: int, heads: int, activation: str, causal: bool = True):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, activation, causal) for _ in range(layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip's CLIP with the image tower removed (as the SD2/SDXL checkpoints store it).

    `text_projection` [width, embed_dim] maps the pooled EOS state into CLIP's joint space (used as
    x @ text_projection); `logit_scale` is CLIP's contrastive temperature, unused for conditioning but part of the
    checkpoint.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, embed_dim: int, context_length: int,
                 activation: str):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = OpenCLIPTransformer(width, layers, heads, activation)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        # open_clip's initialisation, so that a randomly initialised model is well scaled.
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)


class FrozenOpenCLIPEmbedder(TextEncoder):
    """OpenCLIP's text transformer (ViT-H/14 by default) with keys `model.*`.

    `layer` / `final_norm` pick the output (see the module docstring). With `return_pooled`, `encode_tokens` returns
    `(context [B, N, width], pooled [B, embed_dim])`, where
    pooled = ln_final(last block's output)[EOS] @ text_projection and EOS is located as the largest id in each row
    (49407 is the top of CLIP's vocabulary), as open_clip does. The
    pooled vector always comes from the last block, whatever `layer` and `clip_skip` are, as SDXL was trained.
    `pad_token_id` is the tokenizer's padding (OpenCLIP pads with 0).
    """

    def __init__(self, vocab_size: int = 49408, width: int = 1024, layers: int = 24, heads: int = 16,
                 embed_dim: int = 1024, context_length: int = 77, activation: str = "gelu",
                 layer: str = "penultimate", final_norm: bool = True, return_pooled: bool = False,
                 pad_token_id: int = 0):
        super().__init__(layers, layer, final_norm, pad_token_id, context_length)
        self.return_pooled = return_pooled
        self.model = OpenCLIPTextModel(vocab_size, width, layers, heads, embed_dim, context_length, activation)

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: int = 1):
        """tokens: [B, N] -> context [B, N, width], or (context, pooled [B, embed_dim]) with return_pooled."""
        self.check_tokens(tokens)
        model = self.model
        blocks = self.blocks_to_run(clip_skip)
        x = model.token_embedding(tokens) + model.positional_embedding[: tokens.shape[1]]  # [B, N, W]
        for block in model.transformer.resblocks[:blocks]:
            x = block(x)
        context = model.ln_final(x) if self.final_norm else x
        if not self.return_pooled:
            return context
        for block in model.transformer.resblocks[blocks:]:
            x = block(x)
        eos = tokens.argmax(dim=-1)  # [B]
        pooled = model.ln_final(x[torch.arange(x.shape[0], device=x.device), eos]) @ model.text_projection
        return context, pooled
