"""minift.peft: parameter-efficient fine-tuning. Every adapter implements minift/adapter_interface.py.

    lora.py           LoRALinear: the LoRA / rsLoRA / DoRA layer, merge and unmerge
    inject.py         LoRAConfig, add_lora (targets, freezing, parameter count), set_adapter, merge_lora
    ia3.py            (IA)^3: IA3Config, add_ia3, IA3Linear (learned vectors rescale keys, values, FFN activations)
    bottleneck.py     bottleneck adapters (Houlsby / Pfeiffer): AdapterConfig, add_adapters
    prompt_tuning.py  soft prompts (Lester et al.): add_prompt_tuning
    files.py          save_adapter / load_adapter for every kind (dispatch), LoRA's PEFT files, save_merged
    peft_format.py    PEFT's adapter directory (names, target_modules), shared by LoRA and (IA)^3
    qlora.py          LoRA over an NF4 base: merging back into 16/32 bits
    freezing.py       partial / output-only / frozen (the trainer's "features" method: only a task head trains)

    from minift.peft import LoRAConfig, add_lora, save_adapter
    print(add_lora(model, LoRAConfig(r=8, alpha=16, targets="all-linear")))   # trainable params: ...
    ... train ...
    save_adapter(model, "my_adapter")          # peft.PeftModel.from_pretrained(hf_model, "my_adapter") reads it
    load_adapter(base, "my_adapter")           # LoRA, IA3 (PEFT's files or ours), bottleneck, soft prompt
    with disabled_adapters(model): ...         # the base model, whatever the adapter
    merge_adapters(model)                      # LoRA and (IA)^3 folded into plain nn.Linear layers
"""

from minift.adapter_interface import (
    AdapterLayer,
    adapter_layers,
    adapter_parameter_names,
    disabled_adapters,
    has_adapters,
    merge_adapters,
)
from minift.peft.files import load_adapter, save_adapter, save_merged
from minift.peft.ia3 import IA3Config, IA3Linear, add_ia3
from minift.peft.inject import (
    LoRAConfig,
    ParameterCount,
    adapter_names,
    add_lora,
    count_parameters,
    find_targets,
    lora_layers,
    merge_lora,
    set_adapter,
)
from minift.peft.lora import LoRALinear

__all__ = [
    "AdapterLayer", "IA3Config", "IA3Linear", "LoRAConfig", "LoRALinear", "ParameterCount", "adapter_layers",
    "adapter_names", "adapter_parameter_names", "add_ia3", "add_lora", "count_parameters", "disabled_adapters",
    "find_targets", "has_adapters", "load_adapter", "lora_layers", "merge_adapters", "merge_lora", "save_adapter",
    "save_merged", "set_adapter",
]
