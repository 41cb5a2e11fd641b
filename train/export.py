"""python -m train.export CHECKPOINT_DIR [--out FILE]: write the file the run's method writes — a whole model
`.safetensors` with the original keys (full, dreambooth, lcm full) or the LoRA file in kohya's format — from a
training checkpoint, in one process, without torchrun: a sharded (DCP) checkpoint is consolidated; an ordinary one,
whose weights file holds the trained values, is written with its EMA values (what the run's final file holds), e.g.
to sample a consistency model at a mid-run step.

How: the checkpoint's state.json holds the run's configuration, so the model and the method are built as the trainer
built them (on CPU, frozen weights from `model`), the trained weights and the EMA values are read into them with
`torch.distributed.checkpoint.load` in no-process-group mode (it reads every rank's shards and stitches them), and the
method's own `save` writes the file. So the format conversion stays in the one place the trainer uses; DCP's
`dcp_to_torch_save` would give a torch.save file of objective-level names, still to be converted, and a pickle.
Like the run's final file, the export holds the EMA values when the run kept an EMA, in `save_precision`.

Exit status: 0 written; 2 the folder is not a complete checkpoint, an ordinary one has no EMA (its weights file is
already the export), or its base model is missing.
"""
import sys
from pathlib import Path

import torch

from sample.cli import ArgumentParser, report_user_error
from . import resume
from .config import ConfigError, config_from_dict

# The trainer's checkpoint index written by DCP (rank 0) last: its presence means the shards are complete.
DCP_METADATA = ".metadata"


class ExportError(ValueError):
    """The folder cannot be consolidated; the message says what was found and what to give instead."""


def consolidate(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the method's file from the checkpoint `folder` to `out` (default: the method's file name inside a
    sharded `folder`, "ema-" + that name inside an ordinary one); returns the path written."""
    from ldm.checkpoint import read_state_dict

    from .distributed import ShardedCheckpointError, read_sharded
    from .ema import EMA
    from .embedding import Conditioner
    from .methods import method_class
    from .trainer import DTYPES, build_model

    folder = Path(folder)
    try:
        state = resume.load_json(folder / "state.json")
    except FileNotFoundError:
        raise ExportError(f"{folder} has no state.json: give a checkpoint-<step> folder of a training run") from None
    sharded = (folder / DCP_METADATA).is_file()
    # The objective is built only for its trained parameters' names; a reward (method lcm, a plain attribute outside
    # them) is never evaluated here, so its file need not exist where the export runs.
    config = config_from_dict({**state["config"], "device": "cpu", "resume": "", "lcm_reward": ""})
    if not sharded and not config.ema_decay:
        raise ExportError(f"{folder} is an ordinary checkpoint of a run without EMA (ema_decay = 0): its weights "
                          "file is already the export")
    try:
        model = build_model(config, torch.device("cpu"))
    except FileNotFoundError as error:
        raise ExportError(f"the run's base model is needed for the frozen weights: {error}") from None
    method = method_class(config.method)(config, model)
    objective = method.objective(Conditioner(model, method.embedding))
    trained = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    ema = EMA(trained, config.ema_decay).shadow if config.ema_decay else None
    if sharded:
        try:
            read_sharded(folder, objective, ema)
        except ShardedCheckpointError as error:
            raise ExportError(str(error)) from None
    else:  # the files the trainer's resume reads
        missing = [name for name in (method.file_name(), resume.EMA_FILE) if not (folder / name).is_file()]
        if missing:
            raise ExportError(f"{folder} is not a complete checkpoint: {', '.join(missing)} missing (and no "
                              f"{DCP_METADATA} of a sharded one)")
        method.load(folder / method.file_name())
        shadow = read_state_dict(folder / resume.EMA_FILE)
        if shadow.keys() != ema.keys():
            raise ExportError(f"{folder / resume.EMA_FILE} does not hold the EMA of this run's trained weights")
        ema = shadow
    out = Path(out) if out else folder / (method.file_name() if sharded else f"ema-{method.file_name()}")
    method.save(out, state["step"], ema, DTYPES.get(config.save_precision))
    return out


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m train.export", description="Write a training checkpoint's weights "
                                     "file: a sharded (FSDP / DCP) one consolidated, an ordinary one with its EMA "
                                     "values.")
    parser.add_argument("checkpoint", help="a checkpoint-<step> folder of a training run")
    parser.add_argument("--out", default="", help="the file to write (default: in the checkpoint folder, the "
                                                  "method's file name, e.g. model.safetensors, for a sharded one, "
                                                  "ema-<that name> for an ordinary one)")
    args = parser.parse_args(argv)
    try:
        path = consolidate(args.checkpoint, args.out or None)
    except (ExportError, ConfigError) as error:
        return report_user_error(parser.prog, error)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
