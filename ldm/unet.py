"""The conditional UNet of Stable Diffusion (SD1.x, SD2.x, SDXL, inpainting), in CompVis's module layout.

Attribute paths are the checkpoint keys under `model.diffusion_model.`: `time_embed`, `label_emb`, `input_blocks[i]`
(a sequence of ResBlock / SpatialTransformer / Downsample), `middle_block`, `output_blocks[i]`, `out`. The architecture is
ADM's UNet (Dhariwal & Nichol 2021) with the cross-attention transformer blocks of Rombach et al. 2022 (LDM, §3.3).

Extending the UNet (see also ldm/attention.py for attention processors):

Block contract. Each entry of `input_blocks`, `middle_block` and `output_blocks` is a `TimestepEmbedSequential`, a list
of layers run in order on the feature map x: [B, C, H, W]. A layer receives the timestep embedding and the text by
declaring them as parameters of its `forward`: a parameter named `emb` gets the embedding [B, 4·model_channels], one
named `context` gets the text [B, 77·k, context_dim]; both are passed as keywords, and x comes first. So
`forward(self, x)` (a convolution), `forward(self, x, emb)` (ResBlock), `forward(self, x, context)`
(SpatialTransformer) and `forward(self, x, emb, context)` all fit, and any nn.Module written that way can replace a
layer (`unet.middle_block[1] = MyMixer(...)`). The layer returns the new feature map; its channel count and resolution
must be what the next layer expects. The signature is read once per class, not per call. A whole block put in place of
a `TimestepEmbedSequential` (`unet.middle_block = MyBlock()`) is called as block(x, emb, context).
"""
import functools
import inspect

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from .attention import attention_layers, default_attention_processor
from .layers import GroupNorm, Upsample, timestep_embedding, zero_module

NORM_GROUPS = 32


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (itself when context is None); keys `to_q/to_k/to_v/to_out.0`.

    `name` is the layer's state-dict path in the UNet and `is_cross` says whether keys come from the text; the
    softmax(q kᵀ · scale) v step is `processor` (ldm.attention: set_attention_processor), a plain attribute.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.is_cross = context_dim is not None
        self.name = ""  # set by the UNet that holds the layer (ldm.attention.attention_layers)
        self.processor = default_attention_processor
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        # to_out.1 is the (parameter-free) dropout of the original; keeping the Sequential keeps the key `to_out.0`.
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, C], context: [B, M, Dc] -> [B, N, C]
        context = x if context is None else context
        q, k, v = (rearrange(proj(t), "b n (h d) -> b h n d", h=self.heads)
                   for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = self.processor(self, q, k, v, name=self.name, is_cross=self.is_cross, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear to 2·F, then value · gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.geglu(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU MLP with 4× width; `net.0.proj` and `net.2` are the checkpoint keys (net.1 is dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, HW, C], context: [B, 77·k, Dc]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (LDM §3.3), conditioned on `context` by cross-attention.

    SD1 projects in and out with 1×1 convolutions; SD2 and SDXL use Linear layers (`use_linear`), which changes the
    weight shapes ([C, C, 1, 1] vs [C, C]) and the order of the projection and the flatten.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm(NORM_GROUPS, channels, eps=1e-6)
        make_proj = nn.Linear if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = make_proj(channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = zero_module(make_proj(inner_dim, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, C, H, W]
        _, _, height, width = x.shape
        h = self.norm(x)
        if self.use_linear:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height, w=width))
        return x + h


class ResBlock(nn.Module):
    """ADM residual block: GroupNorm-SiLU-conv, add the timestep embedding, GroupNorm-SiLU-dropout-conv, skip.

    The Sequential containers are kept only because their indices are checkpoint keys (`in_layers.2`, `out_layers.3`);
    forward calls the pieces through read-only names (properties: no state-dict keys) so GroupNorm and SiLU can run
    as one fused kernel. The SiLUs at `in_layers.1` / `out_layers.1` are fused into the norms; `emb_layers` runs whole.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(NORM_GROUPS, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm(NORM_GROUPS, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    @property
    def in_norm(self) -> GroupNorm:
        return self.in_layers[0]

    @property
    def in_conv(self) -> nn.Conv2d:
        return self.in_layers[2]

    @property
    def out_norm(self) -> GroupNorm:
        return self.out_layers[0]

    @property
    def dropout(self) -> nn.Dropout:
        return self.out_layers[2]

    @property
    def out_conv(self) -> nn.Conv2d:
        return self.out_layers[3]

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W], emb: [B, E] -> [B, C_out, H, W]
        h = self.in_conv(self.in_norm(x, silu=True))
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        h = self.out_conv(self.dropout(self.out_norm(h, silu=True)))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Strided 3×3 convolution halving H and W (key `op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


BLOCK_INPUTS = ("emb", "context")


@functools.cache
def declared_inputs(layer_type: type) -> tuple[str, ...]:
    """Which of `emb` / `context` a layer class's forward declares (the block contract in the module docstring)."""
    parameters = inspect.signature(layer_type.forward).parameters
    return tuple(name for name in BLOCK_INPUTS if name in parameters)


class TimestepEmbedSequential(nn.ModuleList):
    """One UNet block: its layers in order, each given the inputs its forward declares (`emb`, `context`)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W], emb: [B, E], context: [B, 77·k, Dc] -> [B, C', H', W']
        inputs = {"emb": emb, "context": context}
        for layer in self:
            x = layer(x, **{name: inputs[name] for name in declared_inputs(type(layer))})
        return x


class UNetEncoder(nn.Module):
    """The UNet's first half: time embedding (+ SDXL's `label_emb`), `input_blocks` and `middle_block`.

    Shared by UNetModel, which adds the decoder, and ldm.controlnet.ControlNet, which copies this half (Zhang et al.
    2023, §3.2); both keep these attribute paths as checkpoint keys. `encoder_config` holds the keyword arguments, so
    a twin encoder can be built from an instance. `skip_channels[i]` is the channel count of input block i's output.
    """

    def __init__(self, *, in_channels: int, model_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 attention_resolutions: tuple[int, ...], num_heads: int | None, num_head_channels: int | None,
                 transformer_depth: tuple[int, ...] | int, transformer_depth_middle: int | None, context_dim: int,
                 use_linear_in_transformer: bool, adm_in_channels: int | None, dropout: float):
        super().__init__()
        if (num_heads is None) == (num_head_channels is None):
            raise ValueError("UNetModel needs exactly one of num_heads (SD1) and num_head_channels (SD2/SDXL); "
                             f"got num_heads={num_heads}, num_head_channels={num_head_channels}")
        if isinstance(transformer_depth, int):
            transformer_depth = (transformer_depth,) * len(channel_mult)
        if len(transformer_depth) != len(channel_mult):
            raise ValueError(f"transformer_depth has {len(transformer_depth)} entries but there are "
                             f"{len(channel_mult)} levels (channel_mult={channel_mult})")
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        self.encoder_config = dict(
            in_channels=in_channels, model_channels=model_channels, channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_resolutions), num_heads=num_heads,
            num_head_channels=num_head_channels, transformer_depth=tuple(transformer_depth),
            transformer_depth_middle=transformer_depth_middle, context_dim=context_dim,
            use_linear_in_transformer=use_linear_in_transformer, adm_in_channels=adm_in_channels, dropout=dropout)
        self.model_channels = model_channels
        self.gradient_checkpointing = False
        time_embed_dim = model_channels * 4

        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if adm_in_channels is not None:
            # Nested Sequential so the keys are `label_emb.0.0` / `label_emb.0.2`, as sgm writes them.
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                                                         nn.Linear(time_embed_dim, time_embed_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(in_channels, model_channels, 3,
                                                                              padding=1)])])
        self.skip_channels = [model_channels]
        channels, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(channels, time_embed_dim, mult * model_channels, dropout)]
                channels = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(self.attention(channels, transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                self.skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(channels)]))
                self.skip_channels.append(channels)
                ds *= 2

        self.middle_block = TimestepEmbedSequential([
            ResBlock(channels, time_embed_dim, channels, dropout),
            self.attention(channels, transformer_depth_middle),
            ResBlock(channels, time_embed_dim, channels, dropout),
        ])

    def attention(self, channels: int, depth: int) -> SpatialTransformer:
        """A SpatialTransformer of this UNet's head layout, text width and projection kind."""
        config = self.encoder_config
        heads = config["num_heads"] if config["num_heads"] is not None else channels // config["num_head_channels"]
        return SpatialTransformer(channels, heads, channels // heads, depth, config["context_dim"],
                                  config["use_linear_in_transformer"])

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The blocks' conditioning vector emb: [B, 4·model_channels] from timesteps [B] (and SDXL's y)."""
        if (y is not None) != hasattr(self, "label_emb"):
            raise ValueError("y (SDXL's pooled-text + size vector) must be given exactly when the UNet has "
                             f"adm_in_channels; got y={'a tensor' if y is not None else None}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        return emb

    def _run(self, block: TimestepEmbedSequential, h, emb, context):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)


class UNetModel(UNetEncoder):
    """Stable Diffusion's denoiser ε_θ(x_t, t, c) (or v_θ), with CompVis's hyper-parameter names.

    Attention sits at the levels whose downsampling factor `ds` (1, 2, 4, …) is in `attention_resolutions`. Heads are
    either a fixed count (`num_heads`, SD1) or a fixed width (`num_head_channels`, SD2/SDXL). `transformer_depth` gives
    the transformer depth per level (SDXL: 0/2/10); the middle block uses `transformer_depth_middle`, defaulting to the
    deepest level's. `adm_in_channels` adds SDXL's `label_emb` for the pooled-text + size vector `y`.
    """

    def __init__(self, *, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (4, 2, 1), num_heads: int | None = 8,
                 num_head_channels: int | None = None, transformer_depth: tuple[int, ...] | int = 1,
                 transformer_depth_middle: int | None = None, context_dim: int = 768,
                 use_linear_in_transformer: bool = False, adm_in_channels: int | None = None, dropout: float = 0.0):
        super().__init__(in_channels=in_channels, model_channels=model_channels, channel_mult=channel_mult,
                         num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
                         num_heads=num_heads, num_head_channels=num_head_channels,
                         transformer_depth=transformer_depth, transformer_depth_middle=transformer_depth_middle,
                         context_dim=context_dim, use_linear_in_transformer=use_linear_in_transformer,
                         adm_in_channels=adm_in_channels, dropout=dropout)
        transformer_depth = self.encoder_config["transformer_depth"]
        time_embed_dim = model_channels * 4
        skip_channels = list(self.skip_channels)
        channels, ds = skip_channels[-1], 2 ** (len(channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), time_embed_dim, model_channels * mult, dropout)]
                channels = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(self.attention(channels, transformer_depth[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(channels))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(GroupNorm(NORM_GROUPS, channels), nn.SiLU(),
                                 zero_module(nn.Conv2d(channels, out_channels, 3, padding=1)))
        attention_layers(self)  # gives every attention layer its qualified name

    # Read-only names for the pieces of `out` (keys `out.0`, `out.2`; the SiLU `out.1` is fused into the norm).
    @property
    def out_norm(self) -> GroupNorm:
        return self.out[0]

    @property
    def out_conv(self) -> nn.Conv2d:
        return self.out[2]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        # x: [B, in_channels, H/8, W/8], timesteps: [B] (float allowed), context: [B, 77·k, context_dim],
        # y: [B, adm_in_channels] (SDXL only) -> [B, out_channels, H/8, W/8].
        # control: a ControlNet's residuals (ldm.controlnet), one per input block then the middle block's, each shaped
        # as that block's output; control[i] is added to skip i where the decoder takes it, control[-1] to the middle
        # block's output (ControlledUnetModel in Zhang et al.'s cldm/cldm.py). None leaves the UNet untouched.
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control has {len(control)} residuals; this UNet takes {len(self.input_blocks) + 1} "
                             f"(one per input block, then the middle block's)")
        emb = self.embed(timesteps, y, x.dtype)
        context = context.to(x.dtype)
        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if control is not None:
            h = h + control[-1].to(h.dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(skip.dtype)  # len(skips) is now the popped skip's index
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context)
        return self.out_conv(self.out_norm(h, silu=True))
