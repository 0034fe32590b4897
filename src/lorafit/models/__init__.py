"""Loading base models: short names, GGUF files, Hugging Face folders."""

from lorafit.models.load import ModelLoadError, load_model
from lorafit.models.zoo import KNOWN_MODELS, ModelFetchError, cache_root

__all__ = ["KNOWN_MODELS", "ModelFetchError", "ModelLoadError", "cache_root", "load_model"]
