"""minift.quant: NF4 quantization (QLoRA), bitsandbytes-exact, in plain PyTorch.

    q = quantize_nf4(weight, blocksize=64, double_quant=True)    # NF4Tensor: packed codes + block scales
    w = q.dequantize()                                           # back to weight's dtype
    report = quantize_model(model)                               # nn.Linear -> NF4Linear in place (not lm_head)
    print(report)                                                # which layers, bytes per parameter
    plan = prepare_qlora(model, {"r": 8})                        # NF4 base + LoRA adapters ([method] "qlora")
    merge_qlora(model, torch.bfloat16)                           # dense nn.Linear: dequant(W) + scaling * B A

nf4.py holds the format (codes, blockwise absmax, double quantization, packing); linear.py the frozen
NF4Linear layer with bitsandbytes' Linear4bit state-dict layout, and quantize_model; qlora.py LoRA on an
NF4 base, merging into 16/32 bits, and export as a Hugging Face directory.
"""

from minift.quant.linear import NF4Linear, QuantizationReport, quantize_model
from minift.quant.nf4 import (
    DYNAMIC_MAP,
    NF4_CODE,
    NF4Tensor,
    build_dynamic_map,
    build_nf4_code,
    dequantize,
    nf4_nbytes,
    quantize_nf4,
)
from minift.quant.qlora import export_merged, merge_qlora, merge_qlora_into_nf4, prepare_qlora

__all__ = [
    "DYNAMIC_MAP",
    "NF4_CODE",
    "NF4Linear",
    "NF4Tensor",
    "QuantizationReport",
    "build_dynamic_map",
    "build_nf4_code",
    "dequantize",
    "export_merged",
    "merge_qlora",
    "merge_qlora_into_nf4",
    "nf4_nbytes",
    "prepare_qlora",
    "quantize_model",
    "quantize_nf4",
]
