"""Loading base models: short names, GGUF files, Hugging Face folders; optionally quantised to NF4."""

from lorafit.models.load import (
    ModelLoadError,
    block_linear_names,
    load_model,
    load_tokenizer,
    quantize_block_linears,
)
from lorafit.models.zoo import KNOWN_MODELS, ModelFetchError, cache_root

__all__ = [
    "KNOWN_MODELS",
    "ModelFetchError",
    "ModelLoadError",
    "block_linear_names",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "quantize_block_linears",
]
