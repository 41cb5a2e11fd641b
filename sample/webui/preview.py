"""Live previews of a latent during sampling, and the base64 PNG form images travel in.

"Approx cheap" (A1111's name for its fastest preview) maps each latent pixel to a colour with one linear map. A1111
ships hand-fitted coefficients for the SD latent spaces; here the map is fitted per model instead, so it also works
for models whose latent space nobody tabulated (our tiny and shapes models): a few synthetic colour images are encoded
with the model's own VAE and the colours are regressed on the latents by least squares. "Full" decodes with the VAE.
"""
import base64
import binascii
import io

import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

PREVIEW_TYPES = ("Approx cheap", "Full")


class ImageDecodeError(ValueError):
    """A base64 string that is not an image."""


def encode_png(image: Image.Image, infotext: str | None = None) -> str:
    """base64 of a PNG, with the infotext in its `parameters` text chunk (A1111's format)."""
    metadata = None
    if infotext:
        metadata = PngImagePlugin.PngInfo()
        metadata.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, what: str = "image") -> Image.Image:
    """A PIL image from base64 (a bare string or a `data:image/...;base64,` URL, as A1111 accepts)."""
    if not isinstance(data, str) or not data:
        raise ImageDecodeError(f"{what} is empty; send a base64-encoded PNG/JPEG/WebP")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"{what} is not a decodable base64 image ({error})") from None
    return image


def _synthetic_images(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """count images [count, 3, size, size] in [-1, 1]: flat colour blocks and colour ramps, which cover the colour
    cube and give the fit both uniform areas and smooth transitions."""
    blocks = torch.rand(count // 2, 3, 4, 4, generator=generator) * 2 - 1
    blocks = F.interpolate(blocks, size=(size, size), mode="nearest")
    ends = torch.rand(count - count // 2, 3, 2, 2, generator=generator) * 2 - 1
    ramps = F.interpolate(ends, size=(size, size), mode="bilinear", align_corners=True)
    return torch.cat([blocks, ramps])


@torch.no_grad()
def fit_latent_to_rgb(model, size: int = 64, count: int = 8, seed: int = 0) -> torch.Tensor:
    """A [C + 1, 3] matrix M such that [z, 1] @ M approximates the average colour (in [-1, 1]) of the pixels each
    scaled latent pixel z: [C] covers."""
    generator = torch.Generator().manual_seed(seed)
    images = _synthetic_images(size, count, generator)
    # The posterior's mean: a sample would add the VAE's noise, which no colour explains.
    posterior = model.first_stage_model.encode(images.to(model.device, model.dtype))
    latents = (posterior.mean * model.scale_factor).float().cpu()
    factor = size // latents.shape[-1]
    colours = F.avg_pool2d(images, factor)  # [N, 3, h, w], the pixels under each latent pixel
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    z = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    return torch.linalg.lstsq(z, colours.permute(0, 2, 3, 1).reshape(-1, 3)).solution


def to_pil(image: torch.Tensor) -> Image.Image:
    """image: [3, H, W] in [-1, 1] -> 8-bit RGB."""
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


class PreviewRenderer:
    """Renders JobControl.latent ([C, h, w]) as a small PIL image. The approximate map is fitted when the renderer is
    made (on the worker, when the model is loaded), so rendering is a matrix product that never touches the model
    while a job uses it."""

    def __init__(self, model):
        self.model = model
        self.latent_to_rgb = fit_latent_to_rgb(model)

    @torch.no_grad()
    def render(self, latent: torch.Tensor, kind: str = "Approx cheap") -> Image.Image:
        if kind == "Full":
            decoded = self.model.decode_latents(latent[None].to(self.model.device, self.model.dtype))
            return to_pil(decoded[0])
        z = latent.float().permute(1, 2, 0)  # [h, w, C]
        rgb = torch.cat([z, torch.ones(*z.shape[:2], 1)], dim=-1) @ self.latent_to_rgb  # [h, w, 3]
        return to_pil(rgb.permute(2, 0, 1))
