"""What `python -m sample.txt2img` and `python -m sample.img2img` share: arguments, model loading, saving, errors."""
import argparse
import json
import os
import sys
import tempfile
import warnings
import zipfile
from dataclasses import replace

import torch

from ldm.checkpoint import CheckpointError
from ldm.files import atomic_write
from samplers import SAMPLERS, SCHEDULERS

from .compiled import COMPILE_MODES
from .conditioning import text_towers
from .controlnet.units import UnitError, unit_from_option
from .embeddings import EmbeddingDatabase, EmbeddingError
from .generate import GenerationError, GenerationWarning, Result, generate
from .images import ImageError, filename_part, image_grid, next_sequence_number, save_png
from .infotext import clean_text
from .lora import LoraError
from .models import PRESETS, default_model, generation_dtype, load_checkpoint
from .params import GenerationParams, ParamsError, hires_upscalers
from .prompts import PromptError
from .rng import RNG_SOURCES
from .scripts import ScriptError, run_script
from .sharded import Ranks, images_per_job, read_prompt_file, sharded_jobs
from .styles import load_styles


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


# The one list of the errors that mean "the user asked for something that cannot be done" in the sample commands:
# each message says what to change, so the command prints it as one line and exits with status 2 (no traceback).
USER_ERRORS = (UsageError, ParamsError, PromptError, FileNotFoundError, ImageError, CheckpointError, LoraError,
               EmbeddingError, ScriptError)


def report_user_error(prog: str, error: Exception) -> int:
    """Print a USER_ERRORS error as `prog: error: message` on stderr, on one line (torch's messages span several);
    returns the exit status, 2."""
    message = str(error.args[0] if error.args else error)
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (`prog: error: ...`) instead of the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def size_pair(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 512x512; got {text!r}") from None
    return width, height


def controlnet_unit(text: str):
    try:
        return unit_from_option(text)
    except UnitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# --precision: the weights' dtype (auto: half on a GPU, full on the CPU, as A1111's defaults).
PRECISIONS = {"auto": None, "full": torch.float32, "half": torch.float16, "bf16": torch.bfloat16}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The controls both tabs of A1111 have, with its labels in the help."""
    add = parser.add_argument
    add("--negative-prompt", default="", help="Negative prompt")
    add("--styles", default="", help="Styles: comma-separated names from --styles-file")
    add("--styles-file", help="A1111 styles.csv (name, prompt, negative_prompt)")
    add("--sampler", default="Euler a", help=f"Sampling method, one of: {', '.join(SAMPLERS)}")
    add("--scheduler", default="Automatic", help=f"Schedule type, one of: {', '.join(SCHEDULERS)}")
    add("--steps", type=int, default=20, help="Sampling steps (default 20)")
    add("--cfg-scale", type=float, default=7.0, help="CFG Scale (default 7)")
    add("--width", type=int, help="Width in pixels, a multiple of 8 (default: the model's resolution)")
    add("--height", type=int, help="Height in pixels, a multiple of 8 (default: the model's resolution)")
    add("--batch-count", type=int, default=1, help="Batch count: batches run one after the other")
    add("--batch-size", type=int, default=1, help="Batch size: images generated together")
    add("--seed", type=int, default=-1, help="Seed (-1: random); image i of the job uses seed + i")
    add("--subseed", type=int, default=-1, help="Variation seed (-1: random)")
    add("--subseed-strength", type=float, default=0.0, help="Variation strength, 0..1")
    add("--seed-resize-from", type=size_pair, help="Resize seed from WIDTHxHEIGHT")
    add("--eta", type=float, help="Eta of ancestral / DDIM samplers (default: the sampler's)")
    add("--clip-skip", type=int, default=1, help="Clip skip (default 1)")
    add("--tiling", action="store_true", help="Tiling: seamless images (circular padding)")
    add("--restore-faces", action="store_true", help="Restore faces (needs face-restoration weights)")
    add("--rng", default="CPU", choices=RNG_SOURCES, help="Random number generator source (default CPU)")
    add("--preset", help="Generation preset: its model, LoRAs (added to the prompt as <lora:...> tags), sampler, "
                         "schedule type, steps and CFG scale, each overridden by its flag when given; one of: "
                         f"{', '.join(PRESETS) or 'none installed'}")
    add("--model", help="Stable Diffusion checkpoint (.safetensors / .ckpt); default: the embedded model")
    add("--vae", default="Automatic", help="SD VAE file (default Automatic: the checkpoint's own)")
    add("--lora-dir", help="Folder of LoRA files for <lora:name:weight> (searched before the built-in LoRAs)")
    add("--embeddings-dir", help="Folder of textual-inversion embeddings")
    add("--controlnet", type=controlnet_unit, action="append", default=[], metavar="KEY=VALUE,...",
        help="A ControlNet unit (repeatable): image=PATH,module=canny,model=NAME[,weight=1,guidance_start=0,"
             "guidance_end=1,control_mode=Balanced,resize_mode=Crop and Resize,pixel_perfect=false,"
             "processor_res=512,threshold_a=..,threshold_b=..,mask=PATH]; NAME is a file of --controlnet-dir")
    add("--controlnet-dir", help="Folder of ControlNet models for --controlnet")
    add("--outdir", help="Output folder")
    add("--grid", action="store_true", help="Also save a grid of all images")
    add("--zip", action="store_true", help="Also save all images in a zip archive")
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add("--precision", default="auto", choices=PRECISIONS,
        help="Weights in float32 (full), float16 (half) or bfloat16 (bf16: on CPUs with AMX or AVX-512 BF16, e.g. "
             "Xeon 4th gen and later, the fastest with --compile); auto: half on a GPU, full on the CPU. Sampling "
             "itself always runs in float32")
    add("--threads", type=int, help="CPU threads (default: 1 for models under 100M parameters, whose operations are "
                                    "too small to gain from threads, else PyTorch's default)")
    add("--no-progress", action="store_true", help="No progress bars")
    add("--script", help="Script: one of A1111's script names, e.g. 'x/y/z plot', 'prompt matrix', 'prompts from file "
                         "or textbox' ('sd upscale' for img2img)")
    add("--script-args", default="[]",
        help="The script's arguments as a JSON list in A1111's order (README: Scripts), e.g. '[\"Steps\", \"10, 20\"]'")
    add("--compile", nargs="?", const="auto", choices=("auto", *COMPILE_MODES),
        help="Run the UNet and VAE decoder through torch.compile (mode auto: reduce-overhead, i.e. CUDA graphs, on a "
             "GPU, default on the CPU). Compiling takes seconds to minutes per image size, so it pays off only for "
             "many images (large --batch-count)")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parser.parse_args(argv), with the --preset's settings as the defaults of --model, --sampler, --scheduler,
    --steps and --cfg-scale, so that a flag given explicitly wins over the preset."""
    preset_name = parser.parse_known_args(argv)[0].preset
    if preset_name is not None:
        if preset_name not in PRESETS:
            parser.error(f"--preset: unknown preset {preset_name!r}; available: {', '.join(PRESETS) or 'none'}")
        preset = PRESETS[preset_name]
        parser.set_defaults(model=None if preset.model == "default" else preset.model, sampler=preset.sampler_name,
                            scheduler=preset.scheduler, steps=preset.steps, cfg_scale=preset.cfg_scale)
    return parser.parse_args(argv)


def common_params(args) -> dict:
    """GenerationParams fields from the common arguments."""
    resize_from = args.seed_resize_from or (0, 0)
    return dict(negative_prompt=args.negative_prompt,
                styles=[s.strip() for s in args.styles.split(",") if s.strip()], sampler_name=args.sampler,
                scheduler=args.scheduler, steps=args.steps, cfg_scale=args.cfg_scale, width=args.width,
                height=args.height, batch_count=args.batch_count, batch_size=args.batch_size, seed=args.seed,
                subseed=args.subseed, subseed_strength=args.subseed_strength, seed_resize_from_w=resize_from[0],
                seed_resize_from_h=resize_from[1], eta=args.eta, clip_skip=args.clip_skip, tiling=args.tiling,
                restore_faces=args.restore_faces, rng=args.rng, vae=args.vae, controlnet_units=args.controlnet)


def _device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device, PRECISIONS[args.precision] or generation_dtype(device)


# Below this many parameters a model's tensors are so small that splitting each operation over threads costs more in
# synchronisation than it saves (and on a busy machine far more: a thread waiting for a descheduled partner).
SMALL_MODEL_PARAMETERS = 100_000_000


def _set_threads(threads: int | None, model, device: torch.device) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)


def _writable_folder(path: str) -> None:
    """Create the output folder and write a probe file in it, so that a folder under a file, a read-only place or a
    full disk is reported before any image is computed (and lost)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"--outdir {path}: cannot write there ({error.strerror or error})") from None


def _load_model(args, device: torch.device, dtype: torch.dtype):
    if not args.model:
        return default_model(device, dtype)
    try:
        return load_checkpoint(args.model, device, dtype)
    except (CheckpointError, OSError, RuntimeError, ValueError) as error:
        # RuntimeError / ValueError: torch's load_state_dict on a mis-shaped tensor, bad metadata values.
        raise UsageError(f"--model {args.model}: {error}") from None


def _script_args(text: str) -> list:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--script-args must be a JSON list, e.g. '[\"Steps\", \"10, 20\"]' ({error})") from None
    if not isinstance(values, list):
        raise UsageError(f"--script-args must be a JSON list, got {text!r}")
    return values


def run(prog: str, args, params: GenerationParams, default_outdir: str, prompt_file: str | None = None) -> int:
    """Validate, load, generate, save; returns the exit status. Errors are one line on stderr. With `prompt_file`,
    one job per line of it, shared out over the processes of a torchrun launch (see sample.sharded)."""

    outdir = args.outdir or default_outdir
    preset = PRESETS[args.preset] if args.preset else None
    if preset is not None:
        params = replace(params, prompt=preset.prompt_with_loras(params.prompt))
    # argv that is not UTF-8 arrives as lone surrogates, which no PNG chunk or file name can hold.
    params = replace(params, prompt=clean_text(params.prompt), negative_prompt=clean_text(params.negative_prompt))
    try:
        upscalers_dir = getattr(args, "upscalers_dir", None)  # only txt2img has hires fix
        if upscalers_dir is not None and not os.path.isdir(upscalers_dir):
            raise UsageError(f"--upscalers-dir: folder not found: {upscalers_dir}")
        params.validate(hires_upscalers(upscalers_dir))
        for name in ("model", "styles_file"):
            path = getattr(args, name)
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"--{name.replace('_', '-')}: file not found: {path}")
        for name in ("lora_dir", "embeddings_dir", "controlnet_dir"):
            path = getattr(args, name)
            if path is not None and not os.path.isdir(path):
                raise UsageError(f"--{name.replace('_', '-')}: folder not found: {path}")
        try:
            styles = load_styles(args.styles_file) if args.styles_file else {}
        except (ValueError, OSError, KeyError) as error:
            raise UsageError(f"--styles-file: {error}") from None
        script_args = _script_args(args.script_args)
        _writable_folder(outdir)
        device, dtype = _device_and_dtype(args)
        checkpoint = _load_model(args, device, dtype)
        _set_threads(args.threads, checkpoint.model, device)
        embeddings = None
        if args.embeddings_dir:
            embeddings = EmbeddingDatabase.from_directory(args.embeddings_dir,
                                                          text_towers(checkpoint.model)[0].tokenizer)
        options = dict(progress=not args.no_progress, lora_dir=args.lora_dir, embeddings=embeddings, styles=styles,
                       controlnet_dir=args.controlnet_dir, upscaler_dir=upscalers_dir,
                       compile=True if args.compile == "auto" else args.compile or False)
        if prompt_file is not None:
            if args.script:
                raise UsageError("--from-file and --script cannot be combined; the script \"prompts from file or "
                                 "textbox\" reads prompt lines itself")
            try:
                prompts = read_prompt_file(prompt_file)
            except (OSError, ValueError) as error:
                raise UsageError(f"--from-file: {error}") from None
            if preset is not None:
                prompts = [preset.prompt_with_loras(prompt) for prompt in prompts]
            return _run_prompt_file(prog, args, params, prompts, outdir, checkpoint, device, options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GenerationWarning)  # printed below from the result, once each
            if args.script:
                result = run_script(checkpoint, params, args.script, script_args,
                                    load_model=lambda path: load_checkpoint(path, device, dtype), **options)
            else:
                result = generate(checkpoint, params, **options)
    except USER_ERRORS as error:
        return report_user_error(prog, error)
    except GenerationError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        paths = save_outputs(result, params.prompt, outdir, args.grid, args.zip)
    except OSError as error:  # the folder was writable a moment ago: a full disk, a removed folder
        print(f"{prog}: error: the images were generated but could not be saved in {outdir}: {error}",
              file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _run_prompt_file(prog: str, args, params: GenerationParams, prompts: list[str], outdir: str, checkpoint,
                     device: torch.device, options: dict) -> int:
    """This rank's jobs of a prompt file, saved under the numbers one process would give them."""
    ranks = Ranks(device)
    first = ranks.broadcast(next_sequence_number(outdir))  # read by rank 0 before any rank writes
    step = images_per_job(params)
    status = 0
    try:
        for k, job in sharded_jobs(prompts, params, ranks):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", GenerationWarning)
                    result = generate(checkpoint, job, **options)
            except USER_ERRORS as error:  # a bad line (e.g. an unknown style) costs that line, not the others
                report_user_error(f"{prog}: line {k + 1}", error)
                status = 2
                continue
            for warning in result.warnings:
                print(f"warning: line {k + 1}: {warning}", file=sys.stderr)
            for path in save_images(result, job.prompt, outdir, first + k * step):
                print(path)
    finally:
        ranks.close()
    return status


def save_images(result: Result, prompt: str, outdir: str, number: int) -> list[str]:
    """Write the images as A1111 names them (`NNNNN-SEED-prompt.png`, the infotext embedded), numbered from
    `number`; returns their paths."""
    part = filename_part(prompt)
    paths = []
    for offset, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
        name = f"{number + offset:05d}-{seed}" + (f"-{part}" if part else "") + ".png"
        paths.append(save_png(image, os.path.join(outdir, name), infotext))
    return paths


def save_outputs(result: Result, prompt: str, outdir: str, grid: bool, make_zip: bool) -> list[str]:
    """The images (save_images, numbered after the files already in `outdir`), optionally a grid (`grid-NNNN.png`)
    and a zip of the images; returns the paths written."""
    os.makedirs(outdir, exist_ok=True)
    number = next_sequence_number(outdir)
    paths = save_images(result, prompt, outdir, number)
    written = list(paths)
    if grid and len(result.images) > 1:
        grid_number = next_sequence_number(outdir, "grid-")
        written.append(save_png(image_grid(result.images), os.path.join(outdir, f"grid-{grid_number:04d}.png"),
                                result.infotexts[0]))
    if make_zip:
        zip_path = os.path.join(outdir, f"{number:05d}-{result.seeds[0]}-{result.seeds[-1]}.zip")
        with atomic_write(zip_path) as file, zipfile.ZipFile(file, "w") as archive:
            for path in paths:
                archive.write(path, os.path.basename(path))
        written.append(zip_path)
    return written
