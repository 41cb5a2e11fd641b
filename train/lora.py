"""LoRA (Hu et al. 2021) and LoCon adapters, saved and loaded in kohya's file format.

A LoRA adapter adds a low-rank update to a frozen layer W: y = W x + (alpha / rank) · up(down(x)), with down: in → rank
and up: rank → out. For a convolution ("LoCon", LyCORIS) `down` is a conv with the layer's kernel, stride and padding
and `up` a 1×1 conv. `up` starts at zero, so training starts from the base model exactly (kohya's initialisation:
down Kaiming-uniform, up zeros).

File format (kohya sd-scripts, read by A1111 as `<lora:name:weight>`), one .safetensors with, per adapted layer:
    <name>.lora_down.weight   [rank, in] or [rank, in, k, k]
    <name>.lora_up.weight     [out, rank] or [out, rank, 1, 1]
    <name>.alpha              scalar; the update is scaled by alpha / rank
where name = `lora_unet_` + the layer's path under `model.diffusion_model.` with dots replaced by underscores
(the original CompVis path, e.g. lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q, the form SDXL LoRAs use
and A1111 maps to its modules), and `lora_te_` (SDXL: `lora_te1_`) + the path under the CLIP text model's
`transformer.` (lora_te_text_model_encoder_layers_0_self_attn_q_proj, the same names kohya writes). The names come
from sample.lora's `layer_name` and prefixes, the ones generation resolves them with.

Targets (kohya's defaults): in the UNet every Linear and 1×1 conv inside the cross-attention transformers; with
conv_rank > 0 also the ResBlocks' convolutions and skip projections and the down/upsampling convolutions (LoCon); in
the CLIP text encoder the attention and MLP Linear layers. OpenCLIP text towers (SD2, SDXL's second) keep q/k/v in one
packed parameter that is no layer, so they get no adapters.
"""
import json
import math

import torch
from torch import nn

from ldm.checkpoint import read_metadata, read_state_dict, save_state_dict
from ldm.clip import CLIPAttention, CLIPMLP
from ldm.unet import Downsample, ResBlock, SpatialTransformer, Upsample
from sample.lora import UNET_PREFIX, layer_name, text_tower_prefixes


class LoRAModule(nn.Module):
    """The low-rank update of one Linear or Conv2d layer; `delta(x)` is added to the layer's output."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.lora_down.to(base.weight.device)
        self.lora_up.to(base.weight.device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha), device=base.weight.device))
        self.multiplier = 1.0

    def delta_weight(self) -> torch.Tensor:
        """The update of the base layer's weight, (alpha · multiplier / rank) · up @ down, shaped like the weight."""
        up, down = self.lora_up.weight, self.lora_down.weight
        product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return product * (self.alpha * (self.multiplier / self.rank)).to(product.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: the base layer's input ([B, N, in] or [B, in, H, W]) -> its output's shape
        # The scale stays a tensor on the device: .item() would synchronise with the GPU once per layer.
        scale = self.alpha * (self.multiplier / self.rank)
        update = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return update * scale.to(update.dtype)


def _is_target(module: nn.Module, conv: bool) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and (conv or module.kernel_size == (1, 1))


def target_layers(model, conv: bool, text_encoder: bool) -> dict[str, nn.Module]:
    """kohya name -> layer, for the layers that get adapters (see the module docstring)."""
    layers = {}
    unet = model.model.diffusion_model
    for block_name, block in unet.named_modules():
        if isinstance(block, SpatialTransformer):
            chosen = [(n, m) for n, m in block.named_modules() if _is_target(m, conv=False)]
        elif conv and isinstance(block, (ResBlock, Downsample, Upsample)):
            chosen = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        else:
            continue
        for name, layer in chosen:
            layers[layer_name(UNET_PREFIX, f"{block_name}.{name}")] = layer
    if text_encoder:
        # The first tower only: SDXL's second (OpenCLIP) has no layers to adapt, see the module docstring.
        prefix, tower = next(iter(text_tower_prefixes(model).items()))
        if not hasattr(tower, "transformer"):
            raise ValueError("LoRA on the text encoder needs a CLIP-layout tower (SD1, SDXL's first); this "
                             "model's is OpenCLIP (SD2), whose packed attention has no layers to adapt: set "
                             "train_text_encoder = false")
        for block_name, block in tower.transformer.named_modules():
            if isinstance(block, (CLIPAttention, CLIPMLP)):
                for name, layer in block.named_children():
                    if isinstance(layer, nn.Linear):
                        layers[layer_name(prefix, f"{block_name}.{name}")] = layer
    return layers


def kohya_metadata(rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0) -> dict[str, str]:
    """kohya's network metadata for a LoRA file (what A1111 and kohya's tools read)."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}
                                          if conv_rank else {})}


def save_kohya(tensors: dict[str, torch.Tensor], path, dtype: torch.dtype | None, metadata: dict[str, str]) -> None:
    """Write a kohya LoRA file atomically, every tensor but the `.alpha` scalars in `dtype` (None: as they are)."""
    state = {k: (v.to(dtype) if dtype is not None and not k.endswith(".alpha") else v).cpu().contiguous()
             for k, v in tensors.items()}
    save_state_dict(state, path, metadata=metadata)


class LoRANetwork(nn.Module):
    """Adapters attached to a model's layers through forward hooks, so the model's own modules and keys are untouched.

    `adapters` maps kohya names to LoRAModules; `remove()` detaches the hooks again.
    """

    def __init__(self, layers: dict[str, nn.Module], rank: int, alpha: float, conv_rank: int = 0,
                 conv_alpha: float = 1.0):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._hooks = []
        for name, layer in layers.items():
            is_3x3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
            adapter = LoRAModule(layer, conv_rank if is_3x3 else rank, conv_alpha if is_3x3 else alpha)
            self.adapters[name] = adapter
            self._hooks.append(layer.register_forward_hook(self._hook(adapter)))
        self.metadata = kohya_metadata(rank, alpha, conv_rank, conv_alpha)

    @staticmethod
    def _hook(adapter: LoRAModule):
        def add_update(layer, inputs, output):
            return output + adapter.delta(inputs[0]).to(output.dtype)
        return add_update

    def set_multiplier(self, weight: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = weight

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, adapter in self.adapters.items():
            state[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach()
            state[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach()
            state[f"{name}.alpha"] = adapter.alpha.detach()
        return state

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: every adapter's three tensors must be present with matching shapes, and nothing else."""
        expected = {f"{n}.{part}" for n in self.adapters for part in ("lora_down.weight", "lora_up.weight", "alpha")}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"LoRA file does not match this network: {len(missing)} missing key(s) "
                             f"{missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}")
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                for part, tensor in ((adapter.lora_down.weight, state[f"{name}.lora_down.weight"]),
                                     (adapter.lora_up.weight, state[f"{name}.lora_up.weight"]),
                                     (adapter.alpha, state[f"{name}.alpha"])):
                    if part.shape != tensor.shape:
                        raise ValueError(f"{name}: shape {list(tensor.shape)} in the file, "
                                         f"{list(part.shape)} in the network")
                    part.copy_(tensor)

    def save(self, path, dtype: torch.dtype | None = None, extra_metadata: dict | None = None,
             extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the kohya file; `extra_tensors` (e.g. bundled embeddings) are stored beside the adapters' tensors."""
        save_kohya({**self.kohya_state_dict(), **(extra_tensors or {})}, path, dtype,
                   {**self.metadata, **(extra_metadata or {})})


def apply_lora(model, path, weight: float = 1.0) -> LoRANetwork:
    """Attach the LoRA file at `path` to `model` with strength `weight` (what `<lora:name:weight>` does);
    returns the network, whose `remove()` detaches it. Ranks and targets are read off the file."""
    state = read_state_dict(path)
    names = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")})
    conv = any(state[f"{n}.lora_down.weight"].ndim == 4 and state[f"{n}.lora_down.weight"].shape[-1] > 1
               for n in names)
    text = any(not n.startswith(UNET_PREFIX) for n in names)
    available = target_layers(model, conv=conv, text_encoder=text)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} LoRA layer(s) are not in this model, e.g. {unknown[:3]}")
    network = LoRANetwork({}, 1, 1.0)
    network.metadata = read_metadata(path)
    for name in names:
        down = state[f"{name}.lora_down.weight"]
        adapter = LoRAModule(available[name], down.shape[0], float(state.get(f"{name}.alpha", down.shape[0])))
        adapter.to(dtype=available[name].weight.dtype)
        network.adapters[name] = adapter
        network._hooks.append(available[name].register_forward_hook(network._hook(adapter)))
    # kohya treats a missing alpha as alpha = rank (scale 1).
    state = {**{f"{n}.alpha": torch.tensor(float(state[f"{n}.lora_down.weight"].shape[0])) for n in names}, **state}
    network.load_kohya_state_dict(state)
    network.set_multiplier(weight)
    return network
