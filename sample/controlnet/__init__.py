"""ControlNet in generation (sd-webui-controlnet's units): preprocessors, units, and the model wrapper that adds the
residuals to the UNet call.

    from sample.controlnet import ControlNetUnit
    unit = ControlNetUnit(image="edges.png", module="none", model="shapes_canny", weight=1.0)
    generate(model, GenerationParams(prompt="a red circle", controlnet_units=[unit]), controlnet_dir="models/ControlNet")

`register_preprocessor(name, fn)` adds a preprocessor (see sample.controlnet.preprocessors).
"""
from .control import (ControlledModel, PreparedUnit, UnitControl, crop_to_inpaint_region, detect, fit_map,
                      prepare_units)
from .preprocessors import (PREPROCESSORS, UNAVAILABLE, Preprocessor, PreprocessorError, Slider, canny,
                            get_preprocessor, hint_tensor, preview_image, register_preprocessor, run_preprocessor,
                            unregister_preprocessor)
from .units import (BUILTIN_CONTROLNETS, CONTROL_MODES, MAX_UNITS, RESIZE_MODES, ControlNetUnit, UnitError, find_model,
                    list_models, parse_unit_infotext, register_controlnet, unit_from_api)

__all__ = ["ControlNetUnit", "UnitError", "CONTROL_MODES", "RESIZE_MODES", "MAX_UNITS", "find_model", "list_models",
           "register_controlnet", "BUILTIN_CONTROLNETS", "parse_unit_infotext", "unit_from_api", "Preprocessor",
           "PreprocessorError", "Slider", "PREPROCESSORS",
           "UNAVAILABLE", "register_preprocessor", "unregister_preprocessor", "get_preprocessor", "run_preprocessor",
           "canny", "hint_tensor", "preview_image", "ControlledModel", "PreparedUnit", "UnitControl", "detect",
           "fit_map", "crop_to_inpaint_region", "prepare_units"]
