"""lorafit: LoRA fine-tuning of transformer language models, in one toolkit.

- adapters: LoRA, rsLoRA scaling, DoRA; initialised as default/gaussian, PiSSA or LoftQ; attached to an existing
  transformers model, merged, unloaded or switched off; saved and loaded in PEFT's format (both ways);
- QLoRA: a base held in 4-bit NF4 (double quantisation, bitsandbytes' layout), loaded layer by layer;
- models from a Hugging Face folder or id, a GGUF file, or a short name (SmolLM2);
- data: chat-template formatting with assistant-only loss masks, packing;
- training from one YAML run file: SFT and GRPO (reward functions), checkpoints and exact resume;
- evaluation (generation metrics), and diagnosis: config checks, dataset audit, loss-curve findings with advice,
  a starting-config recommender, a memory estimator; a run report (report.html);
- the `lorafit` command line for all of the above.
"""

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
