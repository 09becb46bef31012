"""Quantized model weights for the Q-GaLore recipe (INT8 weights, stochastic rounding)."""

from __future__ import annotations

from .int8 import (
    Int8Linear,
    dequantize_int8_weights,
    dequantize_rows,
    int8_add_,
    int8_owner,
    int8_scale_,
    int8_weight_bytes,
    quantize_rows,
)

__all__ = [
    "Int8Linear",
    "dequantize_int8_weights",
    "dequantize_rows",
    "int8_add_",
    "int8_owner",
    "int8_scale_",
    "int8_weight_bytes",
    "quantize_rows",
]
