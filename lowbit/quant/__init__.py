"""Low-bit weight quantization for QAT (issue 5): formats + STE fake quantization, clipping search, packed export."""
from lowbit.quant.fake_quant import FORMATS, GROUP_SIZES, QuantFormat, dequantize, fake_quantize, make_format, quantize
from lowbit.quant.linear import FakeQuantLinear, attach_fake_quant, fake_quant_layers

__all__ = ["FORMATS", "GROUP_SIZES", "QuantFormat", "dequantize", "fake_quantize", "make_format", "quantize",
           "FakeQuantLinear", "attach_fake_quant", "fake_quant_layers"]
