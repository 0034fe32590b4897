"""Writing one GGUF file: output path checks, a progress bar over tensors, and an atomic, fsynced write."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from lorafit.errors import UserError
from lorafit.export.gguf_types import TensorChoice, encode
from lorafit.fileio import atomic_file


@dataclass
class GGUFExport:
    """What was written: the file, its size, tensors per GGML type, and the tensors kept in another type with why."""

    path: Path
    size_bytes: int = 0
    types: Counter = field(default_factory=Counter)
    exceptions: dict[str, list[str]] = field(default_factory=dict)  # "F32: reason" -> tensor names

    def summary(self) -> str:
        counts = ", ".join(f"{count} {name}" for name, count in sorted(self.types.items()))
        lines = [f"wrote {self.path} ({self.size_bytes / 2**20:.1f} MiB; tensors: {counts})"]
        lines += [f"  {len(names)} kept as {why} (e.g. {names[0]})" for why, names in self.exceptions.items()]
        return "\n".join(lines)


def check_output_path(path: str | Path, option: str) -> Path:
    """A .gguf path inside an existing folder, or a one-line ValueError naming the option."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise UserError(f"{option} {str(path)!r}: the file name must end in .gguf.")
    if not path.parent.is_dir():
        raise UserError(f"{option} {str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first.")
    if path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder; pass a file name such as {path / 'model.gguf'}.")
    return path


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: Iterable[tuple[str, np.ndarray, TensorChoice]], count: int, description: str) -> GGUFExport:
    """Encode each (name, fp32 array, choice) with a tqdm bar, then write header, keys and tensors to a temp
    file that is fsynced and renamed over `path` (a crash leaves the previous file or none)."""
    result = GGUFExport(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            add_metadata(writer)
            for name, array, choice in tqdm(tensors, total=count, desc=description, unit="tensor"):
                data = encode(array, choice.qtype)
                raw = None if data.dtype in (np.float32, np.float16) else choice.qtype
                writer.add_tensor(name, data, raw_dtype=raw)
                result.types[choice.qtype.name] += 1
                if choice.reason:
                    result.exceptions.setdefault(f"{choice.qtype.name}: {choice.reason}", []).append(name)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
        result.size_bytes = tmp.stat().st_size
    return result
