"""A1111's X/Y/Z plot: one generate() call per combination of up to three axes' values, drawn as a labelled grid.

Every cell is `generate(model, replace(params, <the cell's axis values>, batch_size=1, batch_count=1))`: the labels
state every parameter that differs from the request, nothing else changes between cells. Axis values are
comma-separated (CSV quoting allowed); numeric axes take ranges: `1-5` (inclusive), `1-10 (+3)` (a step), `1-10 [4]`
(a count, evenly spaced). The axis types are A1111's list, in its order, so a client's type index means the same axis;
the types whose effect this engine does not have (sigma churn, token merging, refiner, ...) answer with an error
that says so. "Size" (`64x96` or `64`) is our addition at the end of the list.
"""
import csv
import dataclasses
import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from samplers import SAMPLERS, SCHEDULERS

from ..generate import Result
from ..infotext import quote
from ..params import HIRES_UPSCALERS, GenerationParams, ParamsError
from ..rng import RNG_SOURCES, fixed_seed
from .base import Script, ScriptArg, ScriptError, ScriptJob, register_script
from .grid import annotated_grid

TXT2IMG, IMG2IMG, BOTH = ("txt2img",), ("img2img",), ("txt2img", "img2img")
CHECKPOINT = "checkpoint"  # the key of a cell's model in its changes


@dataclass(frozen=True)
class Axis:
    """One axis type. kind: how values are parsed ("int", "float", "str", "permutations"); apply(changes, value,
    values) sets the cell's GenerationParams fields in `changes` (None: this engine cannot vary it); label: how a
    value is shown ("field": "Steps: 10", "value", "join", "basename", "none"); cost: axes that are slow to change
    (a checkpoint load) are iterated outermost; choices(): the values a page offers."""
    label: str
    kind: str
    apply: Callable[[dict, object, list], None] | None
    modes: tuple[str, ...] = BOTH
    format: str = "field"
    cost: float = 0.0
    choices: Callable[[], list] | None = None

    def format_value(self, value) -> str:
        if isinstance(value, float):
            value = round(value, 8)
        if self.format == "none":
            return ""
        if self.format == "value":
            return str(value)
        if self.format == "join":
            return ", ".join(value)
        if self.format == "basename":
            return os.path.basename(str(value))
        return f"{self.label}: {value}"


def set_field(name: str):
    def apply(changes: dict, value, values: list) -> None:
        changes[name] = value
    return apply


def search_replace(changes: dict, value: str, values: list) -> None:
    """Prompt S/R: the axis's first value is searched for in the prompt and the negative prompt and replaced by the
    cell's value (a LoRA's weight `<lora:name:0.5>` is varied this way)."""
    search = values[0]
    if not search:
        raise ScriptError("Prompt S/R: the first value is the text to search for; it must not be empty")
    if search not in changes["prompt"] and search not in changes["negative_prompt"]:
        raise ScriptError(f"Prompt S/R did not find {search!r} (the first value) in the prompt or the negative "
                          "prompt")
    changes["prompt"] = changes["prompt"].replace(search, value)
    changes["negative_prompt"] = changes["negative_prompt"].replace(search, value)


def prompt_order(changes: dict, order: tuple, values: list) -> None:
    """Prompt order: the axis's values, wherever they stand in the prompt, are put back in the cell's order."""
    prompt = changes["prompt"]
    missing = [token for token in order if token not in prompt]
    if missing:
        raise ScriptError(f"Prompt order: {missing[0]!r} is not in the prompt")
    starts = sorted((prompt.find(token), token) for token in order)
    pieces, position = [], 0
    for slot, (start, token) in enumerate(starts):
        pieces += [prompt[position:start], order[slot]]
        position = start + len(token)
    changes["prompt"] = "".join(pieces) + prompt[position:]


def denoising(changes: dict, value: float, values: list) -> None:
    # img2img's strength; in txt2img A1111's denoising strength is the hires pass's.
    changes["hr_denoising_strength" if changes["mode"] == "txt2img" else "denoising_strength"] = value


def add_styles(changes: dict, value: str, values: list) -> None:
    changes["styles"] = changes["styles"] + [name.strip() for name in value.split(",") if name.strip()]


def size(changes: dict, value: str, values: list) -> None:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", value)
    if not match:
        raise ScriptError(f"Size: {value!r} is not WIDTHxHEIGHT (e.g. 64x96) or one number for a square")
    changes["width"] = int(match[1])
    changes["height"] = int(match[2] or match[1])


def set_checkpoint(changes: dict, value: str, values: list) -> None:
    changes[CHECKPOINT] = value


def unsupported(label: str, modes=BOTH, kind="float") -> Axis:
    return Axis(label, kind, None, modes)


# A1111's axis types in its order (its type index counts the entries of one tab's list), then ours.
AXES = (
    Axis("Nothing", "str", lambda changes, value, values: None, format="none"),
    Axis("Seed", "int", set_field("seed")),
    Axis("Var. seed", "int", set_field("subseed")),
    Axis("Var. strength", "float", set_field("subseed_strength")),
    Axis("Steps", "int", set_field("steps")),
    Axis("Hires steps", "int", set_field("hr_second_pass_steps"), TXT2IMG),
    Axis("CFG Scale", "float", set_field("cfg_scale")),
    unsupported("Image CFG Scale", IMG2IMG),
    Axis("Prompt S/R", "str", search_replace, format="value"),
    Axis("Prompt order", "permutations", prompt_order, format="join"),
    Axis("Sampler", "str", set_field("sampler_name"), TXT2IMG, "value", choices=lambda: list(SAMPLERS)),
    unsupported("Hires sampler", TXT2IMG, "str"),
    Axis("Sampler", "str", set_field("sampler_name"), IMG2IMG, "value", choices=lambda: list(SAMPLERS)),
    Axis("Checkpoint name", "str", set_checkpoint, format="basename", cost=1.0),
    unsupported("Negative Guidance minimum sigma"),
    unsupported("Sigma Churn"),
    unsupported("Sigma min"),
    unsupported("Sigma max"),
    unsupported("Sigma noise"),
    Axis("Schedule type", "str", set_field("scheduler"), choices=lambda: list(SCHEDULERS)),
    unsupported("Schedule min sigma"),
    unsupported("Schedule max sigma"),
    unsupported("Schedule rho"),
    Axis("Eta", "float", set_field("eta")),
    Axis("Clip skip", "int", set_field("clip_skip")),
    Axis("Denoising", "float", denoising),
    Axis("Initial noise multiplier", "float", set_field("noise_multiplier")),
    unsupported("Extra noise"),
    Axis("Hires upscaler", "str", set_field("hr_upscaler"), TXT2IMG, choices=lambda: list(HIRES_UPSCALERS)),
    Axis("Cond. Image Mask Weight", "float", set_field("inpainting_mask_weight"), IMG2IMG),
    unsupported("VAE", kind="str"),
    Axis("Styles", "str", add_styles),
    unsupported("UniPC Order", kind="int"),
    unsupported("Face restore", kind="str"),
    unsupported("Token merging ratio"),
    unsupported("Token merging ratio high-res"),
    unsupported("Always discard next-to-last sigma", kind="str"),
    unsupported("SGM noise multiplier", kind="str"),
    unsupported("Refiner checkpoint", kind="str"),
    unsupported("Refiner switch at"),
    Axis("RNG source", "str", set_field("rng"), choices=lambda: list(RNG_SOURCES)),
    Axis("Size", "str", size),
)


def axes_for(mode: str) -> list[Axis]:
    return [axis for axis in AXES if mode in axis.modes]


def axis_labels(mode: str, options: dict | None = None) -> tuple[str, ...]:
    return tuple(axis.label for axis in axes_for(mode))


def supported_axis_labels(mode: str, options: dict | None = None) -> tuple[str, ...]:
    return tuple(axis.label for axis in axes_for(mode) if axis.apply)


# `a-b`, `a-b (+step)` and `a-b [count]` (A1111's range syntax; the sign of a number may be spaced from it).
_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
_COUNT_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*])?\s*")
_RANGE_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_COUNT_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+(?:\.\d*)?)\s*])?\s*")


def _number(text: str) -> str:
    return text.replace(" ", "")


def split_values(text: str, raw_lines: bool = False) -> list[str]:
    """An axis's value text: comma-separated with CSV quoting, each value stripped; with raw_lines, one value per
    line (a prompt with commas)."""
    if raw_lines and "\n" in text.strip():
        return text.strip().split("\n")
    return [value.strip() for row in csv.reader([text], skipinitialspace=True) for value in row]


def _bounded(count: int, value: str, where: str) -> int:
    """A range's number of values, refused before it is made when it alone exceeds the plot's cell limit."""
    if count > MAX_CELLS:
        raise ScriptError(f"{where}: {value!r} makes {count} values, more than the {MAX_CELLS} cells a plot may have")
    return count


def expand_values(axis: Axis, values: list[str], where: str) -> list:
    """The axis's values with ranges expanded and each converted to the axis's type."""
    if axis.kind == "int":
        expanded = []
        for value in values:
            if match := _RANGE_INT.fullmatch(value):
                start, end = int(_number(match[1])), int(_number(match[2]))
                step = int(match[3]) if match[3] else 1
                if step == 0:
                    raise ScriptError(f"{where}: the step of {value!r} is 0")
                values_in_range = range(start, end + (1 if step > 0 else -1), step)
                _bounded(len(values_in_range), value, where)
                expanded += list(values_in_range)
            elif match := _COUNT_INT.fullmatch(value):
                start, end, count = int(_number(match[1])), int(_number(match[2])), int(match[3] or 1)
                expanded += [int(v) for v in np.linspace(start, end, _bounded(count, value, where)).tolist()]
            else:
                try:
                    expanded.append(int(value))
                except ValueError:
                    raise ScriptError(f"{where}: {value!r} is not an integer or a range like 1-5, 1-10 (+2), "
                                      "1-10 [5]") from None
        return expanded
    if axis.kind == "float":
        expanded = []
        for value in values:
            if match := _RANGE_FLOAT.fullmatch(value):
                start, end = float(_number(match[1])), float(_number(match[2]))
                step = float(match[3]) if match[3] else 1.0
                if step == 0:
                    raise ScriptError(f"{where}: the step of {value!r} is 0")
                _bounded(max(math.ceil((end + step - start) / step), 0), value, where)
                expanded += np.arange(start, end + step, step).tolist()
            elif match := _COUNT_FLOAT.fullmatch(value):
                start, end, count = float(_number(match[1])), float(_number(match[2])), int(float(match[3] or 1))
                expanded += np.linspace(start, end, _bounded(count, value, where)).tolist()
            else:
                try:
                    expanded.append(float(value))
                except ValueError:
                    raise ScriptError(f"{where}: {value!r} is not a number or a range like 0.5-2 (+0.5), "
                                      "1-10 [5]") from None
        return expanded
    if axis.kind == "permutations":
        _bounded(math.factorial(len(values)), ", ".join(values), where)
        return list(itertools.permutations(values))
    return list(values)


# Each A1111 X/Y/Z plot run makes at most this many cells; beyond it a typo in a range (1-1000) would queue hours.
MAX_CELLS = 1000


def _arguments() -> tuple[ScriptArg, ...]:
    def axis_args(name: str, default: str):
        return (ScriptArg(f"{name} type", default, "dropdown", choices=axis_labels, index=True,
                          page_choices=supported_axis_labels),
                ScriptArg(f"{name} values", "", "text"),
                ScriptArg(f"{name} values", None, "list"))

    return (*axis_args("X", "Seed"), *axis_args("Y", "Nothing"), *axis_args("Z", "Nothing"),
            ScriptArg("Draw legend", True, "checkbox"),
            # A1111's default is off (only the grid comes back); here the cells with their infotexts come too.
            ScriptArg("Include Sub Images", True, "checkbox"),
            ScriptArg("Include Sub Grids", False, "checkbox"),
            ScriptArg("Keep -1 for seeds", False, "checkbox"),
            ScriptArg("Grid margins (px)", 0, "number", 0, 500, 2),
            ScriptArg("Use text inputs instead of dropdowns", False, "checkbox"),
            ScriptArg("Use raw text lines", False, "checkbox"))


@dataclass
class _Cell:
    index: tuple[int, int, int]  # (ix, iy, iz)
    params: GenerationParams
    checkpoint: str | None


def plan_axis(axis: Axis, text: str, dropdown: list | None, csv_mode: bool, raw_lines: bool, where: str,
              no_fixed_seeds: bool) -> list:
    if axis.label == "Nothing":
        return [None]
    if axis.apply is None:
        raise ScriptError(f"{where}: the axis type {axis.label!r} is not supported here (this engine has no "
                          "such setting); supported: " + ", ".join(a.label for a in AXES if a.apply))
    values = list(dropdown) if axis.choices and dropdown and not csv_mode else split_values(text or "", raw_lines)
    values = [v for v in values if v != ""] if axis.kind != "str" else values
    if not values:
        raise ScriptError(f"{where}: no values given for {axis.label}")
    values = expand_values(axis, values, where)
    if axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
        values = [fixed_seed(value) for value in values]
    return values


def run(job: ScriptJob, params: GenerationParams, args: list) -> Result:
    (x_type, x_text, x_list, y_type, y_text, y_list, z_type, z_text, z_list, draw_legend, include_cells,
     include_sub_grids, no_fixed_seeds, margin, csv_mode, raw_lines) = args
    mode = "img2img" if params.is_img2img else "txt2img"
    available = axes_for(mode)
    axes = [available[x_type], available[y_type], available[z_type]]
    texts = [x_text, y_text, z_text]
    values = [plan_axis(axis, text, listed, csv_mode, raw_lines, f"{name} values", no_fixed_seeds)
              for axis, text, listed, name in zip(axes, texts, (x_list, y_list, z_list), "XYZ")]
    count = len(values[0]) * len(values[1]) * len(values[2])
    if count > MAX_CELLS:
        raise ScriptError(f"the X/Y/Z plot has {count} cells, more than {MAX_CELLS}; use fewer values")
    base = dataclasses.replace(params, batch_size=1, batch_count=1,
                               seed=params.seed if no_fixed_seeds else fixed_seed(params.seed))
    cells = []
    for iz, iy, ix in itertools.product(*(range(len(v)) for v in reversed(values))):
        changes = {"mode": mode, "prompt": base.prompt, "negative_prompt": base.negative_prompt,
                   "styles": list(base.styles)}
        for axis, axis_values, i in zip(axes, values, (ix, iy, iz)):
            axis.apply(changes, axis_values[i], axis_values)
        checkpoint = changes.pop(CHECKPOINT, None)
        del changes["mode"]
        try:
            cell_params = dataclasses.replace(base, **changes).validate()
            if checkpoint is None:  # what fits the model (sizes, clip skip) is known before anything runs
                cell_params.validate_for(job.model.model.preset)
        except ParamsError as error:
            labels = ", ".join(filter(None, (a.format_value(v[i]) for a, v, i in zip(axes, values, (ix, iy, iz)))))
            raise ScriptError(f"X/Y/Z plot cell ({labels}): {error}") from None
        cells.append(_Cell((ix, iy, iz), cell_params, checkpoint))
    job.check_work([cell.params for cell in cells], f"the X/Y/Z plot's {count} cells")
    for name in {cell.checkpoint for cell in cells if cell.checkpoint is not None}:
        job.check_model(name)

    # A slow-to-change axis (checkpoint) outermost, as A1111 orders the loops, so each model is loaded once.
    outer_first = sorted(range(3), key=lambda a: -axes[a].cost)
    results: dict[tuple, Result] = {}
    for cell in sorted(cells, key=lambda cell: [cell.index[a] for a in outer_first]):
        if cell.checkpoint is not None and cell.checkpoint != job.model_name:
            job.use_model(cell.checkpoint)
        results[cell.index] = job.generate(cell.params)
    return _assemble(cells, results, axes, values, texts, params, draw_legend, include_cells, include_sub_grids,
                     no_fixed_seeds, margin)


def _assemble(cells, results, axes, values, texts, params, draw_legend, include_cells, include_sub_grids,
              no_fixed_seeds, margin) -> Result:
    """The grids (one per Z value, side by side under their Z labels) and the cells, with infotexts."""
    done = [results[cell.index] for cell in cells if results[cell.index].images]
    if not done:
        return Result([], [], [], [], params, [note for r in results.values() for note in r.warnings],
                      interrupted=any(r.interrupted for r in results.values()))
    size = done[0].images[0].size
    images, infotexts, seeds, subseeds = [], [], [], []
    for cell in cells:
        result = results[cell.index]
        if result.images:
            images.append(result.images[0])
            infotexts.append(result.infotexts[0])
            seeds.append(result.seeds[0])
            subseeds.append(result.subseeds[0])
        else:  # a cell that was interrupted or skipped stays black, as in A1111
            images.append(Image.new("RGB", size, "black"))
            infotexts.append("")
            seeds.append(cell.params.seed)
            subseeds.append(cell.params.subseed)
    columns, rows = len(values[0]), len(values[1])
    labels = [[axis.format_value(v) for v in axis_values] if axis.label != "Nothing" else [""] * len(axis_values)
              for axis, axis_values in zip(axes, values)]
    per_grid = columns * rows
    sub_grids = [annotated_grid(images[z * per_grid:(z + 1) * per_grid], columns,
                                labels[0] if draw_legend else [], labels[1] if draw_legend else [], margin)
                 for z in range(len(values[2]))]
    if len(sub_grids) > 1:
        grid = annotated_grid(sub_grids, len(sub_grids), labels[2] if draw_legend else [], [], margin)
    else:
        grid = sub_grids[0]

    script_fields = {"Script": "X/Y/Z plot"}
    for axis, text, axis_values, name in zip(axes, texts, values, "XYZ"):
        if axis.label != "Nothing":
            script_fields[f"{name} Type"] = axis.label
            script_fields[f"{name} Values"] = text
            if axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
                script_fields[f"Fixed {name} Values"] = ", ".join(map(str, axis_values))
    first = done[0].infotexts[0]
    grid_infotext = first + ", " + ", ".join(f"{key}: {quote(value)}" for key, value in script_fields.items())

    head = [grid] + (sub_grids if include_sub_grids and len(sub_grids) > 1 else [])
    out_images = head + (images if include_cells else [])
    out_infotexts = [grid_infotext] * len(head) + (infotexts if include_cells else [])
    out_seeds = [seeds[0]] * len(head) + (seeds if include_cells else [])
    out_subseeds = [subseeds[0]] * len(head) + (subseeds if include_cells else [])
    warnings = list(dict.fromkeys(note for r in results.values() for note in r.warnings))
    return Result(out_images, out_seeds, out_subseeds, out_infotexts, done[0].params, warnings,
                  any(r.interrupted for r in results.values()))


SCRIPT = register_script(Script("X/Y/Z plot", _arguments(), run))
