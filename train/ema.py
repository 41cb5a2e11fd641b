"""Exponential moving average of the trained weights, and swapping its values into a module to save them."""
import torch


class EMA:
    """Exponential moving average of the trainable parameters, with LitEma's warmup of the decay:
    decay_n = min(decay, (1 + n) / (10 + n)) for the n-th update."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in named_params}

    @torch.no_grad()
    def update(self, named_params) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in named_params:
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.updates += 1


class swapped:
    """Temporarily copy `values` (objective-level names with `prefix`) into the module's parameters that have one
    (the trained ones); the others are left alone. `values` None swaps nothing."""

    def __init__(self, module: torch.nn.Module, values: dict[str, torch.Tensor] | None, prefix: str):
        self.module, self.values, self.prefix, self.saved = module, values, prefix, {}

    def __enter__(self):
        if self.values:
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    if self.prefix + name in self.values:
                        self.saved[name] = p.detach().clone()
                        p.copy_(self.values[self.prefix + name])

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if name in self.saved:
                    p.copy_(self.saved[name])
