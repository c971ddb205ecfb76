"""Freezing strategies: full, partial (freeze the bottom k blocks) and output-layer-only fine-tuning.

Lesson
------
The oldest way to spend less on fine-tuning is to train fewer of the weights you already have. Every
strategy here only flips `requires_grad`; no layer is added or swapped (except when untying, below).

    strategy      trains                                    frozen
    -----------   ---------------------------------------   --------------------------------
    full          everything                                nothing
    partial(k)    blocks k..L-1, final norm, lm_head        embeddings + blocks 0..k-1
    output_only   lm_head (the output layer)                everything else
    frozen        nothing in the backbone (a task head      the whole backbone
                  on top trains: feature-based transfer)

Why partial works: lower layers hold general features, upper layers task-specific ones (Yosinski et al.
2014; Howard & Ruder 2018 §3.2), so the bottom of a pretrained network can stay as it is. Freezing the
embeddings also spares the largest matrix of a small model (49,152 x 576 = 28M of SmolLM2's 135M).

Tied embeddings. SmolLM2 and GPT-2 use ONE matrix E (V x d) both to read tokens (x = E[token]) and to
write logits (logits = h E^T). "Output layer only" then has two possible meanings:

    tied = "untie"   (default) give lm_head its own copy of E and train only that copy; inputs are read
                     with the old, frozen E. Costs V x d new numbers; the saved model is untied
                     (config.tie_embeddings = False, so lm_head.weight is written to model.safetensors).
    tied = "shared"  train E itself: the output layer changes, and so do the input embeddings. Honest
                     about what moves: the report then lists "embed" among the trainable groups.

Likewise `partial` freezes the embeddings, and with tied weights that freezes lm_head too: the top blocks
and the final norm train, the output layer stays as pretrained.

Every function returns a `TrainableReport`: exactly which parameters train, as counts and as the smallest
list of module names that covers them ("blocks.2" when a whole block trains, "blocks.2.attn_adapter"
when only its adapter does), so a run's log says precisely what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

EMBEDDING_MODULES = ("embed", "pos_embed", "type_embed", "embed_norm")  # the bottom of a minift Transformer
TIED_CHOICES = ("untie", "shared")


@dataclass
class TrainableReport:
    """What trains in a model: counts, the trainable module groups, and every trainable parameter name."""

    trainable: int  # trainable numbers (each distinct Parameter counted once)
    total: int  # all numbers
    groups: list[str]  # the fewest module (or parameter) names covering exactly the trainable parameters
    names: list[str]  # every trainable parameter, as named by model.named_parameters()

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        shown = ", ".join(self.groups[:12]) + (f", ... ({len(self.groups)} groups)" if len(self.groups) > 12 else "")
        return (f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"
                f" in: {shown or 'nothing'}")


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def trainable_groups(model: nn.Module) -> list[str]:
    """The smallest set of module / parameter names whose parameters are exactly the trainable ones.

    Walk the module tree from the top: a module whose parameters all train is reported whole and not
    entered; a module with none is skipped; a mixed one is entered (its own trainable parameters, such as a
    norm's weight, are named one by one). The model itself is never reported whole.
    """
    groups: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if not params or not any(p.requires_grad for p in params):
            return
        if prefix and all(p.requires_grad for p in params):
            groups.append(prefix)
            return
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                groups.append(_join(prefix, name))
        for name, child in module.named_children():
            visit(_join(prefix, name), child)

    visit("", model)
    return groups


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count and name what trains now. Tied weights count once, under their first name (the embedding)."""
    distinct: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        distinct.setdefault(id(p), p)
    trainable = sum(p.numel() for p in distinct.values() if p.requires_grad)
    total = sum(p.numel() for p in distinct.values())
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return TrainableReport(trainable, total, trainable_groups(model), names)


# ----------------------------------------------------------------------------------------------------
# Flipping requires_grad
# ----------------------------------------------------------------------------------------------------


def set_trainable(modules, trainable: bool) -> None:
    """requires_grad = trainable for every parameter of every module in `modules` (None entries skipped)."""
    for module in modules:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(trainable)


def freeze_all(model: nn.Module) -> TrainableReport:
    """Nothing in `model` trains: feature-based transfer, where only a new head on top learns."""
    set_trainable([model], False)
    return trainable_report(model)


def train_full(model: nn.Module) -> TrainableReport:
    """Full fine-tuning: every parameter trains."""
    set_trainable([model], True)
    return trainable_report(model)


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The input side of a minift Transformer: token, position and token-type embeddings, BERT's embed_norm."""
    return [getattr(model, name) for name in EMBEDDING_MODULES if hasattr(model, name)]


def _require_transformer(model: nn.Module, what: str) -> None:
    if not hasattr(model, "embed") or not hasattr(model, "blocks"):
        raise ValueError(f"{what}: expected a minift Transformer (with `embed` and `blocks`), "
                         f"got {type(model).__name__}")


def freeze_bottom(model: nn.Module, frozen_blocks: int, freeze_embeddings: bool = True) -> TrainableReport:
    """Partial fine-tuning: freeze the embeddings and blocks 0..frozen_blocks-1; everything above trains.

    frozen_blocks = 0 freezes only the embeddings; frozen_blocks = n_layers leaves just the final norm and
    lm_head (an encoder without either then has nothing left: only a task head on top would train).
    """
    _require_transformer(model, "freeze_bottom")
    n_layers = len(model.blocks)
    if isinstance(frozen_blocks, bool) or not isinstance(frozen_blocks, int) or not 0 <= frozen_blocks <= n_layers:
        raise ValueError(f"partial fine-tuning: frozen_blocks must be an integer in 0..{n_layers} "
                         f"(the model has {n_layers} blocks), got {frozen_blocks!r}")
    set_trainable([model], True)
    set_trainable(list(model.blocks)[:frozen_blocks], False)
    if freeze_embeddings:
        set_trainable(embedding_modules(model), False)  # with tied weights this also freezes lm_head
    return trainable_report(model)


def is_tied(model: nn.Module) -> bool:
    """True when lm_head reads its weights from the token embedding (the same Parameter object)."""
    head = getattr(model, "lm_head", None)
    return head is not None and head.weight is model.embed.weight


def untie_output_layer(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix; returns True if the model was tied.

    The copy starts equal, so outputs do not change. config.tie_embeddings becomes False, so minift.save
    writes lm_head.weight and transformers loads an untied model with the same logits.
    """
    if not is_tied(model):
        return False
    model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    model.config.tie_embeddings = False
    return True


def train_output_only(model: nn.Module, tied: str = "untie") -> TrainableReport:
    """Only the output layer (lm_head) trains. See the module docstring for what `tied` means.

    A model without lm_head (an encoder) has nothing trainable left: its output layer is the task head
    (classifier, MLM head) the trainer adds, which always trains.
    """
    _require_transformer(model, "train_output_only")
    if tied not in TIED_CHOICES:
        raise ValueError(f"output-only fine-tuning: tied = {tied!r}; expected one of {', '.join(TIED_CHOICES)}")
    if tied == "untie":
        untie_output_layer(model)
    set_trainable([model], False)
    set_trainable([getattr(model, "lm_head", None)], True)  # "shared": this is also the embedding matrix
    return trainable_report(model)
