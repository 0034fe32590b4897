"""Atomic writes: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create owner-only files; results should get the usual permissions (umask applied)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def fsync_directory(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk. POSIX only: Windows cannot open
    a folder for fsync, and its renames are journaled by NTFS."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under `folder` (itself included), deepest first, so that its whole content is on
    disk before it is renamed into place: without this a crash after the rename can leave empty or partial files."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(root)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file beside `path`, fsync it, then rename it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path` for a writer that wants a path (e.g. GGUFWriter).

    On success the file is fsynced and renamed over `path`; on error it is removed, so `path` is
    either the previous file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        _give_default_mode(tmp, is_dir=False)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise naming(err, path) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def naming(err: OSError, path: str | Path) -> OSError:
    """`err` with `path` as its file name when it has none (a failed write, e.g. a full disk, names no file),
    so that the one-line error says which file could not be written."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror, str(path))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """JSON with indent 2 and sorted keys (PEFT's layout for adapter_config.json), written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, on error it is removed.

    An existing folder at `path` is moved aside first and deleted only once the new one is in place,
    so a crash never leaves a half-written or missing result. Every file and folder inside is fsynced before
    the rename and the parent folder after it, so what appears under `path` is on disk, not only in the page cache.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _give_default_mode(tmp, is_dir=True)
        yield tmp
        fsync_tree(tmp)
        aside = None
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")) / path.name
            os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.replace(aside, path)  # put the previous result back
            raise
        fsync_directory(path.parent)
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file through Python's file I/O, so that a full disk or a read-only
    folder is an OSError naming the file; safetensors' own writer reports them as a generic SafetensorError. Callers write into an atomic_directory, which
    fsyncs the file."""
    data = safetensors_bytes(tensors, metadata)
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as err:
        raise naming(err, path) from err
