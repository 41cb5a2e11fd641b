"""The web UI's internal API: settings, the loaded model, generation jobs, progress and listings.

Both the A1111 routes (`/sdapi/v1/...`) and the page call this class; HTTP lives in app.py. Every method that
touches the model runs as a job on the single worker thread, so a model switch queued behind a generation waits for
it, and the order of arrival is the order of execution.
"""
import base64
import csv
import io
import json
import os
import re
import threading
import time
import zipfile
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime
from typing import Callable

import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, read_metadata
from ldm.merge import MERGE_METHODS, merge_checkpoints, merged_name, resolve_mode
from ldm.tokenizer import CLIPTokenizer
from sample.controlnet import (MAX_UNITS, PREPROCESSORS, UNAVAILABLE, PreprocessorError, UnitError, find_model,
                               list_models, preview_image, run_preprocessor, unit_from_api)
from sample.compiled import COMPILE_MODES
from sample.embeddings import EmbeddingDatabase
from sample.generate import generate
from sample.images import filename_part, next_sequence_number, save_png
from sample.infotext import parse_infotext
from sample.models import DEFAULT_MODEL, PRESETS, LoadedModel, generation_dtype, load_checkpoint
from sample.params import (DEFAULT_MAX_WORK, GenerationParams, ParamsError, hires_upscalers, max_clip_skip,
                           size_multiple)
from sample.prompts import extract_extra_networks, token_count
from sample.rng import RNG_SOURCES
from sample.scripts import Script, ScriptJob, find_script
from sample.styles import Style, load_styles, save_styles
from samplers import SAMPLERS, SCHEDULERS

from .extras import ExtrasJob
from .monitor import StepMonitor
from .options import STORED_OPTIONS, check_stored_option
from .preview import PREVIEW_TYPES, ImageDecodeError, PreviewRenderer, decode_image, encode_png
from .registry import CheckpointFile, NotFound, Registry
from .schemas import Img2ImgRequest, MergeRequest, RequestError, Txt2ImgRequest
from .worker import JobControl, Worker

# Settings this server has, by A1111's option names, with their defaults. sd_model_checkpoint is filled in at start.
DEFAULT_OPTIONS = {
    "sd_model_checkpoint": None,
    "sd_checkpoint_hash": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "inpainting_mask_weight": 1.0,
    "initial_noise_multiplier": 1.0,
    # Where noise is drawn: "CPU" gives the same image on every machine (A1111's own default is "GPU").
    "randn_source": "CPU",
    "samples_save": True,
    "samples_format": "png",
    "show_progress_type": "Approx cheap",
    "live_previews_enable": True,
    "sd_checkpoints_limit": 1,
    # False: images are sent and saved without their infotext (A1111's "Save text information ... to png files").
    "enable_pnginfo": True,
    # generate(compile=...): "off", "auto" (the device's default mode) or a torch.compile mode (sample/compiled.py).
    "ldm_compile": "off",
}
# Settings that name places on the server's disk: fixed by --outdir at start, never by a request.
OUTPUT_FOLDERS = {"outdir_samples": "", "outdir_txt2img_samples": "txt2img-images",
                  "outdir_img2img_samples": "img2img-images", "outdir_extras_samples": "extras-images",
                  "outdir_grids": "", "outdir_txt2img_grids": "txt2img-grids", "outdir_img2img_grids": "img2img-grids",
                  "outdir_save": "saved", "outdir_init_images": "init-images"}
READ_ONLY_OPTIONS = (*OUTPUT_FOLDERS, "sd_checkpoint_hash", "samples_format", "sd_checkpoints_limit")
# Shown next to the page's disabled "Restore faces" box; a request that asks for it gets generate()'s own error.
RESTORE_FACES_UNAVAILABLE = ("no face restoration model is installed on this server (A1111 uses GFPGAN or CodeFormer "
                             "weights, which are not available here)")
COMPILE_SETTINGS = ("off", "auto", *COMPILE_MODES)
# A prompt's <lora:NAME:...> names a file by its stem; anything path-like is refused before it reaches the loader.
_SAFE_NAME = re.compile(r"^[^/\\\0]+$")


class OutOfMemory(RuntimeError):
    """The job needs more memory than the machine has (HTTP 400: the request asked for too much)."""


class ModelLoadError(RuntimeError):
    """The chosen checkpoint could not be loaded (HTTP 400); the message is the loader's, and the setting that asked
    for it is not kept."""


def _check_setting(name: str, value, registry: Registry):
    """The normalised value of one setting, or RequestError saying what is allowed."""
    def number(low: float, high: float, integer: bool = False):
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            raise RequestError(f"{name} must be {'an integer' if integer else 'a number'} in [{low}, {high}], "
                               f"got {value!r}")
        return value

    if name == "sd_model_checkpoint":
        try:
            return registry.checkpoint(str(value)).title
        except NotFound as error:
            raise RequestError(str(error)) from None
    if name == "sd_vae":
        try:
            registry.vae(str(value))
        except NotFound as error:
            raise RequestError(str(error)) from None
        return str(value)
    if name == "CLIP_stop_at_last_layers":
        return number(1, 12, integer=True)
    if name == "inpainting_mask_weight":
        return float(number(0, 1))
    if name == "initial_noise_multiplier":
        return float(number(0, 1.5))
    if name == "randn_source":
        if value not in RNG_SOURCES:
            raise RequestError(f"randn_source must be one of {', '.join(RNG_SOURCES)}, got {value!r}")
        return value
    if name in ("samples_save", "live_previews_enable", "enable_pnginfo"):
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {value!r}")
        return value
    if name == "ldm_compile":
        if value not in COMPILE_SETTINGS:
            raise RequestError(f"ldm_compile must be one of {', '.join(COMPILE_SETTINGS)}, got {value!r}")
        return value
    if name == "show_progress_type":
        if value not in PREVIEW_TYPES:
            raise RequestError(f"show_progress_type must be one of {', '.join(PREVIEW_TYPES)}, got {value!r}")
        return value
    return check_stored_option(name, value)  # KeyError for a setting this server does not have


def available_memory_bytes(device: torch.device) -> int:
    """Free memory where the model runs: the GPU's free memory plus PyTorch's reusable cache, or the system's
    MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62  # no /proc: cannot tell, do not refuse


def estimate_job_bytes(preset, batch_size: int, width: int, height: int, dtype_bytes: int) -> int:
    """A rough upper estimate of the activation memory one batch needs, to refuse absurd batches before they take
    the machine down (a CPU allocation that does not fit may get the whole server killed, not just raise).

    UNet (conditional and unconditional halves together): at the bottom of the U the skip tensors of every level are
    alive, (num_res_blocks + 1) per level of model_channels × mult channels at that level's size, plus a working set
    of about eight top-level tensors. Attention scores are not counted: our attention kernels never materialise
    them. VAE decoder: about six tensors of its widest full-resolution width per image.
    """
    unet, vae = preset.unet, preset.vae
    factor = 2 ** (len(vae.ch_mult) - 1)
    pixels = (width // factor) * (height // factor)
    skips = sum((unet.num_res_blocks + 1) * unet.model_channels * mult * pixels / 4 ** level
                for level, mult in enumerate(unet.channel_mult))
    working = 8 * unet.model_channels * pixels
    unet_bytes = 2 * batch_size * (skips + working) * dtype_bytes
    vae_bytes = batch_size * 6 * vae.ch * max(vae.ch_mult[:2]) * width * height * dtype_bytes
    return int(unet_bytes + vae_bytes)


def save_sample(folder: str, image: Image.Image, seed: int | None, prompt: str, infotext: str | None) -> str:
    """Writes image (infotext in its `parameters` chunk) as A1111 names samples: folder/NNNNN-SEED-prompt.png, NNNNN
    one more than the largest number already there."""
    parts = [f"{next_sequence_number(folder):05d}", None if seed is None else str(seed), filename_part(prompt)]
    name = "-".join(part for part in parts if part) + ".png"
    return save_png(image, os.path.join(folder, name), infotext)


def _native_size(params: GenerationParams, preset) -> GenerationParams:
    """A request without width/height gets the model's native resolution (A1111's API would make 512x512, minutes
    of work for a 64-px model); img2img too, as the page's default is, rather than the init image's size."""
    return replace(params, width=params.width or preset.resolution, height=params.height or preset.resolution)


def _same_model(a: CheckpointFile | None, b: CheckpointFile) -> bool:
    # The built-in default has no file (and gets its real name once loaded); files are the same if their bytes are.
    return a is not None and a.filename == b.filename and (a.filename is None or a.sha256 == b.sha256)


class WebUIService:
    """Settings, model, queue.

    `load_default(device, dtype) -> sample.models.LoadedModel` builds the built-in default model, used when no
    file is chosen (sample.models.default_model). The startup model is loaded by the first job; `ready` is its
    future. `dtype`: the weights' dtype for every model loaded (None: float16 on a GPU, float32 on the CPU).
    """

    def __init__(self, registry: Registry, outdir: str, load_default: Callable[..., LoadedModel],
                 embeddings_dir: str | None = None, device: str | torch.device | None = None,
                 max_work: int = DEFAULT_MAX_WORK, styles_file: str | None = None,
                 controlnet_dir: str | None = None, dtype: torch.dtype | None = None):
        self.registry = registry
        self.styles_file = styles_file  # A1111's styles.csv; None: no styles, and none can be saved
        self._styles_cache: tuple | None = None  # ((mtime_ns, size), {name: Style})
        self.max_work = max_work
        self.outdir = os.path.abspath(outdir)
        self.embeddings_dir = embeddings_dir
        self.controlnet_dir = controlnet_dir  # ControlNet model files (sd-webui-controlnet's models folder)
        self._controlnets: dict = {}  # the last job's loaded ControlNets, reused by the next (worker thread only)
        self.load_default = load_default
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or generation_dtype(self.device)
        self.tokenizer = CLIPTokenizer()
        self._lock = threading.Lock()
        # "" as A1111's outdir_samples / outdir_grids: no folder overriding the per-tab ones.
        folders = {name: os.path.join(self.outdir, folder) if folder else ""
                   for name, folder in OUTPUT_FOLDERS.items()}
        self._options = {**STORED_OPTIONS, **DEFAULT_OPTIONS, **folders,
                         "sd_model_checkpoint": registry.default.title, "sd_checkpoint_hash": registry.default.sha256}
        self.loaded: LoadedModel | None = None  # the model in memory, with the name and hash its infotexts carry
        self.loaded_file: CheckpointFile | None = None  # its registry entry
        self.embeddings = EmbeddingDatabase([], self.tokenizer)
        self.preview: PreviewRenderer | None = None
        self._preview_cache: tuple | None = None  # ((control, latent version, kind), base64 PNG)
        self._lora_metadata: dict[str, tuple[tuple[int, int], dict]] = {}  # path -> ((mtime_ns, size), metadata)
        self._style_write_lock = threading.Lock()
        self.worker = Worker()
        self.ready = self.worker.submit(lambda control: self._use_checkpoint(registry.default)).future

    def close(self) -> None:
        self.worker.stop()

    # ----- settings -----------------------------------------------------------------------------------------------

    def options(self) -> dict:
        with self._lock:
            return dict(self._options)

    def unknown_options(self, values: dict) -> list[str]:
        """The names in `values` that are no setting of this server (A1111 ignores them; the API lists them)."""
        known = self.options()
        return [name for name in values if name not in known]

    def _settings(self, overrides: dict | None) -> dict:
        """The current settings with a request's override_settings applied (validated; names this server does not
        have are ignored, as A1111 ignores them)."""
        settings = self.options()
        for name, value in (overrides or {}).items():
            if name in READ_ONLY_OPTIONS:
                continue
            try:
                settings[name] = _check_setting(name, value, self.registry)
            except KeyError:
                pass
        return settings

    def set_options(self, values: dict) -> Future:
        """Validates every value first (nothing changes when one is bad). A new checkpoint is loaded by a job queued
        behind the ones already waiting, and the settings change only once it has loaded (a model that fails to load
        leaves them as they were: the future raises ModelLoadError); the future completes when the change has taken
        effect."""
        changed = {}
        for name, value in values.items():
            if name in READ_ONLY_OPTIONS:
                if value != self.options().get(name):
                    raise RequestError(f"{name} is fixed when the server starts (--outdir); it cannot be set here")
                continue
            try:
                changed[name] = _check_setting(name, value, self.registry)
            except KeyError:
                pass  # A1111 ignores settings it does not have
        current = self.options()["sd_model_checkpoint"]
        checkpoint = self.registry.checkpoint(changed.get("sd_model_checkpoint", current))
        changed["sd_checkpoint_hash"] = checkpoint.sha256

        def commit() -> None:
            """Runs once the checkpoint is the loaded one: only then do the new settings take effect, so a model
            that fails to load (or has fewer text-encoder layers than the clip skip asked) changes nothing."""
            if "CLIP_stop_at_last_layers" in changed and self.loaded is not None:
                self._check_clip_skip(changed["CLIP_stop_at_last_layers"])
            with self._lock:
                self._options.update(changed)

        def switch_model(control: JobControl) -> None:
            self._use_checkpoint(checkpoint)
            commit()

        if checkpoint.title != current:
            return self.worker.submit(switch_model).future
        commit()
        done = Future()
        done.set_result(None)
        return done

    def _check_clip_skip(self, clip_skip: int) -> None:
        deepest = max_clip_skip(self.loaded.model.preset)
        if clip_skip > deepest:
            raise RequestError(f"CLIP_stop_at_last_layers {clip_skip} is beyond the loaded model's text encoder: "
                               f"it allows 1 to {deepest}")

    # ----- model ----------------------------------------------------------------------------------------------------

    def _use_checkpoint(self, entry: CheckpointFile) -> None:
        """Runs on the worker: makes `entry` the model in memory (one at a time, as A1111's default)."""
        if _same_model(self.loaded_file, entry) and self.loaded is not None:
            return
        self.loaded = self.loaded_file = None  # free the old weights before reading the new ones
        if entry.filename is None:
            loaded = self.load_default(device=self.device, dtype=self.dtype)
            renamed = self.registry.name_builtin(loaded.name, loaded.path)
            with self._lock:
                if self._options["sd_model_checkpoint"] == entry.title:
                    self._options.update(sd_model_checkpoint=renamed.title, sd_checkpoint_hash=renamed.sha256)
            entry = renamed
        else:
            try:
                loaded = load_checkpoint(entry.filename, device=self.device, dtype=self.dtype)
            except (CheckpointError, OSError, RuntimeError, ValueError) as error:
                # RuntimeError / ValueError: what torch's load_state_dict raises for a mis-shaped tensor.
                raise ModelLoadError(f"cannot load model {entry.title}: {error}") from None
        self.loaded, self.loaded_file = loaded, entry
        self.preview = PreviewRenderer(loaded.model)
        self._load_embeddings()

    def _load_embeddings(self) -> None:
        if not self.embeddings_dir:
            return
        widths = [config.width for config in self.loaded.model.preset.text]
        self.embeddings = EmbeddingDatabase.from_directory(self.embeddings_dir, self.tokenizer).compatible_with(widths)

    def refresh_checkpoints(self) -> None:
        self.registry.refresh()

    # ----- generation -----------------------------------------------------------------------------------------------

    def submit_txt2img(self, request: Txt2ImgRequest):
        return self._submit(request, request.generation_fields(), images=[], mask=None, mode="txt2img")

    def submit_img2img(self, request: Img2ImgRequest):
        fields = request.generation_fields()
        try:
            images = [decode_image(data, f"init_images[{i}]").convert("RGB")
                      for i, data in enumerate(request.init_images)]
            mask = decode_image(request.mask, "mask") if request.mask else None
        except ImageDecodeError as error:
            raise RequestError(str(error)) from None
        return self._submit(request, fields, images=images, mask=mask, mode="img2img")

    def _submit(self, request, fields: dict, images: list, mask, mode: str):
        """Validates everything that can be checked before the job runs, then queues it; returns the Job."""
        settings = self._settings(request.override_settings)
        entry = self.registry.checkpoint(settings["sd_model_checkpoint"])
        vae = self.registry.vae(settings["sd_vae"])
        fields.update(clip_skip=settings["CLIP_stop_at_last_layers"], rng=settings["randn_source"],
                      vae=vae.filename if vae else "Automatic", controlnet_units=self._controlnet_units(request))
        if mode == "img2img":
            fields.update(
                init_images=images, mask=mask,
                noise_multiplier=(settings["initial_noise_multiplier"] if request.initial_noise_multiplier is None
                                  else request.initial_noise_multiplier),
                inpainting_mask_weight=(settings["inpainting_mask_weight"] if request.inpainting_mask_weight is None
                                        else request.inpainting_mask_weight))
        try:
            if request.infotext:
                # A1111: the infotext fills the parameters; fields the request sets explicitly win.
                explicit = {name: value for name, value in fields.items()
                            if name in request.model_fields_set or (name == "controlnet_units" and value)}
                params = GenerationParams.from_infotext(request.infotext, **explicit)
            else:
                params = GenerationParams(**fields)
            params.validate(hires_upscalers(self.registry.upscalers_dir))
            if self.loaded is not None and _same_model(self.loaded_file, entry):
                params = _native_size(params, self.loaded.model.preset)
                params.validate_for(self.loaded.model.preset)  # else the job checks once it has loaded the model
        except ParamsError as error:
            raise RequestError(str(error)) from None
        unknown_styles = [name for name in params.styles if name not in self.styles()]
        if unknown_styles:
            raise RequestError(f"styles {unknown_styles} not found; saved styles: {', '.join(self.styles()) or 'none'}"
                               " (GET /sdapi/v1/prompt-styles)")
        for tag in extract_extra_networks(params.prompt)[1]:
            if tag.kind == "lora" and (not _SAFE_NAME.match(tag.name) or tag.name in (".", "..")):
                raise RequestError(f"LoRA name {tag.name!r} is not a file name; use a name listed by "
                                   "/sdapi/v1/loras")
        self._check_memory(entry, params)
        if params.work() > self.max_work:
            raise RequestError(
                f"this request asks for {params.work():,} pixel-steps (width x height x steps x batch_size x n_iter, "
                f"hires pass included), more than this server's limit of {self.max_work:,} (--max-work); lower the "
                "size, steps, batch_size or n_iter")
        # Names in override_settings this server does not have are ignored, as A1111 does, and listed in the answer.
        ignored = [f"override_settings: unknown options ignored: {', '.join(unknown)}"] if (
            unknown := self.unknown_options(request.override_settings or {})) else []
        # A script and its arguments are checked now, so a wrong name or argument is answered before the queue.
        script = find_script(request.script_name, mode) if request.script_name else None
        script_args = script.arguments(request.script_args, mode, self.script_options()) if script else None
        # override_settings_restore_afterwards=False: the overrides become the settings once the job runs.
        persist = None if request.override_settings_restore_afterwards else {
            name: settings[name] for name in (request.override_settings or {})
            if name in DEFAULT_OPTIONS or name in STORED_OPTIONS}
        return self.worker.submit(
            lambda control: self._generate(control, entry, params, request, mode, settings, persist, ignored,
                                           script, script_args),
            request.force_task_id)

    def _controlnet_units(self, request) -> list:
        """The enabled units of the request's `alwayson_scripts.controlnet`, images decoded and models found."""
        args = request.controlnet_args()
        if len(args) > MAX_UNITS:
            raise RequestError(f"alwayson_scripts.controlnet.args has {len(args)} units; at most {MAX_UNITS}")
        units = []
        for index, fields in enumerate(args):
            try:
                unit = unit_from_api(fields, lambda data, name: decode_image(data, f"controlnet unit {index} {name}"))
                if unit is not None:
                    find_model(self.controlnet_dir, unit.validate().model)
                    units.append(unit)
            except (UnitError, ImageDecodeError) as error:
                raise RequestError(f"controlnet unit {index}: {error}") from None
        return units

    # ----- ControlNet (sd-webui-controlnet's /controlnet routes) ------------------------------------------------------

    def controlnet_models(self) -> list[str]:
        """"stem [hash]" of each file in the ControlNet folder. Reads files: call it off the event loop."""
        return list(list_models(self.controlnet_dir))

    @staticmethod
    def controlnet_modules() -> dict:
        """/controlnet/module_list: the preprocessors that run here, their sliders, and those that cannot run (they
        need downloaded weights) with the reason."""
        return {"module_list": list(PREPROCESSORS),
                "module_detail": {name: p.detail() for name, p in PREPROCESSORS.items()},
                "unavailable": dict(UNAVAILABLE)}

    @staticmethod
    def controlnet_detect(module: str, images: list[str], masks: list[str], processor_res: int, threshold_a: float,
                          threshold_b: float) -> dict:
        """Run a preprocessor on base64 images (masks: one per image or none) -> {"images": base64 PNGs of the maps,
        "info": "Success"}. CPU work: call it off the event loop."""
        if not images:
            raise RequestError("controlnet_input_images is empty: send at least one base64 image")
        if len(images) > MAX_UNITS:
            raise RequestError(f"at most {MAX_UNITS} controlnet_input_images per request, got {len(images)}")
        if masks and len(masks) != len(images):
            raise RequestError(f"controlnet_masks must have one mask per image ({len(images)}), got {len(masks)}")
        maps = []
        try:
            for index, data in enumerate(images):
                image = decode_image(data, f"controlnet_input_images[{index}]")
                mask = decode_image(masks[index], f"controlnet_masks[{index}]") if masks else None
                maps.append(encode_png(preview_image(run_preprocessor(module, image, processor_res, threshold_a,
                                                                      threshold_b, mask))))
        except (PreprocessorError, ImageDecodeError) as error:
            raise RequestError(str(error)) from None
        return {"images": maps, "info": "Success"}

    def _check_memory(self, entry: CheckpointFile, params: GenerationParams) -> None:
        loaded = self.loaded
        if loaded is None or not _same_model(self.loaded_file, entry):
            return  # a model that is not loaded yet: its size is unknown until the job loads it
        preset = loaded.model.preset
        scale = params.hr_scale if params.enable_hr else 1.0
        width = int((params.width or preset.resolution) * scale)
        height = int((params.height or preset.resolution) * scale)
        needed = estimate_job_bytes(preset, params.batch_size, width, height, torch.finfo(self.dtype).bits // 8)
        available = available_memory_bytes(self.device)
        if needed > available:
            raise RequestError(
                f"batch_size {params.batch_size} at {width}x{height} needs about {needed / 2**30:.1f} GiB, but only "
                f"{available / 2**30:.1f} GiB is free on {self.device}; lower batch_size (raise n_iter instead) or "
                "the size")

    def _generate(self, control: JobControl, entry: CheckpointFile, params: GenerationParams, request, mode: str,
                  settings: dict, persist: dict | None, notes: list[str], script: Script | None = None,
                  script_args: list | None = None) -> dict:
        """Runs on the worker: one generate() call (or a script's), whose callback reports progress and whose checks
        raise the user's skip (drops the batch) and interrupt (keeps the finished batches). Returns A1111's response
        body."""
        control.textinfo = "Loading model"
        self._use_checkpoint(entry)
        params = _native_size(params, self.loaded.model.preset)
        if persist:
            with self._lock:
                self._options.update(persist, sd_checkpoint_hash=self.loaded_file.sha256)
        # styles.csv is read only for a job that can use it (a broken file must not stop every generation).
        options = dict(progress=False, lora_dir=self.registry.lora_dir, embeddings=self.embeddings,
                       styles=self.styles() if params.styles or script is not None else {},
                       controlnet_dir=self.controlnet_dir, controlnet_cache=self._controlnets,
                       upscaler_dir=self.registry.upscalers_dir,
                       compile={"off": False, "auto": True}.get(settings["ldm_compile"], settings["ldm_compile"]))
        try:
            if script is None:
                monitor = StepMonitor(control, params)
                result = generate(self.loaded, params, **options, callback=monitor, interrupt_check=monitor.check)
            else:
                job = ScriptJob(self.loaded, options, hooks=lambda *call: self._script_hooks(control, *call),
                                load_model=self._script_model, check_model=self.registry.checkpoint,
                                max_work=self.max_work)
                result = script.run(job, params, script_args)
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(f"out of memory on {self.device} ({error}); lower batch_size or the size") from None
        control.report(1.0)
        run = result.params  # random seeds fixed, sizes resolved
        return self._response(request, run, mode, settings, result.images, result.infotexts, result.seeds,
                              result.subseeds, (run.width, run.height), notes + result.warnings, result.interrupted)

    def script_options(self) -> dict:
        """The folders a script's argument choices may list (SD upscale's upscalers)."""
        return {"upscaler_dir": self.registry.upscalers_dir}

    def _script_hooks(self, control: JobControl, params: GenerationParams, call: int, calls: int) -> dict:
        """generate() hooks for the call-th of a script's `calls` generate() calls: progress over all of them. A cell
        of a size axis is checked against free memory like a request."""
        self._check_memory(self.loaded_file, params)
        monitor = StepMonitor(control, params, part=(call, calls))
        return {"callback": monitor, "interrupt_check": monitor.check}

    def _script_model(self, name: str) -> LoadedModel:
        """Runs on the worker: the checkpoint an X/Y/Z plot cell names, made the loaded model (one in memory)."""
        self._use_checkpoint(self.registry.checkpoint(name))
        return self.loaded

    def _response(self, request, params: GenerationParams, mode: str, settings: dict, images: list,
                  infotexts: list[str], seeds: list[int], subseeds: list[int], size: tuple, notes: list[str],
                  interrupted: bool) -> dict:
        """A1111's body: base64 PNGs (infotext inside), `parameters` (the request) and `info` (a JSON string)."""
        # The PNGs' `parameters` chunk; info["infotexts"] has the texts either way, as A1111's has.
        embedded = infotexts if settings["enable_pnginfo"] else [None] * len(images)
        if request.save_images and not request.do_not_save_samples:
            folder = os.path.join(self.options()[f"outdir_{mode}_samples"], datetime.now().strftime("%Y-%m-%d"))
            try:
                for image, infotext, seed in zip(images, embedded, seeds):
                    save_sample(folder, image, seed, params.prompt, infotext)
            except OSError as error:  # a full disk must not cost the client the images it waited for
                notes.append(f"the images could not be saved on the server ({error}); they are in this response")
        encoded = [encode_png(image, text) for image, text in zip(images, embedded)] if request.send_images else []
        parameters = request.model_dump()
        if mode == "img2img" and not request.include_init_images:
            parameters.update(init_images=None, mask=None)
        count, entry, vae = len(images), self.loaded_file, settings["sd_vae"]
        info = {
            "prompt": params.prompt, "all_prompts": [params.prompt] * count,
            "negative_prompt": params.negative_prompt, "all_negative_prompts": [params.negative_prompt] * count,
            "seed": seeds[0] if seeds else params.seed, "all_seeds": seeds,
            "subseed": subseeds[0] if subseeds else params.subseed, "all_subseeds": subseeds,
            "subseed_strength": params.subseed_strength, "width": size[0], "height": size[1],
            "sampler_name": params.sampler_name, "cfg_scale": params.cfg_scale, "steps": params.steps,
            "batch_size": params.batch_size, "restore_faces": params.restore_faces, "face_restoration_model": None,
            "sd_model_name": self.loaded.name, "sd_model_hash": self.loaded.hash,
            "sd_vae_name": None if vae in ("Automatic", "None") else vae, "sd_vae_hash": None,
            "seed_resize_from_w": params.seed_resize_from_w or -1,
            "seed_resize_from_h": params.seed_resize_from_h or -1,
            "denoising_strength": (params.denoising_strength if mode == "img2img"
                                   else params.hr_denoising_strength if params.enable_hr else None),
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
            "styles": params.styles, "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
            "clip_skip": params.clip_skip,
            "is_using_inpainting_conditioning": mode == "img2img" and self.loaded.model.preset.unet.in_channels == 9,
            "version": "ldm-scratch", "sd_checkpoint_title": entry.title,
            # Not A1111 fields (clients ignore unknown keys): what stopped the job, what the user should know.
            "interrupted": interrupted, "warnings": notes,
        }
        return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}

    # ----- progress -------------------------------------------------------------------------------------------------

    def interrupt(self, task_id: str | None = None) -> None:
        self.worker.interrupt(task_id)

    def skip(self) -> None:
        self.worker.skip()

    def _preview_png(self, control: JobControl, kind: str) -> str | None:
        latent, key = control.latent, (control, control.latent_version, kind)
        if latent is None or self.preview is None:
            return None
        cached = self._preview_cache
        if cached and cached[0] == key:
            return cached[1]
        png = encode_png(self.preview.render(latent, kind))
        self._preview_cache = (key, png)
        return png

    def progress(self, skip_current_image: bool = False) -> dict:
        """A1111's /sdapi/v1/progress body for the running job (zeros when idle). state.queued (not in A1111):
        requests waiting behind it."""
        control, queued = self.worker.control, self.worker.queued()
        if control is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                              "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                              "sampling_steps": 0, "queued": queued}}
        fraction = control.fraction
        elapsed = time.monotonic() - control.started
        settings = self.options()
        image = None
        if not skip_current_image and settings["live_previews_enable"]:
            image = self._preview_png(control, settings["show_progress_type"])
        return {"progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
                "current_image": image, "textinfo": control.textinfo,
                "state": {"skipped": control.skipped, "interrupted": control.interrupted,
                          "stopping_generation": False, "job": control.job.task_id,
                          "job_count": control.job_count,
                          "job_timestamp": datetime.fromtimestamp(control.job.queued_at).strftime("%Y%m%d%H%M%S"),
                          "job_no": control.job_no, "sampling_step": control.sampling_step,
                          "sampling_steps": control.sampling_steps, "queued": queued}}

    def task_progress(self, task_id: str) -> dict:
        """The page's view of one task (A1111's /internal/progress): where it is in the queue, and its progress."""
        where, ahead = self.worker.position(task_id)
        body = {"active": where == "running", "queued": where == "queued", "completed": where == "finished",
                "queue_position": ahead, "progress": None, "eta": None, "live_preview": None, "textinfo": None}
        if where == "queued":
            body["textinfo"] = f"In queue: {ahead} job(s) ahead"
        elif where == "running":
            state = self.progress()
            body.update(progress=state["progress"], eta=state["eta_relative"], textinfo=state["textinfo"])
            if state["current_image"]:
                body["live_preview"] = "data:image/png;base64," + state["current_image"]
        return body

    # ----- styles, merger ---------------------------------------------------------------------------------------

    def styles(self) -> dict[str, Style]:
        """name -> Style from the styles file, read again when it changed on disk (users edit it by hand too)."""
        if not self.styles_file or not os.path.isfile(self.styles_file):
            return {}
        stat = os.stat(self.styles_file)
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if self._styles_cache and self._styles_cache[0] == version:
                return self._styles_cache[1]
        try:
            styles = load_styles(self.styles_file)
        except (ValueError, KeyError, csv.Error) as error:
            raise RequestError(f"the styles file {self.styles_file} cannot be read: {error}") from None
        with self._lock:
            self._styles_cache = (version, styles)
        return styles

    def prompt_styles(self) -> list[dict]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in self.styles().values()]

    def save_style(self, name: str, prompt: str, negative_prompt: str) -> list[dict]:
        """Adds (or replaces) a style and rewrites the styles file atomically; returns the new listing."""
        if not self.styles_file:
            raise RequestError("this server has no styles file; start it with --styles-file styles.csv")
        if not name.strip():
            raise RequestError("a style needs a name")
        with self._style_write_lock:
            styles = dict(self.styles())
            styles[name] = Style(name, prompt, negative_prompt)
            save_styles(self.styles_file, styles)
        return self.prompt_styles()

    def delete_style(self, name: str) -> list[dict]:
        with self._style_write_lock:
            styles = dict(self.styles())
            if name not in styles:
                raise RequestError(f"style {name!r} not found; saved styles: {', '.join(styles) or 'none'}")
            del styles[name]
            save_styles(self.styles_file, styles)
        return self.prompt_styles()

    def submit_merge(self, request: MergeRequest):
        """Queues a checkpoint merge (it reads and writes whole model files, so it waits its turn like a
        generation); the job's result is A1111-style: the new file's title, hash and recipe."""
        if not self.registry.models_dir:
            raise RequestError("merged models are saved in the models folder; start the server with --models-dir")
        mode = resolve_mode(request.interp_method)
        names = [request.primary_model_name, request.secondary_model_name, request.tertiary_model_name]
        count = MERGE_METHODS[mode].models
        entries = [self.registry.checkpoint(name) for name in names[:count] if name]
        if len(entries) < count:
            raise RequestError(f"{mode} needs {('A', 'A and B', 'A, B and C')[count - 1]}: send "
                               "primary_model_name, secondary_model_name (and tertiary_model_name)")
        # The built-in default model has no file in the models folder: it is the one embedded in the package.
        paths = [entry.filename or str(DEFAULT_MODEL) for entry in entries]
        vae = self.registry.vae(request.bake_in_vae)
        stem = request.custom_name or merged_name(mode, request.multiplier, *(e.model_name for e in entries))
        if not _SAFE_NAME.match(stem) or stem in (".", ".."):
            raise RequestError(f"custom_name {stem!r} is not a file name")
        out = os.path.join(self.registry.models_dir, stem + ".safetensors")
        if os.path.exists(out):
            raise RequestError(f"{out} exists; choose another custom_name")

        def merge(control: JobControl) -> dict:
            control.textinfo = "Merging"
            result = merge_checkpoints(*paths, out=out, mode=mode, multiplier=request.multiplier,
                                       fp16=request.save_as_half, vae=vae.filename if vae else None,
                                       progress=lambda done, total: control.report(done / total))
            self.registry.refresh()
            entry = next(c for c in self.registry.checkpoints if c.filename == os.path.abspath(out))
            return {"title": entry.title, "filename": out, "sha256": result.sha256, "hash": result.model_hash,
                    "recipe": result.recipe, "info": f"Checkpoint saved to {out}"}

        return self.worker.submit(merge)

    # ----- listings and tools ---------------------------------------------------------------------------------------

    def page_config(self) -> dict:
        """What the page needs to build its controls; waits for the startup model so the default size is its own."""
        self.ready.result()
        preset = self.loaded.model.preset
        return {"samplers": list(SAMPLERS), "schedulers": list(SCHEDULERS), "upscalers": list(hires_upscalers(self.registry.upscalers_dir)),
                "width": preset.resolution, "height": preset.resolution,
                "restore_faces_reason": RESTORE_FACES_UNAVAILABLE,
                # The loaded model's ranges, for the page's size and Clip skip sliders.
                "size_step": size_multiple(preset), "clip_skip_max": max_clip_skip(preset)}

    def submit_extras(self, job: ExtrasJob):
        """Queues a validated Extras job on the worker (upscaler models share the device with generation)."""
        def run(control: JobControl) -> tuple[list[str], str]:
            control.textinfo = "Upscaling"
            return job.run(self.device)
        return self.worker.submit(run)

    def sd_models(self) -> list[dict]:
        return [c.api_dict() for c in self.registry.checkpoints]

    def sd_vae(self) -> list[dict]:
        return [{"model_name": v.name, "filename": v.filename} for v in self.registry.vaes]

    def presets(self) -> list[dict]:
        """GET /ldm/presets: the generation presets (sample.models.PRESETS) whose model this server offers, each with
        that checkpoint's title as `sd_model_checkpoint` for the page's model menu."""
        listed = []
        for preset in PRESETS.values():
            checkpoint = self.registry.preset_checkpoint(preset.model)
            if checkpoint is not None:
                listed.append({**preset.api_dict(), "sd_model_checkpoint": checkpoint.title})
        return listed

    def loras(self) -> list[dict]:
        """A1111's LoRA listing with each file's metadata. Reads files: call it off the event loop."""
        return [{"name": lora.name, "alias": lora.name, "path": lora.filename,
                 "metadata": self._lora_file_metadata(lora.filename)} for lora in self.registry.loras]

    def _lora_file_metadata(self, path: str) -> dict:
        """A LoRA file's header metadata, read again only when its modification time or size changed (a header of
        20k tensors takes seconds to parse)."""
        try:
            stat = os.stat(path)
        except OSError:
            return {}
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._lora_metadata.get(path)
        if cached and cached[0] == version:
            return cached[1]
        try:
            metadata = read_metadata(path)
        except (OSError, ValueError):  # CheckpointError is a ValueError
            metadata = {}
        self._lora_metadata[path] = (version, metadata)
        return metadata

    def embeddings_listing(self) -> dict:
        def describe(embedding):
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": int(embedding.vectors[0].shape[1]), "vectors": embedding.num_vectors}

        loaded = {name: describe(e) for name, e in self.embeddings.embeddings.items()}
        return {"loaded": loaded, "skipped": {name: {} for name in self.embeddings.skipped}}

    def png_info(self, data: str) -> dict:
        """A1111's /sdapi/v1/png-info: the image's text chunks, and the `parameters` one parsed."""
        try:
            image = decode_image(data)
        except ImageDecodeError as error:
            raise RequestError(str(error)) from None
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    def count_tokens(self, text: str, steps: int = 20) -> dict:
        used, limit = token_count(text, steps, self.tokenizer, self.embeddings)
        return {"used": used, "limit": limit}

    def _decode_all(self, images: list[str]) -> list[Image.Image]:
        try:
            return [decode_image(data, f"images[{i}]") for i, data in enumerate(images)]
        except ImageDecodeError as error:
            raise RequestError(str(error)) from None

    def save_images(self, images: list[str]) -> list[str]:
        """The page's Save button: images (base64 PNG, infotext inside) into outdir/saved, named as samples are."""
        paths = []
        for image in self._decode_all(images):
            text = image.info.get("parameters")
            info = parse_infotext(text) if text else {}
            seed = int(info["Seed"]) if info.get("Seed", "").isdigit() else None
            paths.append(save_sample(self.options()["outdir_save"], image, seed, info.get("Prompt", ""), text))
        return paths

    def zip_images(self, images: list[str]) -> bytes:
        """The page's Zip button: the images, byte for byte (infotexts included), in one zip."""
        self._decode_all(images)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for i, data in enumerate(images):
                archive.writestr(f"{i:05d}.png", base64.b64decode(data.split(",", 1)[-1]))
        return buffer.getvalue()
