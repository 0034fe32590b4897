"""Export for other runtimes: GGUF (merged model or LoRA adapter) for llama.cpp / Ollama, and the Ollama Modelfile."""

from lorafit.export.gguf_adapter import export_adapter_gguf
from lorafit.export.gguf_file import GGUFExport
from lorafit.export.gguf_model import export_model_gguf
from lorafit.export.gguf_tokenizer import source_gguf
from lorafit.export.gguf_types import EXPORT_TYPES
from lorafit.export.ollama import write_modelfile

__all__ = ["EXPORT_TYPES", "GGUFExport", "export_adapter_gguf", "export_model_gguf", "source_gguf", "write_modelfile"]
