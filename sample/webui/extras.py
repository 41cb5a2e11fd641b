"""A1111's Extras tab over the API: `/sdapi/v1/extra-single-image` and `/extra-batch-images` (upscaling; face
restoration is not available here), plus the upscaler listings.

The postprocessing follows A1111's `scripts/postprocessing_upscale.py`: resize mode 0 scales by `upscaling_resize`,
mode 1 scales by max(w / width, h / height) to cover `upscaling_resize_w` x `upscaling_resize_h` and, with
`upscaling_crop`, centre-crops to exactly that size; a second upscaler's result is blended in with
`extras_upscaler_2_visibility`. What was done is recorded as A1111's "postprocessing" infotext ("Postprocess upscale
by: 2, Postprocess upscaler: Lanczos"), returned as `html_info` and written into each PNG's `postprocessing` chunk.
"""
import base64
import html
import io
import json
from typing import Literal

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from sample.upscalers import UpscalerError, check_upscaler, list_upscalers, target_size, upscale_to

from .preview import ImageDecodeError, decode_image
from .schemas import RequestError

FACE_RESTORATION_UNAVAILABLE = ("face restoration is not available on this server: A1111 runs GFPGAN or CodeFormer "
                                "weights, which are not installed here; send gfpgan_visibility and "
                                "codeformer_visibility 0")
INTERROGATE_UNAVAILABLE = ("the CLIP interrogator is not available on this server: it needs BLIP captioning and CLIP "
                           "ViT-L/14 image-encoder weights (and DeepDanbooru for model 'deepdanbooru'), which are not "
                           "installed here")
MAX_TARGET_SIDE = 65536


class ExtrasRequest(BaseModel):
    """A1111's ExtrasBaseRequest fields, with its defaults and ranges."""
    model_config = ConfigDict(extra="ignore")
    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True  # A1111 drops results only in its folder mode, which the API lacks
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    # A1111 sets no upper bound; ours keeps the arithmetic in floats (the work bound refuses large sizes anyway).
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_TARGET_SIDE)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_TARGET_SIDE)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData]


def upscaler_listing(directory) -> list[dict]:
    """`/sdapi/v1/upscalers`: A1111's fields for every upscaler."""
    return [{"name": i.name, "model_name": i.model_name, "model_path": i.model_path, "model_url": i.model_url,
             "scale": i.scale} for i in list_upscalers(directory)]


def realesrgan_listing(directory) -> list[dict]:
    """`/sdapi/v1/realesrgan-models`: A1111 lists its Real-ESRGAN upscalers as name, path, scale."""
    return [{"name": i.name, "path": i.model_path, "scale": i.scale} for i in list_upscalers(directory)
            if i.model_name is not None and i.model_name.startswith("RealESRGAN")]


def _quote(value) -> str:
    # A1111's infotext quoting: a value with a comma, colon or newline is written as JSON.
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float):
    return int(value) if float(value).is_integer() else value


class ExtrasJob:
    """One validated Extras request: its images decoded, its upscalers checked, its work counted."""

    def __init__(self, request: ExtrasRequest, images: list[Image.Image], directory, max_work: int):
        if request.gfpgan_visibility or request.codeformer_visibility:
            raise RequestError(FACE_RESTORATION_UNAVAILABLE)
        for field in ("upscaler_1", "upscaler_2"):
            try:
                check_upscaler(getattr(request, field), directory)
            except UpscalerError as error:
                raise RequestError(f"{field}: {error}") from None
        self.request, self.images, self.directory = request, images, directory
        work = sum(self._output_pixels(image) for image in images) * self._passes()
        if work > max_work:
            raise RequestError(f"this request asks for {work:,} upscaled pixels (output size x upscalers, all "
                               f"images), more than this server's limit of {max_work:,} (--max-work); lower the "
                               "scale, the target size or the number of images")

    def _passes(self) -> int:
        r = self.request
        if r.upscaler_1 == "None":
            return 0
        return 2 if r.upscaler_2 != "None" and r.extras_upscaler_2_visibility > 0 else 1

    def _scale(self, image: Image.Image) -> float:
        r = self.request
        if r.resize_mode == 1:
            return max(r.upscaling_resize_w / image.width, r.upscaling_resize_h / image.height)
        return r.upscaling_resize

    def _output_pixels(self, image: Image.Image) -> int:
        width, height = target_size(image.size, self._scale(image))
        return width * height

    def _upscale(self, image: Image.Image, name: str, info: dict, device) -> Image.Image:
        r = self.request
        if r.resize_mode == 1:
            info["Postprocess upscale to"] = f"{r.upscaling_resize_w}x{r.upscaling_resize_h}"
        else:
            info["Postprocess upscale by"] = _number(r.upscaling_resize)
        result = upscale_to(image, name, target_size(image.size, self._scale(image)), self.directory, device=device)
        if r.resize_mode == 1 and r.upscaling_crop:
            width, height = r.upscaling_resize_w, r.upscaling_resize_h
            cropped = Image.new("RGB", (width, height))
            cropped.paste(result, (width // 2 - result.width // 2, height // 2 - result.height // 2))
            result = cropped
            info["Postprocess crop to"] = f"{width}x{height}"
        return result

    def _process(self, image: Image.Image, device) -> tuple[Image.Image, str]:
        """(the postprocessed image, its postprocessing infotext)."""
        r = self.request
        info: dict = {}
        image = image.convert("RGB")
        if r.upscaler_1 != "None":
            result = self._upscale(image, r.upscaler_1, info, device)
            info["Postprocess upscaler"] = r.upscaler_1
            if r.upscaler_2 != "None" and r.extras_upscaler_2_visibility > 0:
                second = self._upscale(image, r.upscaler_2, info, device)
                result = Image.blend(result, second.convert(result.mode), r.extras_upscaler_2_visibility)
                info["Postprocess upscaler 2"] = r.upscaler_2
            image = result
        return image, ", ".join(f"{key}: {_quote(value)}" for key, value in info.items())

    def run(self, device=None) -> tuple[list[str], str]:
        """(base64 PNGs, html_info). Runs on the worker thread."""
        encoded, infotext = [], ""
        try:
            for source in self.images:
                image, infotext = self._process(source, device)
                encoded.append(_encode(image, source.info.get("parameters"), infotext))
        except UpscalerError as error:
            raise RequestError(str(error)) from None
        # A1111's plaintext_to_html of the (last image's) postprocessing infotext.
        return encoded, "<p>" + "<br>\n".join(html.escape(line) for line in infotext.split("\n")) + "</p>"


def _encode(image: Image.Image, parameters: str | None, postprocessing: str) -> str:
    """base64 PNG keeping the source's generation infotext and adding A1111's `postprocessing` chunk."""
    metadata = PngImagePlugin.PngInfo()
    if isinstance(parameters, str):
        metadata.add_text("parameters", parameters)
    if postprocessing:
        metadata.add_text("postprocessing", postprocessing)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def single_image_job(request: ExtrasSingleImageRequest, directory, max_work: int) -> ExtrasJob:
    try:
        image = decode_image(request.image, "image")
    except ImageDecodeError as error:
        raise RequestError(str(error)) from None
    return ExtrasJob(request, [image], directory, max_work)


def batch_images_job(request: ExtrasBatchImagesRequest, directory, max_work: int) -> ExtrasJob:
    if not request.imageList:
        raise RequestError("imageList is empty; send at least one {\"data\": <base64 image>, \"name\": ...}")
    try:
        images = [decode_image(item.data, f"imageList[{i}] ({item.name or 'unnamed'})")
                  for i, item in enumerate(request.imageList)]
    except ImageDecodeError as error:
        raise RequestError(str(error)) from None
    return ExtrasJob(request, images, directory, max_work)
