"""Read the tensors of safetensors files one at a time with plain file reads, never a memory map.

safetensors' own `safe_open` memory-maps each file: every page a read touches stays in the process's
resident set (RSS) for as long as the file is open, so loading a 16 GB checkpoint through it shows
up to 16 GB of RSS even when each tensor is quantised and dropped at once. Reading each tensor's
bytes into a fresh buffer leaves them in the page cache instead, which the OS reclaims freely: the
process holds only the tensor in flight. Format (safetensors spec): an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...}, then the data.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterable, KeysView
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorStreamError(ValueError):
    """A safetensors file is malformed or holds a dtype this reader does not know; the message names the file."""


class SafetensorsStream:
    """Tensors of several safetensors files by key, each read from disk when asked for (`read`).

    Use as a context manager: the files stay open (not mapped) until it exits. `bytes_read` counts
    the tensor bytes read so far, for progress reports.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        if sys.byteorder != "little":
            raise TensorStreamError("safetensors data is little-endian; this reader supports little-endian machines only.")
        self._files: dict[Path, BinaryIO] = {}
        self._entries: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        self.bytes_read = 0
        for path in dict.fromkeys(Path(f) for f in files):
            self._files[path] = handle = open(path, "rb")  # noqa: SIM115 - closed in close()
            self._index(path, handle)

    def _index(self, path: Path, handle: BinaryIO) -> None:
        size = handle.read(8)
        if len(size) != 8:
            raise TensorStreamError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (header_len,) = struct.unpack("<Q", size)
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TensorStreamError(f"{path} is not a safetensors file: its header is not JSON ({err}).") from err
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in DTYPES:
                raise TensorStreamError(f"{path}: tensor {key} has dtype {entry['dtype']}, which lorafit cannot read; "
                                        f"known: {', '.join(DTYPES)}.")
            begin, end = entry["data_offsets"]
            self._entries[key] = (path, 8 + header_len + begin, DTYPES[entry["dtype"]], list(entry["shape"]), end - begin)

    def keys(self) -> KeysView[str]:
        """Every tensor name in the files."""
        return self._entries.keys()

    def nbytes(self, key: str) -> int:
        """Size on disk of tensor `key`."""
        return self._entries[key][4]

    def read(self, key: str) -> torch.Tensor:
        """Tensor `key` in a buffer of its own (the only copy in this process)."""
        path, offset, dtype, shape, nbytes = self._entries[key]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        handle = self._files[path]
        handle.seek(offset)
        if nbytes and handle.readinto(memoryview(buffer.numpy())) != nbytes:
            raise TensorStreamError(f"{path} is truncated: tensor {key} needs {nbytes} bytes at offset {offset}.")
        self.bytes_read += nbytes
        return buffer.view(dtype).reshape(shape)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
