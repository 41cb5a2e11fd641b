"""ControlNet (Zhang et al. 2023): a trainable copy of the frozen model's UNet encoder reads a control image and adds
zero-initialised residuals to the UNet (ldm.controlnet). The original recipe: the ControlNet starts from the UNet's
encoder with its zero convolutions at zero (`from_unet`), the base model is frozen (`sd_locked`; unlocked, the UNet's
decoder trains too), and captions are dropped to "" with `caption_dropout` (the paper drops 50% so the ControlNet
learns to read the control image without the prompt). `controlnet_init` starts from a trained ControlNet file
instead (fine-tuning it on another control map). Control images come from each image's `conditioning_column`
file (imagefolder), each shard sample's `<key>.<conditioning_field>` member (webdataset shards, LAION-joined
ones included), or from `conditioning_function` (train.conditioning)."""
from pathlib import Path

import torch

import ldm
from ldm.checkpoint import read_state_dict
from ldm.controlnet import PREFIX, from_unet, load_controlnet, save_controlnet
from ..conditioning import CONDITIONING_FUNCTIONS
from ..config import ConfigError
from ..ema import swapped
from ..objective import ControlNetObjective
from .base import Method, mismatched_tensors, need


class ControlNet(Method):
    @classmethod
    def check_config(cls, config) -> None:
        need(not config.cache_latents, "method 'controlnet' loads each control image with its image, cropped and "
             "flipped alike, so it cannot use cache_latents; turn it off")
        need(not config.train_text_encoder, "method 'controlnet' trains the ControlNet (and, with sd_locked = false, "
             "the UNet's decoder), never the text encoder; turn train_text_encoder off")
        need(not config.conditioning_function or config.conditioning_function in CONDITIONING_FUNCTIONS,
             f"conditioning_function={config.conditioning_function!r} is not one of "
             f"{', '.join(CONDITIONING_FUNCTIONS)} (train.conditioning.CONDITIONING_FUNCTIONS)")

    def check_items(self, items: list) -> None:
        if self.config.conditioning_function:
            return
        without = [item for item in items if not item.conditioning]
        if not without:
            return
        field, column = self.config.conditioning_field, self.config.conditioning_column
        if any(item.member is not None for item in without):  # shard samples
            source = (f"each webdataset sample needs a member <key>.{field} (conditioning_field = {field!r}; set it "
                      "to the field your shards use)")
        else:
            source = (f"give an imagefolder whose metadata has a '{column}' column (conditioning_column), webdataset "
                      "shards with a control image member per sample (conditioning_field)")
        raise ConfigError(f"{len(without)} of {len(items)} training images have no control image (e.g. "
                          f"{', '.join(item.key for item in without[:3])}): {source}, or set conditioning_function")

    def data_options(self) -> dict:
        name = self.config.conditioning_function
        return {"hint_function": CONDITIONING_FUNCTIONS[name]} if name else {"hint_files": True}

    def model_inputs(self, batch: dict, device: torch.device) -> dict:
        return {"hint": batch["hint"].to(device, self.model.dtype)}

    def set_trainable(self) -> None:
        self.controlnet = from_unet(self.model)
        if self.config.controlnet_init:
            # load_controlnet reads the file's architecture off its tensors (strict, listing missing/unexpected
            # keys); it must also be the architecture of this base model's encoder copy.
            initial = load_controlnet(self.config.controlnet_init, dtype=torch.float32).state_dict()
            expected = self.controlnet.state_dict()
            mismatched = mismatched_tensors(expected, initial)
            need(not mismatched,
                 f"controlnet_init={self.config.controlnet_init!r} is a ControlNet of another architecture than "
                 f"this model's UNet ({len(mismatched)} missing, extra or mis-shaped tensor(s), e.g. "
                 f"{', '.join(mismatched[:3])}): give a ControlNet trained for {self.config.model!r}")
            self.controlnet.load_state_dict(initial, strict=True)
        self.controlnet.gradient_checkpointing = self.config.gradient_checkpointing
        if not self.config.sd_locked:
            self.model.unet.output_blocks.requires_grad_(True)
            self.model.unet.out.requires_grad_(True)

    @property
    def extra(self) -> torch.nn.Module:
        return self.controlnet

    def objective(self, conditioner) -> torch.nn.Module:
        return ControlNetObjective(self.model, conditioner, self.controlnet, self.config.min_snr_gamma)

    def file_name(self) -> str:
        return "controlnet.safetensors"

    def _model_file(self, path: Path) -> Path:
        # With sd_locked = false the trained UNet decoder lives in the whole model, saved beside the ControlNet.
        return path.with_name(path.stem + "-model.safetensors")

    def save(self, path: Path, step: int, ema_values: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> None:
        # The objective holds the ControlNet as `extra` and the LatentDiffusion as `model`.
        with swapped(self.controlnet, ema_values, prefix="extra."):
            save_controlnet(self.controlnet, path, dtype)
        if not self.config.sd_locked:
            with swapped(self.model, ema_values, prefix="model."):
                ldm.save_model(self.model, self._model_file(path), dtype=dtype, name=self.config.run_name())

    def load(self, path: Path) -> None:
        state_dict = read_state_dict(path)
        self.controlnet.load_state_dict({key[len(PREFIX):]: value for key, value in state_dict.items()}, strict=True)
        if not self.config.sd_locked:
            self.model.load_state_dict(read_state_dict(self._model_file(path)), strict=True)
