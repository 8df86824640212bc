"""minilora.quant: blockwise quantization, bit for bit with bitsandbytes 0.50.x on CPU.

    quantize_4bit / dequantize_4bit      NF4, FP4, Int4 in blocks of 32..4096, optional double quantization
    quantize_blockwise / ...             8-bit dynamic map (the nested step of double quantization)
    int8_vectorwise_quant / ...          LLM.int8's row-wise absmax int8 (plus tensor-wise and block-wise)
    create_normal_map, get_4bit_type ... the code tables
    QuantState                           absmax, shape, dtype, blocksize, code, quant_type, offset, state2, nested

Names and signatures follow `bitsandbytes.functional`; `minilora quantize-report` prints the error report.
"""
from minilora.quant.blockwise import dequantize_blockwise, quantize_blockwise, quantize_blockwise_lut
from minilora.quant.checks import ALLOWED_BLOCKSIZES
from minilora.quant.codebooks import (
                                      create_dynamic_map,
                                      create_fp8_map,
                                      create_normal_float_map,
                                      create_normal_map,
                                      get_4bit_type,
                                      linspace_f32,
)
from minilora.quant.fourbit import dequantize_4bit, dequantize_absmax, quantize_4bit
from minilora.quant.int8 import (
                                      int8_blockwise_dequant,
                                      int8_blockwise_quant,
                                      int8_tensorwise_dequant,
                                      int8_tensorwise_quant,
                                      int8_vectorwise_dequant,
                                      int8_vectorwise_quant,
                                      outlier_demo,
)
from minilora.quant.state import QuantState

__all__ = [
    "ALLOWED_BLOCKSIZES", "QuantState",
    "quantize_4bit", "dequantize_4bit", "dequantize_absmax",
    "quantize_blockwise", "dequantize_blockwise", "quantize_blockwise_lut",
    "create_normal_map", "create_normal_float_map", "create_fp8_map", "create_dynamic_map", "get_4bit_type",
    "linspace_f32",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_tensorwise_quant", "int8_tensorwise_dequant",
    "int8_blockwise_quant", "int8_blockwise_dequant", "outlier_demo",
]
