"""python -m sample.webui: serve the page and the A1111-compatible API on one port.

`--extension FILE.py` (or a module name; repeatable) imports user code before serving, so the samplers and schedule
types it registers (samplers.register_sampler / register_scheduler) are offered by the API and the page.
"""
import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from sample.cli import PRECISIONS, ArgumentParser
from sample.params import DEFAULT_MAX_WORK


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m sample.webui",
        description="Web UI and AUTOMATIC1111-compatible HTTP API (/sdapi/v1) for local Stable Diffusion models.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    parser.add_argument("--model", metavar="PATH",
                        help="checkpoint loaded at start (.safetensors/.ckpt); default: the built-in default model")
    parser.add_argument("--models-dir", metavar="DIR",
                        help="folder of checkpoints offered in the Stable Diffusion checkpoint list (VAEs in DIR/VAE "
                             "or named *.vae.safetensors)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="weights in float32 (full), float16 (half) or bfloat16 (bf16: on CPUs with AMX or "
                             "AVX-512 BF16, the fastest with the ldm_compile setting); auto: half on a GPU, full on "
                             "the CPU")
    parser.add_argument("--lora-dir", metavar="DIR", help="folder of LoRA files for <lora:name:weight>")
    parser.add_argument("--embeddings-dir", metavar="DIR", help="folder of textual-inversion embeddings")
    parser.add_argument("--controlnet-dir", metavar="DIR",
                        help="folder of ControlNet models for alwayson_scripts.controlnet and the ControlNet panel")
    parser.add_argument("--upscalers-dir", metavar="DIR",
                        help="folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR .pth/.safetensors), also read "
                             "from its A1111 subfolders ESRGAN/, RealESRGAN/, SwinIR/")
    parser.add_argument("--outdir", metavar="DIR", default="outputs",
                        help="where generated images are saved (default outputs/)")
    parser.add_argument("--max-work", type=int, default=DEFAULT_MAX_WORK, metavar="PIXEL_STEPS",
                        help="refuse requests asking for more than this many width x height x steps x images "
                             "(default 1024x1024 x 150 steps x 8 images)")
    parser.add_argument("--api-auth", metavar="USER:PASS",
                        help="require HTTP basic auth on every route; several as user1:pass1,user2:pass2")
    parser.add_argument("--styles-file", metavar="FILE.csv", default="styles.csv",
                        help="A1111 prompt styles (columns name, prompt, negative_prompt); the page's Styles menu "
                             "saves to it (default styles.csv; created on the first save)")
    parser.add_argument("--extension", metavar="FILE.py", action="append", default=[],
                        help="a Python file (or importable module name) imported before serving, e.g. one that "
                             "registers samplers; repeatable")
    return parser


def a1111_cmd_flags(args: argparse.Namespace) -> dict:
    """GET /sdapi/v1/cmd-flags: the command line under A1111's names where it has one (listen, ckpt_dir, ...), ours
    under our own; --api-auth passwords are not shown."""
    auth = args.api_auth and ",".join(pair.partition(":")[0] + ":***" for pair in args.api_auth.split(","))
    return {"api": True, "nowebui": False, "listen": args.host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": args.host, "port": args.port, "ckpt": args.model, "ckpt_dir": args.models_dir,
            "vae_dir": os.path.join(args.models_dir, "VAE") if args.models_dir else None, "lora_dir": args.lora_dir,
            "embeddings_dir": args.embeddings_dir, "hypernetwork_dir": None, "styles_file": args.styles_file,
            "api_auth": auth or None, "outdir": args.outdir, "max_work": args.max_work, "extension": args.extension,
            "precision": args.precision}


def _importable(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # a missing parent package, an empty or relative name
        return False


def load_extension(name: str):
    """Import a user module: a .py file by its path (registered in sys.modules under its file name) or a module name
    importable from sys.path. Returns the module."""
    path = Path(name)
    if path.suffix != ".py":
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")
    if args.max_work < 1:
        parser.error(f"--max-work must be a positive number of pixel-steps, got {args.max_work}")
    if args.model and not os.path.isfile(args.model):
        parser.error(f"--model: file not found: {args.model}")
    for flag, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir),
                         ("--embeddings-dir", args.embeddings_dir), ("--controlnet-dir", args.controlnet_dir),
                         ("--upscalers-dir", args.upscalers_dir)):
        if folder and not os.path.isdir(folder):
            parser.error(f"{flag}: folder not found: {folder}")
    for extension in args.extension:
        if extension.endswith(".py") and not os.path.isfile(extension):
            parser.error(f"--extension: file not found: {extension}")
        if not extension.endswith(".py") and not _importable(extension):
            parser.error(f"--extension: no module named {extension!r} (give a .py file or an importable module)")
    try:
        import uvicorn

        from sample.models import default_model

        from .app import create_app, parse_credentials
        from .registry import Registry
        from .service import WebUIService
    except ImportError as error:
        parser.exit(2, f"python -m sample.webui: {error}; install the web UI extra: pip install -e \".[webui]\"\n")
    try:
        credentials = parse_credentials(args.api_auth) if args.api_auth else None
    except ValueError as error:
        parser.error(str(error))
    for extension in args.extension:
        try:
            load_extension(extension)
        except Exception as error:  # the user's own code: show where it failed, then stop as for a usage error
            traceback.print_exc()
            parser.exit(2, f"python -m sample.webui: --extension {extension} failed: {type(error).__name__}: "
                           f"{error}\n")

    class Server(uvicorn.Server):
        """uvicorn answers the requests in flight before it exits on SIGTERM / Ctrl-C, and a generation can run for
        minutes: the worker is told to stop first, so the running job ends within a UNet layer and its request,
        like the queued ones, is answered 503."""

        def handle_exit(self, sig, frame) -> None:
            service.worker.stop(timeout=0)
            super().handle_exit(sig, frame)

    registry = Registry(models_dir=args.models_dir, lora_dir=args.lora_dir, model_path=args.model,
                        upscalers_dir=args.upscalers_dir)
    service = WebUIService(registry, outdir=args.outdir, load_default=default_model,
                           embeddings_dir=args.embeddings_dir, max_work=args.max_work, styles_file=args.styles_file,
                           controlnet_dir=args.controlnet_dir, dtype=PRECISIONS[args.precision])
    print(f"web UI on http://{args.host}:{args.port}/  (API: /sdapi/v1, docs: /docs)", file=sys.stderr)
    Server(uvicorn.Config(create_app(service, credentials, a1111_cmd_flags(args)), host=args.host, port=args.port,
                          log_level="warning")).run()


if __name__ == "__main__":
    main()
