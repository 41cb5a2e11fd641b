"""Resumable training checkpoints: atomic folders `checkpoint-<step>/` and the random state of every generator.

A checkpoint is written into a temporary sibling folder, each file fsync'ed, then renamed into place, and the parent
folder fsync'ed: a reader sees the complete folder or none. Older checkpoints are deleted only after the new one is in
place, so a process killed at any moment leaves at least the previous complete checkpoint. Left-over temporary folders
(`.checkpoint-*.tmp`) are never read and are cleaned up by the next run.

A damaged or hostile `optimizer.pt` / `rng.pt` is refused with one line naming the file (`apply_state_file`): torch's
restricted unpickler runs no code from it, and its advice to retry with weights_only=False is never passed on.

Contents: the method's weights file (model.safetensors, the LoRA or the embedding, each in its usual format, so a
checkpoint is directly usable), `ema.safetensors`, `optimizer.pt` (torch.save of the optimizer's state dict, read back
with weights_only=True), `rng.pt` (torch CPU/CUDA, the training noise generator, numpy and Python `random` states,
per rank) and `state.json` (step, data position, counters, the configuration). With distributed = "fsdp" the weights,
EMA and optimizer files are replaced by torch.distributed.checkpoint's `.metadata` and `__<rank>_0.distcp` (written
by every rank, see train.distributed.save_sharded; `python -m train.export` consolidates them).
"""
import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ldm.checkpoint import CheckpointError, read_torch_data

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The EMA values of the trained weights in a (non-sharded) checkpoint folder, keyed like the objective's parameters.
EMA_FILE = "ema.safetensors"


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output`, oldest first."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output: str | os.PathLike) -> Path | None:
    """The folder to resume from: "" -> None; "latest" -> the newest checkpoint in output (None if there is none)."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{resume} is not a complete checkpoint folder (no state.json); give a "
                                "checkpoint-<step> folder or 'latest'")
    return path


def remove_stale_temporaries(output: str | os.PathLike) -> None:
    for path in Path(output).glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def write_checkpoint(output: str | os.PathLike, step: int, write_files, keep: int) -> Path:
    """Create `output/checkpoint-<step>` atomically; `write_files(folder)` writes the contents into a temporary
    folder. Keeps the newest `keep` checkpoints, deleting older ones only once the new one is complete."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    final = output / f"checkpoint-{step}"
    temporary = output / f".checkpoint-{step}-{secrets.token_hex(4)}.tmp"
    temporary.mkdir()
    try:
        write_files(temporary)
        for file in temporary.iterdir():
            fsync_path(file)
        fsync_path(temporary)
        if final.exists():
            # Re-saving the same step (e.g. a signal right after a scheduled save): move the old one aside first;
            # a kill between these renames leaves the new complete folder under its temporary name, never a mix.
            retired = output / f".checkpoint-{step}-{secrets.token_hex(4)}.old.tmp"
            os.rename(final, retired)
            os.rename(temporary, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(temporary, final)
        fsync_path(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def capture_rng(noise_generator: torch.Generator) -> dict:
    """Every random state this process's training draws from."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


def load_json(path: Path):
    return json.loads(Path(path).read_text())


class ResumeError(ValueError):
    """A checkpoint folder's file cannot be read or does not fit this run; the message names the file."""


def apply_state_file(path: Path, apply: Callable[[object], None]) -> None:
    """Read `path` (a torch.save file of tensors, numbers and containers) with torch's weights-only unpickler and
    hand its contents to `apply`; any failure of either is a ResumeError naming the file."""
    advice = "resume from an older checkpoint-<step> folder, or start without --resume"
    try:
        # The checkpoint reader's barriers: static pickle scan, restricted unpickler, tensor views within storage.
        contents = read_torch_data(path)
    except FileNotFoundError:
        raise ResumeError(f"{path} is missing: the checkpoint folder is incomplete; {advice}") from None
    except CheckpointError as error:
        raise ResumeError(f"{error}: it is damaged or was not written by this trainer; {advice}") from None
    try:
        apply(contents)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise ResumeError(f"{path} does not hold the state this run saves ({type(error).__name__}: {error}); "
                          f"{advice}") from None
