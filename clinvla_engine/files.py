"""Writing and hashing files safely: the one place the package does either (checkpoints, training
runs, engine bundles, the runtime, the index folder, evaluation manifests). Torch-free.

Every file a bundle (or a tool beside it) holds is written to a unique temporary name in the same
folder and renamed into place (``os.replace`` is atomic on POSIX and Windows within one file
system). Two writers of one path then never interleave their bytes: each writes its own
temporary file, the last rename wins, and a reader sees one whole file or the other. A writer that
is killed leaves only its temporary file (``.NAME.tmp-XXXX``), never a truncated ``NAME``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # in every temporary name this module makes (bundle checks refuse such leftovers)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (bundles hold files of several GiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory: str | os.PathLike) -> None:
    # The rename is only durable once the folder entry is on disk; not every platform lets a
    # folder be opened for that (Windows), and durability is a bonus over atomicity there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a fresh temporary path beside `path` for a writer that needs a file name (ONNX,
    safetensors, AOTInductor, the index core); renames it onto `path` when the block ends without
    an exception, and removes it otherwise. `suffix` keeps an extension a writer insists on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", suffix=suffix, dir=path.parent)
    # mkstemp makes the file 0600; the renamed file keeps its mode, so give it the target's mode
    # (or the usual 0644), or a serving process of another user could no longer read checkpoints
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.is_file():
            raise OSError(f"the writer of {path} produced no file at {tmp_path}")
        with open(tmp_path, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temp_name(path: str | os.PathLike) -> Path:
    """A unique hidden temporary name beside `path` for a folder written whole and then renamed
    into place (a checkpoint); files use atomic_path."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a unique temporary file, flushed to disk before the rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))
