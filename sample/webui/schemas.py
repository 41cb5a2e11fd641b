"""A1111's `/sdapi/v1` request bodies (field names and defaults as A1111's API has them) and their translation into
GenerationParams.

Fields A1111 accepts that change nothing here (s_churn, image_cfg_scale, comments, …) are accepted and ignored, so
existing clients can send their usual bodies; fields that would change the image in a way this engine cannot
reproduce (always-on scripts, a different hires sampler or checkpoint, …) are refused with a message instead of being
silently dropped.
"""
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from sample.infotext import clean_text
from sample.params import MAX_STEPS, GenerationParams, ParamsError

from samplers import SAMPLERS, SCHEDULERS



# sd-webui-controlnet's alwayson script, the one script this server runs (sample.controlnet).
CONTROLNET_SCRIPT = "controlnet"


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message says which field and what is allowed."""


def scheduler_api_name(label: str) -> str:
    """A1111's schedulers have a label ("Align Your Steps") and a name ("align_your_steps"); both are accepted."""
    return label.lower().replace(" ", "_")


def resolve_scheduler(name: str | None) -> str:
    if not name:
        return "Automatic"
    for label in SCHEDULERS:
        if name in (label, scheduler_api_name(label)) or name.lower() == label.lower():
            return label
    raise RequestError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")


def resolve_sampler_name(name: str) -> str:
    """A sampler name, alias or lower-case spelling -> its A1111 name; names with a schedule suffix ("DPM++ 2M
    Karras") pass through for GenerationParams to split."""
    for sampler, info in SAMPLERS.items():
        if name == sampler or name in info.aliases or name.lower() == sampler.lower():
            return sampler
    return name


class AlwaysOnScript(BaseModel):
    """One entry of A1111's `alwayson_scripts`: {"args": [...]}; an entry without args leaves its script off."""
    model_config = ConfigDict(extra="ignore")

    args: list = []


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None  # None: the model's native resolution (A1111 uses 512 whatever the model)
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = []
    alwayson_scripts: dict[str, AlwaysOnScript] = {}
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = None
    infotext: str | None = None

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        # JSON may carry lone surrogates ("\ud800"); text that cannot be written as UTF-8 would fail only after
        # the images were made, in the PNG chunk or the response.
        if isinstance(value, str):
            return clean_text(value)
        if isinstance(value, list):
            return [clean_text(item) if isinstance(item, str) else item for item in value]
        return value

    def controlnet_args(self) -> list:
        """The units of `alwayson_scripts.controlnet.args` (sd-webui-controlnet's API dicts), [] when absent."""
        return [arg for name, script in self.alwayson_scripts.items() if name.lower() == CONTROLNET_SCRIPT
                for arg in script.args]

    def common_fields(self) -> dict:
        """The GenerationParams fields shared by txt2img and img2img (settings-dependent ones are added later)."""
        active_scripts = [name for name, script in self.alwayson_scripts.items()
                          if script.args and name.lower() != CONTROLNET_SCRIPT]
        if active_scripts:
            raise RequestError(f"alwayson_scripts {', '.join(active_scripts)}: not available on this server, whose "
                               "only always-on script is controlnet (script_name picks one of GET /sdapi/v1/scripts); "
                               "send {}")
        if not 1 <= self.steps <= MAX_STEPS:  # the same limit as GenerationParams.validate, in the API's words
            raise RequestError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        fields = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt, styles=list(self.styles or []),
            sampler_name=resolve_sampler_name(self.sampler_name or self.sampler_index),
            scheduler=resolve_scheduler(self.scheduler), steps=self.steps, width=self.width, height=self.height,
            cfg_scale=self.cfg_scale, batch_count=self.n_iter, batch_size=self.batch_size, seed=self.seed,
            subseed=self.subseed, subseed_strength=self.subseed_strength,
            # A1111 marks "no seed resize" with -1 (its API) or 0 (its UI); GenerationParams with 0.
            seed_resize_from_w=max(self.seed_resize_from_w, 0), seed_resize_from_h=max(self.seed_resize_from_h, 0),
            eta=self.eta, tiling=bool(self.tiling), restore_faces=bool(self.restore_faces))
        try:  # the library's own checks and limits, which every other way into GenerationParams passes too
            GenerationParams(**fields).validate()
        except ParamsError as error:
            raise RequestError(str(error)) from None
        return fields


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    def generation_fields(self) -> dict:
        fields = self.common_fields()
        if not self.enable_hr:
            return fields
        # A1111 sends "Use same ..." as None or as the first pass's own value; anything else changes the second pass.
        for name, same in (("hr_checkpoint_name", "Use same checkpoint"), ("hr_sampler_name", "Use same sampler"),
                           ("hr_scheduler", "Use same scheduler")):
            value = getattr(self, name)
            first_pass = {"hr_sampler_name": fields["sampler_name"], "hr_scheduler": fields["scheduler"]}.get(name)
            if value not in (None, "", same, first_pass):
                raise RequestError(f"{name}={value!r}: a second pass different from the first is not supported; "
                                   f"leave it empty ({same!r})")
        for name, first_pass in (("hr_prompt", self.prompt), ("hr_negative_prompt", self.negative_prompt)):
            if getattr(self, name) not in ("", first_pass):
                raise RequestError(f"{name}: a hires prompt different from the prompt is not supported; leave it empty")
        scale = self.hr_scale
        if self.hr_resize_x or self.hr_resize_y:
            if self.width is None or self.height is None:
                raise RequestError("hr_resize_x/y need the first pass's width and height; send both (or use hr_scale)")
            pairs = ((self.hr_resize_x, self.width), (self.hr_resize_y, self.height))
            scales = {target / base for target, base in pairs if target}
            if len(scales) > 1:
                raise RequestError(f"hr_resize_x/y {self.hr_resize_x}x{self.hr_resize_y} change the aspect ratio of "
                                   f"{self.width}x{self.height}; give one of them or use hr_scale")
            scale = scales.pop()
        fields.update(enable_hr=True, hr_scale=scale, hr_upscaler=self.hr_upscaler or "Latent",
                      hr_second_pass_steps=self.hr_second_pass_steps,
                      hr_denoising_strength=0.7 if self.denoising_strength is None else self.denoising_strength)
        return fields


class Img2ImgRequest(_Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    inpainting_mask_weight: float | None = None
    include_init_images: bool = False
    denoising_strength: float = 0.75

    def generation_fields(self) -> dict:
        fields = self.common_fields()
        if not self.init_images:
            raise RequestError("init_images is empty: img2img needs at least one base64 image")
        blur = self.mask_blur
        if blur is None:
            if self.mask_blur_x != self.mask_blur_y:
                raise RequestError(f"mask_blur_x={self.mask_blur_x} and mask_blur_y={self.mask_blur_y} differ; "
                                   "this server blurs masks equally in both directions (send mask_blur)")
            blur = self.mask_blur_x
        fields.update(resize_mode=self.resize_mode, denoising_strength=self.denoising_strength, mask_blur=blur,
                      inpainting_fill=self.inpainting_fill, inpaint_full_res=self.inpaint_full_res,
                      inpaint_full_res_padding=self.inpaint_full_res_padding,
                      inpainting_mask_invert=bool(self.inpainting_mask_invert))
        return fields


class MergeRequest(BaseModel):
    """POST /sdapi/v1/merge (not in A1111's API): the Checkpoint Merger tab's fields, named as A1111's
    run_modelmerger names them. Models by any name /sdapi/v1/sd-models lists; the result goes to the models folder."""
    model_config = ConfigDict(extra="forbid")

    primary_model_name: str
    secondary_model_name: str | None = None
    tertiary_model_name: str | None = None
    interp_method: str = "Weighted sum"
    multiplier: float = 0.3
    save_as_half: bool = False
    custom_name: str = ""
    bake_in_vae: str = "None"


class StyleRequest(BaseModel):
    name: str
    prompt: str = ""
    negative_prompt: str = ""


class PngInfoRequest(BaseModel):
    image: str


def sampler_list() -> list[dict]:
    return [{"name": name, "aliases": list(info.aliases), "options": {}} for name, info in SAMPLERS.items()]


def scheduler_list() -> list[dict]:
    # default_rho: Karras's rho 7 and Polyexponential's rho 1 (A1111's defaults); -1 where a schedule has none.
    rho = {"Karras": 7.0, "Polyexponential": 1.0}
    return [{"name": scheduler_api_name(label), "label": label, "aliases": None, "default_rho": rho.get(label, -1),
             "need_inner_model": label in ("Automatic", "Uniform", "SGM Uniform", "Simple", "Normal", "DDIM")}
            for label in SCHEDULERS]
