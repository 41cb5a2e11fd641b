"""The generation parameters: one dataclass whose fields are the controls of A1111's txt2img and img2img tabs."""
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field, replace

from PIL import Image

from samplers import SAMPLERS, SCHEDULERS, resolve_sampler

from .controlnet.units import MAX_UNITS, ControlNetUnit, UnitError, parse_unit_infotext
from .infotext import parse_infotext
from .rng import MAX_SEED, RNG_SOURCES
from .upscalers import BUILTIN_UPSCALERS, LATENT_UPSCALERS, upscaler_names

# The hires upscalers that need no model file; hires_upscalers(folder) adds the folder's models.
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *BUILTIN_UPSCALERS)


def hires_upscalers(upscaler_dir: str | os.PathLike | None) -> tuple[str, ...]:
    """Every valid hr_upscaler: the latent modes, the built-in and registered upscalers and the models in
    `upscaler_dir` (sample.upscalers.list_upscalers' names)."""
    return (*LATENT_UPSCALERS, *upscaler_names(upscaler_dir))


# A1111's "Masked content" choices, by their index (inpainting_fill).
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")
# A1111's "Resize mode" choices for img2img, by their index.
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
# Noise levels of the discrete models: more sampling steps than this only revisit the same timesteps.
MAX_STEPS = 1000
# A1111's largest Batch count on its page; a job that needs more is a script's business, not one request's.
MAX_BATCH_COUNT = 100
# Largest "Resize seed from" side: the seed's noise is drawn at that size before it is cropped (A1111's slider stops
# at 2048; 8192 pixels is at most 64 MiB of noise per image even with a 4x VAE).
MAX_SEED_RESIZE = 8192
# The most work a server accepts in one request by default, in pixel-steps (GenerationParams.work): 1024x1024 at 150
# steps for 8 images, a large A1111 job; beyond it one request holds the only worker for many minutes while every
# other client waits (python -m sample.webui --max-work).
DEFAULT_MAX_WORK = 1024 * 1024 * 150 * 8


class ParamsError(ValueError):
    """A parameter is out of range or inconsistent; the message names it and says what is allowed."""


def size_multiple(preset) -> int:
    """The step of the sizes a model can generate, in pixels: the VAE divides by 2^(VAE levels - 1) (8 for SD) and
    every UNet level but the last halves the latent again with a stride-2 convolution (rounding up), so a latent side
    that is not a multiple of 2^(UNet levels - 1) comes back one larger from the up-sampling path and no longer
    matches its skip connection."""
    return 2 ** (len(preset.vae.ch_mult) - 1) * 2 ** (len(preset.unet.channel_mult) - 1)


def max_clip_skip(preset) -> int:
    """The largest clip skip every text tower of the model has layers for (a tower that starts from its
    penultimate layer has one fewer to skip; ldm.clip's blocks_to_run)."""
    return min(tower.layers - (tower.layer != "last") for tower in preset.text)


@dataclass
class GenerationParams:
    """A1111's generation controls. txt2img when `init_images` is empty, img2img / inpainting otherwise.

    Sizes are in pixels and must be multiples of 8; None means the model's native resolution (img2img: the init
    image's size rounded down to a multiple of 8). seed / subseed -1 mean random. `rng` is where noise is drawn: "CPU"
    (the default here: the same image on every machine) or "GPU" (A1111's default; on a CPU-only machine the same as
    CPU). `eta` None keeps the sampler's default (1 for ancestral samplers, 0 for DDIM). `vae` is "Automatic" (the
    checkpoint's own VAE) or the path of a VAE file. Hires fix (`enable_hr`, txt2img only): the first pass at
    width×height, an upscale by `hr_scale` in latent space ("Latent") or of the decoded image ("Lanczos"), then an
    img2img pass of `hr_second_pass_steps` (0: `steps`) at `hr_denoising_strength`. `controlnet_units`: ControlNet
    units (sample.controlnet.ControlNetUnit), applied in every pass; their models are files of generate()'s
    `controlnet_dir`.
    """
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = field(default_factory=list)
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    width: int | None = None
    height: int | None = None
    cfg_scale: float = 7.0
    batch_count: int = 1
    batch_size: int = 1
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    eta: float | None = None
    clip_skip: int = 1
    tiling: bool = False
    restore_faces: bool = False
    rng: str = "CPU"
    vae: str = "Automatic"
    # img2img and inpainting
    init_images: list = field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: float = 0.75
    noise_multiplier: float = 1.0
    mask: Image.Image | str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    inpainting_mask_weight: float = 1.0
    # hires fix
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_denoising_strength: float = 0.7
    # ControlNet (sd-webui-controlnet's units)
    controlnet_units: list[ControlNetUnit] = field(default_factory=list)

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    def validate(self, upscalers: Collection[str] | None = None) -> "GenerationParams":
        """Check every field; raise ParamsError naming the first bad one. Returns self. `upscalers`: the valid
        hr_upscaler names, hires_upscalers(folder) for a folder of upscaler models (default: no folder)."""
        upscalers = hires_upscalers(None) if upscalers is None else upscalers
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ParamsError(message)

        for name in ("steps", "batch_count", "batch_size", "clip_skip"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        for name, limit in (("steps", MAX_STEPS), ("batch_count", MAX_BATCH_COUNT)):
            value = getattr(self, name)
            need(value <= limit, f"{name} must be between 1 and {limit}, got {value!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value > 0 and value % 8 == 0),
                 f"{name} must be a positive multiple of 8 pixels, got {value!r}")
        for name in ("cfg_scale", "denoising_strength", "subseed_strength", "noise_multiplier",
                     "inpainting_mask_weight", "hr_scale", "hr_denoising_strength"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a number, got {value!r}")
        need(0 <= self.denoising_strength <= 1, f"denoising_strength must be in [0, 1], got {self.denoising_strength}")
        need(0 <= self.hr_denoising_strength <= 1,
             f"hr_denoising_strength must be in [0, 1], got {self.hr_denoising_strength}")
        need(0 <= self.subseed_strength <= 1, f"subseed_strength must be in [0, 1], got {self.subseed_strength}")
        need(0 <= self.inpainting_mask_weight <= 1,
             f"inpainting_mask_weight must be in [0, 1], got {self.inpainting_mask_weight}")
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            need(isinstance(value, int) and -1 <= value < 2 ** 32,
                 f"{name} must be -1 (random) or an integer in [0, {MAX_SEED}], got {value!r}")
        try:
            resolve_sampler(self.sampler_name, self.scheduler)
        except ValueError:
            if self.scheduler not in SCHEDULERS:
                raise ParamsError(f"unknown schedule type {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}") \
                    from None
            raise ParamsError(f"unknown sampler {self.sampler_name!r}; valid: {', '.join(SAMPLERS)}") from None
        need(self.rng in RNG_SOURCES, f"rng must be one of {', '.join(RNG_SOURCES)}, got {self.rng!r}")
        need(self.eta is None or self.eta >= 0, f"eta must be >= 0, got {self.eta}")
        need(self.hr_upscaler in upscalers,
             f"unknown hires upscaler {self.hr_upscaler!r}; valid: {', '.join(upscalers)}")
        need(self.hr_scale >= 1, f"hr_scale must be >= 1, got {self.hr_scale}")
        need(isinstance(self.hr_second_pass_steps, int) and 0 <= self.hr_second_pass_steps <= MAX_STEPS,
             f"hr_second_pass_steps must be an integer in [0, {MAX_STEPS}] (0: as many as steps), got "
             f"{self.hr_second_pass_steps!r}")
        need(self.inpainting_fill in range(len(INPAINTING_FILLS)),
             f"inpainting_fill must be 0..3 ({', '.join(INPAINTING_FILLS)}), got {self.inpainting_fill!r}")
        need(self.resize_mode in range(len(RESIZE_MODES)),
             f"resize_mode must be 0..2 ({', '.join(RESIZE_MODES)}), got {self.resize_mode!r}")
        need(isinstance(self.mask_blur, int) and self.mask_blur >= 0, f"mask_blur must be >= 0, got {self.mask_blur}")
        need(self.inpaint_full_res_padding >= 0,
             f"inpaint_full_res_padding must be >= 0, got {self.inpaint_full_res_padding}")
        need(0 <= self.seed_resize_from_w <= MAX_SEED_RESIZE and 0 <= self.seed_resize_from_h <= MAX_SEED_RESIZE,
             f"seed_resize_from_w / _h must be in [0, {MAX_SEED_RESIZE}] (0: off), got {self.seed_resize_from_w} / "
             f"{self.seed_resize_from_h}")
        need(self.mask is None or self.is_img2img, "a mask needs an init image (inpainting is img2img with a mask)")
        need(len(self.init_images) <= 1 or len(self.init_images) == self.batch_size,
             f"give one init image, or one per image of a batch (batch_size {self.batch_size}); "
             f"got {len(self.init_images)}")
        need(not (self.enable_hr and self.is_img2img), "hires fix is a txt2img option; img2img has no hires pass")
        need(not self.restore_faces, "Restore faces needs face-restoration weights (GFPGAN or CodeFormer), which "
                                     "this project does not include; turn the option off")
        need(self.vae == "Automatic" or os.path.isfile(self.vae),
             f"VAE file not found: {self.vae} (use 'Automatic' for the checkpoint's own VAE)")
        need(len(self.controlnet_units) <= MAX_UNITS,
             f"at most {MAX_UNITS} ControlNet units, got {len(self.controlnet_units)}")
        for index, unit in enumerate(self.controlnet_units):
            need(isinstance(unit, ControlNetUnit),
                 f"controlnet_units[{index}] must be a sample.controlnet.ControlNetUnit, got {type(unit).__name__}")
            try:
                unit.validate()
            except UnitError as error:
                raise ParamsError(f"ControlNet unit {index}: {error}") from None
            need(unit.image is not None or self.is_img2img,
                 f"ControlNet unit {index} has no control image (only img2img units default to the init image)")
        return self

    def validate_for(self, preset) -> "GenerationParams":
        """Check what depends on the model (an ldm.presets.Preset): sizes its UNet can halve and double back
        exactly, and a clip skip its text encoder has layers for. Raises ParamsError; returns self."""
        multiple = size_multiple(preset)
        vae_factor = 2 ** (len(preset.vae.ch_mult) - 1)
        sizes = [("width", self.width), ("height", self.height)]
        if self.enable_hr and self.width and self.height:
            # The second pass runs at the upscaled size, rounded down to a multiple of 8 as generate() does.
            for name, value in sizes[:]:
                upscaled = int(value * self.hr_scale) // 8 * 8
                sizes.append((f"hires {name} ({value} x hr_scale {self.hr_scale})", upscaled))
        for name, value in sizes:
            # A size left to the model is its resolution, which comes from the checkpoint's metadata.
            if value is not None and value <= 0:
                raise ParamsError(f"{name} must be a positive multiple of {multiple} pixels, got {value}")
            if value is not None and value % multiple:
                lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
                nearest = f"{lower} or {upper}" if lower else str(upper)
                raise ParamsError(f"{name} {value} does not fit this model: its sizes are multiples of {multiple} "
                                  f"pixels (the VAE's {vae_factor}x times the UNet's {multiple // vae_factor}x "
                                  f"down-sampling); nearest valid: {nearest}")
        deepest = max_clip_skip(preset)
        if self.clip_skip > deepest:
            raise ParamsError(f"clip_skip {self.clip_skip} is beyond this model's text encoder: it allows 1 to "
                              f"{deepest}")
        return self

    def work(self) -> int:
        """The job's compute in pixel-steps: pixels x sampling steps x images, the second pass of hires fix at its
        own size (None sizes count as 512 pixels); each ControlNet unit adds half (its copy of the UNet's encoder
        runs beside the UNet at every step)."""
        width, height = self.width or 512, self.height or 512
        steps = max(int(min(self.denoising_strength, 0.999) * self.steps), 1) if self.is_img2img else self.steps
        work = width * height * steps
        if self.enable_hr:
            work += int(width * self.hr_scale) * int(height * self.hr_scale) * (self.hr_second_pass_steps or self.steps)
        return work * self.batch_size * self.batch_count * (2 + len(self.controlnet_units)) // 2

    @classmethod
    def from_infotext(cls, infotext: str | dict, **overrides) -> "GenerationParams":
        """Parameters from an infotext (the text, or `parse_infotext`'s dict), as A1111's "Send to txt2img" does.

        Keys that have no field here (Model, Model hash, Lora hashes, ...) are ignored; `overrides` set fields
        directly (e.g. init_images for an img2img infotext, whose image the text cannot carry). "ControlNet N"
        entries become controlnet_units without images.
        """
        info = parse_infotext(infotext) if isinstance(infotext, str) else infotext
        values = {"prompt": info.get("Prompt", ""), "negative_prompt": info.get("Negative prompt", "")}

        def take(key, name, convert):
            if key in info:
                try:
                    values[name] = convert(info[key])
                except ValueError:
                    raise ParamsError(f"infotext field {key!r} has the value {info[key]!r}, which is not a "
                                      f"valid {name}") from None

        take("Steps", "steps", int)
        take("Sampler", "sampler_name", str)
        take("Schedule type", "scheduler", str)
        take("CFG scale", "cfg_scale", float)
        take("Seed", "seed", int)
        take("Size-1", "width", int)
        take("Size-2", "height", int)
        take("Clip skip", "clip_skip", int)
        take("Variation seed", "subseed", int)
        take("Variation seed strength", "subseed_strength", float)
        take("Seed resize from-1", "seed_resize_from_w", int)
        take("Seed resize from-2", "seed_resize_from_h", int)
        take("Tiling", "tiling", lambda v: v == "True")
        take("RNG", "rng", str)
        take("Eta", "eta", float)
        take("Eta DDIM", "eta", float)
        take("Noise multiplier", "noise_multiplier", float)
        take("Conditional mask weight", "inpainting_mask_weight", float)
        take("Mask blur", "mask_blur", int)
        take("Masked area padding", "inpaint_full_res_padding", int)
        take("Inpaint area", "inpaint_full_res", lambda v: v == "Only masked")
        take("Mask mode", "inpainting_mask_invert", lambda v: v == "Inpaint not masked")
        take("Masked content", "inpainting_fill", INPAINTING_FILLS.index)
        if "Hires upscale" in info or "Hires upscaler" in info:
            values["enable_hr"] = True
            take("Hires upscale", "hr_scale", float)
            take("Hires upscaler", "hr_upscaler", str)
            take("Hires steps", "hr_second_pass_steps", int)
            take("Denoising strength", "hr_denoising_strength", float)
        else:
            take("Denoising strength", "denoising_strength", float)
        try:
            units = sorted((int(key.split()[1]), parse_unit_infotext(value)) for key, value in info.items()
                           if key.startswith("ControlNet ") and key.split()[1].isdigit())
        except UnitError as error:
            raise ParamsError(str(error)) from None
        # The infotext cannot hold the control images: give them back with `controlnet_units` in overrides, or
        # replace each unit's image (img2img units without one use the init image).
        values["controlnet_units"] = [unit for _, unit in units]
        return replace(cls(**values), **overrides)
