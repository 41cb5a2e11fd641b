"""Training methods, chosen once from `METHODS` by `config.method`.

Each is a small `Method` subclass (train.methods.base) filling the same hooks: which weights train
(`set_trainable`), the loss (`objective`), the optimizer's groups and weight decay (`param_groups`), the file written
and read back (`file_name`, `save`, `load`), the model (`build_model`), how one optimizer step's micro-batches become
gradients (`accumulate`), and the checks of its settings and data (`check_config`, `check_items`,
`prepare_items`, `empty_captions`). A new method is one new file here plus one entry in the table.
"""
from .base import Method
from .clip import ContrastivePretraining
from .controlnet import ControlNet
from .full import DreamBooth, FullFineTune
from .lcm import LatentConsistency
from .lora import LoRA
from .textual_inversion import TextualInversion
from .vae import VAE

METHODS: dict[str, type[Method]] = {
    "full": FullFineTune,
    "lora": LoRA,
    "dreambooth": DreamBooth,
    "textual-inversion": TextualInversion,
    "vae": VAE,
    "controlnet": ControlNet,
    "lcm": LatentConsistency,
    "clip": ContrastivePretraining,
}


def method_class(name: str) -> type[Method]:
    """The class of method `name`; ConfigError listing the known ones otherwise."""
    from ..config import ConfigError
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]
