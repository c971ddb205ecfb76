"""Fine-tuning methods: which weights train, and which tensors a checkpoint must keep.

Lesson
------
Full fine-tuning, LoRA, QLoRA, bottleneck adapters and prompt tuning differ in only two decisions:

    1. prepare the model   full: every weight trains
                           lora: swap target Linear layers for LoRALinear, freeze the rest
                           qlora: quantize the frozen base to NF4, then add LoRA
    2. what to save        full: every weight            (a checkpoint is as big as the model)
                           lora: only lora_A / lora_B    (a checkpoint of a few MB)

Everything else — the loop, the optimizer, the schedule, resume — is the same, so a method is one small
function registered by name:

    def prepare_full(model, options) -> MethodPlan: ...
    METHODS["full"] = prepare_full               # the trainer looks up [method] name = "full"

`model` is the backbone (a minift Transformer); a task head (classifier, MLM head) is added by the trainer,
always trains, and is always checkpointed. `options` holds the other keys of the config's [method] table;
a method must reject keys it does not know. The returned `MethodPlan` lists the backbone parameters a
checkpoint must contain and, optionally, how to export the result (full: a Hugging Face directory; LoRA:
a PEFT adapter directory).

To add a method, write `prepare_<name>(model, options) -> MethodPlan` below (importing its package inside
the function keeps `import minift.train.methods` light) and add it to `METHODS`; code outside minift can call
`register_method("<name>", prepare_<name>)` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn


@dataclass
class MethodPlan:
    """What a method decided about a prepared model."""

    checkpoint_names: list[str]  # backbone parameter names a checkpoint holds (those the method may train)
    export: Callable[[nn.Module, object, Path], None] | None = None  # (backbone, tokenizer, directory) -> files
    description: str = ""  # one line for the log, e.g. "LoRA r=8 on q_proj, v_proj"


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently require a gradient (tied weights listed once)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def reject_unknown_options(method: str, options: dict, known: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = f"its options are {', '.join(known)}" if known else "it takes no options"
        raise ValueError(f"[method] {method!r}: unknown option(s) {', '.join(unknown)}; {allowed}")


def export_full(model: nn.Module, tokenizer, directory: Path) -> None:
    """A Hugging Face directory (config.json, model.safetensors, tokenizer) that transformers loads."""
    from minift.io import save

    save(model, tokenizer, directory)


def prepare_full(model: nn.Module, options: dict) -> MethodPlan:
    """Full fine-tuning: every weight of the backbone trains and is checkpointed."""
    reject_unknown_options("full", options)
    for p in model.parameters():
        p.requires_grad_(True)
    return MethodPlan(checkpoint_names=trainable_names(model), export=export_full,
                      description=f"full fine-tuning, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                                  f"trainable parameters")


METHODS: dict[str, Callable[[nn.Module, dict], MethodPlan]] = {"full": prepare_full}


def register_method(name: str, prepare: Callable[[nn.Module, dict], MethodPlan]) -> None:
    """Make `[method] name = "<name>"` call `prepare(model, options)`."""
    METHODS[name] = prepare


def prepare_method(name: str, model: nn.Module, options: dict) -> MethodPlan:
    """Look up a method by name and apply it to the backbone."""
    if name not in METHODS:
        raise ValueError(f"[method] name = {name!r} is not a known method; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](model, dict(options))


# ----------------------------------------------------------------------------------------------------
# Strategies from minift/peft/strategies.py (bottleneck adapters, prompt tuning, partial, output-only and
# feature-based fine-tuning). Imported only when used, which keeps `import minift.train.methods` light.
# ----------------------------------------------------------------------------------------------------


def _strategy(name: str) -> Callable[[nn.Module, dict], MethodPlan]:
    def prepare(model: nn.Module, options: dict) -> MethodPlan:
        from minift.peft.strategies import STRATEGIES

        return STRATEGIES[name](model, options)

    prepare.__name__ = f"prepare_{name}"
    return prepare


for _name in ("adapters", "prompt_tuning", "partial", "output_only", "features"):
    register_method(_name, _strategy(_name))


# ----------------------------------------------------------------------------------------------------
# LoRA (minift/peft) and QLoRA (minift/peft/qlora.py): [method] name = "lora" | "qlora", with the keys
# r, alpha, dropout, targets, use_rslora, use_dora, init (and for QLoRA blocksize, double_quant, ...).
# ----------------------------------------------------------------------------------------------------


def prepare_lora(model: nn.Module, options: dict) -> MethodPlan:
    """Swap the target Linear layers for LoRALinear; checkpoints and the export hold the adapter only."""
    from minift.peft import add_lora, save_adapter
    from minift.peft.qlora import LORA_OPTIONS, lora_config_from_options

    reject_unknown_options("lora", options, LORA_OPTIONS)
    config = lora_config_from_options(options)
    count = add_lora(model, config)

    def export(backbone: nn.Module, tokenizer, directory: Path) -> None:
        save_adapter(backbone, directory)  # PEFT format: adapter_config.json + adapter_model.safetensors

    return MethodPlan(checkpoint_names=trainable_names(model), export=export,
                      description=f"LoRA r={config.r} alpha={config.alpha:g}; {count.trainable:,} trainable "
                                  f"of {count.total:,} parameters")


def prepare_qlora(model: nn.Module, options: dict) -> MethodPlan:
    from minift.peft.qlora import prepare_qlora as prepare

    return prepare(model, options)


register_method("lora", prepare_lora)
register_method("qlora", prepare_qlora)
