"""CLIP's byte-level BPE tokenizer, as used by every Stable Diffusion text encoder.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 2.4) encodes
text with a lower-cased byte-pair encoding (Sennrich et al. 2016) over UTF-8 bytes, in the GPT-2 style (Radford et al.
2019): every byte is first mapped to a visible unicode character, so that the merge table is plain text, and the last
symbol of each word carries a `</w>` end-of-word mark. The vocabulary has 49408 entries:

    ids 0..255        the 256 byte characters
    ids 256..511      the same characters with `</w>` (a one-byte word)
    ids 512..49405    one per merge, in the order the merges were learned (48894 merges)
    id  49406         BOS, `<|startoftext|>`
    id  49407         EOS, `<|endoftext|>`

The merge table `ldm/data/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's vocabulary file, released under the MIT
licence (Copyright (c) 2021 OpenAI) and redistributed unchanged by open_clip; this package ships the same file as data.

The ids are those of open_clip's `SimpleTokenizer` (used by SD2 and SDXL's OpenCLIP encoder) for every input, and of
the Hugging Face CLIP tokenizer (SD1, SDXL's CLIP-L) on ordinary prompts. The two differ on unusual text: open_clip
repairs it with ftfy, and it reads the literal strings `<start_of_text>` / `<end_of_text>` in a prompt as BOS / EOS
where Hugging Face reads `<|startoftext|>` / `<|endoftext|>`. This module follows open_clip in both.
"""

import functools
import gzip
import html
from collections.abc import Iterable
from pathlib import Path

import ftfy
import regex
import torch

BOS = 49406
EOS = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # every CLIP text encoder has 77 positions: BOS + 75 tokens + EOS

MERGES_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
_NUM_BYTES = 256
_NUM_MERGES = VOCAB_SIZE - 2 * _NUM_BYTES - 2  # 48894: the file holds more merges than CLIP's vocabulary uses
_END_OF_WORD = "</w>"

# Literal text that open_clip turns into the special ids (its names, not OpenAI's `<|startoftext|>`).
_SPECIAL_TEXT = {"<start_of_text>": BOS, "<end_of_text>": EOS}

# CLIP's pre-tokenizer: the special strings, English contractions, runs of letters, single digits (so numbers are
# spelled digit by digit) and runs of anything else that is not whitespace. IGNORECASE is part of the definition:
# after lower-casing it still matters for characters whose case folding differs from their lower case.
_WORD_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """The character standing for each byte value 0..255 (GPT-2's reversible byte-to-unicode map).

    Bytes that are visible Latin-1 characters stand for themselves; the 68 others (controls, space, NBSP, soft
    hyphen) take the code points 256, 257, ... in byte order, so no symbol of the merge table is whitespace.
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars = []
    next_free = _NUM_BYTES
    for byte in range(_NUM_BYTES):
        if byte in visible:
            chars.append(chr(byte))
        else:
            chars.append(chr(next_free))
            next_free += 1
    return tuple(chars)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict[str, int], tuple[str, ...], dict[tuple[str, str], int]]:
    """Parse the merges file once per process: (symbol -> id, id -> symbol, merge pair -> rank)."""
    merges = []
    with gzip.open(MERGES_PATH, "rt", encoding="utf-8") as lines:
        next(lines)  # the first line is a version header
        for line in lines:
            if len(merges) == _NUM_MERGES:
                break
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{MERGES_PATH}: merge {len(merges) + 1} is {line!r}, not two symbols; the file is "
                                 "damaged, reinstall the package")
            merges.append(pair)
    if len(merges) != _NUM_MERGES:
        raise ValueError(f"{MERGES_PATH}: found {len(merges)} merges, CLIP needs {_NUM_MERGES}; the file is "
                         "truncated, reinstall the package")

    # Sorting by code point puts the self-standing bytes first and the shifted ones after, which is CLIP's order.
    byte_symbols = sorted(_byte_chars())
    symbols = (*byte_symbols, *(s + _END_OF_WORD for s in byte_symbols), *("".join(pair) for pair in merges),
               "<|startoftext|>", "<|endoftext|>")
    symbol_ids = {symbol: token_id for token_id, symbol in enumerate(symbols)}
    if len(symbol_ids) != VOCAB_SIZE:
        raise ValueError(f"{MERGES_PATH}: the merges give {len(symbol_ids)} distinct tokens, CLIP has {VOCAB_SIZE}")
    merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
    return symbol_ids, symbols, merge_ranks


@functools.lru_cache(maxsize=1)
def _char_bytes() -> dict[str, int]:
    return {char: byte for byte, char in enumerate(_byte_chars())}


@functools.lru_cache(maxsize=1 << 16)
def _word_ids(word: str) -> tuple[int, ...]:
    """BPE one pre-tokenized word into ids. Cached: prompts and captions repeat the same words over and over."""
    byte_chars = _byte_chars()
    symbol_ids, _, merge_ranks = _vocabulary()
    chars = [byte_chars[byte] for byte in word.encode("utf-8")]
    parts = [*chars[:-1], chars[-1] + _END_OF_WORD]
    # Apply the earliest-learned merge that occurs anywhere in the word to all its non-overlapping occurrences, left
    # to right, until no adjacent pair is a known merge.
    while len(parts) > 1:
        rank, (first, second) = min((merge_ranks.get(pair, VOCAB_SIZE), pair) for pair in zip(parts, parts[1:]))
        if rank == VOCAB_SIZE:  # no adjacent pair is a merge
            break
        merged = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(symbol_ids[part] for part in parts)


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy repair, HTML entities unescaped twice (captions are often escaped twice, so
    `&amp;amp;` becomes `&`), whitespace runs collapsed to one space, ends stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Text -> CLIP token ids.

    pad_token_id: what fills a row after EOS. SD1 and SDXL's CLIP-L pad with EOS (49407); OpenCLIP encoders (SD2,
    SDXL's bigG) pad with 0. The encoders read their pooled output at the first EOS, so the choice only changes the
    positions after it.
    context_length: row length of the batch call, BOS and EOS included.
    The vocabulary is read on first use and shared by all instances, so constructing a tokenizer costs nothing.
    """

    BOS = BOS
    EOS = EOS
    vocab_size = VOCAB_SIZE

    def __init__(self, pad_token_id: int = EOS, context_length: int = CONTEXT_LENGTH):
        if not 0 <= pad_token_id < VOCAB_SIZE:
            raise ValueError(f"pad_token_id={pad_token_id} is not a token id; use 49407 (EOS, SD1) or 0 (OpenCLIP)")
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for BOS and EOS; CLIP uses 77")
        self.pad_token_id = pad_token_id
        self.context_length = context_length

    @property
    def vocab(self) -> dict[str, int]:
        """Token string -> id, in byte-mapped form (`a</w>` is the word "a"), as in CLIP's vocab.json."""
        return dict(_vocabulary()[0])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS and EOS."""
        ids = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            special_id = _SPECIAL_TEXT.get(word)
            if special_id is None:
                ids.extend(_word_ids(word))
            else:
                ids.append(special_id)
        return ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` takes, BOS and EOS not counted (A1111's "13/75" counter shows this number)."""
        return len(self.encode(text))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of a sequence of ids: a list from `encode` or one row of the batch call.

        BOS is skipped and the text ends at the first EOS, so the padding after it (EOS or 0) is never read.
        Each end-of-word mark becomes a space, except the last one. The result equals the cleaned, lower-cased input
        up to whitespace: words and punctuation come back separated ("don't, ok" -> "don 't , ok"). A token cut in the
        middle of a multi-byte character decodes to U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}; "
                                 "decode the rows one by one")
            ids = ids.tolist()
        _, symbols, _ = _vocabulary()
        char_bytes = _char_bytes()
        pieces = []
        for position, token_id in enumerate(ids):
            if token_id == BOS:
                continue
            if token_id == EOS:
                break
            if not 0 <= token_id < BOS:
                raise ValueError(f"id {token_id} at position {position} is not a CLIP text token (0..{BOS - 1})")
            pieces.append(symbols[token_id])
        # The end-of-word marks are plain visible characters in byte-mapped form, so they survive the byte decoding.
        data = bytes(char_bytes[char] for char in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").rstrip(" ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Batch of token rows, LongTensor [B, context_length]: BOS, the tokens, EOS, then padding.

        A text too long for the row is cut so that EOS still ends it: BOS + the first context_length - 2 tokens + EOS.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else context_length
        if length < 2:
            raise ValueError(f"context_length={length} leaves no room for BOS and EOS; CLIP uses 77")
        rows = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)  # [B, L]
        for row, text in zip(rows, texts):
            ids = [BOS, *self.encode(text)][: length - 1] + [EOS]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows
