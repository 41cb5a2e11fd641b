"""A1111's prompt syntax: extra networks, prompt editing and alternation, emphasis, BREAK, 75-token chunks.

A prompt goes through four stages, in A1111's order:

1. `extract_extra_networks`: `<lora:name:0.8>` tags are removed from the text and returned separately.
2. `prompt_schedule`: prompt editing `[from:to:when]` and alternation `[a|b]` turn one prompt into a list of
   (last step, plain prompt) pairs; the sampler switches conditioning between steps.
3. `parse_prompt_attention`: emphasis `(x)` `[x]` `(x:1.3)` gives (text, weight) segments; `BREAK` is a marker.
4. `chunk_prompt`: the segments are tokenized into chunks of 75 tokens, each encoded as BOS + 75 + EOS by the text
   encoder; `PromptEncoder` multiplies every token's output by its weight and rescales to the original mean.

Prompt editing grammar (A1111's; every construct can nest inside the prompts of another):

    [to:when]           nothing until step `when`, then `to`
    [from:to:when]      `from` up to and including step `when`, then `to`
    [a|b|c]             a at step 1, b at step 2, c at step 3, a at step 4, ...
    (x) (x:w) [x]       emphasis: kept as text here, weighted in stage 3

`when` is a number: with a decimal point it is a fraction of the steps (0.25 of 20 steps is step 5), without one a step
number. A `[`, `]`, `(`, `)` or `:` that does not complete a construct stays literal text, but a `|` outside an
alternation or a lone `\\` at the end makes the whole prompt literal (A1111's parser rejects it and uses the text as
is).
"""
import math
import re
from dataclasses import dataclass, field

from ldm.tokenizer import BOS, EOS, CLIPTokenizer

CHUNK_LENGTH = 75  # tokens per chunk between BOS and EOS (CLIP's 77 positions)
# A1111's "comma_padding_backtrack": when a chunk fills up within this many tokens after a comma, the words after the
# comma move to the next chunk so a phrase is not cut in two.
COMMA_BACKTRACK = 20
EMPHASIS_UP = 1.1  # (x)
EMPHASIS_DOWN = 1 / 1.1  # [x]
# Brackets and parentheses nested deeper than this are refused: the editing parser recurses once per level (Python's
# stack holds about a thousand frames), and no prompt needs more than a handful.
MAX_NESTING = 100


class PromptError(ValueError):
    """A prompt whose syntax cannot be honoured (e.g. a weight that is not a number); the message quotes it."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. Extra networks: <type:name:arg:arg...>
# ---------------------------------------------------------------------------------------------------------------------

EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name:te_weight:unet_weight>` tag. A1111: the first number weighs the text encoder, the second the
    UNet, defaulting to the first; both default to 1."""
    kind: str
    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every `<kind:...>` tag from the prompt; return the remaining text and the tags in order.

    The text around a tag is left as it is (`"a, <lora:x:1>, b"` becomes `"a, , b"`), as A1111 does.
    """
    networks = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        numbers = []
        for arg in args[1:]:
            try:
                numbers.append(float(arg))
            except ValueError:
                raise PromptError(f"<{match.group(0)[1:-1]}>: {arg!r} is not a number; write "
                                 f"<{kind}:name:weight> or <{kind}:name:te_weight:unet_weight>") from None
        te = numbers[0] if numbers else 1.0
        unet = numbers[1] if len(numbers) > 1 else te
        networks.append(ExtraNetwork(kind, args[0], te, unet))
        return ""

    return EXTRA_NETWORK_TAG.sub(take, prompt), networks


# ---------------------------------------------------------------------------------------------------------------------
# 2. Prompt editing and alternation
# ---------------------------------------------------------------------------------------------------------------------

# Characters with a meaning in prompt editing; everything else, and any escaped character, is plain text.
_SYNTAX = set("\\[]():|")
# Characters that A1111's grammar accepts as literal text at the top level when they complete no construct.
_STRAY = set("[]():")
# Lark's SIGNED_NUMBER, which A1111's grammar uses for `when`: 3, -2, 0.5, .5, 5., 1e3, 2.5E-1.
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_SPACE = re.compile(r"\s+")


@dataclass
class _Edit:
    """[before:after:when]; before is None for the two-part form [after:when]. `start`: index of its `[`."""
    before: list | None
    after: list
    when: str
    start: int


@dataclass
class _Alternation:
    options: list  # of node lists


@dataclass
class _Group:
    """Emphasis `(x)`, `(x:w)` or `[x]`: literal text here (weights are stage 3), but its contents may hold edits.
    `nodes` include the brackets; `start`: index of the opening one."""
    nodes: list
    start: int


class _NotAConstruct(Exception):
    """The text at this position does not complete a construct."""


class _Dissolve(Exception):
    """Parse again with the bracket at this index as literal text."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class _EditingParser:
    """Recursive descent over A1111's prompt-editing grammar; a node list holds str, _Edit, _Alternation, _Group.

    Inside a construct every character must belong to the grammar; at the top level a bracket, parenthesis or colon
    that completes nothing is kept as literal text ("stray"). Each bracket admits at most one construct, so apart
    from that fallback the parse is unique, and constructs are preferred to it — except in one case where A1111's
    Earley parser breaks the tie the other way (found by comparing with A1111's grammar on random prompts): when a
    run of text ends in an edit nested in d constructs that all close at the run's end (d = 1 for a bare edit) and
    k stray characters follow, the outermost of them is literal text when d + k is odd (`[a:1]]]` stays literal,
    `[a:1]]` and `[a:1]]]]` are edits). Literal brackets are kept in `literal_brackets` and the prompt re-parsed.
    """

    def __init__(self, text: str, literal_brackets: frozenset = frozenset()):
        self.text = text
        self.literal_brackets = literal_brackets
        self.depth = 0  # constructs open around the current position

    def char(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def top_level(self) -> list:
        """The whole prompt as a node list; raises _NotAConstruct where A1111's parser rejects the prompt, and
        _Dissolve(i) where its tie-breaking reads the editing construct starting at i as literal text."""
        nodes, i = [], 0
        while i < len(self.text):
            parsed, i_next = self.sequence(i)
            if i_next > i:
                nodes += parsed
                i = i_next
                continue
            strays = 0
            while self.char(i) in _STRAY and self.sequence(i)[1] == i:
                nodes.append(self.char(i))
                i += 1
                strays += 1
            if not strays:  # `|` outside an alternation, or `\` with nothing escapable after it
                raise _NotAConstruct
            if len(nodes) > strays:
                depth = _closing_edit_depth(nodes[-strays - 1])
                if depth and (depth + strays) % 2:
                    raise _Dissolve(nodes[-strays - 1].start)
        return nodes

    def sequence(self, i: int) -> tuple[list, int]:
        """The longest run of plain text and complete constructs from i: (nodes, end)."""
        nodes = []
        while i < len(self.text):
            c = self.char(i)
            if c == "\\":
                if i + 1 >= len(self.text) or self.text[i + 1] == "\n":
                    break
                nodes.append(self.text[i:i + 2])
                i += 2
            elif c not in _SYNTAX:
                start = i
                while i < len(self.text) and self.char(i) not in _SYNTAX:
                    i += 1
                nodes.append(self.text[start:i])
            elif c in "([" and i not in self.literal_brackets:
                if self.depth == MAX_NESTING:
                    raise PromptError(f"brackets nest more than {MAX_NESTING} deep at character {i} of the prompt; "
                                      "escape literal ones as \\( \\[ or remove some")
                self.depth += 1
                try:
                    construct, i = (self.parenthesis if c == "(" else self.bracket)(i)
                except _NotAConstruct:
                    break
                finally:
                    self.depth -= 1
                nodes.append(construct)
            else:
                break
        return nodes, i

    def parenthesis(self, i: int) -> tuple[_Group, int]:
        """(x) or (x:y), kept as literal text with its contents' constructs resolved."""
        inner, j = self.sequence(i + 1)
        if self.char(j) == ")":
            return _Group(["(", *inner, ")"], i), j + 1
        if self.char(j) == ":":
            weight, k = self.sequence(j + 1)
            if self.char(k) == ")":
                return _Group(["(", *inner, ":", *weight, ")"], i), k + 1
        raise _NotAConstruct

    def bracket(self, i: int) -> tuple[_Group | _Edit | _Alternation, int]:
        first, j = self.sequence(i + 1)
        c = self.char(j)
        if c == "]":  # [x]: de-emphasis
            return _Group(["[", *first, "]"], i), j + 1
        if c == "|":
            options = [first]
            while self.char(j) == "|":
                option, j = self.sequence(j + 1)
                options.append(option)
            if self.char(j) == "]":
                return _Alternation(options), j + 1
            raise _NotAConstruct
        if c == ":":
            when = self.when(j + 1)
            if when is not None:  # [after:when]
                return _Edit(None, first, when[0], i), when[1]
            second, k = self.sequence(j + 1)
            if self.char(k) == ":":
                when = self.when(k + 1)
                if when is not None:
                    return _Edit(first, second, when[0], i), when[1]
        raise _NotAConstruct

    def when(self, i: int) -> tuple[str, int] | None:
        """`[space] NUMBER [space] ]` from i: (the number's text, the index after `]`), or None."""
        space = _SPACE.match(self.text, i)
        i = space.end() if space else i
        number = _NUMBER.match(self.text, i)
        if number is None:
            return None
        i = number.end()
        space = _SPACE.match(self.text, i)
        i = space.end() if space else i
        return (number.group(0), i + 1) if self.char(i) == "]" else None


def _closing_edit_depth(node) -> int:
    """d if `node` is an edit nested in d - 1 groups that all end where it ends, else 0."""
    depth = 0
    while isinstance(node, _Group) and len(node.nodes) > 2:
        depth += 1
        node = node.nodes[-2]  # the last node before the closing bracket
    return depth + 1 if isinstance(node, _Edit) else 0


def _parse_editing(prompt: str) -> list:
    literal_brackets = set()
    while True:
        try:
            return _EditingParser(prompt, frozenset(literal_brackets)).top_level()
        except _Dissolve as dissolve:
            literal_brackets.add(dissolve.index)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """The plain prompts that prompt editing and alternation produce, as [(last step, text), ...] sorted by step.

    The text of entry k applies to the sampling steps after the previous entry's step, up to and including its own;
    the last entry's step is `steps`. Steps count from 1 here and from 0 in the sampler (A1111 compares the 0-based
    step with `<=`, so `[a:b:3]` uses `a` for four steps); `samplers.prompt_schedule` follows that convention.

    With `hires_steps` (the second pass of hires fix) the schedule is for that pass: an integer `when` counts from the
    start of the first pass (so steps beyond the first pass's fall into the second) and a fraction above 1 is a
    fraction of the second pass (1.5: half way through it).
    """
    if hires_steps is None:
        int_offset, fraction_offset, total = 0, 0.0, steps
    else:
        int_offset, fraction_offset, total = steps, 1.0, hires_steps
    try:
        tree = _parse_editing(prompt)
    except _NotAConstruct:
        return [(total, prompt)]

    boundaries = {total}

    def resolve_steps(nodes):
        """Replace every `when` by its step and collect the steps at which the text changes."""
        for node in nodes:
            if isinstance(node, _Edit):
                value = float(node.when)
                value = (value - fraction_offset) * total if "." in node.when else value - int_offset
                node.when = min(total, int(value))
                if node.when >= 1:
                    boundaries.add(node.when)
                for part in (node.before or [], node.after):
                    resolve_steps(part)
            elif isinstance(node, _Alternation):
                boundaries.update(range(1, total + 1))
                for option in node.options:
                    resolve_steps(option)
            elif isinstance(node, _Group):
                resolve_steps(node.nodes)

    def render(nodes, step: int) -> str:
        out = []
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, _Edit):
                out.append(render(node.before or [], step) if step <= node.when else render(node.after, step))
            elif isinstance(node, _Alternation):
                out.append(render(node.options[(step - 1) % len(node.options)], step))
            else:
                out.append(render(node.nodes, step))
        return "".join(out)

    resolve_steps(tree)
    return [(step, render(tree, step)) for step in sorted(boundaries)]


# ---------------------------------------------------------------------------------------------------------------------
# 3. Emphasis
# ---------------------------------------------------------------------------------------------------------------------

_ATTENTION_TOKEN = re.compile(r"""
    (?P<escaped>\\[()\[\]\\]) | (?P<backslash>\\)         # \( \) \[ \] \\ are literal characters; a lone \ vanishes
  | (?P<open>[(\[])                                       # ( and [ open a group
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)                       # :1.3) closes a round group with an explicit weight
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+) | (?P<colon>:)
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """Emphasis segments [[text, weight], ...] exactly as A1111's parser returns them.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; groups nest and multiply; a group left
    open at the end applies to the rest of the text; a `)` or `]` with no open group is literal. `BREAK` (a word in
    capitals) becomes the entry ["BREAK", -1] — it is multiplied like text, so a BREAK inside a group is not a break
    (A1111's behaviour). Neighbouring segments with equal weights are merged.
    """
    segments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        if kind in ("escaped", "backslash"):
            segments.append([token[1:], 1.0])
        elif kind == "open":
            (open_round if token == "(" else open_square).append(len(segments))
        elif kind == "weight" and open_round:
            try:
                factor = float(match.group("weight"))
            except ValueError:
                raise PromptError(f"emphasis weight {match.group('weight')!r} in {token!r} is not a number; "
                                 "write e.g. (word:1.2)") from None
            multiply_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), EMPHASIS_UP)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), EMPHASIS_DOWN)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    segments.append(["BREAK", -1])
                segments.append([part, 1.0])

    for start in open_round:
        multiply_from(start, EMPHASIS_UP)
    for start in open_square:
        multiply_from(start, EMPHASIS_DOWN)
    if not segments:
        segments = [["", 1.0]]
    merged = [segments[0]]
    for segment in segments[1:]:
        if segment[1] == merged[-1][1]:
            merged[-1][0] += segment[0]
        else:
            merged.append(segment)
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# 4. Chunks of 75 tokens
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class PromptChunk:
    """77 positions for the text encoder: `tokens` and `weights` include BOS and EOS; `embeddings` lists
    (position, Embedding) for the textual-inversion vectors that replace placeholder tokens at those positions."""
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list = field(default_factory=list)


def chunk_prompt(text: str, tokenizer: CLIPTokenizer, embeddings=None) -> tuple[list[PromptChunk], int]:
    """Split a plain prompt (no editing syntax left) into chunks of 75 weighted tokens, as A1111 does.

    Each emphasis segment is tokenized on its own. A chunk closes when it holds 75 tokens (moving the words after a
    comma within the last 20 tokens to the next chunk) or at BREAK; the last chunk is padded with EOS. Names of
    textual-inversion embeddings (`embeddings.find(tokens, i)`) expand to their vectors, never split across chunks.
    Returns (chunks, token count), the count being what A1111's counter shows: 75 per closed chunk plus the last
    chunk's tokens.
    """
    comma = tokenizer.encode(",")[0]
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [BOS] + chunk.tokens + [EOS] * padding + [EOS]
        chunk.weights = [1.0] + chunk.weights + [1.0] * padding + [1.0]
        chunk.embeddings = [(position + 1, emb) for position, emb in chunk.embeddings]  # shift past BOS
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for segment_text, weight in parse_prompt_attention(text):
        if segment_text == "BREAK" and weight == -1:
            close_chunk()
            continue
        ids = tokenizer.encode(segment_text)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1
                carried = PromptChunk(chunk.tokens[cut:], chunk.weights[cut:],
                                      [(p - cut, e) for p, e in chunk.embeddings if p >= cut])
                # Embedding vectors move with their placeholders (A1111 leaves them behind, a bug not copied).
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.embeddings = [(p, e) for p, e in chunk.embeddings if p < cut]
                close_chunk()
                chunk = carried
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            found = embeddings.find(ids, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            if len(chunk.tokens) + embedding.num_vectors > CHUNK_LENGTH:
                close_chunk()
            chunk.embeddings.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.num_vectors
            chunk.weights += [weight] * embedding.num_vectors
            position += name_length
    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count


def token_count(text: str, steps: int = 20, tokenizer: CLIPTokenizer | None = None,
                embeddings=None) -> tuple[int, int]:
    """(used, limit) as A1111 shows under the prompt box, e.g. (13, 75) for "13/75".

    Extra-network tags do not count; with prompt editing the longest of the scheduled prompts counts; the limit is
    the next multiple of 75 (each further chunk of 75 tokens is encoded separately).
    """
    tokenizer = tokenizer or CLIPTokenizer()
    text, _ = extract_extra_networks(text)
    used = max(chunk_prompt(scheduled, tokenizer, embeddings)[1] for _, scheduled in prompt_schedule(text, steps))
    return used, math.ceil(max(used, 1) / CHUNK_LENGTH) * CHUNK_LENGTH
