"""The checkpoint file format: state trees stored as JSON + safetensors (never pickle), and the manifest.

A state tree is what `optimizer.state_dict()`, `scheduler.state_dict()` or an RNG state is: nested dicts,
lists and tuples of tensors, numbers, strings, booleans and None. `write_state` stores it as NAME.json (the
structure, tensors replaced by references) and NAME.safetensors (the tensors), and `read_state` rebuilds it
exactly: same key types (an optimizer's state is keyed by int), tuples stay tuples, tensors keep dtype, shape
and bits. Any optimizer whose state holds only such values round-trips (AdamW, bitsandbytes' 8-bit AdamW).

JSON nodes that are objects are tagged, so nothing a state holds can be mistaken for a tag:
`{"tensor": name}`, `{"tuple": [...]}`, `{"dict": [[key, value], ...]}`; lists and scalars are plain JSON.

manifest.json lists every other file of the folder with its size and SHA-256 and is written last;
`verify_manifest` checks them before anything is read, so a truncated, swapped or edited file is named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorafit.adapters.io import non_finite
from lorafit.errors import CheckpointError
from lorafit.fileio import write_json_atomic, write_safetensors
from lorafit.run_dir import CHECKPOINT_MANIFEST as MANIFEST

FORMAT_NAME = "lorafit-checkpoint"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20


def write_state(folder: Path, name: str, tree: Any) -> None:
    """Store state tree `tree` as folder/NAME.json and, when it holds tensors, folder/NAME.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, name, tensors)
    if tensors:
        write_safetensors(folder / f"{name}.safetensors", tensors)
    write_json_atomic(folder / f"{name}.json", structure)


def read_state(folder: Path, name: str) -> Any:
    """The state tree stored by `write_state`; a missing, unreadable or inconsistent file is a CheckpointError."""
    json_file = folder / f"{name}.json"
    structure = read_json(json_file)
    tensor_file = folder / f"{name}.safetensors"
    tensors = read_tensors(tensor_file) if tensor_file.is_file() else {}
    try:
        return _decode(structure, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{json_file} is not a state written by lorafit ({err}); the file was edited or "
                              "damaged: resume from an older checkpoint.") from err


def read_json(path: Path) -> Any:
    """Parsed JSON of a checkpoint file; unreadable or invalid JSON is a CheckpointError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from an older one.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); resume from an older checkpoint.") from err


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, every floating-point one checked to be finite (a NaN or inf in saved
    weights or optimizer moments would silently poison the resumed run)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the file is truncated or corrupt: resume from an "
                              "older checkpoint.") from err
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """CheckpointError naming `source` and the tensor when a floating-point tensor holds NaN or inf."""
    if bad := non_finite(tensors):
        raise CheckpointError(f"{source}: tensor {bad[0]!r} holds {bad[1]} values; this checkpoint was saved from a "
                              "diverged or damaged state: resume from an older one.")


def write_manifest(folder: Path) -> None:
    """manifest.json: format, version, and size + SHA-256 of every other file under `folder`. Call it last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        relative = path.relative_to(folder).as_posix()
        files[relative] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_json_atomic(folder / MANIFEST, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "files": files})


def verify_manifest(folder: Path, required: list[str]) -> None:
    """Check every file the manifest lists (present, same size, same SHA-256) and that it lists `required`."""
    manifest_file = folder / MANIFEST
    manifest = read_json(manifest_file)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_file} is not a lorafit checkpoint manifest; resume from an older checkpoint.")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_file}: checkpoint format version {manifest.get('version')!r}, but this "
                              f"lorafit reads version {FORMAT_VERSION}; resume with the lorafit version that wrote it.")
    for name in required:
        if name not in files:
            raise CheckpointError(f"{manifest_file} does not list {name}; the checkpoint is incomplete.")
    for name, entry in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not isinstance(entry, dict):
            raise CheckpointError(f"{manifest_file}: entry {name!r} is not a file inside the checkpoint folder.")
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: resume from an older one.")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {entry.get('size')}; the file is "
                                  "truncated or was replaced: resume from an older checkpoint.")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} does not match its SHA-256 in {MANIFEST}; the file is corrupt or was "
                                  "edited: resume from an older checkpoint.")


def listed_files(folder: Path) -> set[str]:
    """The files manifest.json lists (relative POSIX paths); call after verify_manifest, which checked them."""
    return set(read_json(folder / MANIFEST)["files"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _encode(node: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON form of `node` (see the module docstring); tensors go to `tensors` under their path `where`."""
    if isinstance(node, torch.Tensor):
        if where in tensors:
            raise ValueError(f"two tensors of the state would be stored as {where!r}")
        tensors[where] = node.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared memory
        return {"tensor": where}
    if node is None or isinstance(node, (bool, int, float, str)):
        return node  # json writes floats exactly (shortest repr), inf and NaN as Infinity / NaN
    if isinstance(node, tuple):
        return {"tuple": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {"dict": [[_encode(k, f"{where}/key", tensors), _encode(v, f"{where}/{k}", tensors)]
                         for k, v in node.items()]}
    raise TypeError(f"{where} is a {type(node).__name__}; a checkpoint state holds tensors, numbers, strings, "
                    "booleans, None, lists, tuples and dicts only")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise ValueError(f"an object with keys {sorted(node)} is no tagged value")
    (tag, value), = node.items()
    if tag == "tensor":
        if value not in tensors:
            raise KeyError(f"tensor {value!r} is missing from the safetensors file")
        return tensors[value]
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    raise ValueError(f"unknown tag {tag!r}")
