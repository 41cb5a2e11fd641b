"""Reading, validating and writing checkpoint files.

Two on-disk formats carry Stable Diffusion weights:

* ``.safetensors``: an 8-byte little-endian header length N, N bytes of JSON
  (``{"name": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``),
  then the raw tensor bytes, offsets counted from the end of the header. Data only, so it is safe to read; we
  still validate the header ourselves so that a damaged file gives an error that says what is wrong.
* PyTorch pickles (``.ckpt`` / ``.pt`` / ``.pth``), either the zip archive ``torch.save`` writes today or the
  older "legacy" stream of pickles. A pickle is a small program: opening one with plain ``pickle`` can import and
  call anything. Here nothing from the file is ever executed: we first list every global the pickle could import
  (statically, without running it) and refuse the file unless each one is plain data (tensors, numpy scalars,
  ``OrderedDict``) or a PyTorch Lightning class, which is replaced by an inert placeholder. Then the file goes
  through ``torch.load(weights_only=True)``, torch's own restricted unpickler, as a second barrier.

The file type is decided from its first bytes, not its extension.
"""

from __future__ import annotations

import _compat_pickle
import functools
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import reprlib
import threading
import zipfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy
import torch

from .files import atomic_write

try:
    from numpy._core import multiarray  # numpy >= 2
except ImportError:
    from numpy.core import multiarray  # numpy 1.x

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "cast_tensor",
    "read_metadata",
    "select_ema",
    "drop_ema",
    "save_state_dict",
    "save_streamed",
    "TensorFile",
    "model_hash",
    "legacy_model_hash",
    "read_torch_data",
]


class CheckpointError(ValueError):
    """A checkpoint file is damaged, of an unknown kind, or refused as unsafe; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# Format detection

_SAFETENSORS = "safetensors"
_TORCH_ZIP = "torch zip archive"
_TORCH_PICKLE = "torch legacy pickle"

_PICKLE_PROTO = 0x80  # every pickle of protocol >= 2 starts with the PROTO opcode
_HEADER_LENGTH_BYTES = 8

# First bytes of files people mistake for checkpoints, so the error can say what the file is.
_OTHER_FORMATS = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"GGUF": "a GGUF model (llama.cpp / ComfyUI-GGUF format)",
    b"\x1f\x8b": "a gzip archive",
    b"%PDF": "a PDF document",
    b"<!DOCTYPE html": "an HTML page (a download that returned a web page instead of the file?)",
    b"<html": "an HTML page (a download that returned a web page instead of the file?)",
    b"version https://git-lfs": "a Git LFS pointer, not the model itself (fetch the file with `git lfs pull`)",
}


def _detect_format(path: str) -> str:
    """Returns which reader a file needs, judged from its first bytes; raises CheckpointError for anything else."""
    with open(path, "rb") as file:
        head = file.read(64)
        size = os.fstat(file.fileno()).st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download or copy probably failed")
    # Checked before the zip/pickle magics: a safetensors header length can itself begin with 0x80 or b"PK".
    if len(head) > _HEADER_LENGTH_BYTES and head[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + 1] == b"{":
        return _SAFETENSORS
    if head.startswith(b"PK\x03\x04"):
        return _TORCH_ZIP
    if head[0] == _PICKLE_PROTO:
        return _TORCH_PICKLE
    for magic, description in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise CheckpointError(f"{path} is not a checkpoint: it is {description}")
    if _looks_like_text(head):
        raise CheckpointError(f"{path} is not a checkpoint: it is a text file starting with {head[:40]!r}")
    if path.endswith(".safetensors"):
        # Let the header validation say precisely what is wrong (too short, bad length, ...).
        return _SAFETENSORS
    raise CheckpointError(
        f"{path} is not a checkpoint: its first bytes {head[:16]!r} match neither .safetensors nor a PyTorch "
        "zip/pickle file"
    )


def _looks_like_text(head: bytes) -> bool:
    # A safetensors length prefix always holds NUL bytes (headers are far below 2**56 bytes), text never does.
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not merely a multi-byte character cut off by the 64-byte window
            return False
        text = head[: error.start].decode("utf-8")
    return all(character.isprintable() or character in "\t\n\r" for character in text)


# ----------------------------------------------------------------------------------------------------------------------
# .safetensors

# Names of the format's element types (https://github.com/huggingface/safetensors, "Format").
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}

# The safetensors library refuses headers above 100 MB; a longer one is a corrupt length field, not a real header.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class _TensorEntry:
    """One tensor as the header describes it; begin/end are byte offsets into the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


# Real files hold a few thousand tensors (SDXL: ~2,500); a header listing more is damaged or crafted, and refusing it
# early bounds the work spent on it.
_MAX_TENSORS = 200_000
# Longest integer text a header may hold: sizes and offsets are below 2**63 (19 digits). Python's own limit (4300
# digits) would fail later with a message that names neither the file nor the field.
_MAX_INTEGER_DIGITS = 20
# Tensors of at most this many dimensions (weights use at most 5).
_MAX_DIMENSIONS = 16
_INT64_LIMIT = 2**63


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # One dict and one set, so the check is linear in the number of tensors.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen, duplicates = set(), set()
        for key, _ in pairs:
            (duplicates if key in seen else seen).add(key)
        raise CheckpointError(f"names appear more than once: {sorted(duplicates)[:5]}")
    if len(result) > _MAX_TENSORS:
        raise CheckpointError(f"lists {len(result)} entries, more than the {_MAX_TENSORS} any model has")
    return result


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS:
        raise CheckpointError(f"holds a {len(text)}-digit integer, larger than any size or offset can be")
    return int(text)


def _read_safetensors_header(path: str, file: io.RawIOBase) -> tuple[list[_TensorEntry], dict[str, str], int]:
    """Parses and checks the header; returns the tensor entries sorted by offset, the text metadata and where the
    data section starts."""
    file_size = os.fstat(file.fileno()).st_size
    problem = f"{path} is not a valid .safetensors file:"
    length_field = file.read(_HEADER_LENGTH_BYTES)
    if len(length_field) < _HEADER_LENGTH_BYTES:
        raise CheckpointError(
            f"{problem} truncated to {file_size} bytes, shorter than the {_HEADER_LENGTH_BYTES}-byte header length"
        )
    header_length = int.from_bytes(length_field, "little")
    if header_length > file_size - _HEADER_LENGTH_BYTES:
        raise CheckpointError(
            f"{problem} header length {header_length} is larger than the file ({file_size} bytes): "
            "the file is truncated or not a safetensors file"
        )
    if header_length > _MAX_HEADER_BYTES:
        raise CheckpointError(f"{problem} header length {header_length} exceeds {_MAX_HEADER_BYTES} bytes")
    header_bytes = file.read(header_length)
    if not header_bytes.startswith(b"{"):
        raise CheckpointError(f"{problem} header must be a JSON object starting with '{{', found {header_bytes[:20]!r}")
    # Counted before parsing (one pass in C), so a header of a million tiny entries costs no parse at all.
    if header_bytes.count(b'"data_offsets"') > _MAX_TENSORS:
        raise CheckpointError(f"{problem} header lists more than the {_MAX_TENSORS} tensors any model has")
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys,
                            parse_int=_bounded_int)
    except CheckpointError as error:
        raise CheckpointError(f"{problem} header {error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{problem} header is not valid JSON ({error})") from None
    except RecursionError:  # the JSON parser recurses once per nesting level; a header nests three levels at most
        raise CheckpointError(f"{problem} header nests JSON values thousands of levels deep") from None

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise CheckpointError(f"{problem} __metadata__ must map strings to strings, found {reprlib.repr(metadata)}")

    data_size = file_size - _HEADER_LENGTH_BYTES - header_length
    entries = [_parse_entry(problem, name, info, data_size) for name, info in header.items()]
    entries.sort(key=lambda entry: (entry.begin, entry.end))
    _check_no_overlap(problem, [entry for entry in entries if entry.end > entry.begin])
    return entries, metadata, _HEADER_LENGTH_BYTES + header_length


def _parse_entry(problem: str, name: str, info: object, data_size: int) -> _TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(
            f"{problem} tensor {name!r} needs 'dtype', 'shape' and 'data_offsets', found {reprlib.repr(info)}"
        )
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{problem} tensor {name!r} has unknown dtype {reprlib.repr(dtype_name)} "
            f"(known: {', '.join(_SAFETENSORS_DTYPES)})"
        )
    # type() rather than isinstance: JSON true/false arrive as bool, a subclass of int.
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMENSIONS
            or not all(type(size) is int and 0 <= size < _INT64_LIMIT for size in shape)
            or _element_count([size for size in shape if size]) >= _INT64_LIMIT):
        raise CheckpointError(
            f"{problem} tensor {name!r} has invalid shape {reprlib.repr(shape)}: expected at most {_MAX_DIMENSIONS} "
            "sizes, each a non-negative integer, whose product (zeros left out) is below 2**63"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{problem} tensor {name!r} has invalid data_offsets {reprlib.repr(offsets)}")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{problem} tensor {name!r} has data offsets [{begin}, {end}] beyond the {data_size} bytes of data "
            "the file holds: the file is truncated or its header is corrupt"
        )
    dtype = _SAFETENSORS_DTYPES[dtype_name]
    expected_bytes = _element_count(shape) * dtype.itemsize
    if end - begin != expected_bytes:
        raise CheckpointError(
            f"{problem} tensor {name!r} of shape {shape} and dtype {dtype_name} needs {expected_bytes} bytes "
            f"but its data offsets [{begin}, {end}] span {end - begin}"
        )
    return _TensorEntry(name, dtype, tuple(shape), begin, end)


def _element_count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _check_no_overlap(problem: str, entries_by_offset: list[_TensorEntry]) -> None:
    for previous, current in zip(entries_by_offset, entries_by_offset[1:]):
        if current.begin < previous.end:
            raise CheckpointError(
                f"{problem} tensors {previous.name!r} [{previous.begin}, {previous.end}] and "
                f"{current.name!r} [{current.begin}, {current.end}] overlap"
            )


def _read_exactly(file: io.RawIOBase, buffer: memoryview, path: str) -> None:
    # A raw read may return fewer bytes than asked (Linux caps one read at ~2 GiB), so loop until full.
    filled = 0
    while filled < len(buffer):
        count = file.readinto(buffer[filled:])
        if not count:
            raise CheckpointError(f"{path} ended while reading tensor data: the file was truncated while being read")
        filled += count


def _read_entry(file: io.RawIOBase, entry: _TensorEntry, data_start: int, path: str) -> torch.Tensor:
    # Read straight into a freshly allocated CPU buffer (no mmap, whose pages would stay resident, no second copy).
    raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    if len(raw):
        file.seek(data_start + entry.begin)
        _read_exactly(file, memoryview(raw.numpy()), path)
    # The format stores little-endian elements, the byte order of every platform torch runs on.
    return raw.view(entry.dtype).reshape(entry.shape)


def _read_safetensors(path: str, device: torch.device, dtype: torch.dtype | None,
                      keep_precision: Collection[str]) -> dict[str, torch.Tensor]:
    # Peak memory is the weights themselves plus at most one tensor in flight when casting or moving to `device`.
    tensors = {}
    with open(path, "rb", buffering=0) as file:
        entries, _, data_start = _read_safetensors_header(path, file)
        for entry in entries:  # sorted by offset: one sequential pass over the file
            tensor = _read_entry(file, entry, data_start, path)
            tensors[entry.name] = cast_tensor(entry.name, tensor, device, dtype, keep_precision)
    return tensors


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch pickles (.ckpt / .pt / .pth)

# Globals that torch's own weights-only unpickler resolves to data-only objects: the tensor rebuild functions,
# storage classes and dtypes `torch.save` writes, plus OrderedDict and `_codecs.encode` (protocol 2 spells `bytes`
# values as `_codecs.encode(str, "latin1")`).
_TORCH_DATA_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "_codecs.encode",
        "torch.Size",
        "torch.storage.UntypedStorage",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
    }
    | {f"torch.{name}" for name in dir(torch) if name.endswith("Storage") and name != "Storage"}
    | {f"torch.{name}" for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
)


def _numpy_data_globals() -> dict[str, object]:
    """numpy objects that only rebuild arrays/scalars; Lightning stores e.g. `global_step` as a numpy int."""
    found = {"numpy.dtype": numpy.dtype, "numpy.ndarray": numpy.ndarray}
    # numpy 2 moved `numpy.core` to `numpy._core`; files written before that use the old spelling.
    for package in ("numpy.core", "numpy._core"):
        found[f"{package}.multiarray.scalar"] = multiarray.scalar
        found[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
    # Unpickling a dtype builds an instance of a per-type class (Float32DType, ...) that torch must also accept.
    for name, value in vars(numpy.dtypes).items():
        if isinstance(value, type) and issubclass(value, numpy.dtype):
            found[f"numpy.dtypes.{name}"] = value
    return found


_NUMPY_DATA_GLOBALS = _numpy_data_globals()

# Training frameworks whose objects (callbacks, hyper-parameter containers) sit beside the weights in .ckpt files.
_FRAMEWORK_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")


class FrameworkPlaceholder:
    """Stands in for a PyTorch Lightning class named in a checkpoint, so it loads without Lightning installed.

    It only stores what the pickle hands it (constructor arguments, state) and has no other behaviour, so no code
    of the real class ever runs.
    """

    pickled_name = "?"  # the "module.Class" the checkpoint referred to; set on each generated subclass

    def __new__(cls, *args):
        placeholder = super().__new__(cls)
        placeholder.args = args
        return placeholder

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self.pickled_name}>"


@functools.cache
def _framework_placeholder(qualified_name: str) -> type[FrameworkPlaceholder]:
    # One subclass per name (cached, so the same name always maps to the same class): callbacks are keyed by their
    # class in old Lightning checkpoints, and two different callbacks must stay two different dict keys.
    return type(qualified_name.rsplit(".", 1)[-1], (FrameworkPlaceholder,), {"pickled_name": qualified_name})


def _is_framework_global(qualified_name: str) -> bool:
    return any(qualified_name.startswith(package + ".") for package in _FRAMEWORK_PACKAGES)


def _is_allowed_global(qualified_name: str) -> bool:
    return (
        qualified_name in _TORCH_DATA_GLOBALS
        or qualified_name in _NUMPY_DATA_GLOBALS
        or _is_framework_global(qualified_name)
    )


_STRING_OPCODES = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_MEMO_READ_OPCODES = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_WRITE_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
_UNRESOLVED_GLOBAL = "<a global whose name is computed while unpickling>"


def _python3_name(module: str, attribute: str) -> str:
    # Protocol-2 pickles (torch.save's default) spell names the Python 2 way (`__builtin__ eval`); unpicklers,
    # torch's included, translate them with the standard library's table before importing.
    if (module, attribute) in _compat_pickle.NAME_MAPPING:
        module, attribute = _compat_pickle.NAME_MAPPING[(module, attribute)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attribute}"


def _globals_in_pickle(stream: io.BufferedIOBase) -> set[str]:
    """Lists every "module.name" one pickle (read up to its STOP) would import, without executing anything.

    GLOBAL and INST name their target inline. STACK_GLOBAL (protocol 4) takes module and name from the stack, so we
    follow string values through the memo, and resolve it only when the two values directly below it were pushed by
    string or memo-get opcodes; any other arrangement is reported as unresolved, which refuses the file.
    """
    found = set()
    memo: dict[int, str | None] = {}
    recent_strings: list[str | None] = []  # values on top of the stack, valid since the last other opcode
    for opcode, argument, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            found.add(_python3_name(*argument.split(" ", 1)))
        elif name == "STACK_GLOBAL":
            module, attribute = recent_strings[-2:] if len(recent_strings) >= 2 else (None, None)
            resolved = isinstance(module, str) and isinstance(attribute, str)
            found.add(_python3_name(module, attribute) if resolved else _UNRESOLVED_GLOBAL)
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.add(f"<copyreg extension code {argument}>")
        if name in _STRING_OPCODES:
            recent_strings.append(argument)
        elif name in _MEMO_READ_OPCODES:
            recent_strings.append(memo.get(argument))
        elif name in _MEMO_WRITE_OPCODES or name == "MEMOIZE":
            index = argument if name != "MEMOIZE" else len(memo)
            memo[index] = recent_strings[-1] if recent_strings else None
        elif name != "FRAME":  # FRAME only announces a length; everything else changes the stack in other ways
            recent_strings.clear()
    return found


# A legacy torch file is five pickles (magic number, protocol, system info, the object, storage keys) followed by
# raw storage bytes, which must not be parsed as pickle.
_LEGACY_PICKLE_COUNT = 5

# The pickles of a real checkpoint describe tensors without holding their data: SD 1.5 with EMA is ~1,800 tensors in
# a ~0.3 MB data.pkl, and Lightning's bookkeeping adds little. Far more is a decompression bomb or not a checkpoint.
_MAX_PICKLE_BYTES = 16 * 1024 * 1024


class _CappedReader:
    """Hands a stream to pickletools at most `limit` bytes in total, refusing a read *before* it would pass the cap,
    so a pickle announcing a 2 GiB string (or a zip entry inflating to 2 GiB) is never read into memory."""

    def __init__(self, stream: io.BufferedIOBase, limit: int):
        self.stream, self.limit, self.remaining = stream, limit, limit

    def _take(self, count: int) -> None:
        if count > self.remaining:
            raise CheckpointError(f"its pickle is larger than {self.limit >> 20} MiB, far beyond the tensor "
                                  "descriptions of any checkpoint (a decompression bomb or not a checkpoint)")
        self.remaining -= count

    def read(self, count: int) -> bytes:
        self._take(count)
        return self.stream.read(count)

    def readline(self) -> bytes:
        line = self.stream.readline(self.remaining + 1)
        self._take(len(line))
        return line


def _zip_pickle_entries(archive: zipfile.ZipFile) -> list[str]:
    """Every *.pkl entry, after refusing an archive whose entries are ambiguous for torch's loader.

    torch's zip reader looks records up case-insensitively, so `archive/Data.pkl` and `archive/data.pkl` (or a name
    stored twice) leave it to the reader which one is loaded; such archives are never written by torch.save.
    """
    seen: dict[str, str] = {}
    for name in archive.namelist():
        folded = name.casefold()
        if folded in seen:
            raise CheckpointError(f"its zip archive holds two entries named {seen[folded]!r} and {name!r}, which "
                                  "torch's loader cannot tell apart; torch.save never writes such an archive")
        seen[folded] = name
    pickles = [name for name in archive.namelist() if name.casefold().endswith(".pkl")]
    data_pickles = [name for name in pickles if name.casefold().rsplit("/", 1)[-1] == "data.pkl"]
    if len(data_pickles) != 1:
        raise zipfile.BadZipFile(f"expected one data.pkl in the archive, found {len(data_pickles)}")
    return pickles


def _globals_in_torch_file(path: str, kind: str) -> set[str]:
    """Every global any pickle of the file could import: for a zip archive every *.pkl entry (whichever one the
    loader picks has been scanned), for a legacy file its leading pickles; streamed with a size cap."""
    try:
        found = set()
        if kind == _TORCH_ZIP:
            with zipfile.ZipFile(path) as archive:
                for name in _zip_pickle_entries(archive):
                    with archive.open(name) as entry:
                        found |= _globals_in_pickle(_CappedReader(entry, _MAX_PICKLE_BYTES))
            return found
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            reader = _CappedReader(file, _MAX_PICKLE_BYTES)
            for _ in range(_LEGACY_PICKLE_COUNT):
                if file.tell() >= size:
                    break
                found |= _globals_in_pickle(reader)
        return found
    except CheckpointError as error:
        raise CheckpointError(f"{path} was refused: {error}") from None
    # pickletools reports a malformed pickle as ValueError; zipfile a corrupt deflated entry as zlib.error, an
    # unknown compression method as NotImplementedError and an encrypted one as RuntimeError.
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error, NotImplementedError, RuntimeError) as error:
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({kind}): {error}") from None


def _without_unsafe_advice(message: str) -> str:
    """The reason in one of torch.load's errors, without its advice to re-run with weights_only=False or to
    allowlist the refused global: for a file from elsewhere, both run whatever code the file carries."""
    reason = message.split("WeightsUnpickler error:")[-1].split("\n\nCheck the documentation")[0]
    reason = re.sub(r"\s*Please use `torch\.serialization\..*", "", reason, flags=re.DOTALL)
    sentences = re.split(r"(?<=[.!?])\s+", reason.strip())
    return " ".join(sentence for sentence in sentences if "weights_only" not in sentence).strip()


# torch's safe-globals registry is process-wide; loads running in parallel threads must not unregister each other's.
_SAFE_GLOBALS_LOCK = threading.Lock()


def _load_torch_pickle(path: str, kind: str, mmap: bool) -> object:
    referenced = _globals_in_torch_file(path, kind)
    refused = sorted(name for name in referenced if not _is_allowed_global(name))
    if refused:
        raise CheckpointError(
            f"{path} was refused: its pickle would import {', '.join(refused)}, which is not tensor data, and "
            "unpickling it would run that code (nothing from the file was executed). Do not load this file: get "
            "the model as .safetensors, or convert it to .safetensors from a trusted source."
        )
    safe_globals = [(value, name) for name, value in _NUMPY_DATA_GLOBALS.items()]
    safe_globals += [(_framework_placeholder(name), name) for name in referenced if _is_framework_global(name)]
    try:
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(safe_globals):
            # torch.load hands any *path* ending in .safetensors to the safetensors library, so such a misnamed
            # pickle goes in as a file object. Otherwise the path is passed, which allows mmap (zip archives only):
            # tensors are paged in from the file when used instead of all being read into memory first.
            if path.endswith(".safetensors"):
                with open(path, "rb") as file:
                    return torch.load(file, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == _TORCH_ZIP)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused by the restricted unpickler: {_without_unsafe_advice(str(error)).rstrip('.')}. "
            "Convert it to .safetensors from a trusted source."
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError, OverflowError) as error:
        raise CheckpointError(
            f"{path} is damaged or not a PyTorch checkpoint ({kind}): {_without_unsafe_advice(str(error))}"
        ) from None


def _check_tensor_views(tensors: list[tuple[str, torch.Tensor]], path: str) -> None:
    """Refuses a tensor that is a view reaching outside its storage or covering more elements than it holds.

    A pickle gives each tensor a storage plus (offset, shape, stride). torch.save writes each tensor's own storage
    span, so real checkpoints never hold stride-0 or overlapping views; a 642-byte file can, however, describe a
    40000×40000 stride-0 view that becomes 6 GB when cast or copied.
    """
    for name, tensor in tensors:
        if tensor.numel() == 0:
            continue
        storage_elements = tensor.untyped_storage().nbytes() // tensor.element_size()
        last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        if min(tensor.stride(), default=1) < 0 or last >= storage_elements or tensor.numel() > storage_elements:
            raise CheckpointError(
                f"{path} was refused: tensor {name!r} of shape {list(tensor.shape)} and stride {list(tensor.stride())} "
                f"covers more elements than its storage holds ({storage_elements}); torch.save never writes such "
                "views (stride 0 or overlapping), the file is damaged or crafted"
            )


def read_torch_data(path: str | os.PathLike) -> object:
    """What a torch.save file (e.g. a training run's optimizer.pt / rng.pt) holds, loaded as data only.

    The same barriers as for checkpoints: the static pickle scan (tensors, containers, numbers only; nothing from
    the file is executed), then torch's restricted unpickler; every tensor is checked to lie within its storage.
    Tensors are on the CPU and fully read (not memory-mapped). Raises CheckpointError naming the file, never
    with torch's advice to load the file unrestricted.
    """
    path = os.fspath(path)
    kind = _detect_format(path)
    if kind == _SAFETENSORS:
        raise CheckpointError(f"{path} is a .safetensors file, not a torch.save file; read it with read_state_dict")
    loaded = _load_torch_pickle(path, kind, mmap=False)
    _check_tensor_views(_tensors_within(loaded), path)
    return loaded


def _tensors_within(value: object) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in nested dicts / lists / tuples, walked without recursion."""
    found, pending = [], [("", value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append((where, item))
        elif isinstance(item, dict):
            pending.extend((f"{where}[{key!r}]", child) for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            pending.extend((f"{where}[{index}]", child) for index, child in enumerate(item))
    return found


def _state_dict_from_pickled(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    """Unwraps Lightning's {"state_dict": ..., "global_step": ..., ...} and checks that what remains is tensors."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    if isinstance(checkpoint.get("state_dict"), dict):
        state_dict = checkpoint["state_dict"]
        not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise CheckpointError(f"{path}: its state_dict holds entries that are not tensors: {not_tensors[:10]}")
    else:
        # An unwrapped dict: keep the tensors, drop bookkeeping such as a top-level "global_step".
        state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    not_strings = [key for key in state_dict if not isinstance(key, str)]
    if not_strings:
        raise CheckpointError(f"{path}: tensor names must be strings, found {not_strings[:5]}")
    # detach() turns nn.Parameter entries into plain tensors.
    return {key: value.detach() for key, value in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Public API


def cast_tensor(key: str, tensor: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None,
                keep_precision: Collection[str] = ()) -> torch.Tensor:
    """The tensor named `key` of a state dict on `device`, cast to `dtype` (None: as stored) unless it is not
    floating (integer buffers such as position_ids and bool masks keep theirs) or `key` is in `keep_precision`."""
    keep = dtype is None or not tensor.is_floating_point() or key in keep_precision
    return tensor.to(device=device, dtype=tensor.dtype if keep else dtype)


def read_state_dict(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    keep_precision: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Reads the tensors of a .safetensors file or a PyTorch .ckpt/.pt/.pth, without running any code from it.

    Lightning's ``{"state_dict": {...}}`` wrapper is removed (its other entries are dropped). Floating tensors are
    cast to ``dtype`` when given, except those named in ``keep_precision`` (e.g. a noise schedule, which bfloat16's
    8-bit mantissa would round: ᾱ_0 = 0.99915 becomes 1.0); tensors are placed on ``device``. Raises
    CheckpointError (naming the file) for a damaged or unrecognised file and for a pickle that references anything
    but tensor data.
    """
    path = os.fspath(path)
    device = torch.device(device)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (it applies to floating tensors only), got {dtype}")
    kind = _detect_format(path)
    if kind == _SAFETENSORS:
        state_dict = _read_safetensors(path, device, dtype, keep_precision)
    else:
        pickled = _state_dict_from_pickled(_load_torch_pickle(path, kind, mmap=True), path)
        _check_tensor_views(list(pickled.items()), path)
        # Popping each source tensor as it is converted keeps at most one tensor in two copies.
        state_dict = {key: cast_tensor(key, pickled.pop(key), device, dtype, keep_precision) for key in list(pickled)}
    if not state_dict:
        raise CheckpointError(f"{path} contains no tensors")
    return state_dict


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata (`__metadata__`) of a .safetensors file; {} for a file without any, and for PyTorch
    pickles, which have no such field. Reads only the header."""
    path = os.fspath(path)
    if _detect_format(path) != _SAFETENSORS:
        return {}
    with open(path, "rb", buffering=0) as file:
        _, metadata, _ = _read_safetensors_header(path, file)
    return metadata


class TensorFile:
    """A checkpoint opened for reading one tensor at a time, so a tool that walks a model (the merger) holds one
    tensor, not the file, in memory:

        with TensorFile("a.safetensors") as a:
            for name in a.keys():
                a.shape(name), a.read(name)

    .safetensors files are read tensor by tensor (header checked as read_state_dict checks it); a PyTorch pickle
    has no index to seek by, so it is read whole on opening (its size in memory). `metadata` is the text metadata.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: dict[str, _TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        if _detect_format(self.path) == _SAFETENSORS:
            self._file = open(self.path, "rb", buffering=0)
            try:
                entries, self.metadata, self._data_start = _read_safetensors_header(self.path, self._file)
            except BaseException:
                self._file.close()
                raise
            self._entries = {entry.name: entry for entry in entries}
        else:
            self._tensors = read_state_dict(self.path)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        return list(self._entries or self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._entries.get(name)
        return entry.shape if entry else tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entries.get(name)
        return entry.dtype if entry else self._tensors[name].dtype

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` on the CPU (KeyError when the file has none)."""
        if name in self._entries:
            return _read_entry(self._file, self._entries[name], self._data_start, self.path)
        return self._tensors[name]


_UNET_PREFIX = "model.diffusion_model."
_EMA_PREFIX = "model_ema."


def _ema_key(unet_key: str) -> str:
    # LitEma registers one buffer per UNet parameter, named after the parameter path below `model.` without its
    # dots: model.diffusion_model.out.2.weight -> model_ema.diffusion_modelout2weight.
    return _EMA_PREFIX + unet_key[len("model.") :].replace(".", "")


def select_ema(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns the state dict with every UNet weight (model.diffusion_model.*) replaced by its EMA twin and all
    model_ema.* entries removed; raises CheckpointError when the EMA weights are missing or incomplete."""
    unet_keys = [key for key in state_dict if key.startswith(_UNET_PREFIX)]
    if not unet_keys:
        raise CheckpointError(f"no UNet weights ({_UNET_PREFIX}*) to replace with EMA weights")
    without_twin = [key for key in unet_keys if _ema_key(key) not in state_dict]
    if without_twin:
        raise CheckpointError(
            f"{len(without_twin)} of {len(unet_keys)} UNet weights have no EMA twin under {_EMA_PREFIX}* "
            f"(e.g. {without_twin[0]!r} has no {_ema_key(without_twin[0])!r}); this file does not carry complete "
            "EMA weights, load it with ema=False"
        )
    mismatched = [key for key in unet_keys if state_dict[key].shape != state_dict[_ema_key(key)].shape]
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(
            f"{len(mismatched)} EMA weights differ in shape from their UNet weight (e.g. {key!r} "
            f"{list(state_dict[key].shape)} vs {list(state_dict[_ema_key(key)].shape)})"
        )
    selected = drop_ema(state_dict)
    for key in unet_keys:
        selected[key] = state_dict[_ema_key(key)]
    return selected


def drop_ema(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns the state dict without its model_ema.* entries (EMA weights, decay, num_updates)."""
    return {key: value for key, value in state_dict.items() if not key.startswith(_EMA_PREFIX)}


_SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _safetensors_header(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: str) -> bytes:
    """The header for `state_dict`, with tensors laid out in the order the dict is iterated by the caller.

    Written by us rather than the safetensors library because the library emits __metadata__ in hash-map order,
    which changes from one save to the next and with it the file's hash; here everything is in a fixed order.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces (valid JSON whitespace) so the data starts 8-byte aligned, as the reference writer does.
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(_HEADER_LENGTH_BYTES, "little") + text


def _check_target(path: str | os.PathLike, metadata: dict[str, str] | None) -> str:
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: only .safetensors files are written (pickle checkpoints can carry code)")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: metadata must map strings to strings, got {metadata!r:.200}")
    return path


def _check_saveable(state_dict: dict[str, torch.Tensor], path: str) -> None:
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise CheckpointError(f"cannot save {path}: tensor names must be strings, found {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot save {path}: {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {path}: {name!r} is on the meta device and has no data")
        if tensor.dtype not in _SAFETENSORS_DTYPE_NAMES:
            raise CheckpointError(f"cannot save {path}: {name!r} has dtype {tensor.dtype}, which .safetensors lacks")


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes a .safetensors file atomically: either the complete new file is at `path` afterwards, or (on any
    error) whatever was there before is untouched. Text `metadata` goes into the header's __metadata__.

    The same tensors and metadata always give the same bytes (so the same model_hash). Tensors that share memory
    (tied weights, slices of one buffer) are each written in full; tensors on a GPU are copied to the CPU one at a
    time while writing.
    """
    path = _check_target(path, metadata)
    _check_saveable(state_dict, path)
    save_streamed(state_dict, state_dict.__getitem__, path, metadata)


def save_streamed(
    layout: dict[str, torch.Tensor], tensor_for, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes a .safetensors file (atomically, in save_state_dict's byte-for-byte order) whose tensors are made one
    at a time: `layout` gives each name's dtype and shape (meta tensors will do), and `tensor_for(name)` is called
    once per name, in file order, for the data; so only one tensor need be in memory while a model is written.
    Raises CheckpointError when a produced tensor differs from its layout."""
    path = _check_target(path, metadata)
    # Largest elements first, then by name: every tensor's offset is then a multiple of its element size.
    ordered = dict(sorted(layout.items(), key=lambda item: (-item[1].element_size(), item[0])))
    header = _safetensors_header(ordered, metadata, path)

    with atomic_write(path) as file:
        file.write(header)
        for name, planned in ordered.items():
            tensor = tensor_for(name)
            if tensor.dtype != planned.dtype or tensor.shape != planned.shape:
                raise CheckpointError(f"cannot save {path}: {name!r} was planned as {planned.dtype} "
                                      f"{list(planned.shape)} but is {tensor.dtype} {list(tensor.shape)}")
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                file.write(memoryview(data.numpy()))


_HASH_CHUNK_BYTES = 1 << 20


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's model hash ("Model hash: ..." in infotext): the first 10 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()[:10]


def legacy_model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's older hash: sha256 of the 64 KiB at offset 1 MiB (less if the file is shorter), 8 hex digits."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        sample = file.read(0x10000)
    return hashlib.sha256(sample).hexdigest()[:8]
