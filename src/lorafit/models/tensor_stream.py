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


READ_CHUNK_BYTES = 16 * 2**20  # bytes read at a time when a tensor is converted to another dtype as it is read


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

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype tensor `key` is stored in."""
        return self._entries[key][2]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key` in a buffer of its own (the only copy in this process). A floating-point tensor read with
        another floating `dtype` is converted READ_CHUNK_BYTES at a time into the result, so a bf16 tensor read as
        fp32 never needs its bf16 copy whole beside the fp32 one."""
        path, offset, stored, shape, nbytes = self._entries[key]
        convert = dtype is not None and dtype != stored and stored.is_floating_point and dtype.is_floating_point
        out = torch.empty(shape, dtype=dtype if convert else stored)
        flat = out.view(-1)
        per_chunk = max(1, READ_CHUNK_BYTES // stored.itemsize if convert else flat.numel())
        buffer = flat.view(torch.uint8) if not convert else torch.empty(min(per_chunk, flat.numel()) * stored.itemsize,
                                                                         dtype=torch.uint8)
        handle = self._files[path]
        handle.seek(offset)
        for start in range(0, flat.numel(), per_chunk):
            count = min(per_chunk, flat.numel() - start)
            chunk = buffer[:count * stored.itemsize]
            if handle.readinto(memoryview(chunk.numpy())) != chunk.numel():
                raise TensorStreamError(f"{path} is truncated: tensor {key} needs {nbytes} bytes at offset {offset}.")
            if convert:
                flat[start:start + count] = chunk.view(stored)
        self.bytes_read += nbytes
        return out

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
