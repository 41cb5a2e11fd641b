"""Attention processors: replace the softmax(q kᵀ · scale) v step of the UNet's attention layers with your own code.

Every `CrossAttention` of a UNet carries its qualified name relative to the UNet, i.e. its state-dict path under
`model.diffusion_model.` (`input_blocks.1.1.transformer_blocks.0.attn2`), and `is_cross` (True for `attn2`, whose keys
and values come from the text; False for the self-attention `attn1`). A processor is any function

    fn(module, q, k, v, *, name, is_cross, scale) -> out

with q: [B, H, Nq, D] (Nq = h·w latent pixels of the layer's resolution), k, v: [B, H, Nk, D] (Nk = 77·k text tokens
for cross-attention, Nq for self-attention) and out: [B, H, Nq, D]; the layer projects in before and out after it.

    ldm.set_attention_processor(model, fn, filter=lambda name, is_cross: is_cross)   # every attn2 from now on
    with ldm.attention_processor(model, store):                                     # every layer, for one block
        generate(...)

The default processor is `kernels.attention` (flash attention where it applies), so installing it changes nothing.
`AttentionStore` is a ready processor that records where each text token looks (Hertz et al. 2022, "Prompt-to-Prompt
Image Editing with Cross Attention Control", §3.1).
"""
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import kernels

AttentionProcessor = Callable[..., torch.Tensor]
LayerFilter = Callable[[str, bool], bool]


def default_attention_processor(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str,
                                is_cross: bool, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v through the kernel dispatch (Triton flash attention on GPUs, else PyTorch's SDPA)."""
    return kernels.attention(q, k, v, scale)


def attention_layers(model_or_unet: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> attention layer, for a LatentDiffusion (its `.unet`) or a UNet, in forward order.

    Names are relative to the UNet (the state-dict key without `model.diffusion_model.`). Walking the tree also
    (re)names each layer, so a block swapped in after construction has correct names too.
    """
    from .unet import CrossAttention  # ldm.unet imports this module for the default processor

    unet = getattr(model_or_unet, "unet", model_or_unet)
    layers = {name: module for name, module in unet.named_modules() if isinstance(module, CrossAttention)}
    for name, module in layers.items():
        module.name = name
    return layers


def set_attention_processor(model_or_unet: nn.Module, fn: AttentionProcessor | None, *,
                            filter: LayerFilter | None = None) -> dict[str, AttentionProcessor]:
    """Install `fn` on every attention layer for which `filter(name, is_cross)` is true (all when filter is None);
    fn=None restores the default processor. Returns the processors it replaced, name -> fn, so a caller can put
    them back (what `attention_processor` does). Processors are plain attributes: no state-dict key changes."""
    previous = {}
    for name, layer in attention_layers(model_or_unet).items():
        if filter is None or filter(name, layer.is_cross):
            previous[name] = layer.processor
            layer.processor = fn or default_attention_processor
    if not previous:
        raise ValueError("set_attention_processor: the filter matched none of the model's attention layers; names "
                         "look like 'input_blocks.1.1.transformer_blocks.0.attn2' (see ldm.attention_layers(model))")
    return previous


@contextmanager
def attention_processor(model_or_unet: nn.Module, fn: AttentionProcessor, *,
                        filter: LayerFilter | None = None) -> Iterator[AttentionProcessor]:
    """`set_attention_processor` for the duration of a with-block; the previous processors come back afterwards,
    also when the block raises. Yields fn."""
    previous = set_attention_processor(model_or_unet, fn, filter=filter)
    try:
        yield fn
    finally:
        layers = attention_layers(model_or_unet)
        for name, processor in previous.items():
            layers[name].processor = processor


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions in the context (BOS is position 0) of the tokens of `prompt` that spell `word` ("red" -> [2] for
    "a red circle"); what indexes the token axis of `AttentionStore.maps`."""
    ids = tokenizer.encode(prompt)
    return [position + 1 for position, token in enumerate(ids) if tokenizer.decode([token]) == word.lower()]


class AttentionStore:
    """A processor that computes attention like the default one and records the cross-attention probabilities.

    For every cross-attention layer whose resolution has at most `max_query_tokens` latent pixels (the memory bound:
    prompt-to-prompt uses the 16×16 layers of SD, the largest ones cost most and carry least), it keeps a running sum
    of softmax(q kᵀ · scale) over all calls (sampler steps, and CFG's passes when they run as separate calls) — one
    [B, Nq, Nk] tensor per layer, the heads averaged unless `keep_heads` ([B, H, Nq, Nk] then). B is the batch the
    UNet sees: with generate()'s classifier-free guidance that is the conditional images first, then the
    unconditional ones (samplers.CFGDenoiser). Memory is bounded by the layers, not by the number of steps.

        store = AttentionStore()
        with ldm.attention_processor(model, store, filter=lambda name, is_cross: is_cross):
            generate(model, params)
        maps = store.maps((64, 64))   # [B, Nk, 64, 64]: where each token looked, averaged over layers and steps
    """

    def __init__(self, max_query_tokens: int = 32 * 32, keep_heads: bool = False):
        self.max_query_tokens = max_query_tokens
        self.keep_heads = keep_heads
        self.sums: dict[str, torch.Tensor] = {}  # layer name -> summed probabilities, float32 on the CPU
        self.counts: dict[str, int] = {}  # layer name -> number of calls summed

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def __call__(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str,
                 is_cross: bool, scale: float) -> torch.Tensor:
        if not is_cross or q.shape[2] > self.max_query_tokens:
            return default_attention_processor(module, q, k, v, name=name, is_cross=is_cross, scale=scale)
        # The probabilities are needed explicitly, so this runs the textbook attention instead of a fused kernel;
        # softmax in float32 so fp16 models record probabilities that sum to 1.
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # [B, H, Nq, Nk]
        recorded = (probs if self.keep_heads else probs.mean(dim=1)).detach().cpu()
        if name in self.sums and self.sums[name].shape != recorded.shape:
            raise ValueError(f"AttentionStore: layer {name} saw probabilities of shape {tuple(recorded.shape)} after "
                             f"{tuple(self.sums[name].shape)}; the batch or image size changed — call reset() "
                             "between generations of different sizes")
        self.sums[name] = self.sums[name] + recorded if name in self.sums else recorded
        self.counts[name] = self.counts.get(name, 0) + 1
        return (probs @ v.float()).to(v.dtype)

    def probabilities(self, name: str) -> torch.Tensor:
        """Mean probabilities of one layer over its calls: [B, Nq, Nk] ([B, H, Nq, Nk] with keep_heads)."""
        if name not in self.sums:
            raise KeyError(f"AttentionStore recorded nothing for {name!r}; recorded layers: {sorted(self.sums)}")
        return self.sums[name] / self.counts[name]

    def maps(self, image_size: tuple[int, int], layers: list[str] | None = None) -> torch.Tensor:
        """Per-token attention maps resized to the image: [B, Nk, H, W] ([B, H_heads, Nk, H, W] with keep_heads).

        Each recorded layer's mean probabilities [.., Nq, Nk] are laid out on its h×w grid (h/w = H/W), bilinearly
        resized to image_size = (H, W) and averaged over `layers` (default: all recorded). A token's map is how much
        probability mass each pixel's queries gave it; maps[:, j] summed over j is 1 at every pixel.
        """
        names = list(self.sums) if layers is None else layers
        if not names:
            raise ValueError("AttentionStore.maps: nothing was recorded; run the UNet with this store installed "
                             "(ldm.attention_processor) and check max_query_tokens against the layer resolutions")
        height, width = image_size
        total = 0
        for name in names:
            probs = self.probabilities(name)
            queries = probs.shape[-2]
            grid_h = round((queries * height / width) ** 0.5)
            grid_w = queries // grid_h
            if grid_h * grid_w != queries:
                raise ValueError(f"layer {name} has {queries} latent pixels, which is no grid of the image's aspect "
                                 f"ratio {height}:{width}; pass the size of the image that was generated")
            grid = probs.transpose(-1, -2).unflatten(-1, (grid_h, grid_w))  # [.., Nk, h, w]
            lead = grid.shape[:-2]
            resized = F.interpolate(grid.reshape(-1, 1, grid_h, grid_w), size=(height, width), mode="bilinear",
                                    align_corners=False)
            total = total + resized.reshape(*lead, height, width)
        return total / len(names)
