"""Export types (f32, f16, bf16, q8_0, q4_0): which GGML type each tensor gets, and its encoding with gguf-py.

The rule follows llama.cpp: norms and every 1-D tensor (biases included) stay F32, since they are
tiny and ggml's norm / add kernels expect F32. For the block quantisations a tensor whose rows are
not a multiple of the 32-value block falls back to F16 (convert_hf_to_gguf does the same on a
QuantError). For q4_0 the output head (or the tied embedding that serves as it) is written Q8_0:
llama-quantize keeps it in Q6_K because 4 bits there cost the most quality, and gguf-py cannot write
K-quants, so Q8_0 is the nearest type it can produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from lorafit.errors import UserError

Q = gguf.GGMLQuantizationType
EXPORT_TYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
OUTPUT_HEAD = "output.weight"
TOKEN_EMBEDDING = "token_embd.weight"


@dataclass(frozen=True)
class TensorChoice:
    """The GGML type of one tensor and, when it differs from the export type, why."""

    qtype: Q
    reason: str | None = None


def check_export_type(export_type: str) -> tuple[Q, gguf.LlamaFileType]:
    """(main GGML type, general.file_type) of an export type name, or a one-line ValueError."""
    if export_type not in EXPORT_TYPES:
        raise UserError(f"unknown GGUF type {export_type!r}: use one of {', '.join(EXPORT_TYPES)} "
                         "(K-quants such as q4_k_m need llama.cpp's llama-quantize on the f16 export).")
    return EXPORT_TYPES[export_type]


def choose_type(gguf_name: str, shape: tuple[int, ...], export_type: str, tied_embeddings: bool) -> TensorChoice:
    """The GGML type llama.cpp would give this tensor in an `export_type` file (see the module docstring)."""
    main, _ = check_export_type(export_type)
    if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
        return TensorChoice(Q.F32, None if main == Q.F32 else "1-D / norm tensors stay F32 (as in llama.cpp)")
    if main in (Q.F32, Q.F16, Q.BF16):
        return TensorChoice(main)
    block, _ = gguf.GGML_QUANT_SIZES[main]
    if shape[-1] % block:
        return TensorChoice(Q.F16, f"rows of {shape[-1]} values are not a multiple of the {block}-value block")
    is_head = gguf_name == OUTPUT_HEAD or (tied_embeddings and gguf_name == TOKEN_EMBEDDING)
    if main == Q.Q4_0 and is_head:
        return TensorChoice(Q.Q8_0, "the output head keeps more bits (llama-quantize uses Q6_K, which gguf-py cannot write)")
    return TensorChoice(main)


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    """The bytes (or float array) gguf-py writes for `array` as `qtype`; F32/F16 stay plain numpy floats."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)
