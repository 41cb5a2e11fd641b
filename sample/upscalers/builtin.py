"""The upscalers that need no model file: A1111's "None", "Lanczos" and "Nearest" (PIL resampling)."""
from PIL import Image


def resize(image: Image.Image, size: tuple[int, int], name: str) -> Image.Image:
    """`image` resized to `size` (width, height) by the built-in upscaler `name`. "None" enlarges nothing itself;
    like A1111's base Upscaler, the final resize to the requested size is Lanczos."""
    resample = Image.NEAREST if name == "Nearest" else Image.LANCZOS
    return image if image.size == size else image.resize(size, resample=resample)


BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
