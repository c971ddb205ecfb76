"""The non-LoRA fine-tuning strategies as `[method]` entries of a run config (see minift/train/methods.py).

Lesson
------
Each strategy answers the trainer's two questions (which weights train, what a checkpoint keeps) by calling
the module that implements it; this file only reads the TOML options and returns a MethodPlan.

    [method] name    implemented in        trains (in the backbone)                checkpoint / export
    --------------   -------------------   -------------------------------------   ----------------------------
    "adapters"       peft/adapters.py      bottleneck adapters (+ norms)           adapters / adapter files
    "prompt_tuning"  peft/prompt_tuning.py the soft prompt                         soft_prompt / prompt file
    "partial"        peft/freezing.py      blocks k.., final norm, lm_head         those / Hugging Face dir
    "output_only"    peft/freezing.py      lm_head (untied, or the shared matrix)  lm_head / Hugging Face dir
    "features"       peft/freezing.py      nothing: only the task head learns,     head only / Hugging Face dir
                                           on deterministic (dropout-free) features

("full" is minift/train/methods.py's own; the end of that file registers these names.) Options, with defaults:

    [method]                          [method]                     [method]
    name = "adapters"                 name = "prompt_tuning"       name = "partial"
    bottleneck = 64                   n_tokens = 20                frozen_blocks = 4      # required
    placement = "houlsby"             init = "vocab"               freeze_embeddings = true
    activation = "gelu"               init_token_ids = [..]        # with init = "text"
    train_norms = true                                             [method]
    init_std = 0.01                                                name = "output_only"
                                                                   tied = "untie"         # or "shared"

`features` trains the task head the trainer adds over a frozen backbone, recomputing the features each
step; for the cache-once version (logistic regression / MLP on stored features) use
minift.peft.features.FeatureClassifier directly.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from minift.train.methods import MethodPlan, export_full, reject_unknown_options
from minift.peft.bottleneck import AdapterConfig, add_adapters, save_adapters
from minift.peft.freezing import TrainableReport, freeze_all, freeze_bottom, train_output_only
from minift.peft.prompt_tuning import add_prompt_tuning, save_prompt


def _plan(report: TrainableReport, description: str, export) -> MethodPlan:
    return MethodPlan(checkpoint_names=list(report.names), export=export, description=f"{description}; {report}")


def export_adapters(model: nn.Module, tokenizer, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (load with minift.peft.bottleneck.load_adapters)."""
    save_adapters(model, directory)


def export_prompt(model: nn.Module, tokenizer, directory: Path) -> None:
    """soft_prompt.safetensors (load with minift.peft.prompt_tuning.load_prompt)."""
    save_prompt(model, directory)


def prepare_adapters(model: nn.Module, options: dict) -> MethodPlan:
    """Houlsby bottleneck adapters in every block; the base model frozen."""
    known = ("bottleneck", "placement", "activation", "train_norms", "init_std")
    reject_unknown_options("adapters", options, known)
    try:
        config = AdapterConfig(**options)
    except ValueError as e:
        raise ValueError(f"[method] 'adapters': {e}") from None
    report = add_adapters(model, config)
    return _plan(report, f"bottleneck adapters m={config.bottleneck} ({config.placement})", export_adapters)


def prepare_prompt_tuning(model: nn.Module, options: dict) -> MethodPlan:
    """A soft prompt of n_tokens virtual tokens; every model weight frozen."""
    reject_unknown_options("prompt_tuning", options, ("n_tokens", "init", "init_token_ids"))
    n_tokens, init = options.get("n_tokens", 20), options.get("init", "vocab")
    token_ids = options.get("init_token_ids")
    if init == "text" and not (isinstance(token_ids, list) and token_ids
                               and all(isinstance(i, int) and not isinstance(i, bool) for i in token_ids)):
        raise ValueError("[method] 'prompt_tuning': init = \"text\" needs init_token_ids = [id, ...] (the token ids "
                         "of the task description, e.g. from tokenizer.encode(...))")
    if token_ids is not None and init != "text":
        raise ValueError("[method] 'prompt_tuning': init_token_ids is only used with init = \"text\"")
    try:
        report = add_prompt_tuning(model, n_tokens, init=init, token_ids=token_ids)
    except ValueError as e:
        raise ValueError(f"[method] 'prompt_tuning': {e}") from None
    return _plan(report, f"prompt tuning, {n_tokens} virtual tokens ({init} init)", export_prompt)


def prepare_partial(model: nn.Module, options: dict) -> MethodPlan:
    """Freeze the embeddings and the first `frozen_blocks` blocks; the rest trains."""
    reject_unknown_options("partial", options, ("frozen_blocks", "freeze_embeddings"))
    if "frozen_blocks" not in options:
        raise ValueError(f"[method] 'partial' needs frozen_blocks = k (0..{len(model.blocks)}): how many blocks "
                         f"from the bottom stay frozen")
    freeze_embeddings = options.get("freeze_embeddings", True)
    if not isinstance(freeze_embeddings, bool):
        raise ValueError(f"[method] 'partial': freeze_embeddings must be true or false, got {freeze_embeddings!r}")
    try:
        report = freeze_bottom(model, options["frozen_blocks"], freeze_embeddings)
    except ValueError as e:
        raise ValueError(f"[method] 'partial': {e}") from None
    frozen = "embeddings + " if freeze_embeddings else ""
    return _plan(report, f"partial fine-tuning, frozen: {frozen}{options['frozen_blocks']} blocks", export_full)


def prepare_output_only(model: nn.Module, options: dict) -> MethodPlan:
    """Only lm_head trains (tied = "untie" gives it its own copy of the embedding matrix first)."""
    reject_unknown_options("output_only", options, ("tied",))
    if getattr(model, "lm_head", None) is None:
        raise ValueError("[method] 'output_only': this model has no lm_head (an encoder); its output layer is the "
                         "task head, so use name = \"features\" to train only the head")
    try:
        report = train_output_only(model, options.get("tied", "untie"))
    except ValueError as e:
        raise ValueError(f"[method] 'output_only': {e}") from None
    return _plan(report, f"output layer only (tied = {options.get('tied', 'untie')})", export_full)


def prepare_features(model: nn.Module, options: dict) -> MethodPlan:
    """Feature-based: the whole backbone frozen, dropout off (features are fixed); only the task head trains."""
    reject_unknown_options("features", options)
    report = freeze_all(model)
    model.config.dropout = 0.0  # attention dropout reads the config
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return _plan(report, "feature-based: frozen backbone, only the task head trains", export_full)


STRATEGIES = {
    "adapters": prepare_adapters,
    "prompt_tuning": prepare_prompt_tuning,
    "partial": prepare_partial,
    "output_only": prepare_output_only,
    "features": prepare_features,
}
