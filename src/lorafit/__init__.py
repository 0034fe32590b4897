"""lorafit: parameter-efficient fine-tuning (LoRA, rsLoRA) of transformer language models."""

from lorafit.adapters.io import AdapterFileError, load_adapter, save_adapter
from lorafit.adapters.lora import LoraLinear
from lorafit.adapters.model import (
    ParameterReport,
    adapters_disabled,
    attach,
    detach,
    merge,
    merge_and_unload,
    parameter_report,
    unmerge,
)
from lorafit.adapters.targets import TargetError
from lorafit.config import AdapterConfig, ConfigError, LorafitWarning, lora_scale
from lorafit.errors import UserError
from lorafit.models import KNOWN_MODELS, ModelFetchError, ModelLoadError, load_model

__version__ = "0.1.0"

__all__ = [
    "KNOWN_MODELS",
    "AdapterConfig",
    "AdapterFileError",
    "ConfigError",
    "LoraLinear",
    "LorafitWarning",
    "ModelFetchError",
    "ModelLoadError",
    "ParameterReport",
    "TargetError",
    "UserError",
    "adapters_disabled",
    "attach",
    "detach",
    "load_adapter",
    "load_model",
    "lora_scale",
    "merge",
    "merge_and_unload",
    "parameter_report",
    "save_adapter",
    "unmerge",
]
