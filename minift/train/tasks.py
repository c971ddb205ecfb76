"""Tasks: what a fine-tuning run teaches — next tokens, masked tokens, or one label per text.

Lesson
------
The same backbone serves three tasks; only the head on top and the targets change:

    task            head on the hidden states (B, T, d)          targets                     counted per
    ------------    -----------------------------------------    ------------------------    -----------
    causal_lm       the model's own lm_head                      the next token (shifted)    token
    masked_lm       MLMHead: dense -> GELU -> LayerNorm ->       the original token at the   token
                    decoder tied to the input embeddings         15% masked positions
    classification  ClassificationHead: pool -> dropout ->       one class id per text       example
                    linear (mean pooling for encoders, the
                    last real token for decoders)

`TaskModel` wraps backbone + head and returns the *summed* loss and the number of targets, never a mean:
the training loop divides by the number of targets in all accumulated micro-batches together, which is
what makes k micro-batches equal to one big batch (see minift/losses.py).

Only target positions go through the vocabulary projection. For completion-only SFT most positions are
prompt (-100), and the (B, T, V) logits tensor is the largest activation of a small model (V = 49,152 for
SmolLM2), so we select the target rows of the hidden states first:

    hidden (B, T, d) --select labels != -100--> (N, d) --lm_head--> logits (N, V) --cross-entropy--> sum

This gives the same loss as `losses.token_loss_sum` on full logits, with N/(B*T) of its memory and FLOPs.
The (N, V) logits are still the largest tensor of a step, so by default (train.fused_loss = true) the projection
and the cross-entropy run fused, a chunk of rows at a time (minift/fused_loss.py): the same loss and gradients,
never more than one chunk of logits in memory. An lm_head with an adapter inside (LoRA on lm_head) or in NF4
is not a plain linear layer, and takes the unfused path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.fused_loss import final_softcap, fusable_head, linear_cross_entropy
from minift.io.files import read_json_file
from minift.losses import IGNORE_INDEX, ClassificationHead, mask_tokens

TASK_KINDS = ("causal_lm", "masked_lm", "classification")


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> LayerNorm -> decoder tied to the token embeddings (+ bias).

    The bundled MiniLM ships without one, so it starts from random weights (std 0.02, like BERT's init);
    the decoder reuses the embedding matrix, so only d*d + 2d + d + V new numbers are learned.
    """

    def __init__(self, embedding: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        vocab_size, dim = embedding.weight.shape
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = embedding.weight  # tied: the same Parameter object as the input embedding
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        nn.init.zeros_(self.decoder.bias)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden)))  # (N, d): what the decoder projects to the vocabulary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))  # (N, V)


@dataclass
class TaskOutput:
    loss_sum: torch.Tensor  # float32 scalar: the loss summed over all targets of the batch
    n_targets: int  # target tokens (LM tasks) or examples (classification)
    n_correct: int | None = None  # classification: examples whose argmax is the label
    metric_sums: dict[str, float] | None = None  # other metrics, summed over targets (train/preference_tasks.py)


class TaskModel(nn.Module):
    """Backbone + the task's head. forward(batch) -> TaskOutput with the summed loss.

    batch: input_ids (B, T), attention_mask (B, T) or a boolean (B, 1, T, T) mask for packed rows,
    optional position_ids (B, T), and labels: (B, T) token ids with -100 (LM tasks) or (B,) class ids.
    """

    KINDS = TASK_KINDS  # a subclass for other tasks names its own (minift/train/preference_tasks.py)

    def __init__(self, backbone: nn.Module, kind: str, head: nn.Module | None = None) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"[task] kind = {kind!r}; expected one of {', '.join(self.KINDS)}")
        self.backbone, self.kind, self.head = backbone, kind, head
        self.fused_loss = True  # LM tasks: fused, chunked projection + cross-entropy (train.fused_loss)

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The head's own parameters, named as in this module ("head.linear.weight"). The MLM decoder's weight
        *is* the backbone's embedding (tied), so it is not listed: it belongs to the backbone."""
        if self.head is None:
            return {}
        shared = {id(p) for p in self.backbone.parameters()}
        return {f"head.{n}": p for n, p in self.head.named_parameters() if id(p) not in shared}

    def hidden_states(self, batch: dict) -> torch.Tensor:
        return self.backbone(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             position_ids=batch.get("position_ids"), return_hidden=True)  # (B, T, d)

    def forward(self, batch: dict) -> TaskOutput:
        hidden = self.hidden_states(batch)  # (B, T, d)
        labels = batch["labels"]
        if self.kind == "classification":
            mask = batch.get("attention_mask")
            logits = self.head(hidden, mask if mask is not None and mask.dim() == 2 else None)  # (B, C)
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
            return TaskOutput(loss_sum, labels.numel(), int((logits.argmax(-1) == labels).sum()))
        if self.kind == "causal_lm":
            hidden, labels = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        selected = labels != IGNORE_INDEX  # (B, T)
        loss_sum = self.vocabulary_loss(hidden[selected], labels[selected])  # only target rows meet the vocabulary
        return TaskOutput(loss_sum, int(selected.sum()))

    def vocabulary_loss(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the target rows (N, d) projected to the vocabulary: fused and chunked when the
        projection is a plain linear layer and fused_loss is on, else the logits (N, V) and F.cross_entropy."""
        if self.kind == "causal_lm":
            project, softcap = self.backbone.lm_head, final_softcap(self.backbone.config)
        else:  # masked_lm: dense -> GELU -> LayerNorm, then the tied decoder
            rows, project, softcap = self.head.transform(rows), self.head.decoder, None
        parts = fusable_head(project) if self.fused_loss else None
        if parts is not None:
            return linear_cross_entropy(rows, parts[0], targets, parts[1], softcap=softcap)
        logits = project(rows).float()  # (N, V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets, reduction="sum")


def build_task_model(backbone: nn.Module, kind: str, num_labels: int | None = None, pooling: str | None = None,
                     head_dropout: float = 0.0, fused_loss: bool = True) -> TaskModel:
    """Attach the head a task needs (creating new weights, so seed torch first for a reproducible init).
    fused_loss: LM tasks compute the vocabulary projection and the loss fused, chunk by chunk."""
    model = _build_task_model(backbone, kind, num_labels, pooling, head_dropout)
    model.fused_loss = fused_loss
    return model


def _build_task_model(backbone: nn.Module, kind: str, num_labels: int | None, pooling: str | None,
                      head_dropout: float) -> TaskModel:
    config = backbone.config
    if kind == "causal_lm":
        if not (config.causal and config.lm_head):
            raise ValueError(f"task causal_lm needs a decoder with an lm_head; {config.model_type} is an encoder "
                             f"(use task kind masked_lm or classification)")
        return TaskModel(backbone, kind)
    if kind == "masked_lm":
        if config.causal:
            raise ValueError(f"task masked_lm needs a bidirectional encoder; {config.model_type} is causal")
        return TaskModel(backbone, kind, MLMHead(backbone.embed, eps=config.norm_eps))
    if kind == "classification":
        if not num_labels or num_labels < 2:
            raise ValueError(f"task classification needs at least 2 labels, got {num_labels}")
        pooling = pooling or ("last" if config.causal else "mean")
        return TaskModel(backbone, kind, ClassificationHead(config.dim, num_labels, pooling, head_dropout))
    raise ValueError(f"[task] kind = {kind!r}; expected one of {', '.join(TASK_KINDS)}")


# ----------------------------------------------------------------------------------------------------
# Batches: masking, counting targets, moving to the device
# ----------------------------------------------------------------------------------------------------


def prepare_batch(batch: dict, kind: str, tokenizer=None, mlm_probability: float = 0.15,
                  generator: torch.Generator | None = None) -> dict:
    """Last-minute, random parts of a batch: BERT masking for masked_lm (drawn from `generator`)."""
    if kind != "masked_lm":
        return batch
    mask = batch.get("attention_mask")
    masked_ids, labels = mask_tokens(batch["input_ids"], tokenizer, attention_mask=mask,
                                     mlm_probability=mlm_probability, generator=generator)
    return {**batch, "input_ids": masked_ids, "labels": labels}


def count_targets(batch: dict, kind: str) -> int:
    """Targets in a batch before the forward pass: the N of 'divide by the total number of targets'."""
    if "n_targets" in batch:  # a batch that counts its own targets (preference pairs, rollouts)
        return int(batch["n_targets"])
    labels = batch["labels"]
    if kind == "classification":
        return labels.numel()
    if kind == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch, for tokens/s."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch["input_ids"].numel()
    return int(mask.sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def summarize(kind: str, loss_sum: float, n_targets: int, n_correct: int, prefix: str = "eval_") -> dict:
    """Metrics from totals: mean loss, and perplexity (LM tasks) or accuracy (classification)."""
    loss = loss_sum / max(n_targets, 1)
    metrics = {f"{prefix}loss": loss}
    if kind == "classification":
        metrics[f"{prefix}accuracy"] = n_correct / max(n_targets, 1)
    elif kind in ("causal_lm", "masked_lm"):
        metrics[f"{prefix}perplexity"] = math.exp(min(loss, 80.0))
    metrics[f"{prefix}targets"] = n_targets
    return metrics


# ----------------------------------------------------------------------------------------------------
# Saving and loading a fine-tuned task model (the head beside an exported backbone)
# ----------------------------------------------------------------------------------------------------


def save_head(model: TaskModel, directory: Path, labels: list[str] | None = None) -> None:
    """Write task.json (kind, labels, pooling) and the head's own weights (head.safetensors) into `directory`."""
    from minift.io.files import write_json_atomic, write_safetensors_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.head is not None:
        tensors = {n.removeprefix("head."): p.detach().cpu().contiguous() for n, p in model.head_parameters().items()}
        write_safetensors_atomic(tensors, directory / "head.safetensors")
    write_json_atomic({"kind": model.kind, "labels": labels, "pooling": getattr(model.head, "pooling", None)},
                      directory / "task.json")


def load_task_model(source: str | Path, device: str = "cpu") -> tuple[TaskModel, object, list[str] | None]:
    """Load a model for evaluation: a directory written by `save_head` (with task.json) gets its head back;
    any other source (bundled name, .gguf, HF directory) is a plain causal LM."""
    from minift.io import load
    from minift.io.files import json_field, read_safetensors

    backbone, tokenizer = load(source)
    task_file = Path(source) / "task.json"
    if not task_file.is_file():
        return build_task_model(backbone, "causal_lm").to(device).eval(), tokenizer, None
    task = read_json_file(task_file)
    kind, labels = json_field(task, "kind", task_file, "str"), json_field(task, "labels", task_file, "str list", None)
    if kind not in TASK_KINDS:
        raise ValueError(f"{task_file}: kind is {kind!r}; expected one of {', '.join(TASK_KINDS)}")
    pooling = json_field(task, "pooling", task_file, "str", None)
    try:
        model = build_task_model(backbone, kind, num_labels=len(labels) if labels else None, pooling=pooling)
    except ValueError as error:
        raise ValueError(f"{task_file}: {error}") from None
    if model.head is not None:
        head_file = Path(source) / "head.safetensors"
        if not head_file.is_file():
            raise FileNotFoundError(f"{head_file}: missing; {task_file} says this is a {kind} model")
        state = read_safetensors(head_file, floating=True)
        own = {n.removeprefix("head."): p for n, p in model.head_parameters().items()}
        if set(state) != set(own):
            raise ValueError(f"{head_file}: tensors {sorted(state)} do not match the {kind} head {sorted(own)}")
        for name, tensor in state.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"{head_file}: tensor {name!r} has shape {tuple(tensor.shape)}, the {kind} head "
                                 f"needs {tuple(own[name].shape)} ({len(labels or [])} labels in {task_file.name})")
        model.head.load_state_dict(state, strict=False)
    return model.to(device).eval(), tokenizer, labels


# ----------------------------------------------------------------------------------------------------
# Perplexity of a long text: sliding windows
# ----------------------------------------------------------------------------------------------------


def text_windows(ids: list[int], max_length: int, stride: int) -> list[dict]:
    """Cut a long token sequence into windows a model can read, each scoring only its new tokens.

        ids     t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        max_length 6, stride 4
        win 1   t0 t1 t2 t3 t4 t5                    scores t1..t5 (t0 has no context)
        win 2         t4 t5 t6 t7 t8 t9              scores t6..t9, with t4 t5 as context only

    Every token but the first is scored exactly once, each with up to max_length - stride tokens of context
    from the window before, so the summed loss over all windows / (len(ids) - 1) is the text's mean NLL.
    """
    if not 0 < stride < max_length:
        raise ValueError(f"text_windows: need 0 < stride < max_length (windows must overlap), got stride={stride}, "
                         f"max_length={max_length}")
    if len(ids) < 2:
        raise ValueError("text_windows: the text has fewer than 2 tokens; nothing to score")
    windows, first_unscored = [], 1  # t0 is never scored: nothing comes before it
    for start in range(0, len(ids), stride):
        end = min(start + max_length, len(ids))
        window = ids[start:end]
        labels = [token if i > 0 and start + i >= first_unscored else IGNORE_INDEX for i, token in enumerate(window)]
        windows.append({"input_ids": window, "labels": labels})
        first_unscored = end
        if end == len(ids):
            break
    return windows
