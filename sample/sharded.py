"""Many prompts as one job list, shared out over the processes of a torchrun launch (or run by one process).

A prompt file (one prompt a line; blank lines and `#` comments skipped) becomes jobs: job k is `params` with line k's
prompt and seed `seed + k · images_per_job`, so every image of the file has its own seed, as A1111's "prompts from
file" gives them with "Iterate seed every line". Image i of job k is the file's image number
`first_number + k · images_per_job + i`, named `NNNNN-SEED-prompt.png` like any txt2img image.

Rank r of N runs jobs r, r + N, r + 2N, ... (whole jobs, so each batch holds the same images as in one process).
Seeds and numbers depend only on k, and a random seed (-1) is drawn once by rank 0 and shared: the union of the
ranks' files is byte for byte what one process writes (on the CPU; GPU kernels may differ between devices).
"""
import os
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.distributed as dist

from .params import GenerationParams
from .rng import fixed_seed


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a prompt file, in order."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"the prompt file {path} holds no prompt (one per line; # starts a comment)")
    return prompts


def images_per_job(params: GenerationParams) -> int:
    return params.batch_count * params.batch_size


def prompt_jobs(prompts: list[str], params: GenerationParams) -> list[GenerationParams]:
    """Job k: line k's prompt, seed params.seed + k · images_per_job (params.seed must be fixed, not -1)."""
    step = images_per_job(params)
    return [replace(params, prompt=prompt, seed=params.seed + k * step) for k, prompt in enumerate(prompts)]


def rank_jobs(jobs: list, rank: int, world_size: int) -> list[tuple[int, object]]:
    """(k, job) of the jobs rank `rank` of `world_size` runs."""
    return [(k, jobs[k]) for k in range(rank, len(jobs), world_size)]


class Collectives:
    """Object collectives over the default process group of `self.size` processes; each is the identity for one
    process. Shared by Ranks here and by the trainer's train.distributed.World."""
    size: int

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


class Ranks(Collectives):
    """This process's place in a torchrun launch (WORLD_SIZE, RANK; one process without them). Joins (or starts,
    with gloo on the CPU and nccl on a GPU) the default process group."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.started = 0, False
        if self.size > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.started = True
            self.rank = dist.get_rank()

    def close(self) -> None:
        """Leave the process group if this object started it."""
        if self.started:
            dist.destroy_process_group()
            self.started = False



def shared_seeds(params: GenerationParams, ranks: Ranks) -> GenerationParams:
    """params with seed and subseed fixed: drawn by rank 0 when -1, the same on every rank."""
    seeds = ranks.broadcast((fixed_seed(params.seed), fixed_seed(params.subseed)))
    return replace(params, seed=seeds[0], subseed=seeds[1])


def sharded_jobs(prompts: list[str], params: GenerationParams, ranks: Ranks) -> Iterator[tuple[int, GenerationParams]]:
    """This rank's (k, job) of the prompts (see the module docstring)."""
    return iter(rank_jobs(prompt_jobs(prompts, shared_seeds(params, ranks)), ranks.rank, ranks.size))
