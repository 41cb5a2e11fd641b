"""A1111's "Prompts from file or textbox": one generation per line of text.

A plain line is a prompt. A line with `--` is a command line of options (A1111's set, quoted as a shell quotes):

    --prompt "a red circle" --negative_prompt "blurry" --steps 10 --cfg_scale 5 --seed 3 --sampler_name "Euler"

`--prompt` / `--negative_prompt` take every word up to the next option. With a prompt in the request, a line's prompt
is put at the start or the end of it ("Insert prompts at the"). "Iterate seed every line" advances the seed by
batch_size x n_iter after each line; with it or "Use same random seed for all lines" a seed of -1 is drawn once for
all lines. A line this parser cannot read is an error naming the line (A1111 would take it as a prompt).
"""
import dataclasses
import shlex

from samplers import SAMPLERS

from ..generate import Result
from ..params import GenerationParams, ParamsError
from ..rng import fixed_seed
from .base import Script, ScriptArg, ScriptError, ScriptJob, join_results, register_script


def _boolean(text: str) -> bool:
    return text == "true"


def _sampler_by_index(text: str) -> str:
    names = list(SAMPLERS)
    index = int(text)
    if not 0 <= index < len(names):
        raise ValueError(f"sampler_index {index} is not in 0..{len(names) - 1}")
    return names[index]


def _sampler_by_name(text: str) -> str:
    for name, info in SAMPLERS.items():
        if text.lower() in (name.lower(), *(alias.lower() for alias in info.aliases)):
            return name
    raise ValueError(f"unknown sampler {text!r}; valid: {', '.join(SAMPLERS)}")


def _styles(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


# A1111's options: name -> (GenerationParams field or None to accept and ignore, conversion). Its output folders are
# the server's business and are ignored, as are the save switches (this script saves nothing itself).
OPTIONS = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "styles": ("styles", _styles),
    "seed": ("seed", int), "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float),
    "seed_resize_from_h": ("seed_resize_from_h", int), "seed_resize_from_w": ("seed_resize_from_w", int),
    "sampler_index": ("sampler_name", _sampler_by_index), "sampler_name": ("sampler_name", _sampler_by_name),
    "batch_size": ("batch_size", int), "n_iter": ("batch_count", int), "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float), "width": ("width", int), "height": ("height", int),
    "restore_faces": ("restore_faces", _boolean), "tiling": ("tiling", _boolean),
    "outpath_samples": (None, str), "outpath_grids": (None, str), "prompt_for_display": (None, str),
    "do_not_save_samples": (None, _boolean), "do_not_save_grid": (None, _boolean),
}


def parse_line(line: str) -> dict:
    """One line as GenerationParams fields; ValueError says what is wrong."""
    if "--" not in line:
        return {"prompt": line}
    words = shlex.split(line)
    fields, position = {}, 0
    while position < len(words):
        option = words[position]
        if not option.startswith("--"):
            raise ValueError(f"expected an option starting with --, got {option!r}")
        name = option[2:]
        if name not in OPTIONS:
            raise ValueError(f"unknown option {option}; valid: {', '.join('--' + o for o in OPTIONS)}")
        if position + 1 >= len(words):
            raise ValueError(f"{option} needs a value")
        field, convert = OPTIONS[name]
        if name in ("prompt", "negative_prompt"):  # every word up to the next option
            end = position + 1
            while end < len(words) and not words[end].startswith("--"):
                end += 1
            value, position = " ".join(words[position + 1:end]), end
        else:
            try:
                value = convert(words[position + 1])
            except ValueError as error:
                raise ValueError(f"{option} {words[position + 1]!r}: {error}") from None
            position += 2
        if field:
            fields[field] = value
    return fields


def parse_lines(text: str) -> list[tuple[int, dict]]:
    """The textbox: (line number, fields) per non-empty line; ScriptError names the first line that cannot be
    read."""
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            jobs.append((number, parse_line(line.strip())))
        except ValueError as error:
            raise ScriptError(f"prompts line {number}: {error}") from None
    return jobs


def run(job: ScriptJob, params: GenerationParams, args: list) -> Result:
    iterate_seed, same_seed, position, text = args
    lines = parse_lines(text)
    if not lines:
        raise ScriptError("no prompts: write one prompt (or one line of --options) per line")
    seed = fixed_seed(params.seed) if iterate_seed or same_seed else params.seed
    plans = []
    for number, fields in lines:
        for name, base in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
            if fields.get(name) and base:
                fields[name] = f"{fields[name]} {base}" if position == "start" else f"{base} {fields[name]}"
        try:
            plans.append(dataclasses.replace(params, **{"seed": seed, **fields}).validate())
        except ParamsError as error:
            raise ScriptError(f"prompts line {number}: {error}") from None
        if iterate_seed:
            seed += params.batch_size * params.batch_count
    job.check_work(plans, f"the {len(plans)} prompt lines")
    return join_results([job.generate(plan) for plan in plans], params)


ARGS = (ScriptArg("Iterate seed every line", False, "checkbox"),
        ScriptArg("Use same random seed for all lines", False, "checkbox"),
        ScriptArg("Insert prompts at the", "start", "radio", choices=("start", "end")),
        ScriptArg("List of prompt inputs", "", "textarea"))

SCRIPT = register_script(Script("Prompts from file or textbox", ARGS, run))
