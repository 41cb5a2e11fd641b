"""Fine-tuning and from-scratch training for the models of `ldm`.

    python -m train --config configs/lora.toml --max-steps 500      # every config key is also a --option
    python -m train.data filter --in laion.parquet --out en.parquet --min-size 512 --language en
    python -m train.plot outputs/run                                 # loss curve PNG

In Python: `train.train(train.TrainConfig(model="preset:tiny", data="imgs/", output="out/", ...))`.
Methods: full, lora (+ LoCon), dreambooth, textual-inversion, vae, one class each in train.methods. See train.trainer
for the loop, train.resume for checkpoint folders and exact resume, train.data for sources and hygiene,
train.buckets for buckets, crops and captions, train.lora / train.embedding for the file formats.
"""
from .config import ConfigError, TrainConfig, config_from_dict

# The rest is imported on first use, so that `python -m train.data` / `train.plot` do not find their own module
# already imported by this package (runpy warns about that) and `import train` stays light.
_LAZY = {"train": "trainer", "TrainResult": "trainer", "TrainingError": "trainer", "apply_lora": "lora",
         "LoRANetwork": "lora", "load_embedding": "embedding", "TextualInversion": "embedding"}

__all__ = ["TrainConfig", "ConfigError", "config_from_dict", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
