"""Image generation with AUTOMATIC1111's parameters, prompt syntax, LoRA, embeddings and PNG infotext.

    from sample import GenerationParams, generate, default_model, load_checkpoint
    result = generate(default_model(), GenerationParams(prompt="a red circle", seed=1, steps=20))
    result.images[0].save("out.png")            # or sample.images.save_png(image, path, result.infotexts[0])
    print(result.infotexts[0])                   # A1111's "parameters" text
    again = generate(default_model(), result.infotexts[0])   # an infotext reproduces its image (CPU RNG)
    generate(default_model(), params, callback=lambda step: print(step.i, step.sigma))   # StepInfo per step

A1111's scripts (X/Y/Z plot, SD upscale, prompt matrix, prompts from file): `sample.scripts.run_script(model, params,
"x/y/z plot", args)`.

Commands: `python -m sample.txt2img`, `python -m sample.img2img`, `python -m sample.pnginfo` (`--script` runs a
script).
"""
from .embeddings import Embedding, EmbeddingDatabase, load_embedding
from .generate import (GenerationError, GenerationWarning, Interrupted, Result, Skipped, StepInfo, batch_steps,
                       generate)
from .infotext import format_infotext, parse_infotext
from .lora import Lora, LoraError, applied, load_lora, merge, save_merged
from .models import (PRESETS, GenerationPreset, LoadedModel, ModelSpec, default_model, load_checkpoint,
                     load_model_spec, load_vae, parse_model_spec, register_lora, register_preset)
from .params import GenerationParams, ParamsError
from .prompts import extract_extra_networks, parse_prompt_attention, prompt_schedule, token_count
from .styles import Style, load_styles

__all__ = ["GenerationParams", "ParamsError", "generate", "Result", "StepInfo", "Interrupted", "Skipped", "batch_steps",
           "GenerationError", "GenerationWarning", "LoadedModel", "default_model", "load_checkpoint", "load_vae",
           "format_infotext", "parse_infotext", "parse_prompt_attention", "prompt_schedule", "extract_extra_networks",
           "token_count", "Embedding", "EmbeddingDatabase", "load_embedding", "Lora", "LoraError", "load_lora", "applied",
           "merge", "save_merged", "ModelSpec", "parse_model_spec", "load_model_spec", "Style",
           "load_styles", "PRESETS", "GenerationPreset", "register_lora", "register_preset"]
