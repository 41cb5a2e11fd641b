"""Checkpoint I/O: bitwise safetensors round trips, atomic saves, pickles that are refused without running anything,
Lightning .ckpt files that load without Lightning, precise errors for damaged files, A1111 hashes and EMA selection.

Independent oracles: the safetensors library (reads our files, and its metadata), hashlib on the raw bytes, and
plain `pickle.loads` showing that each malicious payload really would run if unpickled naively.
"""
import builtins
import collections
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.checkpoint import (CheckpointError, drop_ema, legacy_model_hash, model_hash, read_metadata, read_state_dict,
                            save_state_dict, select_ema)
from ldm.files import atomic_write


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so NaN payloads, -0.0 and float8 compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(bits(actual[name]), bits(tensor)), name


def every_dtype_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-8, 65504.0, 3.0e38])
    return {
        "model.diffusion_model.w32": torch.randn(3, 5, generator=generator),
        "model.diffusion_model.specials32": special,
        "first_stage_model.w16": torch.randn(4, 2, 3, generator=generator).half(),
        "first_stage_model.specials16": special.half(),
        "cond_stage_model.wbf16": torch.randn(7, generator=generator).bfloat16(),
        "cond_stage_model.specialsbf16": special.bfloat16(),
        "w64": torch.randn(2, 2, generator=generator, dtype=torch.float64),
        "w8": torch.randn(6, generator=generator).to(torch.float8_e4m3fn),
        "position_ids": torch.arange(77, dtype=torch.int64)[None],
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "scalar": torch.tensor(0.18215),
        "empty": torch.zeros(0, 4),
    }


# --------------------------------------------------------------------------------------------------------------------
# safetensors round trips and atomic writes


def test_safetensors_round_trip_is_bitwise_for_every_dtype_and_keeps_metadata(tmp_path):
    state_dict = every_dtype_state_dict()
    path = tmp_path / "model.safetensors"
    metadata = {"ldm.preset": "sd15", "note": "ünïcode ✓"}
    save_state_dict(state_dict, path, metadata=metadata)

    assert_bitwise_equal(read_state_dict(path), state_dict)
    assert read_metadata(path) == metadata
    # The reference library reads the same file to the same tensors and metadata.
    assert_bitwise_equal(load_file(path), state_dict)
    with safe_open(path, framework="pt") as reference:
        assert reference.metadata() == metadata


def test_saving_is_deterministic_and_aligned(tmp_path):
    # Same tensors and metadata (given in another order) -> the same bytes, so the same A1111 hash.
    state_dict = every_dtype_state_dict()
    metadata = {"b": "2", "a": "1", "c": "3"}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_state_dict(state_dict, first, metadata=metadata)
    save_state_dict(dict(reversed(state_dict.items())), second, metadata=dict(reversed(metadata.items())))
    assert first.read_bytes() == second.read_bytes()
    # The data section starts 8-byte aligned and every tensor sits at a multiple of its element size.
    data = first.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    assert header_length % 8 == 0
    header = json.loads(data[8:8 + header_length])
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % state_dict[name].element_size() == 0, name


def test_dtype_without_a_safetensors_name_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'w' has dtype torch.complex128"):
        save_state_dict({"w": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_file_saved_without_metadata_reads_empty_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_state_dict({"w": torch.ones(2)}, path)
    assert read_metadata(path) == {}


def test_tied_sliced_and_transposed_tensors_are_each_saved_in_full(tmp_path):
    weight = torch.randn(4, 6)
    buffer = torch.arange(10.0)
    state_dict = {"embedding": weight, "tied_head": weight, "first": buffer[:5], "second": buffer[5:],
                  "transposed": weight.t()}
    path = tmp_path / "shared.safetensors"
    save_state_dict(state_dict, path)
    loaded = read_state_dict(path)
    assert_bitwise_equal(loaded, {name: tensor.contiguous() for name, tensor in state_dict.items()})
    assert loaded["embedding"].data_ptr() != loaded["tied_head"].data_ptr()


def test_saved_file_gets_the_default_mode_or_keeps_the_replaced_files_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "model.safetensors"
    save_state_dict({"w": torch.ones(1)}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o640)
    save_state_dict({"w": torch.zeros(1)}, path)
    assert path.stat().st_mode & 0o777 == 0o640


def write_through_every_writer(folder) -> list:
    """One file from each atomic writer of the project, all through ldm.files.atomic_write."""
    from PIL import Image

    from metrics.report import write_page
    from sample.images import save_png

    with atomic_write(folder / "plain.txt", "w", encoding="utf-8") as file:
        file.write("text")
    save_state_dict({"w": torch.ones(1)}, folder / "model.safetensors")
    save_png(Image.new("RGB", (8, 8)), str(folder / "image.png"), "a red circle")
    write_page(folder / "report.html", "Report", ["<p>body</p>"])
    return ["plain.txt", "model.safetensors", "image.png", "report.html"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        names = write_through_every_writer(tmp_path)
        with open(tmp_path / "opened.txt", "w") as file:
            file.write("text")
    finally:
        os.umask(previous)
    assert 0o666 & ~umask == (tmp_path / "opened.txt").stat().st_mode & 0o777
    for name in names:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_atomic_write_failing_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_write(path, "w") as file:
            file.write("half of the new")
            file.flush()  # the half is on disk in the temporary file when the error strikes
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_atomic_write_into_a_missing_folder_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot write .*model.safetensors: the folder .*missing does not exist"):
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "missing" / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_accepts_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_write(tmp_path / "log.txt", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_formats_other_than_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.ckpt: only \.safetensors"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "model.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_non_string_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="metadata must map strings to strings"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"steps": 20})


def write_original(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state_dict({"w": torch.arange(6.0)}, path)
    return path, path.read_bytes()


class FailsWhenWritten(torch.Tensor):
    """A tensor whose data cannot be fetched, like a device that errors (or a disk that fills) in mid-save."""

    def detach(self):
        raise OSError(28, "No space left on device")


def test_failing_write_leaves_the_existing_file_untouched_and_no_temporary_file(tmp_path):
    path, original = write_original(tmp_path)
    # "a" is written first, then "z" fails: the temporary file is left half-written when the error strikes.
    state_dict = {"a": torch.randn(1000), "z": torch.Tensor._make_subclass(FailsWhenWritten, torch.zeros(6))}
    with pytest.raises(OSError, match="No space left"):
        save_state_dict(state_dict, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_failing_fsync_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    path, original = write_original(tmp_path)

    def failing_fsync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        save_state_dict({"w": torch.zeros(6)}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_invalid_entry_is_rejected_before_anything_is_written(tmp_path):
    path, original = write_original(tmp_path)
    with pytest.raises(CheckpointError, match="'steps'.*not a tensor"):
        save_state_dict({"w": torch.zeros(6), "steps": 20}, path)
    with pytest.raises(CheckpointError, match="meta device"):
        save_state_dict({"w": torch.zeros(6, device="meta")}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_successful_save_replaces_the_old_file(tmp_path):
    path, _ = write_original(tmp_path)
    save_state_dict({"w": torch.full((2,), 7.0)}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.full((2,), 7.0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# --------------------------------------------------------------------------------------------------------------------
# dtype / device


def test_floating_tensors_are_cast_to_the_requested_dtype_and_integers_keep_theirs(tmp_path):
    state_dict = {"w": torch.randn(3, 3, dtype=torch.float64), "h": torch.randn(4).half(),
                  "position_ids": torch.arange(5), "mask": torch.tensor([True, False])}
    safetensors_path = tmp_path / "m.safetensors"
    ckpt_path = tmp_path / "m.ckpt"
    save_state_dict(state_dict, safetensors_path)
    torch.save({"state_dict": state_dict}, ckpt_path)
    for path in (safetensors_path, ckpt_path):
        loaded = read_state_dict(path, device=torch.device("cpu"), dtype=torch.bfloat16)
        for name in ("w", "h"):
            assert loaded[name].dtype == torch.bfloat16
            assert torch.equal(loaded[name], state_dict[name].to(torch.bfloat16))
        assert loaded["position_ids"].dtype == torch.int64 and torch.equal(loaded["position_ids"], torch.arange(5))
        assert loaded["mask"].dtype == torch.bool and torch.equal(loaded["mask"], state_dict["mask"])
        kept = read_state_dict(path, dtype=torch.bfloat16, keep_precision={"w"})
        assert kept["w"].dtype == torch.float64 and torch.equal(kept["w"], state_dict["w"])
        assert kept["h"].dtype == torch.bfloat16


def test_non_floating_target_dtype_is_rejected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict({"w": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="floating dtype"):
        read_state_dict(path, dtype=torch.int8)


@pytest.mark.cuda
def test_tensors_are_placed_on_the_gpu(tmp_path):
    state_dict = {"w": torch.randn(64, 64), "position_ids": torch.arange(77)}
    path = tmp_path / "m.safetensors"
    save_state_dict(state_dict, path)
    loaded = read_state_dict(path, device="cuda", dtype=torch.float16)
    assert loaded["w"].device.type == "cuda" and loaded["w"].dtype == torch.float16
    assert torch.equal(loaded["w"].cpu(), state_dict["w"].half())
    assert loaded["position_ids"].device.type == "cuda" and loaded["position_ids"].dtype == torch.int64


# --------------------------------------------------------------------------------------------------------------------
# .ckpt / .pt: formats, Lightning wrappers, content sniffing

TORCH_FORMATS = {"zip": True, "legacy": False}


def small_state_dict() -> collections.OrderedDict:
    generator = torch.Generator().manual_seed(1)
    return collections.OrderedDict([
        ("model.diffusion_model.input_blocks.0.0.weight", torch.randn(8, 4, 3, 3, generator=generator)),
        ("model.diffusion_model.input_blocks.0.0.bias", torch.randn(8, generator=generator).half()),
        ("first_stage_model.decoder.conv_out.weight", torch.randn(3, 8, 3, 3, generator=generator).bfloat16()),
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.arange(77)[None]),
    ])


def install_fake_lightning(monkeypatch):
    """Registers a stand-in `pytorch_lightning` package, so pickling records its real class paths."""
    class ModelCheckpoint:
        def __init__(self):
            self.monitor = None
            self.best_model_path = "/logs/checkpoints/last.ckpt"
            self.best_model_score = np.float64(0.1234)
            self.save_top_k = -1

    class LearningRateMonitor:
        pass

    classes = {"pytorch_lightning.callbacks.model_checkpoint": ModelCheckpoint,
               "pytorch_lightning.callbacks.lr_monitor": LearningRateMonitor}
    for package in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for module_name, cls in classes.items():
        module = types.ModuleType(module_name)
        cls.__module__, cls.__qualname__ = module_name, cls.__name__
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module_name, module)
    return ModelCheckpoint, LearningRateMonitor


def save_lightning_checkpoint(path, state_dict, zip_format: bool) -> None:
    """A checkpoint shaped like the released SD .ckpt files: Lightning bookkeeping around an OrderedDict state_dict,
    numpy scalars, and callback classes/objects of pytorch_lightning (present only while saving)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        ModelCheckpoint, LearningRateMonitor = install_fake_lightning(monkeypatch)
        lightning_checkpoint = {
            "epoch": 6,
            "global_step": np.int64(470000),
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            # Old Lightning keyed callback states by the callback class; newer ones store the objects' state.
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float32(0.5), "dirpath": "/logs"},
                          LearningRateMonitor: {},
                          "ModelCheckpoint{'monitor': None}": ModelCheckpoint()},
            "optimizer_states": [],
            "lr_schedulers": [],
        }
        torch.save(lightning_checkpoint, path, _use_new_zipfile_serialization=zip_format)
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("torch_format", TORCH_FORMATS)
def test_lightning_checkpoint_loads_without_lightning_installed(tmp_path, torch_format):
    path = tmp_path / "sd-v1-4.ckpt"
    state_dict = small_state_dict()
    save_lightning_checkpoint(path, state_dict, TORCH_FORMATS[torch_format])
    loaded = read_state_dict(path)
    assert_bitwise_equal(loaded, state_dict)
    assert "pytorch_lightning" not in sys.modules


def test_checkpoint_from_numpy_1_names_numpy_core(tmp_path):
    # Files written before numpy 2 spell the scalar constructor numpy.core.multiarray.scalar. The legacy format has
    # no offsets, so the GLOBAL line can be rewritten in place to produce such a file.
    path = tmp_path / "old.ckpt"
    state_dict = small_state_dict()
    save_lightning_checkpoint(path, state_dict, zip_format=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar\n" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar\n", b"numpy.core.multiarray\nscalar\n"))
    assert_bitwise_equal(read_state_dict(path), state_dict)


@pytest.mark.parametrize("torch_format", TORCH_FORMATS)
def test_plain_state_dict_file_drops_top_level_bookkeeping(tmp_path, torch_format):
    path = tmp_path / "vae.pt"
    state_dict = small_state_dict()
    torch.save({**state_dict, "global_step": 840000}, path, _use_new_zipfile_serialization=TORCH_FORMATS[torch_format])
    assert_bitwise_equal(read_state_dict(path), state_dict)


def test_parameters_in_a_checkpoint_load_as_plain_tensors(tmp_path):
    path = tmp_path / "params.pth"
    torch.save({"state_dict": {"w": torch.nn.Parameter(torch.ones(2, 2))}}, path)
    loaded = read_state_dict(path)["w"]
    assert type(loaded) is torch.Tensor and not loaded.requires_grad and torch.equal(loaded, torch.ones(2, 2))


def test_non_tensor_inside_the_state_dict_is_an_error(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1), "note": "hello"}}, path)
    with pytest.raises(CheckpointError, match=r"odd\.ckpt.*not tensors.*'note'"):
        read_state_dict(path)


def test_checkpoint_without_tensors_is_an_error(tmp_path):
    path = tmp_path / "empty.ckpt"
    torch.save({"global_step": 5}, path)
    with pytest.raises(CheckpointError, match=r"empty\.ckpt contains no tensors"):
        read_state_dict(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match=r"empty\.ckpt holds a list"):
        read_state_dict(path)


def test_format_is_decided_by_content_not_extension(tmp_path):
    state_dict = {"w": torch.randn(3)}
    safetensors_named_ckpt = tmp_path / "really_safetensors.ckpt"
    save_state_dict(state_dict, tmp_path / "tmp.safetensors")
    os.replace(tmp_path / "tmp.safetensors", safetensors_named_ckpt)
    zip_named_safetensors = tmp_path / "really_torch.safetensors"
    torch.save(state_dict, zip_named_safetensors)
    for path in (safetensors_named_ckpt, zip_named_safetensors):
        assert_bitwise_equal(read_state_dict(path), state_dict)


def test_safetensors_header_length_starting_with_pickle_or_zip_bytes_is_still_safetensors(tmp_path):
    # A header of 0x80 + 256k bytes has the pickle PROTO byte first; content detection must not be fooled by it.
    for target_length in (0x180, 0x4B50 + 0x10000):
        header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
        text = json.dumps(header).encode()
        text += b" " * (target_length - len(text))
        path = tmp_path / f"padded{target_length}.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + struct.pack("<2f", 1.5, -2.0))
        assert torch.equal(read_state_dict(path)["w"], torch.tensor([1.5, -2.0]))


# --------------------------------------------------------------------------------------------------------------------
# Malicious pickles: refused, and nothing runs


class Payload:
    """Pickles as a call of `function(*arguments)`, the way a malicious checkpoint smuggles code."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def create_file_code(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def payloads(marker) -> dict[str, tuple[str, Payload]]:
    """name -> (the global the pickle names, payload that would create `marker` or import a module)."""
    return {
        "os.system": ("posix.system" if os.name == "posix" else "nt.system", Payload(os.system, f"touch '{marker}'")),
        "subprocess.call": ("subprocess.call", Payload(subprocess.call, ["touch", str(marker)])),
        "builtins.eval": ("builtins.eval", Payload(builtins.eval, create_file_code(marker))),
        "builtins.exec": ("builtins.exec", Payload(builtins.exec, create_file_code(marker))),
        "builtins.__import__": ("builtins.__import__", Payload(builtins.__import__, "antigravity")),
        "builtins.getattr": ("builtins.getattr", Payload(getattr, "text", "upper")),
    }


def test_payloads_would_really_run_when_unpickled_naively(tmp_path):
    # The control for the tests below: the same payload, opened with plain pickle, does create the marker.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(payloads(marker)["builtins.exec"][1], protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("torch_format", TORCH_FORMATS)
@pytest.mark.parametrize("attack", ["os.system", "subprocess.call", "builtins.eval", "builtins.exec",
                                    "builtins.__import__", "builtins.getattr"])
def test_pickle_calling_code_is_refused_and_nothing_runs(tmp_path, torch_format, attack):
    marker = tmp_path / "pwned"
    global_name, payload = payloads(marker)[attack]
    path = tmp_path / "model.ckpt"
    checkpoint_dict = {"state_dict": small_state_dict(), "callbacks": {"cb": payload}}
    torch.save(checkpoint_dict, path, _use_new_zipfile_serialization=TORCH_FORMATS[torch_format])

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert str(path) in message
    assert global_name in message
    assert "safetensors" in message and "trusted source" in message
    assert not marker.exists()
    assert "antigravity" not in sys.modules


def short_unicode(text: str) -> bytes:
    encoded = text.encode()
    return b"\x8c" + bytes([len(encoded)]) + encoded  # SHORT_BINUNICODE


def test_protocol_4_stack_global_is_resolved_and_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "proto4.ckpt"
    path.write_bytes(pickle.dumps({"x": payloads(marker)["builtins.exec"][1]}, protocol=4))
    with pytest.raises(CheckpointError, match=r"proto4\.ckpt.*builtins\.exec"):
        read_state_dict(path)
    assert not marker.exists()


def test_stack_global_hidden_behind_popped_strings_is_refused(tmp_path):
    # The strings directly under STACK_GLOBAL are 'builtins' 'exec'; two harmless names were pushed after them and
    # popped again, to trick a scanner that only looks at the last strings it saw.
    marker = tmp_path / "pwned"
    stream = (b"\x80\x04" + short_unicode("builtins") + short_unicode("exec")
              + short_unicode("collections") + short_unicode("OrderedDict") + b"00"  # POP, POP
              + b"\x93" + short_unicode(create_file_code(marker)) + b"\x85R.")  # STACK_GLOBAL, TUPLE1, REDUCE, STOP
    pickle.loads(stream)  # control: plain pickle runs it
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "sneaky.ckpt"
    path.write_bytes(stream)
    with pytest.raises(CheckpointError, match=r"sneaky\.ckpt.*computed while unpickling"):
        read_state_dict(path)
    assert not marker.exists()


def test_global_fetched_from_the_memo_is_resolved(tmp_path):
    # STACK_GLOBAL whose module string comes from the memo (BINGET) still names the real target.
    marker = tmp_path / "pwned"
    stream = (b"\x80\x04" + short_unicode("builtins") + b"\x94" + b"0"  # MEMOIZE as 0, POP
              + b"h\x00" + short_unicode("exec")  # BINGET 0
              + b"\x93" + short_unicode(create_file_code(marker)) + b"\x85R.")
    path = tmp_path / "memo.ckpt"
    path.write_bytes(stream)
    with pytest.raises(CheckpointError, match=r"memo\.ckpt.*builtins\.exec"):
        read_state_dict(path)
    assert not marker.exists()


def test_unknown_classes_are_refused_by_name(tmp_path):
    path = tmp_path / "pickled_module.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "model": torch.nn.Identity()}, path)
    with pytest.raises(CheckpointError, match=r"pickled_module\.pt.*torch\.nn\.modules\.linear\.Identity"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------------------------------
# Damaged or foreign files


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


VALID_HEADER = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}
VALID_DATA = bytes(range(24))


def with_entry(name: str, **changes) -> dict:
    header = json.loads(json.dumps(VALID_HEADER))
    header[name].update(changes)
    return header


BAD_FILES = {
    "empty": (b"", "is empty"),
    "shorter_than_length_field": (b"\x05\x00\x00", "truncated to 3 bytes"),
    "truncated_data": (safetensors_bytes(VALID_HEADER, VALID_DATA)[:-5], r"\[16, 24\] beyond the 19 bytes"),
    "header_length_beyond_file": (struct.pack("<Q", 10**6) + b"{}", "header length 1000000 is larger than the file"),
    "header_not_json": (safetensors_bytes(b"{not json}"), "not valid JSON"),
    "header_not_utf8": (safetensors_bytes(b"{\"\xff\xfe\": 1}"), "not valid JSON"),
    "header_not_object": (safetensors_bytes(b"[1, 2, 3]"), "JSON object starting with"),
    "overlapping_offsets": (safetensors_bytes(with_entry("b", shape=[4], data_offsets=[8, 16]), VALID_DATA),
                            "'a' \\[0, 16\\] and 'b' \\[8, 16\\] overlap"),
    "offsets_out_of_range": (safetensors_bytes(with_entry("b", shape=[496], data_offsets=[16, 1008]), VALID_DATA),
                             r"\[16, 1008\] beyond the 24 bytes"),
    "reversed_offsets": (safetensors_bytes(with_entry("b", data_offsets=[24, 16]), VALID_DATA),
                         "invalid data_offsets"),
    "unknown_dtype": (safetensors_bytes(with_entry("a", dtype="F17"), VALID_DATA), "unknown dtype 'F17'"),
    "shape_size_mismatch": (safetensors_bytes(with_entry("a", shape=[3, 2]), VALID_DATA),
                            r"shape \[3, 2\] and dtype F32 needs 24 bytes but .* span 16"),
    "negative_shape": (safetensors_bytes(with_entry("a", shape=[-1, 4]), VALID_DATA), "invalid shape"),
    "missing_field": (safetensors_bytes({"a": {"dtype": "F32", "shape": [4]}}, VALID_DATA[:16]),
                      "needs 'dtype', 'shape' and 'data_offsets'"),
    "duplicate_name": (safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                         b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8)),
                       r"more than once: \['a'\]"),
    "metadata_not_text": (safetensors_bytes({"__metadata__": {"steps": 20}, **VALID_HEADER}, VALID_DATA),
                          "__metadata__ must map strings to strings"),
    "png_image": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64), "it is a PNG image"),
    "text_file": (b"Stable Diffusion v1.5 model card\n\nLicense: CreativeML Open RAIL-M\n", "text file"),
    "git_lfs_pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n",
                        "Git LFS pointer"),
    "html_page": (b"<!DOCTYPE html><html><body>Repository not found</body></html>", "HTML page"),
}


# Without the .safetensors extension, these are not recognisable as a damaged safetensors file.
SAFETENSORS_NAME_NEEDED = {"shorter_than_length_field", "header_not_object"}


@pytest.mark.parametrize(("case", "extension"), [(case, extension) for case in BAD_FILES for extension in
                                                 (".safetensors", ".ckpt")
                                                 if extension == ".safetensors" or case not in SAFETENSORS_NAME_NEEDED])
def test_damaged_or_foreign_file_gives_an_error_naming_the_file_and_the_problem(tmp_path, case, extension):
    content, expected = BAD_FILES[case]
    path = tmp_path / f"{case}{extension}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as error:
        read_state_dict(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [bytes([7, 0, 3, 250, 0, 1, 2, 3, 4, 5, 6]) * 10]
                         + [BAD_FILES[case][0] for case in sorted(SAFETENSORS_NAME_NEEDED)])
def test_unrecognised_binary_file_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.bin is not a checkpoint: its first bytes"):
        read_state_dict(path)


@pytest.mark.parametrize("torch_format", TORCH_FORMATS)
def test_truncated_torch_checkpoint_is_reported_as_damaged(tmp_path, torch_format):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": small_state_dict()}, path, _use_new_zipfile_serialization=TORCH_FORMATS[torch_format])
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*damaged"):
        read_state_dict(path)


def test_metadata_of_a_pickle_checkpoint_is_empty(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    assert read_metadata(path) == {}


# --------------------------------------------------------------------------------------------------------------------
# A1111 hashes


def test_model_hashes_match_sha256_of_the_defined_byte_ranges(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, size=(5 << 19) + 123, dtype=np.uint8).tobytes()  # 2.5 MiB + 123
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_legacy_hash_of_a_file_shorter_than_one_mebibyte_hashes_nothing(tmp_path):
    path = tmp_path / "small.safetensors"
    path.write_bytes(b"x" * 1000)
    assert legacy_model_hash(path) == hashlib.sha256(b"").hexdigest()[:8]
    assert model_hash(path) == hashlib.sha256(b"x" * 1000).hexdigest()[:10]


# --------------------------------------------------------------------------------------------------------------------
# EMA


UNET_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.0.0.bias",
             "model.diffusion_model.out.2.weight"]


def state_dict_with_ema() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    state_dict = {key: torch.randn(3, 2, generator=generator) for key in UNET_KEYS}
    state_dict["first_stage_model.decoder.conv_out.bias"] = torch.randn(3, generator=generator)
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    state_dict["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    for key in UNET_KEYS:
        state_dict["model_ema." + key[len("model."):].replace(".", "")] = torch.randn(3, 2, generator=generator)
    return state_dict


def test_ema_key_naming_matches_the_original_files():
    assert "model_ema.diffusion_modelinput_blocks00weight" in state_dict_with_ema()


def test_select_ema_swaps_in_the_ema_weights_after_a_file_round_trip(tmp_path):
    original = state_dict_with_ema()
    path = tmp_path / "full-ema.safetensors"
    save_state_dict(original, path)
    selected = select_ema(read_state_dict(path))
    assert sorted(selected) == sorted(UNET_KEYS + ["first_stage_model.decoder.conv_out.bias"])
    for key in UNET_KEYS:
        assert torch.equal(selected[key], original["model_ema." + key[len("model."):].replace(".", "")])
    assert torch.equal(selected["first_stage_model.decoder.conv_out.bias"],
                       original["first_stage_model.decoder.conv_out.bias"])


def test_drop_ema_keeps_the_regular_weights():
    original = state_dict_with_ema()
    dropped = drop_ema(original)
    assert sorted(dropped) == sorted(UNET_KEYS + ["first_stage_model.decoder.conv_out.bias"])
    assert all(dropped[key] is original[key] for key in dropped)


def test_partial_ema_is_an_error_that_counts_the_missing_twins():
    state_dict = state_dict_with_ema()
    del state_dict["model_ema.diffusion_modelout2weight"]
    with pytest.raises(CheckpointError, match=r"1 of 3 UNet weights have no EMA twin.*out\.2\.weight"):
        select_ema(state_dict)
    with pytest.raises(CheckpointError, match="3 of 3 UNet weights have no EMA twin"):
        select_ema(drop_ema(state_dict))


def test_ema_twin_of_a_different_shape_is_an_error():
    state_dict = state_dict_with_ema()
    state_dict["model_ema.diffusion_modelout2weight"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"differ in shape.*\[3, 2\] vs \[5\]"):
        select_ema(state_dict)
