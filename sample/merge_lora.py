"""Merge LoRAs into a checkpoint for good: a model file whose weights are the base's with the LoRAs applied, as
kohya's `merge_lora` and A1111's SuperMerger write, for sharing one file or for fine-tuning on top of a LoRA.

    python -m sample.merge_lora BASE+LORA[:STRENGTH]... --out MERGED.safetensors [--precision fp16]

BASE is a checkpoint file or `default` (the embedded model); each LORA is a kohya file or the name of a built-in
LoRA (e.g. tiny-shapes-lcm), at STRENGTH (default 1) for the UNet and the text encoder alike — the model-spec syntax
of the judge and the metrics (`sample.models.parse_model_spec`). The weights are `load_model_spec`'s, i.e. exactly
those `<lora:NAME:STRENGTH>` gives a generation job (`sample.lora.applied`, same arithmetic), so the merged file
samples bitwise like the LoRA applied at run time in the same precision. The file is written atomically, with the
original key names and the base's metadata; its model name (infotext "Model:") lists the merged LoRAs.

A LoRA layer that matches nothing in the base, a file that is no LoRA, or an embedding named in the spec (an
embedding is a word, not a weight change: use it in prompts) stops the command with one line and exit status 2;
textual-inversion embeddings a LoRA bundles are not weights either, and the command says they were left out.
"""
import sys
from pathlib import Path

import torch

import ldm
from ldm.checkpoint import CheckpointError
from ldm.merge import OneLineArgumentParser

from .lora import LoraError, load_lora
from .models import load_model_spec, parse_model_spec

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def merge_loras(spec: str, out: str | Path, dtype: torch.dtype = torch.float16) -> list[str]:
    """Write the model `spec` (BASE+LORA[:STRENGTH]...) with its LoRAs merged to `out` (.safetensors, atomically,
    floating tensors in `dtype`); returns notes for the user (embeddings left out). Raises
    ValueError for a spec without a LoRA, with an embedding file, or whose LoRA does not fit the base."""
    parsed = parse_model_spec(spec)
    if not parsed.additions:
        raise ValueError(f"model spec {spec!r} names no LoRA to merge: give BASE+LORA[:STRENGTH]")
    # Merged in float32 (as `applied` merges in float32 whatever the weights' dtype), rounded once when written.
    loaded, database = load_model_spec(parsed, device="cpu", dtype=torch.float32)
    for path in parsed.files()[-len(parsed.additions):]:
        try:
            load_lora(path)
        except LoraError:  # load_model_spec read it, so it is an embedding
            raise ValueError(f"{path} is an embedding, not a weight change, and a checkpoint cannot hold it: leave "
                             "it out of the spec and use its word in prompts") from None
    ldm.save_model(loaded.model, out, dtype=dtype, name=loaded.name)
    bundled = sorted(database.embeddings) if database is not None else []
    return [f"the textual-inversion embedding(s) {', '.join(bundled)} bundled with the LoRA are words, not weights, "
            "and are not in the merged file: keep the LoRA file to use them"] if bundled else []


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m sample.merge_lora",
        description="Merge LoRAs into a checkpoint: write BASE with the LoRAs applied as a new model file.")
    parser.add_argument("spec", metavar="BASE+LORA[:STRENGTH]...",
                        help="a checkpoint file or 'default', then one or more LoRA files or built-in LoRA names "
                             "joined by '+', each at STRENGTH (default 1)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the merged model's file")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16",
                        help="precision of the written weights (default fp16, as A1111's 'Save as float16')")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        notes = merge_loras(args.spec, args.out, PRECISIONS[args.precision])
    except (CheckpointError, LoraError, OSError, ValueError) as error:  # OSError: a file missing or unwritable
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {args.spec} merged, {args.precision}, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
