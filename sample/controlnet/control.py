"""ControlNet units inside a generation: their control maps, models and per-step schedule, and the model wrapper
that adds the residuals to the UNet call the sampler's denoiser makes.

How a unit reaches the UNet. generate() gives the sampler the denoiser of `ControlledModel(model, units)` instead of
the model's own; the cond / uncond entries of classifier-free guidance carry two more tensors,

    control_hint    [B, U, 3, H, W]    each unit's control map fitted to the pass's image size H × W (the
                                       ControlNet's hint encoder downsamples as the autoencoder does), values in
                                       [0, 1] (-1: masked, inpaint)
    control_active  [B, U]             1 where unit u acts on that row at this step, else 0

which CFGDenoiser batches like the prompt's tensors, so each row of a [cond; uncond] batch knows what it gets.
ControlledModel.apply_model runs each unit's ControlNet on the rows' latents, scales residual i of unit u by
`unit.level_scales` (the weight; soft injection for the non-Balanced modes) times control_active, sums the units
(sd-webui-controlnet adds them) and calls the UNet with `control=`. A unit acts at step i of a pass of n steps when
guidance_start <= i/n <= guidance_end; "ControlNet is more important" leaves the uncond rows at 0. When no unit
acts at a step, the UNet is called exactly as without ControlNet, so weight 0 reproduces the uncontrolled image bit
for bit.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm.controlnet import ControlNet, load_controlnet

from .. import images as imaging
from .preprocessors import PreprocessorError, hint_tensor, pixel_perfect_resolution, run_preprocessor
from .units import RESIZE_MODES, ControlNetUnit, UnitError, find_model

# Maps with at most this many colours (edges, binary, segmentation) are resized with nearest neighbours, so their
# labels and hard edges stay hard; others with Lanczos, as img2img resizes.
FLAT_MAP_COLOURS = 32


@dataclass
class PreparedUnit:
    """A validated unit with its ControlNet, the file's label ("stem [hash]", for the infotext) and its control map
    [H, W, 3 or 4] uint8 as the preprocessor produced it."""
    unit: ControlNetUnit
    net: ControlNet
    label: str
    control_map: np.ndarray


def fit_map(control_map: np.ndarray, size: tuple[int, int], resize_mode: str) -> np.ndarray:
    """The map fitted to size (width, height) by the unit's resize mode (img2img's modes: stretch, cover and crop,
    fit and extend the edges)."""
    image = Image.fromarray(control_map)
    colours = len(np.unique(control_map.reshape(-1, control_map.shape[-1]), axis=0))
    resample = Image.NEAREST if colours <= FLAT_MAP_COLOURS else Image.LANCZOS
    fitted = imaging.resize_image(image, size[0], size[1], RESIZE_MODES.index(resize_mode), resample)
    return np.asarray(fitted)


def detect(unit: ControlNetUnit, image: Image.Image, mask: Image.Image | None,
           target_size: tuple[int, int] | None) -> np.ndarray:
    """The unit's control map of `image` (its preprocessor at its resolution; with pixel_perfect, the resolution that
    makes the map land one pixel per pixel of `target_size` (width, height))."""
    resolution = unit.processor_res
    if unit.pixel_perfect and target_size is not None:
        resolution = pixel_perfect_resolution(image.size, target_size, unit.resize_mode)
    return run_preprocessor(unit.module, image, resolution, unit.threshold_a, unit.threshold_b, mask)


def crop_to_inpaint_region(image: Image.Image, init_size: tuple[int, int], region: tuple[int, int, int, int],
                           size: tuple[int, int], resize_mode: str) -> Image.Image:
    """"Only masked" inpainting (sd-webui-controlnet's inpaint_full_res handling): the control image (or its mask)
    fitted to the init image's size (width, height) by the unit's resize mode, cut to the crop rectangle
    (x1, y1, x2, y2) the init image and mask are cut to, and fitted to the processing size (width, height) with
    Resize and Fill, as the init image's crop is; so the map covers the same part of the picture as the latents."""
    fitted = imaging.resize_image(image, init_size[0], init_size[1], RESIZE_MODES.index(resize_mode))
    return imaging.resize_image(fitted.crop(region), size[0], size[1], RESIZE_MODES.index("Resize and Fill"))


def prepare_units(units: list[ControlNetUnit], controlnet_dir: str | os.PathLike | None, model,
                  init_image: Image.Image | None, init_mask: Image.Image | None, size: tuple[int, int],
                  cache: dict | None = None,
                  inpaint_region: tuple[int, int, int, int] | None = None) -> list[PreparedUnit]:
    """Validate the units, load their ControlNets (once per file) on the model's device and dtype and run their
    preprocessors (pixel perfect for the image size (width, height)). A unit without an image uses the img2img init
    image (and the inpainting mask). inpaint_region: the "Only masked" crop rectangle (x1, y1, x2, y2) of the init
    image; control images and masks are cut to it first (crop_to_inpaint_region).

    cache: a dict the caller keeps between jobs (the web UI does): a file loaded for the previous job is reused
    while its size and modification time are unchanged; afterwards the cache holds this job's ControlNets only, so
    it never keeps more in memory than one job uses."""
    prepared, nets, used = [], {}, {}
    cache = {} if cache is None else cache
    for index, unit in enumerate(units):
        def fail(message: str):
            raise UnitError(f"ControlNet unit {index}: {message}")
        try:
            unit = unit.validate()
            path, label = find_model(controlnet_dir, unit.model)
        except UnitError as error:
            fail(str(error))
        if path not in nets:
            status = os.stat(path)
            key = (os.path.abspath(path), status.st_size, status.st_mtime_ns, str(model.device), model.dtype)
            net = cache[key] if key in cache else load_controlnet(path, device=model.device, dtype=model.dtype)
            _check_fits(net, model, label, fail)
            nets[path] = used[key] = net
        image = imaging.open_image(unit.image) if unit.image is not None else init_image
        if image is None:
            fail("no control image; give the unit an image (img2img units default to the init image)")
        mask = imaging.open_image(unit.mask, "L") if unit.mask is not None else init_mask
        if inpaint_region is not None:
            image = crop_to_inpaint_region(image, init_image.size, inpaint_region, size, unit.resize_mode)
            if mask is not None:
                mask = crop_to_inpaint_region(mask, init_image.size, inpaint_region, size, unit.resize_mode)
        try:
            control_map = detect(unit, image, mask, size)
        except PreprocessorError as error:
            fail(str(error))
        prepared.append(PreparedUnit(unit, nets[path], label, control_map))
    cache.clear()
    cache.update(used)
    return prepared


def _check_fits(net: ControlNet, model, label: str, fail) -> None:
    unet = model.unet
    if net.skip_channels != unet.skip_channels or \
            net.encoder_config["context_dim"] != unet.encoder_config["context_dim"]:
        fail(f"ControlNet {label} was made for another model (residual channels {net.skip_channels}, text width "
             f"{net.encoder_config['context_dim']}; this model's UNet has {unet.skip_channels} and "
             f"{unet.encoder_config['context_dim']}): choose a ControlNet of the same family (SD1.x / SD2.x / SDXL)")
    if net.hint_downscale != model.vae.downscale:
        fail(f"ControlNet {label} was made for a model whose autoencoder downsamples {net.hint_downscale}x; this "
             f"model's downsamples {model.vae.downscale}x")


def step_of(sigma: torch.Tensor, levels: list[float]) -> int:
    """The sampling step a model call at noise level `sigma` belongs to, for a pass whose schedule after its first
    level is `levels` (sigmas[1:]): step i covers sigmas[i] >= sigma > sigmas[i + 1] (samplers.prompt_schedule's
    rule, so a second-order sampler's extra evaluations stay in their step)."""
    level = float(sigma.reshape(-1)[0])
    return sum(1 for s in levels if s >= level * (1 - 1e-5))


class UnitControl:
    """The prepared units of one job, as cond / uncond entries for classifier-free guidance."""

    def __init__(self, units: list[PreparedUnit]):
        self.units = units
        self._hints: dict[tuple[int, int], torch.Tensor] = {}

    def hints(self, size: tuple[int, int], device) -> torch.Tensor:
        """[1, U, 3, H, W]: every unit's map fitted to the image size (W, H), cached per size (base, hires pass).
        The hires pass gets the map detected for the base size, resized, not detected again: sd-webui-controlnet
        preprocesses once and fits that map to both sizes (its detectmap_proc to h × w and to hr_y × hr_x)."""
        if size not in self._hints:
            self._hints[size] = torch.stack(
                [hint_tensor(fit_map(p.control_map, size, p.unit.resize_mode))[0] for p in self.units])[None]
        return self._hints[size].to(device)

    def active(self, step: int, steps: int, conditional: bool) -> list[float]:
        """control_active of one row at `step` of `steps`: 1 for each unit that acts there."""
        return [float(p.unit.weight > 0 and p.unit.active_at(step, steps) and (conditional or not p.unit.cfg_injection))
                for p in self.units]

    def attach(self, schedule, sigmas: torch.Tensor, batch: int, size: tuple[int, int], conditional: bool):
        """`schedule` (prompt_schedule's cond_at: sigma -> dict of tensors) with control_hint (the maps at the
        pass's image size (W, H)) and control_active added for each call."""
        hints = self.hints(size, sigmas.device)
        hints = hints.expand(batch, *hints.shape[1:])
        levels, steps = [float(s) for s in sigmas[1:]], len(sigmas) - 1

        def at(sigma):
            active = torch.tensor(self.active(step_of(sigma, levels), steps, conditional), device=sigmas.device)
            return {**schedule(sigma), "control_hint": hints, "control_active": active.expand(batch, -1)}

        return at


class ControlledModel:
    """`model` (a LatentDiffusion) whose apply_model takes control_hint / control_active (see the module docstring)
    and adds the units' residuals; what samplers.model_denoiser reads (parameterization, alphas_cumprod, dtype) is
    the model's."""

    def __init__(self, model, units: list[PreparedUnit]):
        self.model = model
        self.units = units

    parameterization = property(lambda self: self.model.parameterization)
    alphas_cumprod = property(lambda self: self.model.alphas_cumprod)
    dtype = property(lambda self: self.model.dtype)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                    control_hint: torch.Tensor | None = None, control_active: torch.Tensor | None = None):
        # x: [B, C, h, w] (C = 9 for inpainting UNets: the latent's 4 channels first), t: [B],
        # control_hint: [B, U, 3, f·h, f·w] (f: the autoencoder's downscale), control_active: [B, U]
        control = None
        for index, prepared in enumerate(self.units):
            rows = control_active[:, index]
            if not rows.any():
                continue
            net = prepared.net
            residuals = net(x[:, :net.encoder_config["in_channels"]], control_hint[:, index], t, context, y)
            rows = rows.to(residuals[0].dtype)[:, None, None, None]
            scaled = [residual * (scale * rows)
                      for residual, scale in zip(residuals, prepared.unit.level_scales(len(residuals)))]
            control = scaled if control is None else [a + b for a, b in zip(control, scaled)]
        return self.model.apply_model(x, t, context, y, control=control)
