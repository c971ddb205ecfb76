"""minift: a from-scratch fine-tuning framework you can read top to bottom.

    model, tokenizer = minift.load("smollm2-135m")        # or a .gguf file, or a Hugging Face directory
    ids = torch.tensor([tokenizer.encode("Hello")])
    out = model.generate(ids, max_new_tokens=20)
    minift.save(model, tokenizer, "out_dir")              # transformers loads it with identical outputs

Importing minift never imports a reference library (transformers, peft, bitsandbytes, gguf), and never
probes the device: everything runs on a CPU, and GPU kernels are launched only when tensors live on one.
"""

from minift.config import ModelConfig
from minift.io import load, save
from minift.model import Transformer

__all__ = ["ModelConfig", "Transformer", "load", "save"]
__version__ = "0.1.0"
