"""4-bit NF4 quantisation (QLoRA): the code book and block quantiser, a frozen 4-bit linear layer, LoftQ factors."""

from lorafit.quant.linear4bit import Linear4bit, nf4_from_state_dict, nf4_state_dict
from lorafit.quant.loftq import LoftQError, loftq_error, loftq_factors
from lorafit.quant.nf4 import (
    NF4_CODE,
    QUANT_SCHEMES,
    NF4Tensor,
    QuantDtypeError,
    QuantizationError,
    bits_per_parameter,
    block_absmax,
    check_scheme,
    dequantize_nf4,
    dynamic_map,
    nf4_code,
    quantize_nf4,
    state_bits,
)

__all__ = [
    "NF4_CODE",
    "QUANT_SCHEMES",
    "Linear4bit",
    "LoftQError",
    "NF4Tensor",
    "QuantDtypeError",
    "QuantizationError",
    "bits_per_parameter",
    "block_absmax",
    "check_scheme",
    "dequantize_nf4",
    "dynamic_map",
    "loftq_error",
    "loftq_factors",
    "nf4_code",
    "nf4_from_state_dict",
    "nf4_state_dict",
    "quantize_nf4",
    "state_bits",
]
