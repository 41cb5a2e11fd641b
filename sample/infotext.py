"""A1111's infotext: the generation parameters stored in a PNG's `parameters` text chunk, and read back by "PNG Info".

    a red circle, (masterpiece:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: ...

The prompt may span several lines; the `Negative prompt:` line (and its continuation lines) only appears when it is
non-empty; the last line is `key: value` pairs separated by `, `, where a value containing `,`, `:` or a newline is
written as a JSON string.
"""
import json
import re

# A key starts with a word character and continues with words, spaces, `-` and `/`; a value is a JSON string or runs
# to the next comma (A1111's pattern, so any line it accepts is accepted here).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
# UTF-16 surrogate code points: valid in a Python str (from JSON "\ud800", or argv bytes that are not UTF-8, which
# Python decodes to U+DC80..U+DCFF) but not encodable as UTF-8, so a PNG chunk or a file name holding one fails.
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (the replacement character), as a UTF-8 decoder with
    errors="replace" shows undecodable bytes."""
    return _SURROGATE.sub("\ufffd", text)


def quote(value) -> str:
    """A value as infotext writes it: JSON-quoted when it contains `,`, `:` or a newline, as is otherwise."""
    text = format_value(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_value(value) -> str:
    """Numbers as A1111's UI passes them: a whole float prints as an integer (CFG scale 7, not 7.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, parameters: dict) -> str:
    """The infotext for one image. `parameters` is ordered; entries whose value is None are left out."""
    fields = ", ".join(f"{key}: {quote(value)}" for key, value in parameters.items() if value is not None)
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return clean_text(f"{prompt}{negative}\n{fields}".strip())


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's "PNG Info" parse: {"Prompt", "Negative prompt", and each `key: value` of the last line}.

    Values stay strings (JSON-quoted ones are unquoted); `Size: 512x512` also gives "Size-1": "512" and
    "Size-2": "512" (so does any other WxH value). Keys A1111 omits when they hold their default are filled in with
    that default, so a parsed infotext always has them: "Clip skip" "1", "RNG" "GPU" (A1111's default source),
    "Schedule type" "Automatic". A last line with fewer than three `key: value` pairs is taken as part of the prompt.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # A1111 keeps a malformed quoted value as written
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    result.setdefault("Clip skip", "1")
    result.setdefault("RNG", "GPU")
    result.setdefault("Schedule type", "Automatic")
    return result
