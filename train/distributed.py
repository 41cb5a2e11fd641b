"""The process group of a training run: one process, or one per GPU under torchrun (which sets WORLD_SIZE, RANK and
LOCAL_RANK). `World` hides the difference: every collective is the identity when there is one process.

`shard` applies FSDP2 (`torch.distributed.fsdp.fully_shard`) to a training objective for `distributed = "fsdp"`;
`save_sharded` / `load_sharded` write and read its checkpoints with torch.distributed.checkpoint (DCP);
`gradient_sync` is gradient accumulation's "reduce only on the last micro-batch" for DDP and FSDP alike."""
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from sample.sharded import Collectives

FSDP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class World(Collectives):
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.size

    def any(self, flag: bool) -> bool:
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def init_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, world: World) -> torch.device:
    """The device of this process: `requested` ("auto", "cpu", "cuda", "cuda:N"); a bare "cuda" or "auto" with a GPU
    means the GPU of this process's local rank."""
    if requested == "auto":
        return torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{world.local_rank}")
    return device


# Module classes sharded as FSDP units of their own inside the blocks, for finer sharding (a large replaced UNet layer,
# see README "Extending it without editing it"): `train.distributed.FSDP_UNIT_CLASSES.add(MyLayer)`.
FSDP_UNIT_CLASSES: set[type] = set()


def fsdp_units(model, text_trained: bool) -> list[nn.Module]:
    """The modules FSDP gathers one at a time, innermost first (fully_shard goes bottom-up): instances of
    FSDP_UNIT_CLASSES, each trained text tower's transformer blocks, then the UNet's input_blocks[i], middle_block and
    output_blocks[i] (TimestepEmbedSequential, the blocks gradient_checkpointing recomputes). Only one unit's full
    parameters exist at a time (plus the one prefetched)."""
    from sample.conditioning import text_towers
    units = [module for module in model.modules() if type(module) in FSDP_UNIT_CLASSES]
    if text_trained:
        for tower in text_towers(model):
            # A tower's one ModuleList is its stack of blocks (encoder.layers / transformer.resblocks).
            units += [block for module in tower.modules() if isinstance(module, nn.ModuleList) for block in module]
    unet = model.unet
    return units + [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def shard(objective: nn.Module, model, text_trained: bool, param_dtype: str, reduce_dtype: str,
          cpu_offload: bool) -> None:
    """FSDP2 in place: `fully_shard` on every unit of `fsdp_units`, then on the objective (the root, which takes the
    rest of the UNet — time embedding, `out`, frozen or not, so that mixed precision casts it with the blocks — the
    text embeddings of a trained tower and a LoRA network). The autoencoder and frozen text towers stay whole on every
    rank (ignored_params): the autoencoder is used outside the objective's forward (latent encoding), and neither has
    a gradient or optimizer state to shard."""
    # Trained weights initialised by each rank's own generator (a LoRA network's down projections) would otherwise
    # make every shard come from another initialisation; DDP broadcasts rank 0's at construction for the same reason.
    with torch.no_grad():
        for p in objective.parameters():
            if p.requires_grad:
                dist.broadcast(p, src=0)
    policy = MixedPrecisionPolicy(param_dtype=FSDP_DTYPES[param_dtype], reduce_dtype=FSDP_DTYPES[reduce_dtype])
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for unit in fsdp_units(model, text_trained):
        fully_shard(unit, mp_policy=policy, offload_policy=offload)
    sharded = {id(p) for p in model.unet.parameters()}
    ignored = {p for p in objective.parameters() if not p.requires_grad and id(p) not in sharded}
    # The root is used once per step: keeping its parameters gathered after forward saves an all-gather.
    fully_shard(objective, mp_policy=policy, offload_policy=offload, ignored_params=ignored,
                reshard_after_forward=False)


@contextmanager
def gradient_sync(module: nn.Module, sync: bool):
    """Run a micro-batch's forward and backward with gradients reduced across ranks only when `sync` (the last
    micro-batch of an accumulation); the others accumulate locally (DDP's no_sync, FSDP's
    set_requires_gradient_sync)."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield


# Only trained weights go into a sharded checkpoint; the frozen ones are the base model's (config.model).
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
# Loading them leaves the frozen weights as they are (not strict); DCP itself fails on a trained key it lacks.
INTO_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def _sharded_state(objective: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> dict:
    """{"model": trained weights, "optimizer": AdamW state keyed by parameter name, "ema"?: EMA values}: DTensors
    (each rank's shards) under FSDP, plain tensors in one process. Keys are parameter names, never positions, so the
    same checkpoint loads at any world size, DCP re-cutting the shards."""
    model, optim = get_state_dict(objective, optimizer, options=TRAINED_ONLY)
    state = {"model": model, "optimizer": optim}
    if ema is not None:
        state["ema"] = ema
    return state


@contextmanager
def _one_process_is_intended():
    """DCP warns on every save and load without a process group that it assumes one process: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(folder, objective: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> None:
    """Collective: every rank writes its own shards into `folder` (`__<rank>_0.distcp`, fsync'ed), rank 0 the
    `.metadata` index; no rank gathers the whole model or optimizer state."""
    with _one_process_is_intended():
        dcp.save(_sharded_state(objective, optimizer, ema), checkpoint_id=folder, no_dist=not dist.is_initialized())


def load_sharded(folder, objective: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> None:
    """Collective: read a `save_sharded` checkpoint into the trained weights, the optimizer and the EMA values (in
    place), at this run's sharding (any world size)."""
    state = _sharded_state(objective, optimizer, ema)
    _read(state, folder, no_dist=not dist.is_initialized())
    set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=INTO_TRAINED)


def read_sharded(folder, objective: nn.Module, ema: dict | None) -> None:
    """This process alone (no collective, whether or not a process group exists): read the trained weights and the
    EMA values of a `save_sharded` checkpoint, every rank's shards, into an unsharded `objective` and `ema`."""
    state = {"model": {name: p.detach() for name, p in objective.named_parameters() if p.requires_grad}}
    if ema is not None:
        state["ema"] = ema
    # In place: the detached tensors share the parameters' storage.
    _read(state, folder, no_dist=True)


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint folder cannot be read into this run; the message names the folder."""


def _read(state: dict, folder, no_dist: bool) -> None:
    try:
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=folder, no_dist=no_dist)
    except (CheckpointException, OSError, RuntimeError, ValueError, KeyError) as error:
        # DCP's own message is a per-rank traceback dump: name the folder and the kind of failure instead.
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ShardedCheckpointError(f"{folder} cannot be read as this run's sharded checkpoint ({type(error).__name__}"
                                     f"{': ' + first if first else ''}): it is incomplete, damaged or from another "
                                     "model or method; resume from an older checkpoint-<step> folder") from None
