"""minift: a from-scratch fine-tuning framework you can read top to bottom.

    model, tokenizer = minift.load("smollm2-135m")        # or a .gguf file, or a Hugging Face directory
    ids = torch.tensor([tokenizer.encode("Hello")])
    out = model.generate(ids, max_new_tokens=20)
    minift.save(model, tokenizer, "out_dir")              # transformers loads it with identical outputs

Importing minift never imports a reference library (transformers, peft, bitsandbytes, gguf), and never
probes the device: everything runs on a CPU, and GPU kernels are launched only when tensors live on one.

Layers
------
The modules form layers, lowest first. A module imports only from its own layer or a lower one, and never
in a cycle; tests/test_layers.py reads every import (lazy ones too) and holds the same table.

    0  config, tokenizer, dtypes, adapter_interface, machine, svg_chart
                             the vocabulary: model settings, text <-> ids, dtype names, what any adapter
                             answers, the machine a result ran on, charts; nothing here imports minift
    1  model                 one Transformer for every supported family, KV cache, generate
    2  kernels (kernels/)    Triton kernels, each beside its pure-torch reference; the NF4 code tables
    3  quant                 the NF4 format (bitsandbytes-exact) and NF4Linear
    4  io, and this package  checkpoint formats: files, HF dirs, 4-bit dirs, GGUF (read and write), bundled
                             names; load/save
                             (library modules import minift.io, never `minift` itself)
    5  peft                  LoRA family, (IA)^3, bottleneck adapters, prompt tuning, QLoRA, PEFT files
    6  losses, fused_loss, data, datasets, schedules
                             what is learned from which records, and at which learning rate (fused_loss:
                             the LM loss chunk by chunk, never holding the tokens x vocabulary logits);
       align (align/)        the formulas of preference learning: reward model, DPO, PPO/GRPO arithmetic
    7  train                 the engine, in its own order: fields -> methods (the registry) -> tasks
                             -> preference_tasks -> rl_tasks -> run_config -> batches -> preference_data
                             -> rl_data -> checkpoint -> guards -> distributed -> compiled -> optimizer_in_backward
                             -> loop -> train/__init__
    8  icl, export, plan     techniques and tools built on the engine (plan: bytes per GPU of a run, on paper)
    9  demo                  the main job, a composition of the layers below
   10  cli, __main__         the `minift` command
"""

from minift.config import ModelConfig
from minift.io import load, save
from minift.model import Transformer

__all__ = ["ModelConfig", "Transformer", "load", "save"]
__version__ = "0.1.0"
