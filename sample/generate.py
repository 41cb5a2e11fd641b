"""`generate(model, params)`: txt2img, img2img, inpainting and hires fix with A1111's parameters.

One job is `batch_count` batches of `batch_size` images; image i has seed `seed + i` (with a variation seed, every
image keeps `seed` and the variation seed advances instead, as in A1111). Each batch:

    txt2img    noise(seed) · σ₀ ──sampler + CFG──> latent ─(hires fix: upscale, re-noise, img2img)─> VAE decode
    img2img    VAE(init image) + noise(seed) · σ_k ──sampler over the last steps──> latent ──> VAE decode
    inpainting img2img whose unmasked area is held to the original at every step (ordinary models) or conditioned
               on the masked image (9-channel inpainting models); the original pixels are pasted back outside the mask

Nothing is global: the model's weights are only swapped temporarily (LoRA, tiling, VAE override) and restored when
the job ends, whatever happens.

Extension points: `callback` sees every sampling step (a StepInfo) and may raise Interrupted to end the job with the
images finished so far; `interrupt_check` is called between UNet layers, so an interrupt also lands inside a long
step; `sampler` and `guidance` replace the sampler and classifier-free guidance for one call (samplers.register_sampler
makes a sampler a name that infotexts carry).
"""
import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from tqdm.auto import tqdm

from ldm import model_hash
from samplers import (CFGDenoiser, InpaintingDenoiser, SamplerInfo, blur_mask, get_sigmas, img2img_sigmas,
                      img2img_steps, initial_latent, latent_mask, mix_seed, model_denoiser, prompt_schedule,
                      resolve_sampler, sample)

from . import images as imaging
from .compiled import compiled
from .conditioning import PromptEncoder, text_towers, token_embedding
from .controlnet.control import ControlledModel, UnitControl, prepare_units
from .controlnet.units import UnitError
from .embeddings import EmbeddingDatabase
from .infotext import format_infotext
from .lora import LayerIndex, applied, find_lora, load_lora, with_bundled_embeddings
from .models import BUILTIN_LORAS, LoadedModel, load_vae
from .params import INPAINTING_FILLS, GenerationParams, ParamsError, hires_upscalers, size_multiple
from .prompts import extract_extra_networks, prompt_schedule as text_schedule
from .rng import ImageNoise, fixed_seed
from .styles import apply_styles
from .upscalers import LATENT_UPSCALERS, UpscalerError, check_upscaler, upscale_to

# Names in "Lora hashes" / "TI hashes" lose the characters that separate the entries (A1111).
_NO_SEPARATORS = str.maketrans("", "", ":,")
# Random streams derived from an image's seed (samplers.mix_seed), independent of its noise generator.
VAE_ENCODE_STREAM = 3


class GenerationError(RuntimeError):
    """The generation could not produce an image; the message says why and what to try."""


class GenerationWarning(UserWarning):
    """Something the user asked for was skipped (e.g. a LoRA that was not found); the image was still made."""


class Interrupted(Exception):
    """Raise it from a generate() callback or interrupt_check to end the job: generate() returns the images of the
    batches finished so far (Result.interrupted is True) and nothing of the batch it was in."""


class Skipped(Exception):
    """Raise it from a generate() callback or interrupt_check to drop the batch being sampled (A1111's Skip): the job
    goes on with the next batch, and the result holds no image of the skipped one."""


@dataclass(frozen=True)
class StepInfo:
    """One sampling step, as generate()'s callback sees it.

    image_indices: the job's indices of the images in this batch (image k of the batch is image_indices[k]).
    pass_name: "base" (txt2img / img2img) or "hires" (hires fix's second pass). i: the step, 0-based, of `total`
    steps in this pass (the schedule's; DPM fast reports once per solver step, fewer, and DPM adaptive chooses its
    own number, so their i does not stop at total - 1). sigma: the step's noise level. x: the latent the step starts from [B, C, h, w] (noise level
    sigma). denoised: the step's prediction of the clean latent x0 [B, C, h, w]. sampler: the sampler's name.
    """
    image_indices: tuple[int, ...]
    pass_name: str
    i: int
    total: int
    sigma: float
    x: torch.Tensor = field(repr=False)
    denoised: torch.Tensor = field(repr=False)
    sampler: str


@dataclass
class Result:
    """images: PIL RGB images in job order; seeds / subseeds: per image; infotexts: per image, A1111's format;
    params: the parameters as run (random seeds fixed, sizes resolved); warnings: what the user should know (e.g. a
    LoRA that was not found); interrupted: the job was stopped by Interrupted, so it holds only the batches finished
    before. Batches ended by Interrupted or Skipped leave no image, seed or infotext in the result."""
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    params: GenerationParams
    warnings: list[str]
    interrupted: bool = False


def batch_steps(params: GenerationParams) -> int:
    """Sampling steps one batch of `params` runs, the count progress bars and StepInfo totals add up to: img2img runs
    samplers.img2img_steps of its schedule; txt2img its steps plus, with hires fix, the second pass's."""
    if params.is_img2img:
        return img2img_steps(params.steps, params.denoising_strength)
    hires = params.enable_hr and params.hr_denoising_strength > 0
    return params.steps + ((params.hr_second_pass_steps or params.steps) if hires else 0)


def generate(model: LoadedModel | nn.Module, params: GenerationParams | dict | str, progress: bool = True, *,
             lora_dir: str | os.PathLike | None = None, embeddings: EmbeddingDatabase | str | None = None,
             styles: dict | None = None, callback: Callable[[StepInfo], None] | None = None,
             interrupt_check: Callable[[], None] | None = None, sampler: SamplerInfo | Callable | None = None,
             guidance: Callable[[nn.Module], nn.Module] = CFGDenoiser,
             controlnet_dir: str | os.PathLike | None = None, controlnet_cache: dict | None = None,
             upscaler_dir: str | os.PathLike | None = None, compile: bool | str = False) -> Result:
    """Run one A1111 job. `model`: a LoadedModel (name and hash go into the infotext) or a bare LatentDiffusion;
    `params`: GenerationParams, or an infotext (text or `parse_infotext` dict) to reproduce; `lora_dir`: where
    `<lora:name:w>` files are looked up; `embeddings`: an EmbeddingDatabase or a folder of embedding files;
    `styles`: name -> Style for `params.styles`; `controlnet_dir`: the folder of the ControlNet files that
    `params.controlnet_units` name; `controlnet_cache`: a dict kept between calls to reuse the ControlNets loaded
    for the previous job (sample.controlnet.prepare_units). `progress` shows tqdm bars (one per sampling pass, one
    for the job).

    callback(StepInfo) is called after every sampling step; raising Interrupted in it ends the job, raising Skipped
    drops the current batch (see Result). interrupt_check() is called before every layer of the UNet's blocks, so
    either exception raised there takes effect inside a long step. sampler: used instead of params.sampler_name (a SamplerInfo, or a function with the
    signature of samplers.sampling.sample_euler); the infotext names it. guidance: maps the conditional denoiser
    D(x, sigma, context=...) to the guided one called as guided(x, sigma, cond=, uncond=, cond_scale=); the default
    is classifier-free guidance (samplers.CFGDenoiser), samplers.guidance_interval(lo, hi) an alternative.
    upscaler_dir: the folder of upscaler models whose names hr_upscaler may give (sample.upscalers).
    compile: run the UNet and VAE decoder through torch.compile (True: the device's default mode, or a mode name of
    sample.compiled.COMPILE_MODES), compiled at the first call per shape and cached on the model; interrupt_check then
    runs before every UNet call instead of every layer (see sample/compiled.py)."""
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model, model.preset.name)
    if isinstance(params, (str, dict)):
        params = GenerationParams.from_infotext(params)
    params = dataclasses.replace(params).validate(hires_upscalers(upscaler_dir))
    if params.enable_hr and params.hr_upscaler not in LATENT_UPSCALERS:
        try:
            check_upscaler(params.hr_upscaler, upscaler_dir)  # a broken model file fails before the first pass
        except UpscalerError as error:
            raise ParamsError(f"hr_upscaler: {error}") from None
    job = _Job(loaded, params, lora_dir, embeddings, styles or {}, sampler, guidance, controlnet_dir,
               controlnet_cache, upscaler_dir)
    try:
        return job.run(progress, callback, interrupt_check, compile)
    finally:
        for note in job.notes:
            warnings.warn(note, GenerationWarning, stacklevel=2)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class _Job:
    def __init__(self, loaded: LoadedModel, params: GenerationParams, lora_dir, embeddings, styles,
                 sampler: SamplerInfo | Callable | None, guidance: Callable[[nn.Module], nn.Module], controlnet_dir,
                 controlnet_cache: dict | None, upscaler_dir):
        self.loaded = loaded
        self.model = loaded.model
        self.params = params
        self.sampler, self.schedule = resolve_sampler(params.sampler_name if sampler is None else sampler,
                                                      params.scheduler)
        self.guidance = guidance
        self.is_sdxl = self.model.is_sdxl
        self.is_inpainting_model = self.model.preset.unet.in_channels == 9
        self.device = self.model.device
        self.downscale = self.model.vae.downscale
        self.lora_dir = lora_dir
        self.upscaler_dir = upscaler_dir
        self.embeddings = embeddings
        self.styles = styles
        self.controlnet_dir = controlnet_dir
        self.controlnet_cache = controlnet_cache
        self.control: UnitControl | None = None  # the ControlNet units, once prepared
        self.extra: dict = {}  # infotext fields added by the job (hashes, img2img details)
        self.cond_cache: dict = {}
        self.notes: list[str] = []  # warnings for the user, returned in Result.warnings

    # -- setup ----------------------------------------------------------------------------------------------------

    def _prompts(self) -> tuple[str, str, str]:
        """(prompt as the infotext records it, prompt for the text encoder, negative prompt)."""
        p = self.params
        try:
            prompt, negative = apply_styles(p.prompt, p.negative_prompt, p.styles, self.styles)
        except KeyError as error:
            raise ParamsError(error.args[0]) from None
        text, networks = extract_extra_networks(prompt)
        self.loras = []
        for network in networks:
            if network.kind != "lora":
                self.notes.append(f"extra network <{network.kind}:{network.name}> ignored: only LoRA is supported")
                continue
            path = find_lora(self.lora_dir, network.name)
            if path is None:
                folder = self.lora_dir or "no LoRA folder given"
                self.notes.append(f"LoRA not found: {network.name} (searched: {folder}; built-in LoRAs: "
                                  f"{', '.join(BUILTIN_LORAS) or 'none'})")
                continue
            self.loras.append((load_lora(path), network.te_multiplier, network.unet_multiplier))
        if self.loras:
            hashes = [f"{lora.name.translate(_NO_SEPARATORS)}: {lora.shorthash}" for lora, _, _ in self.loras]
            self.extra["Lora hashes"] = ", ".join(hashes)
        return prompt, text, negative

    def _embedding_database(self) -> EmbeddingDatabase | None:
        database = self.embeddings
        tokenizer = text_towers(self.model)[0].tokenizer
        if database is not None and not isinstance(database, EmbeddingDatabase):
            database = EmbeddingDatabase.from_directory(database, tokenizer)
        # The prompt's LoRAs bring the embeddings they bundle.
        database, notes = with_bundled_embeddings(database, self.loras, tokenizer)
        self.notes += notes
        if database is None:
            return None
        return database.compatible_with([token_embedding(t).embedding_dim for t in text_towers(self.model)])

    def _size(self) -> tuple[int, int]:
        p = self.params
        if p.width is not None and p.height is not None:
            return p.width, p.height
        if p.is_img2img:
            first = self.init_images[0]
            # A1111 rounds down to a multiple of 8; here also to the sizes the model can take (both powers of two).
            step = max(8, size_multiple(self.model.preset))
            default = (max(first.width // step, 1) * step, max(first.height // step, 1) * step)
        else:
            default = (self.model.preset.resolution, self.model.preset.resolution)
        return p.width or default[0], p.height or default[1]

    # -- conditioning ---------------------------------------------------------------------------------------------

    def _schedule_conds(self, text: str, negative: bool, hires_steps: int | None, size: tuple[int, int]):
        """[(end_at_step, cond dict [1, ...])] for one prompt, cached per job."""
        key = (text, negative, hires_steps, size)
        if key not in self.cond_cache:
            schedule = text_schedule(text, self.params.steps, hires_steps)
            encoded = self.encoder.encode([t for _, t in schedule], size=(size[1], size[0]), is_negative=negative)
            self.cond_cache[key] = [(step, {k: v[i:i + 1] for k, v in encoded.items()})
                                    for i, (step, _) in enumerate(schedule)]
        return self.cond_cache[key]

    def _guidance_args(self, sigmas, batch: int, hires_steps: int | None, size, image_cond: torch.Tensor | None):
        def expand(entries):
            out = []
            for step, cond in entries:
                cond = {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}
                if image_cond is not None:
                    cond["concat"] = image_cond
                out.append((step, cond))
            return prompt_schedule(out, sigmas)

        cond = expand(self._schedule_conds(self.text, False, hires_steps, size))
        uncond = expand(self._schedule_conds(self.negative, True, hires_steps, size))
        if self.control is not None:
            cond = self.control.attach(cond, sigmas, batch, size, conditional=True)
            uncond = self.control.attach(uncond, sigmas, batch, size, conditional=False)
        return {"cond": cond, "uncond": uncond, "cond_scale": self.params.cfg_scale}

    def _prepare_control(self) -> UnitControl:
        """The ControlNet units with their models and control maps; img2img units without an image take the init
        image (and the inpainting mask). "Only masked" inpainting cuts every control image (and mask) to the crop
        rectangle of the init image. The hires pass resizes these maps (UnitControl.hints)."""
        p = self.params
        init_image = self.init_images[0] if p.is_img2img else None
        init_mask = None
        if p.mask is not None:
            init_mask = imaging.open_image(p.mask, "L")
            if p.inpainting_mask_invert:
                init_mask = ImageOps.invert(init_mask)
        try:
            units = prepare_units(p.controlnet_units, self.controlnet_dir, self.model, init_image, init_mask,
                                  (p.width, p.height), self.controlnet_cache,
                                  self.crop_region if p.is_img2img else None)
        except UnitError as error:
            raise ParamsError(str(error)) from None
        for index, prepared in enumerate(units):
            self.extra[f"ControlNet {index}"] = prepared.unit.infotext(prepared.label)
        return UnitControl(units)

    # -- model pieces ---------------------------------------------------------------------------------------------

    def _encode(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> scaled latents, a posterior sample per image from its own seed."""
        posterior = self.model.vae.encode(images.to(self.device, self.model.vae.dtype))
        noise = torch.stack([torch.randn(posterior.mean.shape[1:],
                                         generator=torch.Generator().manual_seed(mix_seed(s, VAE_ENCODE_STREAM)))
                             for s in seeds]).to(self.device)
        return (posterior.mean.float() + posterior.std.float() * noise) * self.model.scale_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(latents).all():
            raise GenerationError(
                "the sampler produced NaN/inf latents. With fp16 weights the UNet can overflow: load the model in "
                "float32 (--precision full); a CFG scale far above 30 or a LoRA with a very large weight can also "
                "cause it")
        decoded = self.model.decode_latents(latents.to(self.model.vae.dtype)).float()
        if not torch.isfinite(decoded).all():
            raise GenerationError("the VAE produced NaN/inf even in float32: the VAE weights are probably broken; "
                                  "try another VAE file (--vae)")
        return decoded

    def _inpainting_conditioning(self, image: torch.Tensor | None, mask: torch.Tensor | None,
                                 latent_size: tuple[int, int], seeds: list[int]) -> torch.Tensor:
        """[B, 5, h, w]: the mask and the latent of lerp(image, image · (1 − mask), mask weight), what 9-channel
        inpainting UNets take besides the noisy latent. No image: grey; no mask: everything masked (txt2img)."""
        batch = len(seeds)
        height, width = latent_size[0] * self.downscale, latent_size[1] * self.downscale
        if image is None:
            image = torch.zeros(batch, 3, height, width)
        if mask is None:
            mask = torch.ones(batch, 1, height, width)
        mask = mask.round()  # A1111 conditions on the mask rounded to 0 / 1
        masked = torch.lerp(image, image * (1 - mask), self.params.inpainting_mask_weight)
        masked_latent = self._encode(masked, seeds)
        small_mask = F.interpolate(mask, size=latent_size).to(self.device)
        return torch.cat([small_mask, masked_latent], dim=1)

    # -- sampling -------------------------------------------------------------------------------------------------

    def _run_sampler(self, x, sigmas, noise: ImageNoise, seeds, guidance, denoiser_wrapper=None,
                     pass_name: str = "base"):
        info = self.sampler
        options = {}
        if self.params.eta is not None and "eta" in info.options:
            options["eta"] = self.params.eta
        model = self.guidance(self.denoiser)
        if denoiser_wrapper is not None:
            model = denoiser_wrapper(model)
        noise_sampler = noise.noise_sampler(x) if info.noise == "rng" else None
        total = len(sigmas) - 1
        with tqdm(total=total, desc=f"{pass_name} pass", leave=False, disable=not self.progress) as pass_bar:
            def step_done(step: dict) -> None:
                # step: the samplers' k-diffusion-style report {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
                pass_bar.update(1)
                self.total_bar.update(1)
                if self.callback is not None:
                    self.callback(StepInfo(self.image_indices, pass_name, step["i"], total, float(step["sigma"]),
                                           step["x"], step["denoised"], info.name))

            return sample(info, model, x, sigmas, extra_args=guidance, callback=step_done, disable=True,
                          noise_sampler=noise_sampler, seeds=seeds if info.noise == "brownian" else None, **options)

    def _sigmas(self, steps: int) -> torch.Tensor:
        return get_sigmas(self.sampler, self.schedule, steps, self.denoiser, self.is_sdxl)

    def _seed_resize_from(self) -> tuple[int, int] | None:
        p = self.params
        if p.seed_resize_from_w <= 0 or p.seed_resize_from_h <= 0:
            return None
        return p.seed_resize_from_h // self.downscale, p.seed_resize_from_w // self.downscale

    def _noise(self, latent_shape, seeds, subseeds) -> ImageNoise:
        p = self.params
        return ImageNoise(latent_shape, seeds, subseeds, p.subseed_strength, self._seed_resize_from(),
                          self.device, p.rng)

    def _txt2img(self, seeds, subseeds) -> torch.Tensor:
        p = self.params
        channels = self.model.preset.unet.out_channels
        shape = (channels, p.height // self.downscale, p.width // self.downscale)
        noise = self._noise(shape, seeds, subseeds)
        sigmas = self._sigmas(p.steps).to(self.device)
        image_cond = (self._inpainting_conditioning(None, None, shape[1:], seeds)
                      if self.is_inpainting_model else None)
        guidance = self._guidance_args(sigmas, len(seeds), None, (p.width, p.height), image_cond)
        latents = self._run_sampler(noise.first() * sigmas[0], sigmas, noise, seeds, guidance)
        if p.enable_hr:
            latents = self._hires_pass(latents, seeds, subseeds)
        return latents

    def _hires_size(self) -> tuple[int, int]:
        p = self.params
        return int(p.width * p.hr_scale) // 8 * 8, int(p.height * p.hr_scale) // 8 * 8

    def _hires_pass(self, latents, seeds, subseeds) -> torch.Tensor:
        """Upscale the first pass and run img2img on it (A1111's hires fix)."""
        p = self.params
        width, height = self._hires_size()
        latent_size = (height // self.downscale, width // self.downscale)
        image = None
        if p.hr_upscaler.startswith("Latent"):
            mode = "nearest" if p.hr_upscaler == "Latent (nearest)" else "bilinear"
            latents = F.interpolate(latents, size=latent_size, mode=mode, antialias=False)
        else:
            # A1111 decodes, upscales the images (a model upscaler, or a resampler) and encodes them again.
            upscaled = [upscale_to(im, p.hr_upscaler, (width, height), self.upscaler_dir, device=self.device)
                        for im in imaging.to_pil(self._decode(latents))]
            image = torch.cat([imaging.to_tensor(im) for im in upscaled])
            latents = self._encode(image, seeds)
        if p.hr_denoising_strength == 0:
            return latents
        steps = p.hr_second_pass_steps or p.steps
        # A1111 runs exactly `steps` steps in this pass: it takes the last steps + 1 levels of a schedule of
        # steps / strength levels (img2img instead rounds strength · steps down).
        total = int(steps / min(p.hr_denoising_strength, 0.999))
        sigmas = self._sigmas(total).to(self.device)[-(steps + 1):]
        noise = self._noise((latents.shape[1], *latent_size), seeds, subseeds)
        image_cond = None
        if self.is_inpainting_model:
            if image is None:
                image = self._decode(latents)
            image_cond = self._inpainting_conditioning(image, None, latent_size, seeds)
        guidance = self._guidance_args(sigmas, len(seeds), steps, (width, height), image_cond)
        x = initial_latent(latents, noise.first(), sigmas[0])
        return self._run_sampler(x, sigmas, noise, seeds, guidance, pass_name="hires")

    # -- img2img --------------------------------------------------------------------------------------------------

    def _prepare_img2img(self):
        """Init images at the processing size, masks and overlays (A1111's StableDiffusionProcessingImg2Img.init)."""
        p = self.params
        width, height = p.width, p.height
        self.crop_region = None
        self.overlay_mask = None
        processing_mask = None
        if p.mask is not None:
            mask = imaging.open_image(p.mask, "L")
            if mask.size != self.init_images[0].size:  # a mask drawn at another resolution covers the same area
                mask = mask.resize(self.init_images[0].size, Image.BILINEAR)
            if p.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
            if p.mask_blur > 0:
                try:
                    blurred = blur_mask(imaging.mask_to_tensor(mask), p.mask_blur)[0, 0]
                except ValueError as error:  # a blur wider than the mask
                    raise ParamsError(f"mask_blur: {error}") from None
                mask = Image.fromarray((blurred.clamp(0, 1) * 255).round().byte().numpy(), "L")
            if p.inpaint_full_res:
                self.crop_region = imaging.mask_crop_region(mask, p.inpaint_full_res_padding, width, height)
            if self.crop_region is not None:
                self.overlay_mask = mask
                processing_mask = imaging.resize_image(mask.crop(self.crop_region), width, height, 2)
                self.extra["Inpaint area"] = "Only masked"
                self.extra["Masked area padding"] = p.inpaint_full_res_padding
            else:
                processing_mask = imaging.resize_image(mask, width, height, p.resize_mode)
                # A1111 pastes back with the blurred mask doubled, so its half-blurred edge is fully generated.
                self.overlay_mask = processing_mask.point(lambda v: min(255, v * 2))
            self.extra["Mask blur"] = p.mask_blur
            if p.inpainting_mask_invert:
                self.extra["Mask mode"] = "Inpaint not masked"
            if p.inpainting_fill != 1:
                self.extra["Masked content"] = INPAINTING_FILLS[p.inpainting_fill]
        self.processing_mask = processing_mask
        self.base_images, prepared = [], []
        for image in self.init_images:
            if self.crop_region is None:
                image = imaging.resize_image(image, width, height, p.resize_mode)
            self.base_images.append(image)
            if self.crop_region is not None:
                image = imaging.resize_image(image.crop(self.crop_region), width, height, 2)
            if processing_mask is not None and p.inpainting_fill == 0:
                image = imaging.fill_masked(image, processing_mask)
            prepared.append(imaging.to_tensor(image))
        self.prepared_images = prepared

    def _batch_images(self, index_range: range) -> list[int]:
        """Which init image each image of the batch starts from: the only one, or the one at its batch position."""
        return [i % self.params.batch_size if len(self.prepared_images) > 1 else 0 for i in index_range]

    def _img2img(self, seeds, subseeds, image_indices: list[int]) -> torch.Tensor:
        p = self.params
        images = torch.cat([self.prepared_images[i] for i in image_indices])
        init_latent = self._encode(images, seeds)
        latent_size = tuple(init_latent.shape[-2:])
        shape = (init_latent.shape[1], *latent_size)
        regenerate = None
        if self.processing_mask is not None:
            pixel_mask = imaging.mask_to_tensor(self.processing_mask)
            regenerate = latent_mask(pixel_mask, latent_size).to(self.device).expand(len(seeds), 1, *latent_size)
            if p.inpainting_fill == 2:  # latent noise: the masked area starts from the seed's noise
                fill = self._noise(shape, seeds, subseeds).first()
                init_latent = torch.lerp(init_latent, fill, regenerate)
            elif p.inpainting_fill == 3:  # latent nothing
                init_latent = init_latent * (1 - regenerate)
        image_cond = None
        if self.is_inpainting_model:
            pixel_masks = None if self.processing_mask is None else \
                imaging.mask_to_tensor(self.processing_mask).expand(len(seeds), 1, -1, -1)
            image_cond = self._inpainting_conditioning(images, pixel_masks, latent_size, seeds)
            self.extra["Conditional mask weight"] = _number(p.inpainting_mask_weight)
        sigmas = img2img_sigmas(self._sigmas(p.steps), p.denoising_strength).to(self.device)
        noise = self._noise(shape, seeds, subseeds)
        first_noise = noise.first() * p.noise_multiplier
        x = initial_latent(init_latent, first_noise, sigmas[0])
        guidance = self._guidance_args(sigmas, len(seeds), None, (p.width, p.height), image_cond)
        # The kept area follows the original at every step, for inpainting models too (as A1111 blends).
        hold_unmasked = None if regenerate is None else \
            (lambda model: InpaintingDenoiser(model, init_latent, regenerate, first_noise))
        latents = self._run_sampler(x, sigmas, noise, seeds, guidance, hold_unmasked)
        if regenerate is not None:
            latents = torch.lerp(init_latent, latents, regenerate)
        return latents

    def _paste_back(self, image: Image.Image, base: Image.Image) -> Image.Image:
        """Inpainting output: generated pixels inside the mask, the original outside (A1111's overlay)."""
        if self.overlay_mask is None:
            return image
        if self.crop_region is not None:
            x1, y1, x2, y2 = self.crop_region
            canvas = base.copy()
            canvas.paste(imaging.resize_image(image, x2 - x1, y2 - y1, 1), (x1, y1))
            image = canvas
        return Image.composite(image, base, self.overlay_mask)

    # -- the job --------------------------------------------------------------------------------------------------

    def _infotext(self, prompt: str, seed: int, subseed: int) -> str:
        p, loaded = self.params, self.loaded
        info, schedule = self.sampler, self.schedule
        eta_key = "Eta DDIM" if info.name == "DDIM" else "Eta"
        default_eta = info.options.get("eta")
        fields = {
            "Steps": p.steps,
            "Sampler": info.name,
            "Schedule type": schedule,
            "CFG scale": _number(p.cfg_scale),
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": loaded.hash,
            "Model": loaded.name,
            "VAE hash": self.vae_hash,
            "VAE": self.vae_name,
            "Variation seed": subseed if p.subseed_strength else None,
            "Variation seed strength": _number(p.subseed_strength) if p.subseed_strength else None,
            "Seed resize from": (f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
                                 if self._seed_resize_from() is not None else None),
            "Denoising strength": (_number(p.denoising_strength) if p.is_img2img
                                   else _number(p.hr_denoising_strength) if p.enable_hr else None),
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            "Tiling": "True" if p.tiling else None,
            "RNG": p.rng if p.rng != "GPU" else None,
            eta_key: (_number(p.eta) if p.eta is not None and default_eta is not None and p.eta != default_eta
                      else None),
            "Noise multiplier": _number(p.noise_multiplier) if p.is_img2img and p.noise_multiplier != 1 else None,
            "Hires upscale": _number(p.hr_scale) if p.enable_hr else None,
            "Hires steps": p.hr_second_pass_steps if p.enable_hr and p.hr_second_pass_steps else None,
            "Hires upscaler": p.hr_upscaler if p.enable_hr else None,
            **self.extra,
        }
        used = [e for e in self.encoder.used_embeddings.values() if e.shorthash]
        if used:
            fields["TI hashes"] = ", ".join(f"{e.name.translate(_NO_SEPARATORS)}: {e.shorthash}" for e in used)
        return format_infotext(prompt, self.negative, fields)

    def run(self, progress: bool, callback: Callable[[StepInfo], None] | None,
            interrupt_check: Callable[[], None] | None, compile: bool | str) -> Result:
        p = self.params
        self.progress, self.callback = progress, callback
        self.init_images = [imaging.open_image(image) for image in p.init_images]
        width, height = self._size()
        p.width, p.height = width, height
        # As run: a sampler given to generate() replaces the params' one, a legacy "DPM++ 2M Karras" is split.
        p.sampler_name, p.scheduler = self.sampler.name, self.schedule
        p.validate_for(self.model.preset)
        prompt, self.text, self.negative = self._prompts()
        seed, subseed = fixed_seed(p.seed), fixed_seed(p.subseed)
        p.seed, p.subseed = seed, subseed
        count = p.batch_count * p.batch_size
        all_seeds = [seed + (i if p.subseed_strength == 0 else 0) for i in range(count)]
        all_subseeds = [subseed + i for i in range(count)]
        self.vae_name = self.vae_hash = None
        if p.vae != "Automatic":
            self.vae_name = os.path.basename(p.vae)
            self.vae_hash = model_hash(p.vae)
        if p.is_img2img:
            self._prepare_img2img()
        if p.controlnet_units:
            self.control = self._prepare_control()
        images, infotexts = [], []
        interrupted = False
        done_seeds, done_subseeds = [], []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.loras:
                self.notes += stack.enter_context(applied(self.model, self.loras, LayerIndex(self.model)))
            if p.vae != "Automatic":
                stack.enter_context(_swapped_vae(self.model, load_vae(p.vae, self.model)))
            if p.tiling:
                stack.enter_context(_circular_padding([self.model.unet, self.model.vae]))
            if compile:
                stack.enter_context(compiled(self.model, None if compile is True else compile, interrupt_check))
            elif interrupt_check is not None:
                stack.enter_context(_checked_between_layers(self.model.unet, interrupt_check))
            self.encoder = PromptEncoder(self.model, self._embedding_database(), p.clip_skip)
            self.denoiser = model_denoiser(self.model if self.control is None else
                                           ControlledModel(self.model, self.control.units))
            self.total_bar = stack.enter_context(tqdm(total=batch_steps(p) * p.batch_count, desc="Total progress",
                                                      disable=not progress))
            for batch in range(p.batch_count):
                indices = range(batch * p.batch_size, (batch + 1) * p.batch_size)
                self.image_indices = tuple(indices)
                seeds, subseeds = [all_seeds[i] for i in indices], [all_subseeds[i] for i in indices]
                try:
                    if p.is_img2img:
                        init_indices = self._batch_images(indices)
                        latents = self._img2img(seeds, subseeds, init_indices)
                    else:
                        latents = self._txt2img(seeds, subseeds)
                except Skipped:
                    continue
                except Interrupted:
                    interrupted = True
                    break
                batch_images = imaging.to_pil(self._decode(latents))
                if p.is_img2img:
                    batch_images = [self._paste_back(image, self.base_images[init_indices[j]])
                                    for j, image in enumerate(batch_images)]
                infotexts += [self._infotext(prompt, seeds[j], subseeds[j]) for j in range(len(batch_images))]
                images += batch_images
                done_seeds += seeds
                done_subseeds += subseeds
        return Result(images, done_seeds, done_subseeds, infotexts, p, self.notes, interrupted)


@contextlib.contextmanager
def _swapped_vae(model, vae):
    original = model.first_stage_model
    model.first_stage_model = vae
    try:
        yield
    finally:
        model.first_stage_model = original


@contextlib.contextmanager
def _circular_padding(modules: list[nn.Module]):
    """Tiling: every padded convolution wraps around the image edges, so the output tiles seamlessly."""
    convolutions = [m for module in modules for m in module.modules()
                    if isinstance(m, nn.Conv2d) and any(m.padding)]
    previous = [m.padding_mode for m in convolutions]
    for conv in convolutions:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convolutions, previous):
            conv.padding_mode = mode


@contextlib.contextmanager
def _checked_between_layers(unet: nn.Module, check: Callable[[], None]):
    """check() before every layer (ResBlock, transformer, down/upsampling, …) of the UNet's blocks, so an exception
    it raises stops a step part way instead of after it (a step of a large image can take minutes on a CPU)."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    handles = [layer.register_forward_pre_hook(lambda module, args: check()) for block in blocks for layer in block]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
