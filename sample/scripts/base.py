"""The script registry: A1111's "Script" menu as named functions over generate().

A script is a title (A1111's, shown in the menu; its lower-case form is the API's `script_name`), a description of its
positional arguments (A1111's `script_args` in its UI order, listed by /sdapi/v1/script-info), the tabs it appears on,
and a run function `run(job, params, args) -> sample.Result` that makes its images with `job.generate(params)`.
"""
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..generate import Result, generate
from ..models import LoadedModel, load_checkpoint
from ..params import GenerationParams, ParamsError


class ScriptError(ValueError):
    """A script name or script argument the user got wrong, or a script job that asks for too much; the message says
    what is valid."""


@dataclass(frozen=True)
class ScriptArg:
    """One positional argument as A1111's /sdapi/v1/script-info describes it. `kind` is how the page draws it:
    "text", "textarea", "number", "checkbox", "radio" or "dropdown" (choices), "list" (of strings), "html" (an
    information line that takes the place of an argument, as A1111's sd upscale has). `index`: a choice is passed
    as its index (A1111's type="index" dropdowns); its label is accepted too. `page_choices`: the choices the page
    offers, where they are fewer than the API accepts (the X/Y/Z plot keeps A1111's whole axis list for its indices
    but offers only the axes this engine has). Callable choices get the tab and the job's generate() options, so
    they can list what a folder holds (SD upscale's upscalers in `upscaler_dir`)."""
    label: str
    value: Any = None
    kind: str = "text"
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | Callable[[str, dict], tuple] | None = None
    index: bool = False
    page_choices: Callable[[str, dict], tuple] | None = None

    def choice_list(self, mode: str, options: dict | None = None) -> tuple | None:
        return self.choices(mode, options or {}) if callable(self.choices) else self.choices

    def info(self, mode: str, options: dict | None = None) -> dict:
        return {"label": self.label, "value": self.value, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": list(self.choice_list(mode, options)) if self.choices else None}

    def check(self, value, mode: str, options: dict | None = None):
        """The value as the run function gets it, or ScriptError naming the argument and what it accepts."""
        if self.kind == "checkbox":
            if isinstance(value, bool):
                return value
            if value in (0, 1, "true", "false", "True", "False"):
                return value in (1, "true", "True")
            raise ScriptError(f"{self.label!r} must be true or false, got {value!r}")
        if self.kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScriptError(f"{self.label!r} must be a number, got {value!r}")
            if not self.minimum <= value <= self.maximum:
                raise ScriptError(f"{self.label!r} must be in [{self.minimum}, {self.maximum}], got {value}")
            return value
        if self.kind in ("radio", "dropdown"):
            choices = self.choice_list(mode, options)
            if self.index and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
                return value
            for i, choice in enumerate(choices):
                if isinstance(value, str) and value.lower() == str(choice).lower():
                    return i if self.index else choice
            raise ScriptError(f"{self.label!r} must be one of {', '.join(map(str, choices))}"
                              f"{' (or its index)' if self.index else ''}, got {value!r}")
        if self.kind == "html":
            return value
        if self.kind == "list":
            if value is None:
                return []
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ScriptError(f"{self.label!r} must be a list of strings, got {value!r}")
            return value
        if not isinstance(value, str):
            raise ScriptError(f"{self.label!r} must be text, got {value!r}")
        return value


@dataclass(frozen=True)
class Script:
    """A1111's script: `title` as its menu shows it, `args` its positional arguments, `run(job, params, args)`."""
    title: str
    args: tuple[ScriptArg, ...]
    run: Callable[["ScriptJob", GenerationParams, list], Result]
    txt2img: bool = True
    img2img: bool = True

    @property
    def name(self) -> str:
        return self.title.lower()

    def arguments(self, values: list, mode: str, options: dict | None = None) -> list:
        """`values` (A1111's positional script_args; missing trailing ones and None take their defaults) checked;
        `options`: the generate() options the script will run with (choices may depend on their folders)."""
        if not isinstance(values, (list, tuple)):
            raise ScriptError(f"script_args must be a list, got {type(values).__name__}")
        if len(values) > len(self.args):
            raise ScriptError(f"{self.title} takes at most {len(self.args)} script_args "
                              f"({', '.join(a.label for a in self.args)}), got {len(values)}")
        # None stands for the default too (a client that fills the list it does not care about with nulls).
        filled = [arg.value if value is None else value for arg, value in zip(self.args, values)]
        filled += [arg.value for arg in self.args[len(values):]]
        return [arg.check(value, mode, options) for arg, value in zip(self.args, filled)]

    def info(self, mode: str, options: dict | None = None) -> dict:
        """A1111's /sdapi/v1/script-info entry for one tab."""
        return {"name": self.name, "is_alwayson": False, "is_img2img": mode == "img2img",
                "args": [arg.info(mode, options) for arg in self.args]}

    def page_info(self, mode: str, options: dict | None = None) -> dict:
        """What the page draws the script's controls from: its title, and each argument's kind besides A1111's
        fields."""
        def page_arg(arg: ScriptArg) -> dict:
            info = dict(arg.info(mode, options), kind=arg.kind)
            if arg.page_choices:
                info["choices"] = list(arg.page_choices(mode, options or {}))
            return info

        return {"name": self.name, "title": self.title, "args": [page_arg(arg) for arg in self.args]}


SCRIPTS: dict[str, Script] = {}


def register_script(script: Script) -> Script:
    """Add a script to the menu, the API and run_script (a name already registered is replaced). Returns it."""
    if not (script.txt2img or script.img2img):
        raise ValueError(f"script {script.title!r} is on neither txt2img nor img2img")
    SCRIPTS[script.name] = script
    return script


def scripts_for(mode: str) -> list[Script]:
    """The scripts of the "txt2img" or "img2img" tab, in registration order."""
    return [s for s in SCRIPTS.values() if (s.img2img if mode == "img2img" else s.txt2img)]


def find_script(name: str, mode: str) -> Script:
    """The script a name (A1111's title, any case) refers to on a tab, or ScriptError listing the valid ones."""
    script = SCRIPTS.get(name.lower())
    valid = ", ".join(repr(s.name) for s in scripts_for(mode))
    if script is None:
        raise ScriptError(f"script {name!r} not found; scripts for {mode}: {valid} (GET /sdapi/v1/scripts)")
    if script not in scripts_for(mode):
        raise ScriptError(f"script {name!r} is not a {mode} script; scripts for {mode}: {valid}")
    return script


class ScriptJob:
    """What a script's run function works with: the model, generate() with the caller's options, models by name for
    a checkpoint axis, and the work limit of one request.

    model: the LoadedModel the job starts with. generate_options: generate()'s keyword arguments (lora_dir,
    embeddings, styles, progress, ...). hooks(params, call, calls) -> extra generate() keyword arguments for the
    call-th (0-based) of the `calls` generate() calls the script planned (the web server's progress monitor).
    load_model(name) -> LoadedModel: a checkpoint by name, for use_model (default: the name is a file path);
    check_model(name) raises when there is no such checkpoint, before anything runs. max_work: the most pixel-steps
    (GenerationParams.work) all the script's generate() calls may add up to; None is no limit.
    """

    def __init__(self, model: LoadedModel, generate_options: dict | None = None,
                 hooks: Callable[[GenerationParams, int, int], dict] | None = None,
                 load_model: Callable[[str], LoadedModel] | None = None,
                 check_model: Callable[[str], None] | None = None, max_work: int | None = None):
        self.model = model
        self.generate_options = generate_options or {}
        self.hooks = hooks or (lambda params, call, calls: {})
        self.calls = 0  # generate() calls made so far
        self.planned = 1  # calls the script announced through check_work
        self.model_name: str | None = None  # the checkpoint name use_model() last loaded
        self._load_model = load_model or load_checkpoint
        self.check_model = check_model or _check_file
        self.max_work = max_work
        self.interrupted = False

    def check_work(self, planned: list[GenerationParams], what: str) -> None:
        """Raise ScriptError before anything runs when the planned generate() calls together exceed max_work; their
        number is the total the progress counts."""
        self.planned = max(len(planned), 1)
        total = sum(params.work() for params in planned)
        if self.max_work is not None and total > self.max_work:
            raise ScriptError(f"{what} needs {total:,} pixel-steps over {len(planned)} generations, more than this "
                              f"server's limit of {self.max_work:,} (--max-work); use fewer values, steps or a "
                              "smaller size")

    def use_model(self, name: str) -> LoadedModel:
        """Make the checkpoint `name` the job's model. The previous one is let go first, so that a loader which
        keeps one model in memory (the web server) never holds two."""
        self.model = None
        self.model, self.model_name = self._load_model(name), name
        return self.model

    def generate(self, params: GenerationParams) -> Result:
        """generate() on the job's model with the job's options; a job that was interrupted makes no more images
        (an empty Result)."""
        if self.interrupted:
            return Result([], [], [], [], params, [], interrupted=True)
        try:
            hooks = self.hooks(params, self.calls, max(self.planned, self.calls + 1))
            result = generate(self.model, params, **self.generate_options, **hooks)
        except ParamsError as error:
            raise ScriptError(str(error)) from None
        self.calls += 1
        self.interrupted = result.interrupted
        return result


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ScriptError(f"checkpoint {path!r} not found: give the path of a model file")


def run_script(model: LoadedModel, params: GenerationParams, name: str, args: list | tuple = (), *,
               load_model: Callable[[str], LoadedModel] | None = None, max_work: int | None = None,
               **generate_options) -> Result:
    """Run the script `name` (A1111's title, e.g. "x/y/z plot") with its positional `args` over `params`: txt2img
    when params has no init_images, img2img otherwise. generate_options go to every generate() call (lora_dir,
    embeddings, styles, callback, progress, ...); load_model(name) gives the model of a checkpoint axis value (default:
    the value is a checkpoint file's path). Returns a sample.Result whose images are the script's (grid first where
    it makes one)."""
    mode = "img2img" if params.is_img2img else "txt2img"
    script = find_script(name, mode)
    checked = script.arguments(list(args), mode, generate_options)
    try:
        params = dataclasses.replace(params).validate()
    except ParamsError as error:
        raise ScriptError(str(error)) from None
    job = ScriptJob(model, generate_options, load_model=load_model, max_work=max_work)
    return script.run(job, params, checked)


def join_results(results: list[Result], params: GenerationParams, images=None, infotexts=None) -> Result:
    """One Result for several generate() calls: their images, seeds, infotexts and warnings in order (`images` /
    `infotexts` put in front, e.g. a grid)."""
    warnings = list(dict.fromkeys(note for r in results for note in r.warnings))
    return Result(list(images or []) + [im for r in results for im in r.images],
                  [s for r in results for s in r.seeds], [s for r in results for s in r.subseeds],
                  list(infotexts or []) + [t for r in results for t in r.infotexts], params, warnings,
                  any(r.interrupted for r in results))


__all__ = ["Script", "ScriptArg", "ScriptError", "ScriptJob", "SCRIPTS", "register_script", "scripts_for",
           "find_script", "run_script", "join_results"]
