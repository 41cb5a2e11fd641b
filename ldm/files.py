"""Atomic file writes: a reader sees either the old file or the complete new one, never half of either.

    with atomic_write("out/00001-42.png") as file:
        image.save(file, format="PNG")

The one helper every writer of the project uses (models, images, zips, reports).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None) -> Iterator[IO]:
    """Yields a file open for writing beside `path`; when the block ends without an exception the data is fsynced
    and the file renamed over `path`; on an exception the temporary file is removed and `path` is untouched.

    `mode` is "wb" or "w" (text, with `encoding` / `newline` as for `open`). The result has the permissions a plain
    `open(path, "w")` would give: those of the file it replaces, or 0o666 less the process umask for a new file
    (`tempfile.mkstemp` would make every output 0o600).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        # Named here: the open below would fail on the hidden temporary file's name, not the user's path.
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: the folder {directory} does not exist; create it "
                                              "first", directory)
    # Same folder as the target, so the rename stays within one file system (atomic on POSIX and Windows); the dot
    # hides it from folder listings while it is being written.
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        # "x" creates with O_EXCL and mode 0o666, to which the kernel applies the umask exactly as for open(path, "w").
        with open(temporary, mode.replace("w", "x"), encoding=encoding, newline=newline) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data must be on disk before the rename makes it visible under `path`
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)  # open() on an existing file keeps its mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    if os.name == "posix":
        _fsync_directory(directory)  # persist the rename itself


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
