"""A1111's prompt matrix: `base | part 1 | part 2 | ...` makes one image for every subset of the parts, on a grid
whose labels show which parts each column and row has (the others greyed).

Combination c has part k (1-based) when bit k-1 of c is set; its prompt is the base and those parts joined by ", "
(or " "), the base first or last. Every image has the request's seed (or seed + c with "Random seeds"). The matrix
varies the prompt or, with "Prompt type" negative, the negative prompt.
"""
import dataclasses

from ..generate import Result
from ..params import GenerationParams
from ..rng import fixed_seed
from .base import Script, ScriptArg, ScriptError, ScriptJob, join_results, register_script
from .grid import annotated_grid

# 2^10 images; a longer matrix is more likely a prompt with stray `|` than a wish for thousands of images.
MAX_PARTS = 10


def combinations(prompt: str, put_at_start: bool, delimiter: str) -> tuple[list[str], list[str]]:
    """(the prompt's parts, the 2^(parts - 1) prompts of the matrix in combination order)."""
    parts = prompt.split("|")
    if len(parts) - 1 > MAX_PARTS:
        raise ScriptError(f"the prompt matrix has {len(parts) - 1} variable parts, more than {MAX_PARTS} "
                          f"({2 ** (len(parts) - 1)} images); use fewer `|`")
    prompts = []
    for c in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for k, text in enumerate(parts[1:]) if c & (1 << k)]
        prompts.append(delimiter.join(chosen + [parts[0]] if put_at_start else [parts[0]] + chosen))
    return parts, prompts


def run(job: ScriptJob, params: GenerationParams, args: list) -> Result:
    put_at_start, different_seeds, prompt_type, joiner, margin = args
    field = "prompt" if prompt_type == "positive" else "negative_prompt"
    parts, prompts = combinations(getattr(params, field), put_at_start, ", " if joiner == "comma" else " ")
    if len(parts) == 1:
        raise ScriptError(f"the {prompt_type} prompt has no `|`: write it as `base | part 1 | part 2` for a matrix")
    seed = fixed_seed(params.seed)
    plans = [dataclasses.replace(params, **{field: text}, seed=seed + (c if different_seeds else 0), batch_size=1,
                                 batch_count=1) for c, text in enumerate(prompts)]
    job.check_work(plans, f"the prompt matrix's {len(plans)} images")
    results = [job.generate(plan) for plan in plans]
    joined = join_results(results, dataclasses.replace(params, seed=seed))
    if len(joined.images) < len(plans):
        return joined  # interrupted: no grid with holes
    variable = [part.strip() for part in parts[1:]]
    rows = 1 << ((len(parts) - 1) // 2)
    columns = len(prompts) // rows
    column_bits = columns.bit_length() - 1  # the low bits of c pick the column's parts, the high bits the row's
    column_labels = [[(variable[k], bool(j & (1 << k))) for k in range(column_bits)] for j in range(columns)]
    row_labels = [[(variable[column_bits + k], bool(r & (1 << k))) for k in range(len(variable) - column_bits)]
                  for r in range(rows)]
    grid = annotated_grid(joined.images, columns, column_labels, row_labels, margin)
    return dataclasses.replace(joined, images=[grid] + joined.images, infotexts=joined.infotexts[:1] + joined.infotexts,
                               seeds=joined.seeds[:1] + joined.seeds, subseeds=joined.subseeds[:1] + joined.subseeds)


ARGS = (ScriptArg("Set at prompt start", False, "checkbox"),
        ScriptArg("Random seeds", False, "checkbox"),
        ScriptArg("Prompt type", "positive", "radio", choices=("positive", "negative")),
        ScriptArg("Joining char", "comma", "radio", choices=("comma", "space")),
        ScriptArg("Grid margins", 0, "number", 0, 500, 2))

SCRIPT = register_script(Script("Prompt Matrix", ARGS, run))
