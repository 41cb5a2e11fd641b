"""The ASGI app: A1111's `/sdapi/v1` routes, the page and its `/internal` helpers, all over one WebUIService.

Errors a client can fix answer 400 with {"error": kind, "detail": readable message} (422 for a body whose fields
have the wrong types, as FastAPI and A1111 do); the server keeps serving.
"""
import asyncio
import base64
import binascii
import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ldm.checkpoint import CheckpointError
from ldm.merge import MergeError
from sample.controlnet import MAX_UNITS
from sample.embeddings import EmbeddingError
from sample.generate import GenerationError
from sample.images import ImageError
from sample.lora import LoraError
from sample.params import MAX_STEPS, ParamsError
from sample.prompts import PromptError
from sample.scripts import ScriptError, scripts_for
from sample.upscalers import UpscalerError

from .extras import (INTERROGATE_UNAVAILABLE, ExtrasBatchImagesRequest, ExtrasSingleImageRequest, batch_images_job,
                     realesrgan_listing, single_image_job, upscaler_listing)
from .preview import ImageDecodeError
from .registry import NotFound
from .schemas import (CONTROLNET_SCRIPT, Img2ImgRequest, MergeRequest, PngInfoRequest, RequestError, StyleRequest,
                      Txt2ImgRequest, sampler_list, scheduler_list)
from .service import ModelLoadError, OutOfMemory, WebUIService
from .worker import ServerStopping

STATIC = Path(__file__).parent / "static"
# The sd-webui-controlnet API version whose routes and unit fields /controlnet/* answer.
CONTROLNET_API_VERSION = 2
# The one list of the project's errors that answer 400, for every route: each means "this request asked for something
# that cannot be done" and its message says what to change. Anything else is a server error (500).
CLIENT_ERRORS = (RequestError, NotFound, ParamsError, PromptError, ImageDecodeError, ImageError, OutOfMemory,
                 GenerationError, LoraError, EmbeddingError, CheckpointError, ModelLoadError, MergeError,
                 ScriptError, UpscalerError)


class TaskRequest(BaseModel):
    id_task: str


class TokenCountRequest(BaseModel):
    text: str = ""
    steps: int = Field(20, ge=1, le=MAX_STEPS)  # alternation schedules one prompt per step


class ImagesRequest(BaseModel):
    images: list[str]


class ControlNetDetectRequest(BaseModel):
    """sd-webui-controlnet's /controlnet/detect body (low_vram accepted and ignored)."""
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_masks: list[str] = []
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    low_vram: bool = False


def parse_credentials(text: str) -> dict[str, str]:
    """`user:pass[,user2:pass2]` (A1111's --api-auth) -> {user: password}."""
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth expects user:password[,user2:password2], got {pair.strip()!r}")
        credentials[user] = password
    return credentials


def _authorized(header: str | None, credentials: dict[str, str]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = credentials.get(user)
    # compare_digest: the time taken does not reveal how much of a guessed password was right.
    return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


class StyleName(BaseModel):
    name: str


def create_app(service: WebUIService, credentials: dict[str, str] | None = None,
               cmd_flags: dict | None = None) -> FastAPI:
    """The app over `service`; with `credentials` every route (page included) requires HTTP basic auth.
    `cmd_flags`: what GET /sdapi/v1/cmd-flags answers (the server's command line, A1111's names)."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="ldm-scratch web UI", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    if credentials:
        @app.middleware("http")
        async def basic_auth(request: Request, call_next):
            if not _authorized(request.headers.get("authorization"), credentials):
                return JSONResponse({"error": "Unauthorized", "detail": "this server requires HTTP basic auth"},
                                    status_code=401, headers={"WWW-Authenticate": 'Basic realm="webui"'})
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}"
                             for e in error.errors())
        return JSONResponse({"error": "RequestValidationError", "detail": problems}, status_code=422)

    async def client_error(request: Request, error: Exception):
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=400)

    for kind in CLIENT_ERRORS:
        app.add_exception_handler(kind, client_error)

    @app.exception_handler(ServerStopping)
    async def stopping(request: Request, error: ServerStopping):
        return JSONResponse({"error": "ServerStopping", "detail": str(error)}, status_code=503)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        # A1111's API answers failures as JSON too; the traceback still goes to the server's log.
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=500)

    async def finish(job):
        """The job's result once the worker has run it (the request waits its turn in the queue)."""
        return await asyncio.wrap_future(job.future)

    # ----- A1111 API ------------------------------------------------------------------------------------------------

    # Submitting decodes the request's base64 images (init images, masks, ControlNet maps): off the event loop, so
    # a large upload does not stall /progress and /interrupt meanwhile.
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Txt2ImgRequest):
        return await finish(await asyncio.to_thread(service.submit_txt2img, request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Img2ImgRequest):
        return await finish(await asyncio.to_thread(service.submit_img2img, request))

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: PngInfoRequest):
        return await asyncio.to_thread(service.png_info, request.image)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return await asyncio.to_thread(service.progress, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(id_task: str | None = None):
        # id_task (our addition; A1111 interrupts whatever runs): that task only, even if it has not started yet.
        service.interrupt(id_task)
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        service.skip()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return service.options()

    @app.post("/sdapi/v1/options")
    async def set_options(values: dict):
        ignored = service.unknown_options(values)
        await asyncio.wrap_future(service.set_options(values))
        if not ignored:
            return None  # A1111's answer
        # A1111 drops unknown names silently; here they are named, so a misspelt setting does not go unnoticed.
        warning = f"unknown options ignored: {', '.join(ignored)}"
        # The header holds ASCII without control characters or quotes: each name JSON-escaped, then " -> '.
        escaped = ", ".join(json.dumps(name)[1:-1].replace('"', "'") for name in ignored)
        header = f'299 - "unknown options ignored: {escaped}"'
        return JSONResponse({"ignored": ignored, "warning": warning}, headers={"Warning": header})

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return service.sd_models()

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return service.sd_vae()

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return scheduler_list()

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        # The image upscalers (the latent ones are listed by latent-upscale-modes).
        return await asyncio.to_thread(upscaler_listing, service.registry.upscalers_dir)

    @app.get("/sdapi/v1/realesrgan-models")
    async def realesrgan_models():
        return await asyncio.to_thread(realesrgan_listing, service.registry.upscalers_dir)

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(request: ExtrasSingleImageRequest):
        job = await asyncio.to_thread(single_image_job, request, service.registry.upscalers_dir, service.max_work)
        images, html_info = await finish(service.submit_extras(job))
        return {"html_info": html_info, "image": images[0]}

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(request: ExtrasBatchImagesRequest):
        job = await asyncio.to_thread(batch_images_job, request, service.registry.upscalers_dir, service.max_work)
        images, html_info = await finish(service.submit_extras(job))
        return {"html_info": html_info, "images": images}

    @app.post("/sdapi/v1/interrogate")
    async def interrogate():
        raise RequestError(INTERROGATE_UNAVAILABLE)

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": "Latent"}, {"name": "Latent (nearest)"}]

    @app.get("/sdapi/v1/face-restorers")
    async def face_restorers():
        return []

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        # Lower-case titles as A1111 lists them; ControlNet is the one always-on script here.
        return {mode: [script.name for script in scripts_for(mode)] + [CONTROLNET_SCRIPT]
                for mode in ("txt2img", "img2img")}

    @app.get("/sdapi/v1/script-info")
    async def script_info():
        return [script.info(mode, service.script_options()) for mode in ("txt2img", "img2img")
                for script in scripts_for(mode)]

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags_route():
        return cmd_flags or {}  # an app made in code has no command line

    @app.get("/sdapi/v1/hypernetworks")
    async def hypernetworks():
        return []  # hypernetworks are not supported (README, "Web UI and API")

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():
        return await asyncio.to_thread(service.prompt_styles)

    @app.post("/sdapi/v1/merge")
    async def merge(request: MergeRequest):
        return await finish(service.submit_merge(request))

    @app.get("/sdapi/v1/loras")
    async def loras():
        return await asyncio.to_thread(service.loras)

    @app.get("/ldm/presets")
    async def presets():
        return service.presets()

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        await asyncio.to_thread(service.refresh_checkpoints)
        return None

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return service.embeddings_listing()

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await asyncio.to_thread(service.refresh_checkpoints)
        return None

    @app.post("/sdapi/v1/refresh-vae")
    async def refresh_vae():
        await asyncio.to_thread(service.refresh_checkpoints)
        return None

    # ----- sd-webui-controlnet API ----------------------------------------------------------------------------------

    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": CONTROLNET_API_VERSION}

    @app.get("/controlnet/model_list")
    async def controlnet_model_list(update: bool = True):
        return {"model_list": await asyncio.to_thread(service.controlnet_models)}

    @app.get("/controlnet/module_list")
    async def controlnet_module_list(alias_names: bool = False):
        return service.controlnet_modules()

    @app.get("/controlnet/settings")
    async def controlnet_settings():
        return {"control_net_unit_count": MAX_UNITS}

    @app.post("/controlnet/detect")
    async def controlnet_detect(request: ControlNetDetectRequest):
        return await asyncio.to_thread(
            service.controlnet_detect, request.controlnet_module, request.controlnet_input_images,
            request.controlnet_masks, request.controlnet_processor_res, request.controlnet_threshold_a,
            request.controlnet_threshold_b)

    # ----- page -----------------------------------------------------------------------------------------------------

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/internal/progress")
    async def task_progress(request: TaskRequest):
        return await asyncio.to_thread(service.task_progress, request.id_task)

    @app.post("/internal/token-count")
    async def token_count(request: TokenCountRequest):
        return await asyncio.to_thread(service.count_tokens, request.text, request.steps)

    @app.get("/internal/config")
    async def config():
        return await asyncio.to_thread(service.page_config)

    @app.post("/internal/styles")
    async def save_style(request: StyleRequest):
        return await asyncio.to_thread(service.save_style, request.name, request.prompt, request.negative_prompt)

    @app.post("/internal/styles/delete")
    async def delete_style(request: StyleName):
        return await asyncio.to_thread(service.delete_style, request.name)

    @app.get("/internal/scripts")
    async def page_scripts():
        return {mode: [script.page_info(mode, service.script_options()) for script in scripts_for(mode)]
                for mode in ("txt2img", "img2img")}

    @app.post("/internal/save")
    async def save(request: ImagesRequest):
        return {"files": await asyncio.to_thread(service.save_images, request.images)}

    @app.post("/internal/zip")
    async def make_zip(request: ImagesRequest):
        data = await asyncio.to_thread(service.zip_images, request.images)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="images.zip"'})

    return app
