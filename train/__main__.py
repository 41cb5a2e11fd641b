"""python -m train --config configs/<name>.toml [--key value ...]: run a training (see train.config for the keys).

Exit status: 0 done; 2 usage or configuration error; 1 training, data or file error (e.g. NaN loss, no usable
images, an unreadable checkpoint); 130 / 143 stopped by SIGINT / SIGTERM after saving a resumable checkpoint
(continue with --resume latest).
"""
import logging
import sys

from sample.cli import ArgumentParser

from .config import ConfigError, add_arguments, config_from_args


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m train", description="Train or fine-tune a Stable Diffusion "
                                     "model (full, lora, dreambooth, textual-inversion, vae).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        parser.exit(2, f"python -m train: error: {e}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .trainer import TrainingError, train
    try:
        result = train(config)
    except ConfigError as e:
        parser.exit(2, f"python -m train: error: {e}\n")
    except (TrainingError, ValueError, OSError) as e:
        # Data and file problems (no usable images, a missing checkpoint, a damaged file) end with their message.
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 1
    print(f"data: {result.data_report}", file=sys.stderr)
    if result.skipped_nan_steps:
        print(f"skipped {result.skipped_nan_steps} step(s) with a NaN/inf loss", file=sys.stderr)
    if result.interrupted:
        print(f"stopped by {result.interrupted} at step {result.step}; checkpoint saved to {result.checkpoint} "
              "(continue with --resume latest)", file=sys.stderr)
        return 130 if result.interrupted == "SIGINT" else 143
    print(f"step {result.step}: wrote {result.weights} and {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
