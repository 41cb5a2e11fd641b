"""Compiled inference: the UNet and the VAE decoder through torch.compile, for `generate(..., compile=True)`.

What is compiled: the UNet's forward (every sampling step calls it) and the VAE's `_decode` (the untiled decode; tiled
decoding calls it per tile). At each new input shape a function first runs once eagerly (kernels/dispatch.py says why),
then compiles. The text encoders run once per job and stay eager. The compiled functions are cached on
the model (one torch.compile per model, device and mode), so a second job at the same shapes starts with compiled code.

Shapes: torch.compile specialises on the first shapes it sees and, when a second batch size arrives, recompiles once
with the batch dimension dynamic ("automatic dynamic shapes"), so a server that sees many batch sizes compiles each
function about twice; image sizes are kept static (each new size compiles once; CompiledFunction.__call__ says why).
On CUDA the default mode is "reduce-overhead": CUDA graphs replay the whole UNet call as one launch, which needs
fixed shapes, so there each new shape is compiled and captured.
Recompiles are never silent: every call with input shapes a cached function has not seen yet is logged by this module's
logger ("sample.compiled", INFO for the first shape, WARNING for each further one, listed in `CompiledFunction.shapes`),
and torch's own recompile log (torch._logging "recompiles", the guard that failed) is switched on with it unless
TORCH_LOGS chooses the logs.

The Triton kernels are torch.library custom ops (kernels/flash_attention.py etc.), so torch.compile traces through
kernels.dispatch: on the CPU the dispatch picks the PyTorch path, which inductor compiles; on CUDA each kernel is one
opaque node in the graph.

Interrupts: generate()'s interrupt_check normally runs before every UNet layer; hooks inside a compiled graph would break
it apart at every layer, so with compile it runs before every UNet call instead (an interrupt lands between calls).
"""
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

logger = logging.getLogger(__name__)


def default_mode(device: torch.device) -> str:
    """"reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere (CUDA graphs do not exist there)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def _signature(args: tuple, kwargs: dict) -> tuple:
    """The shapes and dtypes of the tensor arguments: what makes torch.compile specialise or recompile."""
    values = [*args, *(kwargs[name] for name in sorted(kwargs))]
    return tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in values)


@dataclass
class CompiledFunction:
    """One compiled function and the input shapes it has been called with (each new one may compile: logged)."""
    name: str
    eager: Callable
    function: Callable
    cuda_graphs: bool
    shapes: list[tuple] = field(default_factory=list)

    def __call__(self, *args, **kwargs):
        signature = _signature(args, kwargs)
        if signature not in self.shapes:
            self.shapes.append(signature)
            sizes = ", ".join(str(list(entry[0])) for entry in signature if entry is not None)
            if len(self.shapes) == 1:
                logger.info("compiling the %s for inputs %s", self.name, sizes)
            else:
                logger.warning("new input shapes for the compiled %s: %s (shape %d it has seen): a recompile "
                               "unless an earlier one made these sizes dynamic (torch's recompile log says which)",
                               self.name, sizes, len(self.shapes))
            # One eager call first: it imports the kernel modules and runs their self-checks on real data, which
            # tracing cannot do without breaking the graph (kernels/dispatch.py).
            self.eager(*args, **kwargs)
        for value in args:
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                # Image sizes stay static (one compile per size): with the latent's height and width dynamic, torch
                # 2.13's inductor fails to lower the UNet's 1x1 convolutions after the downsampling (ValueRangeError
                # "Invalid ranges [0:-1]", met by hires fix's second size). Batch sizes may still become dynamic.
                torch._dynamo.mark_static(value, 2)
                torch._dynamo.mark_static(value, 3)
        if not self.cuda_graphs:
            return self.function(*args, **kwargs)
        # Every call is a new CUDA-graph step whose replay overwrites the previous output buffer; the samplers keep
        # earlier outputs (multistep methods), so each output is copied out of the graph's memory.
        torch.compiler.cudagraph_mark_step_begin()
        return self.function(*args, **kwargs).clone()


@dataclass
class CompiledForwards:
    """The compiled UNet forward and VAE decode of one model, for one device and mode."""
    mode: str
    unet: CompiledFunction
    decode: CompiledFunction


def compiled_forwards(model: nn.Module, mode: str | None = None) -> CompiledForwards:
    """The model's compiled UNet and VAE decode for `mode` (None: default_mode), compiled lazily at their first call
    and cached on the model. model: a LatentDiffusion."""
    mode = default_mode(model.device) if mode is None else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    cache = model.__dict__.setdefault("_compiled_forwards", {})
    key = (str(model.device), mode)
    if key not in cache:
        if "TORCH_LOGS" not in os.environ:  # set_logs replaces every log setting: respect the user's own
            torch._logging.set_logs(recompiles=True)
        # CUDA graphs need fixed shapes; elsewhere let a second shape make the changed sizes dynamic.
        cuda_graphs = mode == "reduce-overhead" and model.device.type == "cuda"
        dynamic = False if cuda_graphs else None
        # The bound methods of the originals, so the cache keeps compiling the class's code even while the
        # instance attributes are swapped in by compiled().
        unet_forward, vae_decode = type(model.unet).forward.__get__(model.unet), \
            type(model.vae)._decode.__get__(model.vae)
        cache[key] = CompiledForwards(
            mode,
            CompiledFunction("UNet", unet_forward, torch.compile(unet_forward, mode=mode, dynamic=dynamic),
                             cuda_graphs),
            CompiledFunction("VAE decoder", vae_decode, torch.compile(vae_decode, mode=mode, dynamic=dynamic),
                             cuda_graphs))
    return cache[key]


@contextlib.contextmanager
def compiled(model: nn.Module, mode: str | None = None,
             before_unet_call: Callable[[], None] | None = None) -> Iterator[CompiledForwards]:
    """Within the block, the model's UNet forward and VAE decode are the compiled ones (instance attributes, so the
    module tree and state_dict are untouched); before_unet_call() runs before every UNet call."""
    forwards = compiled_forwards(model, mode)
    unet, vae = model.unet, model.vae

    def unet_forward(*args, **kwargs):
        if before_unet_call is not None:
            before_unet_call()
        return forwards.unet(*args, **kwargs)

    unet.forward, vae._decode = unet_forward, forwards.decode
    try:
        yield forwards
    finally:
        del unet.forward, vae._decode
