"""minift.quant: NF4 quantization (QLoRA), bitsandbytes-exact, in plain PyTorch.

    q = quantize_nf4(weight, blocksize=64, double_quant=True)    # NF4Tensor: packed codes + block scales
    w = q.dequantize()                                           # back to weight's dtype
    report = quantize_model(model)                               # nn.Linear -> NF4Linear in place (not lm_head)
    print(report)                                                # which layers, bytes per parameter

nf4.py holds the format (blockwise absmax, double quantization, packing; its two code tables sit one layer
down in kernels/nf4_codes.py, where the kernels' references read them too); linear.py the frozen
NF4Linear layer with bitsandbytes' Linear4bit state-dict layout, and quantize_model; huge_pages.py the
fresh-output allocation the CPU dequantize writes into (2 MiB pages: fewer page faults). QLoRA (LoRA on an NF4
base, merging back into 16/32 bits) is an adapter technique and lives in minift/peft/qlora.py; the 4-bit
directory format lives with the other checkpoint formats in minift/io/nf4dir.py.
"""

from minift.kernels.nf4_codes import DYNAMIC_MAP, NF4_CODE, build_dynamic_map, build_nf4_code
from minift.quant.linear import NF4Linear, QuantizationReport, quantize_model
from minift.quant.nf4 import NF4Tensor, dequantize, nf4_nbytes, quantize_nf4

__all__ = [
    "DYNAMIC_MAP",
    "NF4_CODE",
    "NF4Linear",
    "NF4Tensor",
    "QuantizationReport",
    "build_dynamic_map",
    "build_nf4_code",
    "dequantize",
    "nf4_nbytes",
    "quantize_model",
    "quantize_nf4",
]
