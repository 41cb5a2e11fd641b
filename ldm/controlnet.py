"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder reads the noisy latent plus a control image (edges, a silhouette, a
segmentation…) and returns one residual per UNet skip connection and one for the middle block; the frozen UNet adds
them (ldm.unet.UNetModel.forward's `control`). Attribute paths are lllyasviel's keys without their `control_model.`
prefix, so `state_dict()` is the released file's layout:

    time_embed.{0,2}              the UNet's timestep MLP (copied)
    label_emb.0.{0,2}             SDXL only: the pooled-text + size vector MLP (copied)
    input_hint_block.{0,2,…,14}   8 convs encoding the control image [B, 3, H, W] -> [B, model_channels, H/8, W/8]
    input_blocks.N                the UNet's encoder blocks (copied)
    zero_convs.N.0                1×1 convs, zero at the start of training, one per input block
    middle_block                  the UNet's middle block (copied)
    middle_block_out.0            1×1 conv, zero at the start of training

    net = load_controlnet("control_v11p_sd15_canny.pth")
    residuals = net(latents, hint, timesteps, context)                    # len(input_blocks) + 1 tensors
    eps = model.unet(latents, timesteps, context, control=residuals)

Extending: any module returning the same residual list can drive the UNet (a T2I-adapter, a ControlNet of another
layout); several are combined with `sum_residuals`.
"""
import os

import torch
from torch import nn

from .attention import attention_layers
from .checkpoint import CheckpointError, read_metadata, read_state_dict, save_state_dict
from .layers import zero_module
from .presets import HeadCounts, detect_encoder
from .unet import UNetEncoder, UNetModel

PREFIX = "control_model."

# Channel widths of the hint encoder after its first conv (Zhang et al.'s cldm.py); SiLUs sit at the odd indices. For
# SD's ÷8 autoencoder the convs at sequential indices 4, 8 and 12 have stride 2, so the hint (the image's size) reaches
# latent resolution; a model whose autoencoder downsamples less (the shapes world's ÷4) strides at the first ones only.
# Strides leave no trace in the weights: save_controlnet records a downscale other than 8 in the metadata.
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDE_2 = (4, 8, 12)
DOWNSCALES = {1: 0, 2: 1, 4: 2, 8: 3}  # hint_downscale -> number of stride-2 convs
DOWNSCALE_KEY = "ldm.hint_downscale"


class ControlNet(UNetEncoder):
    """The UNet encoder copy with its hint encoder and zero convolutions; keyword arguments are UNetConfig's fields
    (less out_channels) plus `hint_channels`, the control image's channel count (3 for every released file), and
    `hint_downscale`, the autoencoder's downsampling factor (8 for SD): the control image has the generated image's
    size, hint_downscale × the latent's."""

    def __init__(self, *, hint_channels: int = 3, hint_downscale: int = 8, **encoder_config):
        super().__init__(**{"dropout": 0.0, **encoder_config})
        if hint_downscale not in DOWNSCALES:
            raise ValueError(f"hint_downscale must be one of {sorted(DOWNSCALES)}, got {hint_downscale}")
        strided = HINT_STRIDE_2[:DOWNSCALES[hint_downscale]]
        layers, channels = [], hint_channels
        for width in HINT_WIDTHS:
            stride = 2 if len(layers) in strided else 1
            layers += [nn.Conv2d(channels, width, 3, padding=1, stride=stride), nn.SiLU()]
            channels = width
        # The last conv starts at zero, so an untrained ControlNet adds nothing to the latent (paper §3.2).
        layers.append(zero_module(nn.Conv2d(channels, self.model_channels, 3, padding=1)))
        self.input_hint_block = nn.Sequential(*layers)
        self.hint_channels, self.hint_downscale = hint_channels, hint_downscale
        # Sequential wrappers keep the checkpoint keys `zero_convs.N.0` / `middle_block_out.0`.
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_module(nn.Conv2d(c, c, 1))) for c in self.skip_channels)
        middle = self.skip_channels[-1]
        self.middle_block_out = nn.Sequential(zero_module(nn.Conv2d(middle, middle, 1)))
        attention_layers(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        # x: [B, in_channels, h, w] latents, hint: [B, hint_channels, f·h, f·w] control image in [0, 1] at the
        # generated image's size (f = hint_downscale, 8 for SD), timesteps: [B], context: [B, 77·k, context_dim],
        # y: [B, adm_in_channels] (SDXL) -> len(input_blocks) + 1 residuals, each shaped as the matching UNet block's
        # output.
        f = self.hint_downscale
        if hint.shape[-2:] != (f * x.shape[-2], f * x.shape[-1]) or hint.shape[1] != self.hint_channels:
            raise ValueError(f"the control image must be [B, {self.hint_channels}, {f}h, {f}w] for latents "
                             f"{list(x.shape)}, got {list(hint.shape)}; resize it to the generated image's size")
        emb = self.embed(timesteps, y, x.dtype)
        context = context.to(x.dtype)
        guided_hint = self.input_hint_block(hint.to(x.dtype))  # [B, model_channels, h, w]
        residuals, h = [], x
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if index == 0:
                h = h + guided_hint  # the control enters right after the input conv (cldm.py ControlNet.forward)
            residuals.append(zero_conv(h))
        h = self._run(self.middle_block, h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


def sum_residuals(residual_lists: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """Σ_k weights[k] · residual_lists[k][i] for every i: several ControlNets (units) driving one UNet call, each
    scaled by its weight, as sd-webui-controlnet combines units."""
    if len(residual_lists) != len(weights) or not residual_lists:
        raise ValueError(f"need one weight per residual list, got {len(residual_lists)} lists and {len(weights)} "
                         "weights")
    lengths = {len(residuals) for residuals in residual_lists}
    if len(lengths) != 1:
        raise ValueError(f"the ControlNets return different numbers of residuals {sorted(lengths)}; they were made "
                         "for different UNets")
    return [sum(weight * residual for weight, residual in zip(weights, level))
            for level in zip(*residual_lists)]


def from_unet(model_or_unet: nn.Module, hint_channels: int = 3) -> ControlNet:
    """A new ControlNet as training starts (paper §3.2): the encoder (time_embed, label_emb, input_blocks,
    middle_block) copied from the UNet of `model_or_unet` (a LatentDiffusion, whose autoencoder sets hint_downscale,
    or a bare UNetModel: SD's 8), the zero convs and the hint encoder's last conv at zero, the other hint convs
    freshly initialised. Same device and dtype as the UNet."""
    unet = getattr(model_or_unet, "unet", model_or_unet)
    if not isinstance(unet, UNetModel):
        raise TypeError(f"from_unet needs a LatentDiffusion or a UNetModel, got {type(model_or_unet).__name__}")
    autoencoder = getattr(model_or_unet, "first_stage_model", None)
    downscale = autoencoder.downscale if autoencoder is not None else 8
    weight = unet.time_embed[0].weight
    with torch.device(weight.device):
        net = ControlNet(hint_channels=hint_channels, hint_downscale=downscale, **unet.encoder_config)
    net.to(weight.dtype)
    for name in ("time_embed", "label_emb", "input_blocks", "middle_block"):
        if hasattr(unet, name):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
    return net


# Keys that mark ControlNet-like files of other kinds, with what each one is (checked in this order).
OTHER_KINDS = (
    ("difference", "a \"diff\" ControlNet (weights stored as differences from SD1.5's UNet)"),
    ("lora_controlnet", "a Control-LoRA (low-rank ControlNet)"),
    ("lllite", "a ControlNet-LLLite (\"lite\") network"),
    ("controlnet_cond_embedding.", "a ControlNet in diffusers' layout (ControlNetModel)"),
    ("adapter.", "a T2I-Adapter"),
    ("body.0.", "a T2I-Adapter"),
)


def control_weights(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ControlNet tensors of a file's state dict, without the `control_model.` prefix (a file holding a whole SD
    model beside the ControlNet keeps only the latter); CheckpointError for files of other kinds, saying what they
    are."""
    for marker, kind in OTHER_KINDS:
        if any(marker in key for key in state_dict):
            raise CheckpointError(f"{source} is {kind}, which load_controlnet does not read; use a full ControlNet "
                                  "1.0/1.1 file (lllyasviel's layout, keys control_model.*)")
    if any(key.startswith(PREFIX) for key in state_dict):
        state_dict = {key[len(PREFIX):]: value for key, value in state_dict.items() if key.startswith(PREFIX)}
    if "input_hint_block.0.weight" not in state_dict or "input_blocks.0.0.weight" not in state_dict:
        prefixes = sorted({".".join(key.split(".")[:2]) for key in state_dict})
        raise CheckpointError(f"{source} is not a ControlNet: it lacks input_hint_block.0.weight / "
                              f"input_blocks.0.0.weight (with or without the '{PREFIX}' prefix); found "
                              f"{_preview(prefixes)}")
    return state_dict


def controlnet_config(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """ControlNet's keyword arguments read off the (unprefixed) tensors: the encoder's hyper-parameters as for a
    UNet (ldm.presets.detect_encoder; head layout from save_controlnet's metadata, else the SD1 / SD2-SDXL
    conventions), the control image's channel count, and its downscale (metadata, else SD's 8)."""
    heads = HeadCounts.from_metadata(metadata)
    downscale = (metadata or {}).get(DOWNSCALE_KEY, "8")
    if not downscale.isdigit():
        raise ValueError(f"metadata {DOWNSCALE_KEY}={downscale!r:.20} is not one of {sorted(DOWNSCALES)}")
    return {**detect_encoder(state_dict, "", heads), "hint_downscale": int(downscale),
            "hint_channels": state_dict["input_hint_block.0.weight"].shape[1]}


def load_controlnet(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> ControlNet:
    """A ControlNet from a `.safetensors` or `.pth`/`.ckpt` file (read by ldm.checkpoint, no code from the file
    runs), with or without the `control_model.` prefix; strict: missing or unexpected keys raise CheckpointError
    listing them."""
    source = os.fspath(path)
    state_dict = control_weights(read_state_dict(source, device=device, dtype=dtype), source)
    try:
        config = controlnet_config(state_dict, read_metadata(source))
        with torch.device("meta"):
            net = ControlNet(**config)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as error:
        raise CheckpointError(f"{source}: cannot read a ControlNet architecture (SD1.x / SD2.x / SDXL) off its "
                              f"tensors: {error!r}") from None
    expected = {key: value.shape for key, value in net.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the ControlNet its tensors describe: {len(missing)} missing "
                              f"key(s) {_preview(missing)}, {len(unexpected)} unexpected key(s) "
                              f"{_preview(unexpected)}")
    mismatched = [key for key, shape in expected.items() if state_dict[key].shape != shape]
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(f"{source}: tensor {key} has shape {list(state_dict[key].shape)} but the ControlNet "
                              f"needs {list(expected[key])} ({len(mismatched)} mis-shaped tensor(s))")
    net.load_state_dict(state_dict, strict=True, assign=True)
    return net.eval()


def save_controlnet(net: ControlNet, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Writes `net` as a `.safetensors` file in the original layout (keys `control_model.*`), atomically; the head
    layout and a hint downscale other than SD's 8, which shapes do not show, go into the metadata for
    load_controlnet."""
    state_dict = {PREFIX + key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value)
                  .detach().cpu() for key, value in net.state_dict().items()}
    config = net.encoder_config
    metadata = HeadCounts(config["num_heads"], config["num_head_channels"]).to_metadata()
    if net.hint_downscale != 8:
        metadata[DOWNSCALE_KEY] = str(net.hint_downscale)
    save_state_dict(state_dict, path, metadata=metadata)


def _preview(keys: list[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (", …" if len(keys) > n else "") + "]"
