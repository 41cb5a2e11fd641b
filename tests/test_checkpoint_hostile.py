"""Hostile and malformed checkpoint files, one table: every case is refused with a CheckpointError that names the
file, runs nothing from it, and never repeats torch's advice to load the file with weights_only=False.

Cases (issue 23, "Checkpoint readers"): zip archives whose pickle entry is ambiguous for torch's case-insensitive
loader, a zip bomb, tensor views covering more elements than their storage, malformed safetensors headers (wrong
types, absurd sizes, huge integers, deep nesting, too many tensors), and load_model's metadata and shape errors.
"""
import builtins
import io
import json
import pickle
import struct
import time
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import ldm
from ldm.checkpoint import (CheckpointError, _without_unsafe_advice, read_metadata, read_state_dict, read_torch_data,
                            save_state_dict)


class Payload:
    """Pickles as a call of `function(*arguments)`, the way a malicious checkpoint smuggles code."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def exec_payload(marker) -> bytes:
    """A pickle that creates `marker` when unpickled naively (pickle.loads)."""
    return pickle.dumps(Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), protocol=2)


def add_zip_entry(path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(name, data)


def data_pickle_name(path) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(name for name in archive.namelist() if name.endswith("/data.pkl"))


# --------------------------------------------------------------------------------------------------------------------
# Builders: each writes one hostile file at `path` (marker: a file the payload would create if it ran)


def ambiguous_case_entries(path, marker):
    # The static scan used to read the benign archive/data.pkl while torch's case-insensitive lookup may pick
    # archive/Data.pkl.
    torch.save({"w": torch.ones(2)}, path)
    add_zip_entry(path, data_pickle_name(path).replace("data.pkl", "Data.pkl"), exec_payload(marker))


def duplicate_entry_name(path, marker):
    torch.save({"w": torch.ones(2)}, path)
    with pytest.warns(UserWarning, match="Duplicate name"):
        add_zip_entry(path, data_pickle_name(path), exec_payload(marker))


def hostile_second_pickle(path, marker):
    # Not named data.pkl, but a *.pkl entry all the same: scanned, whatever the loader would do with it.
    torch.save({"w": torch.ones(2)}, path)
    add_zip_entry(path, data_pickle_name(path).replace("data.pkl", "extra.PKL"), exec_payload(marker))


def raw_zip(entries: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip archive of already-deflated entries (name, deflated bytes, crc32, inflated size), so that a bomb is
    built without inflating it first (zipfile.writestr would need the 2 GiB in memory)."""
    local, central, offset = b"", b"", 0
    for name, deflated, crc, size in entries:
        encoded = name.encode()
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(deflated), size, len(encoded), 0)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(deflated), size,
                               len(encoded), 0, 0, 0, 0, 0, offset) + encoded
        local += header + encoded + deflated
        offset += len(header) + len(encoded) + len(deflated)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), offset, 0)
    return local + central + end


BOMB_BYTES = 2 << 30  # what the pickle inflates to


def zip_bomb(path, marker):
    """A ~2 MB .ckpt whose data.pkl inflates to 2 GiB: a protocol-4 pickle holding one 2 GiB BINBYTES8 of zeros.

    Deflate blocks ended by a full flush are byte-aligned and independent of what came before, so one compressed
    MiB of zeros repeated 2048 times is a valid stream (and compresses in milliseconds)."""
    mebibyte = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = b"\x80\x04\x8e" + struct.pack("<Q", BOMB_BYTES)  # PROTO 4, BINBYTES8 of 2 GiB
    first = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(mebibyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = BOMB_BYTES >> 20
    tail = compressor.compress(b".") + compressor.flush()  # STOP
    crc = zlib.crc32(head)
    for _ in range(count):  # ~1 s: crc32 runs at memory speed
        crc = zlib.crc32(mebibyte, crc)
    crc = zlib.crc32(b".", crc)
    deflated = first + block * count + tail
    path.write_bytes(raw_zip([("archive/data.pkl", deflated, crc, len(head) + BOMB_BYTES + 1)]))
    assert path.stat().st_size < 3_000_000


def stride_zero_view(path, marker):
    # 642 bytes on disk; cast to fp16 it would materialise 40000² elements (3 GiB).
    torch.save({"w": torch.zeros(1).expand(40000, 40000)}, path)


def absurd_stride_zero_view(path, marker):
    torch.save({"w": torch.zeros(1).expand(10**6, 10**6)}, path)


def overlapping_view(path, marker):
    # 25 elements over a 10-element storage: windows that share memory.
    torch.save({"state_dict": {"w": torch.arange(10.0).as_strided((5, 5), (1, 1))}}, path)


def safetensors_file(header: dict | bytes, data: bytes = b""):
    def build(path, marker):
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return build


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def deeply_nested(path, marker):
    text = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    safetensors_file(text)(path, marker)


def huge_integer(path, marker):
    text = b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5001 + b'], "data_offsets": [0, 8]}}'
    safetensors_file(text, bytes(8))(path, marker)


def too_many_tensors(path, marker):
    entries = b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(200_001))
    safetensors_file(b"{" + entries + b"}")(path, marker)


def oversized_header(path, marker):
    # A header length beyond the 100 MB cap, in a sparse file just large enough to hold it.
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 100_000_001) + b"{")
        file.truncate(100_000_100)


def tiny_model_file(metadata_changes: dict | None = None, mis_shaped: str | None = None):
    def build(path, marker):
        model = ldm.create_model("tiny")
        ldm.save_model(model, path)
        state_dict, metadata = read_state_dict(path), read_metadata(path)
        if mis_shaped:
            state_dict[mis_shaped] = torch.zeros(state_dict[mis_shaped].shape[0] + 1)
        save_state_dict(state_dict, path, metadata={**metadata, **(metadata_changes or {})})
    return build


@dataclass(frozen=True)
class Case:
    build: Callable
    message: str  # regular expression the CheckpointError must match
    reader: Callable = read_state_dict
    extension: str = ".ckpt"


CASES = {
    "zip_entries_differing_in_case": Case(ambiguous_case_entries, r"two entries named .*data\.pkl.*Data\.pkl"),
    "zip_entry_stored_twice": Case(duplicate_entry_name, r"two entries named"),
    "hostile_pickle_beside_data_pkl": Case(hostile_second_pickle, r"would import builtins\.exec"),
    "zip_bomb": Case(zip_bomb, r"pickle is larger than 16 MiB"),
    "stride_zero_view": Case(stride_zero_view, r"'w' of shape \[40000, 40000\] and stride \[0, 0\] covers more"),
    "absurd_stride_zero_view": Case(absurd_stride_zero_view, r"shape \[1000000, 1000000\].*covers more elements"),
    "overlapping_view": Case(overlapping_view, r"'w' of shape \[5, 5\] and stride \[1, 1\] covers more elements"),
    "hostile_optimizer_state": Case(lambda path, marker: path.write_bytes(exec_payload(marker)),
                                    r"would import builtins\.exec", read_torch_data, ".pt"),
    "garbage_optimizer_state": Case(lambda path, marker: path.write_bytes(b"\x80\x02garbage" * 10),
                                    r"damaged or not a PyTorch checkpoint", read_torch_data, ".pt"),
    "stride_zero_optimizer_state": Case(lambda path, marker: torch.save(
        {"state": {0: {"exp_avg": torch.zeros(1).expand(1000, 1000)}}}, path),
        r"\['state'\]\[0\]\['exp_avg'\]\" of shape \[1000, 1000\]", read_torch_data, ".pt"),
    "dtype_not_a_string": Case(safetensors_file({"a": entry(dtype=["F32"])}, bytes(8)), r"unknown dtype \['F32'\]",
                               extension=".safetensors"),
    "shape_of_10_to_the_30": Case(safetensors_file({"a": entry(shape=[0, 10**30], offsets=[0, 0])}),
                                  r"header holds a 31-digit integer", extension=".safetensors"),
    "shape_product_beyond_int64": Case(safetensors_file({"a": entry(shape=[0, 2**63 - 1, 2**63 - 1], offsets=[0, 0])}),
                                       r"invalid shape", extension=".safetensors"),
    "shape_of_booleans": Case(safetensors_file({"a": entry(shape=[True, 2])}, bytes(8)), r"invalid shape",
                              extension=".safetensors"),
    "shape_of_floats": Case(safetensors_file({"a": entry(shape=[2.0])}, bytes(8)), r"invalid shape",
                            extension=".safetensors"),
    "too_many_dimensions": Case(safetensors_file({"a": entry(shape=[1] * 17, offsets=[0, 4])}, bytes(4)),
                                r"invalid shape", extension=".safetensors"),
    "offsets_of_floats": Case(safetensors_file({"a": entry(offsets=[0.0, 8.0])}, bytes(8)), r"invalid data_offsets",
                              extension=".safetensors"),
    "offsets_beyond_int64": Case(safetensors_file({"a": entry(offsets=[0, 2**64])}, bytes(8)),
                                 r"beyond the 8 bytes", extension=".safetensors"),
    "offsets_not_a_pair": Case(safetensors_file({"a": entry(offsets=[0, 4, 8])}, bytes(8)), r"invalid data_offsets",
                               extension=".safetensors"),
    "entry_not_an_object": Case(safetensors_file({"a": [[[["F32"]]]]}), r"needs 'dtype', 'shape' and 'data_offsets'",
                                extension=".safetensors"),
    "metadata_nested": Case(safetensors_file({"__metadata__": {"a": {"b": "c"}}}), r"must map strings to strings",
                            extension=".safetensors"),
    "5001_digit_integer": Case(huge_integer, r"5001-digit integer", extension=".safetensors"),
    "100000_deep_nesting": Case(deeply_nested, r"nests JSON values", extension=".safetensors"),
    "200001_tensors": Case(too_many_tensors, r"more than the 200000 tensors", extension=".safetensors"),
    "header_over_100_mb": Case(oversized_header, r"header length 100000001 exceeds", extension=".safetensors"),
    "metadata_scale_factor_abc": Case(tiny_model_file({"ldm.scale_factor": "abc"}),
                                      r"metadata ldm\.scale_factor='abc' is not a number", ldm.load_model,
                                      ".safetensors"),
    "metadata_scale_factor_nan": Case(tiny_model_file({"ldm.scale_factor": "nan"}),
                                      r"ldm\.scale_factor='nan' must be a positive finite number", ldm.load_model,
                                      ".safetensors"),
    "metadata_resolution_negative": Case(tiny_model_file({"ldm.resolution": "-64"}),
                                         r"metadata ldm\.resolution='-64' must be a multiple of 8", ldm.load_model,
                                         ".safetensors"),
    "metadata_prediction_x": Case(tiny_model_file({"ldm.prediction": "x"}),
                                  r"metadata ldm\.prediction='x' must be 'eps' or 'v'", ldm.load_model,
                                  ".safetensors"),
    "metadata_text_heads_abc": Case(tiny_model_file({"ldm.text_heads": "abc"}),
                                    r"metadata ldm\.text_heads='abc' must hold positive integers", ldm.load_model,
                                    ".safetensors"),
    "metadata_text_layers_unknown": Case(tiny_model_file({"ldm.text_layers": "first"}),
                                         r"metadata ldm\.text_layers='first' must name 'last' or 'penultimate' for "
                                         r"each of the model's 1 text tower", ldm.load_model, ".safetensors"),
    "mis_shaped_weight": Case(tiny_model_file(mis_shaped="model.diffusion_model.out.2.bias"),
                              r"tensor model\.diffusion_model\.out\.2\.bias has shape \[5\] but the detected tiny "
                              r"architecture needs \[4\]", ldm.load_model, ".safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_or_malformed_file_is_refused_naming_the_file_and_runs_nothing(tmp_path, case):
    spec = CASES[case]
    marker = tmp_path / "pwned"
    path = tmp_path / f"hostile{spec.extension}"
    spec.build(path, marker)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=spec.message) as error:
            spec.reader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert str(path) in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert not marker.exists()
    if spec.reader is not ldm.load_model:  # load_model builds a model (and its tokenizer) before refusing
        # Refused without reading the file's bulk: the 2 GiB bomb, the 3 GiB view and the 100 MB header alike.
        assert peak < 64 << 20, f"{peak >> 20} MiB allocated while refusing"


@pytest.mark.slow
def test_the_bomb_really_inflates_to_two_gibibytes(tmp_path):
    # The control for the zip_bomb case: a valid archive whose entry inflates to 2 GiB (zipfile checks the CRC at the
    # end), read here one MiB at a time.
    path = tmp_path / "bomb.ckpt"
    zip_bomb(path, None)
    inflated = 0
    with zipfile.ZipFile(path) as archive, archive.open("archive/data.pkl") as entry:
        while chunk := entry.read(1 << 20):
            inflated += len(chunk)
    assert inflated == BOMB_BYTES + 12


def test_stride_zero_file_is_tiny_and_a_real_view():
    # The control for the view cases: torch.save keeps the view, so a few hundred bytes describe 1.6e9 elements.
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1).expand(40000, 40000)}, buffer)
    assert len(buffer.getvalue()) < 2000
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["w"].stride() == (0, 0)


def test_duplicate_names_are_found_in_linear_time(tmp_path):
    # 100k tensors with one duplicate at the very end: the quadratic check took minutes for 40k.
    names = [f"t{i}" for i in range(100_000)] + ["t0"]
    text = "{" + ",".join(f'"{name}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for name in names) + "}"
    path = tmp_path / "duplicates.safetensors"
    safetensors_file(text.encode())(path, None)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"duplicates\.safetensors.*more than once: \['t0'\]"):
        read_state_dict(path)
    assert time.perf_counter() - start < 10


def test_pickle_scan_is_streamed_with_a_cap_also_for_many_small_opcodes(tmp_path, monkeypatch):
    # Not one giant string but many small opcodes (NONE, POP): refused once the cap is read, not at the end.
    monkeypatch.setattr("ldm.checkpoint._MAX_PICKLE_BYTES", 1 << 20)
    path = tmp_path / "long.ckpt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"N0" * (4 << 20) + b"}.")
    with pytest.raises(CheckpointError, match=r"long\.ckpt was refused: its pickle is larger than"):
        read_state_dict(path)


def test_torch_advice_to_load_unrestricted_is_stripped_from_its_messages():
    # The message torch really gives for a refused global, reduced to its reason.
    buffer = io.BytesIO()
    torch.save({"f": Payload(print, "hi")}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(buffer, weights_only=True)
    assert "weights_only" in str(error.value) and "safe_globals" in str(error.value)
    reason = _without_unsafe_advice(str(error.value))
    assert reason.startswith("Unsupported global: GLOBAL ") and reason.endswith("print was not an allowed global by "
                                                                               "default.")


def test_optimizer_state_reads_back_through_the_safe_loader(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3, betas=(0.9, 0.99))
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    loaded = read_torch_data(path)
    assert loaded["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(loaded["state"][0][key], value), key
