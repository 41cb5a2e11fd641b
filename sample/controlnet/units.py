"""A ControlNet unit: one control image, its preprocessor, model and schedule, with sd-webui-controlnet's field
names, choices and infotext.

    ControlNet 0: "Module: canny, Model: shapes_canny [1a2b3c4d], Weight: 1, Resize Mode: Crop and Resize, ..."

The infotext value lists the unit's fields as "Display Name: value" (sd-webui-controlnet's serialize_unit: field
names title-cased, thresholds and resolution left out when the preprocessor has no such slider); the control image
itself is not in the infotext, as in sd-webui-controlnet: reproducing an image needs it given again.
"""
import math
import os
import re
from dataclasses import dataclass, replace

from PIL import Image

from ldm import legacy_model_hash

from ..models import DATA_DIR, register_file
from .preprocessors import (DEFAULT_RESOLUTION, MAX_RESOLUTION, MIN_RESOLUTION, PreprocessorError, get_preprocessor,
                            resolve_thresholds)

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# Older names sd-webui-controlnet still accepts for the resize modes.
RESIZE_MODE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                       "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
# sd-webui-controlnet's default unit count is 3; more units multiply the work of every step.
MAX_UNITS = 8
# "My prompt is more important" scales residual i of n by SOFT_INJECTION_BASE ** (n - 1 - i) (hook.py's 0.825**(12-i)
# for SD1.5's 13 residuals): the deep, coarse residuals keep most of their weight, the fine ones fade.
SOFT_INJECTION_BASE = 0.825


class UnitError(ValueError):
    """A unit field out of range or of the wrong kind; the message names it."""


@dataclass
class ControlNetUnit:
    """One ControlNet unit (sd-webui-controlnet's ControlNetUnit fields).

    image: PIL image or path of the control image (None in img2img: the init image); mask: L image or path, 255 =
    masked (the inpaint preprocessor; None in img2img: the inpainting mask). module: preprocessor name; model: a file
    in the ControlNet folder, by file name, stem or "stem [hash]". weight scales the residuals. guidance_start /
    guidance_end: the fraction of the sampling steps the unit acts in (step i of n when start <= i/n <= end).
    control_mode: a name of CONTROL_MODES or its index; resize_mode: a name of RESIZE_MODES (or an alias) or its
    index, how the control map is fitted to the generation size. pixel_perfect: the processor resolution follows
    from the sizes; processor_res / threshold_a / threshold_b: -1 means the preprocessor's default.
    """
    image: Image.Image | str | None = None
    mask: Image.Image | str | None = None
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = "Balanced"
    resize_mode: str | int = "Crop and Resize"
    pixel_perfect: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1

    def validate(self) -> "ControlNetUnit":
        """Check every field and return a copy with the choices normalised to their names and -1 defaults resolved
        (what the infotext records); raises UnitError."""
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise UnitError(message)

        try:
            preprocessor = get_preprocessor(self.module)
            threshold_a, threshold_b = resolve_thresholds(preprocessor, self.threshold_a, self.threshold_b)
        except PreprocessorError as error:
            raise UnitError(str(error)) from None
        need(isinstance(self.model, str) and self.model not in ("", "None"),
             f"no model chosen (model {self.model!r}); give a ControlNet file of the ControlNet folder "
             "(/controlnet/model_list lists them)")
        for name in ("weight", "guidance_start", "guidance_end"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                 f"{name} must be a number, got {value!r}")
        need(self.weight >= 0, f"weight must be >= 0, got {self.weight}")
        need(0 <= self.guidance_start <= self.guidance_end <= 1,
             f"guidance_start and guidance_end must satisfy 0 <= start <= end <= 1, got {self.guidance_start} and "
             f"{self.guidance_end}")
        need(isinstance(self.pixel_perfect, bool), f"pixel_perfect must be true or false, got {self.pixel_perfect!r}")
        processor_res = self.processor_res
        if preprocessor.uses_resolution:
            if processor_res == -1:
                processor_res = DEFAULT_RESOLUTION
            need(isinstance(processor_res, int) and MIN_RESOLUTION <= processor_res <= MAX_RESOLUTION,
                 f"processor_res must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] or -1 (default "
                 f"{DEFAULT_RESOLUTION}), got {self.processor_res!r}")
        return replace(self, control_mode=_choice("control_mode", self.control_mode, CONTROL_MODES, {}),
                       resize_mode=_choice("resize_mode", self.resize_mode, RESIZE_MODES, RESIZE_MODE_ALIASES),
                       processor_res=processor_res, threshold_a=threshold_a, threshold_b=threshold_b)

    def active_at(self, step: int, steps: int) -> bool:
        """Whether the unit acts at sampling step `step` (0-based) of `steps` (sd-webui-controlnet's
        guidance_schedule_handler: the fraction step / steps inside [guidance_start, guidance_end])."""
        return self.guidance_start <= step / steps <= self.guidance_end

    def level_scales(self, count: int) -> list[float]:
        """The factor of each of the ControlNet's `count` residuals (input blocks, then the middle block): the weight,
        times SOFT_INJECTION_BASE ** (count - 1 - i) unless the control mode is Balanced (hook.py's soft injection)."""
        if self.control_mode == CONTROL_MODES[0]:
            return [float(self.weight)] * count
        return [self.weight * SOFT_INJECTION_BASE ** (count - 1 - i) for i in range(count)]

    @property
    def cfg_injection(self) -> bool:
        """"ControlNet is more important": the unconditional half of classifier-free guidance gets no control, so
        guidance pushes towards the control as much as towards the prompt (hook.py's cfg_injection)."""
        return self.control_mode == CONTROL_MODES[2]

    def infotext(self, model_label: str) -> str:
        """The unit's infotext value, for a validated unit whose model file is called `model_label`."""
        preprocessor = get_preprocessor(self.module)
        fields = {"Module": self.module, "Model": model_label, "Weight": self.weight, "Resize Mode": self.resize_mode,
                  "Processor Res": self.processor_res if preprocessor.uses_resolution else None,
                  "Threshold A": self.threshold_a if preprocessor.sliders[0] else None,
                  "Threshold B": self.threshold_b if preprocessor.sliders[1] else None,
                  "Guidance Start": self.guidance_start, "Guidance End": self.guidance_end,
                  "Pixel Perfect": self.pixel_perfect, "Control Mode": self.control_mode}
        return ", ".join(f"{key}: {_format(value)}" for key, value in fields.items() if value is not None)


def _format(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _choice(name: str, value, choices: tuple[str, ...], aliases: dict[str, str]) -> str:
    """A choice given by name (or alias) or index -> its name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str) and aliases.get(value, value) in choices:
        return aliases.get(value, value)
    raise UnitError(f"{name} must be one of {', '.join(repr(c) for c in choices)} or their index 0..{len(choices) - 1}, "
                    f"got {value!r}")


def parse_unit_infotext(text: str) -> ControlNetUnit:
    """A unit from its infotext value (the inverse of ControlNetUnit.infotext; no image). Fields this project does
    not have (Low Vram, Hr Option, Save Detected Map) are ignored."""
    values = {}
    for item in text.split(","):
        key, separator, value = item.strip().partition(": ")
        if not separator:
            raise UnitError(f"ControlNet infotext entry {item.strip()!r} is not 'Key: value'")
        values[key] = value

    def number(key: str, convert, default):
        if key not in values:
            return default
        try:
            return convert(values[key])
        except ValueError:
            raise UnitError(f"ControlNet infotext field {key!r} has the value {values[key]!r}, which is not a number") \
                from None

    return ControlNetUnit(
        module=values.get("Module", "none"), model=values.get("Model", "None"),
        weight=number("Weight", float, 1.0), resize_mode=values.get("Resize Mode", "Crop and Resize"),
        processor_res=number("Processor Res", lambda v: int(float(v)), -1), threshold_a=number("Threshold A", float, -1),
        threshold_b=number("Threshold B", float, -1), guidance_start=number("Guidance Start", float, 0.0),
        guidance_end=number("Guidance End", float, 1.0), pixel_perfect=values.get("Pixel Perfect") == "True",
        control_mode=values.get("Control Mode", "Balanced"))


_OPTION_TYPES = {"weight": float, "guidance_start": float, "guidance_end": float, "processor_res": int,
                 "threshold_a": float, "threshold_b": float}


def unit_from_option(text: str) -> ControlNetUnit:
    """A unit from the commands' `--controlnet` value: comma-separated key=value pairs of ControlNetUnit fields,
    e.g. "image=edges.png,module=none,model=shapes_canny,weight=0.8,control_mode=My prompt is more important"."""
    values = {}
    names = set(ControlNetUnit.__dataclass_fields__)
    for item in text.split(","):
        key, separator, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not separator or key not in names:
            raise UnitError(f"{item.strip()!r} is not key=value with a key among {', '.join(sorted(names))}")
        try:
            if key in _OPTION_TYPES:
                value = _OPTION_TYPES[key](value)
            elif key == "pixel_perfect":
                value = {"true": True, "false": False}[value.lower()]
            elif key in ("control_mode", "resize_mode") and value.isdigit():
                value = int(value)
        except (ValueError, KeyError):
            raise UnitError(f"{key}={value!r} is not a valid value for {key}") from None
        values[key] = value
    return ControlNetUnit(**values)


# sd-webui-controlnet's alternative keys in API units.
_API_ALIASES = {"input_image": "image", "mask_image": "mask", "guidance": "guidance_end", "lowvram": "low_vram"}
# API fields accepted and ignored: they change nothing here (memory handling, saving the map, hires options).
_API_IGNORED = {"enabled", "low_vram", "save_detected_map", "hr_option", "inpaint_crop_input_image", "is_ui",
                "batch_images", "input_mode", "output_dir", "loopback", "use_preview_as_input", "generated_image",
                "animatediff_batch", "batch_modifiers", "batch_mask_dir", "batch_input_gallery",
                "batch_mask_gallery", "effective_region_mask", "ipadapter_input", "union_control_type"}


def unit_from_api(fields: dict, decode_image) -> ControlNetUnit | None:
    """A unit from one entry of `alwayson_scripts.controlnet.args` (sd-webui-controlnet's API dict), or None when
    `enabled` is false. decode_image(data, field_name) turns a base64 image into a PIL image. Unknown fields are
    refused (a typo would otherwise silently change nothing)."""
    if not isinstance(fields, dict):
        raise UnitError(f"a ControlNet unit must be a JSON object, got {type(fields).__name__}")
    if not fields.get("enabled", True):
        return None
    values = {}
    names = set(ControlNetUnit.__dataclass_fields__)
    for key, value in fields.items():
        key = _API_ALIASES.get(key, key)
        if key in _API_IGNORED:
            continue
        if key not in names:
            raise UnitError(f"unknown ControlNet unit field {key!r}; known: {', '.join(sorted(names))}")
        values[key] = value
    image = values.get("image")
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        values["image"] = image.get("image")
        values["mask"] = values.get("mask") or image.get("mask")
    for key in ("image", "mask"):
        if values.get(key):
            if not isinstance(values[key], str):
                raise UnitError(f"{key} must be a base64-encoded image, got {type(values[key]).__name__}")
            values[key] = decode_image(values[key], key)
        else:
            values[key] = None
    return ControlNetUnit(**values)


def find_model(folder: str | os.PathLike | None, name: str) -> tuple[str, str]:
    """(path, label "stem [hash]") of the ControlNet file `name` in `folder` or built in (list_models' order), looked
    up as sd-webui-controlnet does: by "stem [hash]", else by file name or stem (case-insensitive; a "[hash]" that
    does not match is ignored, as the extension falls back to the name)."""
    models = list_models(folder)
    if name in models:
        return models[name], name
    wanted = _HASH_SUFFIX.sub("", name).lower()
    for label, path in models.items():
        if wanted in (os.path.basename(path).lower(), _stem(path).lower()):
            return path, label
    where = f"in {folder}" if folder else "(no ControlNet folder given: --controlnet-dir)"
    raise UnitError(f"ControlNet model {name!r} not found {where}; available: {', '.join(models) or 'none'}")


MODEL_EXTENSIONS = (".safetensors", ".pth", ".ckpt", ".pt")
_HASH_SUFFIX = re.compile(r" \[[0-9a-fA-F]{8,10}\]$")


def list_models(folder: str | os.PathLike | None) -> dict[str, str]:
    """{"stem [hash]": path} of the ControlNet files in `folder` and its subfolders, sorted by name, then the built-in
    ControlNets (BUILTIN_CONTROLNETS) whose names no file of the folder takes; the hash is A1111's legacy 8-digit one,
    as sd-webui-controlnet shows it. The one place that decides the search order."""
    found = []
    if folder and os.path.isdir(folder):
        for root, _, files in os.walk(folder):
            found += [os.path.join(root, f) for f in files if f.lower().endswith(MODEL_EXTENSIONS)]
        found.sort(key=lambda p: os.path.basename(p).lower())
    taken = {_stem(p).lower() for p in found}
    found += [path for name, path in BUILTIN_CONTROLNETS.items() if name.lower() not in taken]
    return {f"{_stem(p)} [{legacy_model_hash(p)}]": p for p in found}


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ControlNets shipped with the package: name -> file. Every entry point (generate(), the commands' --controlnet, the
# web UI's /controlnet/model_list) finds them by name after the user's ControlNet folder, where a file of the same
# name wins -- as built-in LoRAs are found (sample.models.BUILTIN_LORAS).
BUILTIN_CONTROLNETS: dict[str, str] = {}


def register_controlnet(path: str | os.PathLike) -> str:
    """Offer a ControlNet file by its name wherever ControlNet models are listed and looked up, with or without a
    ControlNet folder; returns the name."""
    return register_file(BUILTIN_CONTROLNETS, path, "ControlNet")


# The shapes model's ControlNets (docs/RESULTS.md): object silhouettes, and silhouettes in the objects' colours.
SHAPES_CONTROLNETS = [DATA_DIR / f"tiny-shapes-{kind}.safetensors" for kind in ("controlnet", "controlnet-seg")]
for _path in SHAPES_CONTROLNETS:
    if _path.is_file():
        register_controlnet(_path)
