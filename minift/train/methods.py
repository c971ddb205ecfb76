"""The method registry: `[method] name = "..."` -> a typed options dataclass -> which weights train.

Lesson
------
Full fine-tuning, LoRA, QLoRA, (IA)^3, bottleneck adapters, prompt tuning and the freezing strategies differ
in only two decisions; everything else — the loop, the optimizer, the schedule, resume — is shared:

    1. prepare the model     full: every weight trains
                             lora: swap target Linear layers for LoRALinear, freeze the rest
                             qlora: quantize the frozen base to NF4, then add LoRA
    2. what to keep          full: every weight            (a checkpoint as big as the model)
                             lora: only lora_A / lora_B    (a checkpoint of a few MB; a PEFT adapter out)

So a method is one registry entry: a name, a dataclass of options (its fields are the keys of the
[method] table, with their types and defaults), and a `prepare(model, options) -> MethodPlan` function:

    [method]                    METHODS["lora"] = Method("lora", LoRAConfig, prepare_lora, "...")
    name = "lora"        --->   options = parse_method_options("lora", {"r": 16, ...})   # typed, checked
    r = 16                      plan = prepare_lora(backbone, options)                    # model changed in place

Options are read like every other table of a run config (minift/train/fields.py): an unknown key is an
error with a did-you-mean suggestion, `--set method.r=16` is converted to the declared type, and the
options' own checks (LoRAConfig.__post_init__, ...) run when the config is read, before any model loads.
Each method keeps its own defaults: plain LoRA adapts q_proj and v_proj (Hu et al. 2021 §7.1; on Phi-3, which
fuses q, k, v, the qkv_proj holding them), QLoRA every linear layer (Dettmers et al. 2023 §4).

The techniques themselves live in minift/peft and minift/quant and never import the trainer; this file
is the only place that knows both. `model` is the backbone (a minift Transformer); the trainer adds the
task head, which always trains and is always checkpointed. To add a method, write its options dataclass
and prepare function and call `register_method(name, Options, prepare, summary)`.

    method           options class          trains (in the backbone)              export (run_dir/final)
    --------------   --------------------   -----------------------------------   --------------------------
    full             FullOptions            everything                            Hugging Face directory
    lora             LoRAConfig             LoRA A, B on the targets              PEFT adapter
    qlora            QLoRAOptions           LoRA A, B over an NF4 base            merged HF directory
    ia3              IA3Config              (IA)^3 vectors on k, v, FFN input     PEFT adapter
    adapters         AdapterConfig          bottleneck adapters (+ norms)         minift adapter files
    prompt_tuning    PromptTuningOptions    the soft prompt                       minift soft-prompt file
    partial          PartialOptions         blocks k.., final norm, lm_head       Hugging Face directory
    output_only      OutputOnlyOptions      lm_head                               Hugging Face directory
    features         FeaturesOptions        nothing: only the task head           Hugging Face directory
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from minift.dtypes import parse_dtype
from minift.io import save
from minift.peft import IA3Config, LoRAConfig, add_ia3, add_lora, save_adapter
from minift.peft.bottleneck import AdapterConfig, add_adapters
from minift.peft.freezing import freeze_all, freeze_bottom, train_output_only
from minift.peft.prompt_tuning import add_prompt_tuning
from minift.peft.qlora import dense_dtype, export_merged
from minift.quant import quantize_model
from minift.quant.nf4 import check_blocksize
from minift.train.fields import suggest, table_to_dataclass


@dataclass
class MethodPlan:
    """What a method decided about a prepared model."""

    checkpoint_names: list[str]  # backbone parameter names a checkpoint holds (those the method may train)
    export: Callable[[nn.Module, object, Path], None] | None = None  # (backbone, tokenizer, directory) -> files
    description: str = ""  # one line for the log, e.g. "LoRA r=8 on q_proj, v_proj"


@dataclass
class Method:
    """One registry entry."""

    name: str
    options: type  # a dataclass: its fields are the keys of the [method] table
    prepare: Callable[[nn.Module, Any], MethodPlan]  # (backbone, options instance) -> plan; changes the backbone
    summary: str  # one line for `minift finetune --help` and the docs


METHODS: dict[str, Method] = {}


def register_method(name: str, options: type, prepare: Callable[[nn.Module, Any], MethodPlan], summary: str) -> None:
    """Make `[method] name = "<name>"` read `options` and call `prepare(model, options)`."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"register_method({name!r}): options must be a dataclass, got {options!r}")
    METHODS[name] = Method(name, options, prepare, summary)


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str, where: str = "[method]") -> Method:
    if name not in METHODS:
        raise ValueError(f"{where}: method.name = {name!r} is not a known method{suggest(name, METHODS)}; "
                         f"known: {', '.join(METHODS)}")
    return METHODS[name]


def parse_method_options(name: str, table: dict, where: str = "[method]"):
    """The typed options of method `name` from its table (every key but `name`); errors name method.<key>."""
    method = get_method(name, where)
    try:
        return table_to_dataclass(method.options, dict(table), "method", where)
    except (TypeError, ValueError) as error:  # the options' own __post_init__ checks
        message = str(error)
        raise ValueError(message if message.startswith(where) else f"{where}: method {name!r}: {message}") from None


def prepare_method(name: str, model: nn.Module, options: dict | Any) -> MethodPlan:
    """Apply method `name` to the backbone; `options` is its table (a dict) or an options instance."""
    method = get_method(name)
    if isinstance(options, dict):
        options = parse_method_options(name, options)
    elif not isinstance(options, method.options):
        raise TypeError(f"method {name!r} takes {method.options.__name__} options, got {type(options).__name__}")
    return method.prepare(model, options)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently require a gradient (tied weights listed once)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def export_full(model: nn.Module, tokenizer, directory: Path) -> None:
    """A Hugging Face directory (config.json, model.safetensors, tokenizer) that transformers loads."""
    save(model, tokenizer, directory)


def export_adapter(model: nn.Module, tokenizer, directory: Path) -> None:
    """The adapter alone, in its file format (PEFT's for LoRA and (IA)^3), via the one adapter interface."""
    save_adapter(model, directory)


def _plan(model: nn.Module, description: str, export) -> MethodPlan:
    return MethodPlan(checkpoint_names=trainable_names(model), export=export, description=description)


def _count(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters"


# ----------------------------------------------------------------------------------------------------
# full
# ----------------------------------------------------------------------------------------------------


@dataclass
class FullOptions:
    """[method] name = "full" takes no options."""


def prepare_full(model: nn.Module, options: FullOptions) -> MethodPlan:
    for p in model.parameters():
        p.requires_grad_(True)
    return _plan(model, f"full fine-tuning, {_count(model)}", export_full)


# ----------------------------------------------------------------------------------------------------
# LoRA and QLoRA (minift/peft/inject.py, minift/peft/qlora.py, minift/quant/linear.py)
# ----------------------------------------------------------------------------------------------------


def prepare_lora(model: nn.Module, options: LoRAConfig) -> MethodPlan:
    options = fused_default_targets(model, options)
    add_lora(model, options)
    return _plan(model, f"LoRA r={options.r} alpha={options.alpha:g} on {_targets(options.targets)}; {_count(model)}",
                 export_adapter)


def fused_default_targets(model: nn.Module, options: LoRAConfig) -> LoRAConfig:
    """LoRA's default targets, q_proj and v_proj, on a model that keeps q, k and v in one qkv_proj (Phi-3):
    that fused layer, the only one holding q and v (its adapter then also reaches k). Other targets as given."""
    if options.targets == ["q_proj", "v_proj"] and getattr(getattr(model, "config", None), "fused_qkv", False):
        return dataclasses.replace(options, targets=["qkv_proj"])
    return options


def _targets(targets) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


@dataclass
class QLoRAOptions(LoRAConfig):
    """LoRA's options with QLoRA's default targets (every linear layer, §4 of the paper), plus the NF4 base."""

    targets: list[str] | str = "all-linear"
    blocksize: int = 64  # NF4 block size (elements per absmax): 32 .. 4096, a power of two
    double_quant: bool = True  # quantize the block scales too (0.127 bits/weight saved)
    compute_dtype: str | None = None  # dtype of the base matmul: float32 | bfloat16 | float16; None = activations'
    export_dtype: str | None = None  # dtype of the merged export; None = the model's dense dtype

    def __post_init__(self) -> None:
        super().__post_init__()
        check_blocksize(self.blocksize)
        for option in ("compute_dtype", "export_dtype"):
            _optional_dtype(getattr(self, option), option)


def _optional_dtype(name: str | None, option: str):
    return None if name is None else parse_dtype(name, f"method.{option}")


def prepare_qlora(model: nn.Module, options: QLoRAOptions) -> MethodPlan:
    """Quantize the backbone's linear layers to NF4, add LoRA; the export is a merged Hugging Face directory."""
    export_dtype = _optional_dtype(options.export_dtype, "export_dtype") or dense_dtype(model)
    report = quantize_model(model, blocksize=options.blocksize, double_quant=options.double_quant,
                            compute_dtype=_optional_dtype(options.compute_dtype, "compute_dtype"))
    if not report.quantized:
        raise ValueError("[method] 'qlora': the model has no nn.Linear layer to quantize")
    add_lora(model, options)  # a QLoRAOptions is a LoRAConfig

    def export(backbone: nn.Module, tokenizer, directory: Path) -> None:
        export_merged(backbone, tokenizer, directory, export_dtype)

    description = (f"QLoRA: {len(report.quantized)} linear layers in NF4 "
                   f"({8 * report.bytes_per_param_quantized:.3f} bits/weight), LoRA r={options.r} "
                   f"alpha={options.alpha:g} on {_targets(options.targets)}; {_count(model)}")
    return MethodPlan(checkpoint_names=trainable_names(model), export=export, description=description)


# ----------------------------------------------------------------------------------------------------
# (IA)^3 (minift/peft/ia3.py)
# ----------------------------------------------------------------------------------------------------


def prepare_ia3(model: nn.Module, options: IA3Config) -> MethodPlan:
    add_ia3(model, options)
    return _plan(model, f"(IA)^3 on {_targets(options.targets)} (feed-forward: "
                        f"{_targets(options.feedforward_targets)}); {_count(model)}", export_adapter)


# ----------------------------------------------------------------------------------------------------
# Bottleneck adapters and prompt tuning (minift/peft/bottleneck.py, minift/peft/prompt_tuning.py)
# ----------------------------------------------------------------------------------------------------


def prepare_adapters(model: nn.Module, options: AdapterConfig) -> MethodPlan:
    """Houlsby bottleneck adapters in every block; the base model frozen."""
    report = add_adapters(model, options)
    return _plan(model, f"bottleneck adapters m={options.bottleneck} ({options.placement}); {report}", export_adapter)


@dataclass
class PromptTuningOptions:
    """[method] name = "prompt_tuning" (Lester et al. 2021): a soft prompt of n_tokens virtual tokens."""

    n_tokens: int = 20  # virtual tokens in front of every input
    init: str = "vocab"  # vocab (embeddings of common tokens) | text (init_token_ids) | random
    init_token_ids: list[int] | None = None  # with init = "text": the token ids of a task description

    def __post_init__(self) -> None:
        if self.init == "text" and not self.init_token_ids:
            raise ValueError("init = \"text\" needs init_token_ids = [id, ...] (the token ids of the task "
                             "description, e.g. from tokenizer.encode(...))")
        if self.init_token_ids is not None and self.init != "text":
            raise ValueError("init_token_ids is only used with init = \"text\"")


def prepare_prompt_tuning(model: nn.Module, options: PromptTuningOptions) -> MethodPlan:
    try:
        report = add_prompt_tuning(model, options.n_tokens, init=options.init, token_ids=options.init_token_ids)
    except ValueError as e:
        raise ValueError(f"[method] 'prompt_tuning': {e}") from None
    return _plan(model, f"prompt tuning, {options.n_tokens} virtual tokens ({options.init} init); {report}",
                 export_adapter)


# ----------------------------------------------------------------------------------------------------
# Freezing strategies (minift/peft/freezing.py)
# ----------------------------------------------------------------------------------------------------


@dataclass
class PartialOptions:
    """[method] name = "partial": freeze the embeddings and the first `frozen_blocks` blocks."""

    frozen_blocks: int | None = None  # required: how many blocks from the bottom stay frozen
    freeze_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.frozen_blocks is None:
            raise ValueError("method 'partial' needs frozen_blocks = k: how many blocks from the bottom stay frozen")
        if self.frozen_blocks < 0:
            raise ValueError(f"frozen_blocks must be >= 0, got {self.frozen_blocks}")


def prepare_partial(model: nn.Module, options: PartialOptions) -> MethodPlan:
    try:
        report = freeze_bottom(model, options.frozen_blocks, options.freeze_embeddings)
    except ValueError as e:
        raise ValueError(f"[method] 'partial': {e}") from None
    frozen = "embeddings + " if options.freeze_embeddings else ""
    return _plan(model, f"partial fine-tuning, frozen: {frozen}{options.frozen_blocks} blocks; {report}", export_full)


@dataclass
class OutputOnlyOptions:
    """[method] name = "output_only": only lm_head trains."""

    tied: str = "untie"  # untie: lm_head gets its own copy of a tied embedding | shared: train the shared matrix

    def __post_init__(self) -> None:
        if self.tied not in ("untie", "shared"):
            raise ValueError(f"tied = {self.tied!r}; expected untie or shared")


def prepare_output_only(model: nn.Module, options: OutputOnlyOptions) -> MethodPlan:
    if getattr(model, "lm_head", None) is None:
        raise ValueError("[method] 'output_only': this model has no lm_head (an encoder); its output layer is the "
                         "task head, so use name = \"features\" to train only the head")
    report = train_output_only(model, options.tied)
    return _plan(model, f"output layer only (tied = {options.tied}); {report}", export_full)


@dataclass
class FeaturesOptions:
    """[method] name = "features" takes no options: frozen, dropout-free backbone; only the task head trains."""


def prepare_features(model: nn.Module, options: FeaturesOptions) -> MethodPlan:
    report = freeze_all(model)
    model.config.dropout = 0.0  # the features are fixed: attention dropout reads the config
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return _plan(model, f"feature-based: frozen backbone, only the task head trains; {report}", export_full)


# ----------------------------------------------------------------------------------------------------
# The registry: one list of names, in the order the docs show them
# ----------------------------------------------------------------------------------------------------


def _register_builtin() -> None:
    register_method("full", FullOptions, prepare_full, "every weight trains")
    register_method("lora", LoRAConfig, prepare_lora, "low-rank updates W + (alpha/r) B A (Hu et al. 2021)")
    register_method("qlora", QLoRAOptions, prepare_qlora, "LoRA over an NF4-quantized base (Dettmers et al. 2023)")
    register_method("ia3", IA3Config, prepare_ia3, "learned rescaling of keys, values, FFN activations (Liu et al. 2022)")
    register_method("adapters", AdapterConfig, prepare_adapters, "bottleneck adapters (Houlsby et al. 2019)")
    register_method("prompt_tuning", PromptTuningOptions, prepare_prompt_tuning, "a soft prompt (Lester et al. 2021)")
    register_method("partial", PartialOptions, prepare_partial, "freeze the bottom k blocks")
    register_method("output_only", OutputOnlyOptions, prepare_output_only, "train only the output layer")
    register_method("features", FeaturesOptions, prepare_features, "frozen features + the task head")


_register_builtin()
