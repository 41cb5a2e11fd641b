"""A1111's "Script" menu: scripts that make their images with several generate() calls.

    from sample import GenerationParams, default_model
    from sample.scripts import run_script
    result = run_script(default_model(), GenerationParams(prompt="a red circle", seed=1, steps=8),
                        "x/y/z plot", ["Steps", "4, 8, 16", None, "CFG Scale", "3, 7", None])
    result.images[0].save("grid.png")            # the labelled grid; then each cell, its infotext in result.infotexts

Built in, under A1111's names and positional arguments: "x/y/z plot", "prompt matrix", "prompts from file or
textbox" (txt2img and img2img) and "sd upscale" (img2img). `register_script(Script(title, args, run))` adds one.
"""
from .base import (SCRIPTS, Script, ScriptArg, ScriptError, ScriptJob, find_script, join_results, register_script,
                   run_script, scripts_for)
from . import prompt_matrix, prompts_from_file, sd_upscale, xyz_plot  # noqa: F401  (the built-ins register themselves)

__all__ = ["SCRIPTS", "Script", "ScriptArg", "ScriptError", "ScriptJob", "find_script", "join_results",
           "register_script", "run_script", "scripts_for"]
