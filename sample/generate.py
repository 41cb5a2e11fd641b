"""`generate(model, params)`: txt2img, img2img, inpainting and hires fix with A1111's parameters.

One job is `batch_count` batches of `batch_size` images; image i has seed `seed + i` (with a variation seed, every
image keeps `seed` and the variation seed advances instead, as in A1111). Each batch:

    txt2img    noise(seed) · σ₀ ──sampler + CFG──> latent ─(hires fix: upscale, re-noise, img2img)─> VAE decode
    img2img    VAE(init image) + noise(seed) · σ_k ──sampler over the last steps──> latent ──> VAE decode
    inpainting img2img whose unmasked area is held to the original at every step (ordinary models) or conditioned
               on the masked image (9-channel inpainting models); the original pixels are pasted back outside the mask

Nothing is global: the model's weights are only swapped temporarily (LoRA, tiling, VAE override) and restored when
the job ends, whatever happens.
"""
import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from tqdm.auto import tqdm

from ldm import model_hash
from samplers import (CFGDenoiser, DiscreteEpsDenoiser, DiscreteVDenoiser, InpaintingDenoiser, blur_mask,
                      get_sigmas, img2img_sigmas, initial_latent, latent_mask, mix_seed, prompt_schedule,
                      resolve_sampler, sample)

from . import images as imaging
from .conditioning import PromptEncoder, text_towers, token_embedding
from .embeddings import EmbeddingDatabase
from .infotext import format_infotext
from .lora import LayerIndex, applied, find_lora, load_lora
from .models import Checkpoint, load_vae
from .params import INPAINTING_FILLS, GenerationParams, ParamsError, size_multiple
from .prompts import extract_extra_networks, prompt_schedule as text_schedule
from .rng import ImageNoise, fixed_seed
from .styles import apply_styles

# Names in "Lora hashes" / "TI hashes" lose the characters that separate the entries (A1111).
_NO_SEPARATORS = str.maketrans("", "", ":,")
# Random streams derived from an image's seed (samplers.mix_seed), independent of its noise generator.
VAE_ENCODE_STREAM = 3


class GenerationError(RuntimeError):
    """The generation could not produce an image; the message says why and what to try."""


class GenerationWarning(UserWarning):
    """Something the user asked for was skipped (e.g. a LoRA that was not found); the image was still made."""


@dataclass
class Result:
    """images: PIL RGB images in job order; seeds / subseeds: per image; infotexts: per image, A1111's format;
    params: the parameters as run (random seeds fixed, sizes resolved); warnings: what the user should know (e.g. a
    LoRA that was not found)."""
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    params: GenerationParams
    warnings: list[str]


def generate(model: Checkpoint | nn.Module, params: GenerationParams | dict | str, progress: bool = True, *,
             lora_dir: str | os.PathLike | None = None, embeddings: EmbeddingDatabase | str | None = None,
             styles: dict | None = None) -> Result:
    """Run one A1111 job. `model`: a Checkpoint (name and hash go into the infotext) or a bare LatentDiffusion;
    `params`: GenerationParams, or an infotext (text or `parse_infotext` dict) to reproduce; `lora_dir`: where
    `<lora:name:w>` files are looked up; `embeddings`: an EmbeddingDatabase or a folder of embedding files;
    `styles`: name -> Style for `params.styles`. `progress` shows tqdm bars (one per batch, one for the job)."""
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model, model.preset.name)
    if isinstance(params, (str, dict)):
        params = GenerationParams.from_infotext(params)
    params = dataclasses.replace(params).validate()
    job = _Job(checkpoint, params, lora_dir, embeddings, styles or {})
    try:
        return job.run(progress)
    finally:
        for note in job.notes:
            warnings.warn(note, GenerationWarning, stacklevel=2)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class _Job:
    def __init__(self, checkpoint: Checkpoint, params: GenerationParams, lora_dir, embeddings, styles):
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.params = params
        self.is_sdxl = self.model.preset.family == "sdxl"
        self.is_inpainting_model = self.model.preset.unet.in_channels == 9
        self.device = self.model.device
        self.downscale = self.model.vae.downscale
        self.lora_dir = lora_dir
        self.embeddings = embeddings
        self.styles = styles
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
            path = find_lora(self.lora_dir, network.name) if self.lora_dir else None
            if path is None:
                where = f"in {self.lora_dir}" if self.lora_dir else "(no LoRA folder given)"
                self.notes.append(f"LoRA not found: {network.name} {where}")
                continue
            self.loras.append((load_lora(path), network.te_multiplier, network.unet_multiplier))
        if self.loras:
            hashes = [f"{lora.name.translate(_NO_SEPARATORS)}: {lora.shorthash}" for lora, _, _ in self.loras]
            self.extra["Lora hashes"] = ", ".join(hashes)
        return prompt, text, negative

    def _embedding_database(self) -> EmbeddingDatabase | None:
        database = self.embeddings
        if database is None:
            return None
        if not isinstance(database, EmbeddingDatabase):
            database = EmbeddingDatabase.from_directory(database, text_towers(self.model)[0].tokenizer)
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
        return {"cond": cond, "uncond": uncond, "cond_scale": self.params.cfg_scale}

    # -- model pieces ---------------------------------------------------------------------------------------------

    def _denoiser(self):
        model = self.model

        def unet(x, t, context, y=None, concat=None):
            # x: [B, 4, h, w] (+ concat [B, 5, h, w] for inpainting models), t: [B] fractional timesteps
            if concat is not None:
                x = torch.cat([x, concat.to(x)], dim=1)
            dtype = model.dtype
            return model.apply_model(x.to(dtype), t, context.to(dtype), None if y is None else y.to(dtype)).float()

        wrapper = DiscreteVDenoiser if model.parameterization == "v" else DiscreteEpsDenoiser
        # A1111 runs k-diffusion without timestep quantization (its default), so fractional timesteps reach the UNet.
        return wrapper(unet, model.alphas_cumprod, quantize=False)

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

    def _run_sampler(self, x, sigmas, noise: ImageNoise, seeds, guidance, denoiser_wrapper=None):
        info, _ = resolve_sampler(self.params.sampler_name, self.params.scheduler)
        options = {}
        if self.params.eta is not None and "eta" in info.options:
            options["eta"] = self.params.eta
        model = CFGDenoiser(self.denoiser)
        if denoiser_wrapper is not None:
            model = denoiser_wrapper(model)
        noise_sampler = noise.noise_sampler(x) if info.noise == "rng" else None
        return sample(self.params.sampler_name, model, x, sigmas, extra_args=guidance,
                      callback=lambda _: self.total_bar.update(1), disable=not self.progress,
                      noise_sampler=noise_sampler, seeds=seeds if info.noise == "brownian" else None, **options)

    def _sigmas(self, steps: int) -> torch.Tensor:
        return get_sigmas(self.params.sampler_name, self.params.scheduler, steps, self.denoiser, self.is_sdxl)

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
            resample = Image.LANCZOS if p.hr_upscaler == "Lanczos" else Image.NEAREST
            upscaled = [im.resize((width, height), resample) for im in imaging.to_pil(self._decode(latents))]
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
        return self._run_sampler(x, sigmas, noise, seeds, guidance)

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
        p, checkpoint = self.params, self.checkpoint
        info, schedule = resolve_sampler(p.sampler_name, p.scheduler)
        eta_key = "Eta DDIM" if info.name == "DDIM" else "Eta"
        default_eta = info.options.get("eta")
        fields = {
            "Steps": p.steps,
            "Sampler": info.name,
            "Schedule type": schedule,
            "CFG scale": _number(p.cfg_scale),
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": checkpoint.hash,
            "Model": checkpoint.name,
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

    def run(self, progress: bool) -> Result:
        p = self.params
        self.progress = progress
        self.init_images = [imaging.open_image(image) for image in p.init_images]
        width, height = self._size()
        p.width, p.height = width, height
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
            steps_per_batch = int(min(p.denoising_strength, 0.999) * p.steps) + 1
        else:
            steps_per_batch = p.steps + ((p.hr_second_pass_steps or p.steps) if p.enable_hr else 0)
        images, infotexts = [], []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.loras:
                self.notes += stack.enter_context(applied(self.model, self.loras, LayerIndex(self.model)))
            if p.vae != "Automatic":
                stack.enter_context(_swapped_vae(self.model, load_vae(p.vae, self.model)))
            if p.tiling:
                stack.enter_context(_circular_padding([self.model.unet, self.model.vae]))
            self.encoder = PromptEncoder(self.model, self._embedding_database(), p.clip_skip)
            self.denoiser = self._denoiser()
            self.total_bar = stack.enter_context(tqdm(total=steps_per_batch * p.batch_count, desc="Total progress",
                                                      disable=not progress))
            for batch in range(p.batch_count):
                indices = range(batch * p.batch_size, (batch + 1) * p.batch_size)
                seeds, subseeds = [all_seeds[i] for i in indices], [all_subseeds[i] for i in indices]
                if p.is_img2img:
                    image_indices = self._batch_images(indices)
                    latents = self._img2img(seeds, subseeds, image_indices)
                else:
                    latents = self._txt2img(seeds, subseeds)
                for j, image in enumerate(imaging.to_pil(self._decode(latents))):
                    if p.is_img2img:
                        image = self._paste_back(image, self.base_images[image_indices[j]])
                    images.append(image)
                    infotexts.append(self._infotext(prompt, seeds[j], subseeds[j]))
        return Result(images, all_seeds, all_subseeds, infotexts, p, self.notes)


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
