"""minift.peft: parameter-efficient fine-tuning.

    lora.py     LoRALinear: the LoRA / rsLoRA / DoRA layer, merge and unmerge
    inject.py   LoRAConfig, add_lora (targets, freezing, parameter count), set_adapter, disable_adapters, merge_lora
    files.py    save_adapter / load_adapter in PEFT's file format, save_merged (a plain Hugging Face model)

    from minift.peft import LoRAConfig, add_lora, save_adapter
    print(add_lora(model, LoRAConfig(r=8, alpha=16, targets="all-linear")))   # trainable params: ...
    ... train ...
    save_adapter(model, "my_adapter")          # peft.PeftModel.from_pretrained(hf_model, "my_adapter") reads it
"""

from minift.peft.files import load_adapter, save_adapter, save_merged
from minift.peft.inject import (
    LoRAConfig,
    ParameterCount,
    adapter_names,
    add_lora,
    count_parameters,
    disable_adapters,
    find_targets,
    lora_layers,
    merge_lora,
    set_adapter,
)
from minift.peft.lora import LoRALinear

__all__ = [
    "LoRAConfig", "LoRALinear", "ParameterCount", "add_lora", "adapter_names", "count_parameters",
    "disable_adapters", "find_targets", "load_adapter", "lora_layers", "merge_lora", "save_adapter",
    "save_merged", "set_adapter",
]
