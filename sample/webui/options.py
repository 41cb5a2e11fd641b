"""A1111's ordinary settings that this server stores and reads back without acting on them.

Clients (and A1111's own API tests) write and read these: `send_seed` round-trips, `eta_noise_seed_delta` is copied
from one server to another. Each keeps A1111's name and default; a value must have its default's type (a number for
a float setting). The settings the server acts on are in service.DEFAULT_OPTIONS; docs/WEBUI.md lists both.

Extend: `STORED_OPTIONS["my_setting"] = default` (e.g. from an --extension file) before the server starts makes
another stored setting.
"""
from .schemas import RequestError

STORED_OPTIONS = {
    # "Send to ..." buttons: whether the seed and size travel with the image.
    "send_seed": True,
    "send_size": True,
    # Saving: the server writes PNG (samples_format is fixed); these A1111 file options are kept for clients.
    "jpeg_quality": 80,
    "webp_lossless": False,
    "export_for_4chan": True,
    "save_txt": False,
    "save_images_add_number": True,
    "samples_filename_pattern": "",
    "save_to_dirs": True,
    "grid_save": True,
    "grid_format": "png",
    "grid_save_to_dirs": True,
    "return_grid": True,
    "do_not_show_images": False,
    "use_original_name_batch": True,
    "use_upscaler_name_as_suffix": False,
    "save_selected_only": True,
    "do_not_add_watermark": False,
    # Infotext contents.
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_vae_name_to_info": True,
    "add_vae_hash_to_info": True,
    # Sampling parameters A1111 exposes as settings; here the samplers' own defaults apply (eta per request).
    "eta_noise_seed_delta": 0,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "always_discard_next_to_last_sigma": False,
    "img2img_fix_steps": False,
    "img2img_color_correction": False,
    "img2img_background_color": "#ffffff",
    "emphasis": "Original",
    "comma_padding_backtrack": 20,
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "token_merging_ratio": 0.0,
    "sd_vae_as_default": True,
    "sd_checkpoint_cache": 0,
    "sd_vae_checkpoint_cache": 0,
    # Upscaling and face restoration (face restoration is unavailable here).
    "ESRGAN_tile": 192,
    "ESRGAN_tile_overlap": 8,
    "upscaling_max_images_in_cache": 5,
    "face_restoration": False,
    "face_restoration_model": "CodeFormer",
    "code_former_weight": 0.5,
    # The page.
    "show_progressbar": True,
    "show_progress_every_n_steps": 10,
    "js_modal_lightbox": True,
    "quicksettings_list": ["sd_model_checkpoint"],
}


def check_stored_option(name: str, value):
    """`value` if it has the type of the setting's default, else RequestError naming the type; KeyError for a name
    that is not a stored setting."""
    default = STORED_OPTIONS[name]
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok, kind = isinstance(value, list) and all(isinstance(item, str) for item in value), "a list of strings"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise RequestError(f"{name} must be {kind}, got {value!r}")
    return value
