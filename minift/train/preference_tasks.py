"""Preference tasks on the one engine: `[task] kind = "reward"` (a reward model) and `kind = "preference"` (DPO).

Lesson
------
minift.align holds the formulas (Bradley–Terry, DPO, their metrics); this file makes them tasks of the training
loop, so that every method (full, lora, qlora, ia3, ...), gradient accumulation, checkpoints, resume, Ctrl-C and
divergence guards work for them exactly as for next-token training. A task is a TaskModel whose forward(batch)
returns the *summed* loss and the number of targets; here a target is one preference pair:

    batch (minift/train/preference_data.py)   input_ids (2B, T) = [chosen_1..chosen_B ; rejected_1..rejected_B]
                                              attention_mask, completion_mask (2B, T), n_targets = B
    reward       r = score(hidden at the last real token)                 loss_sum = sum_pairs -log sigmoid(r_w - r_l)
    preference   log pi(y|x) summed over completion tokens, policy and    loss_sum = sum_pairs DPO loss
                 reference                                                  (sigmoid / robust / ipo, label smoothing)

The loop divides loss_sum by all pairs of the k accumulated micro-batches, so a step's gradient is that of the
mean loss over its pairs, TRL's. Metrics are returned as sums too (`TaskOutput.metric_sums`), averaged over
pairs by the loop and logged under TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (DPO); accuracy, margin (reward model). Evaluation prefixes eval_.

The DPO reference pi_ref is the model the run starts from:
    a method with adapters (lora, qlora, ia3, adapters, prompt_tuning)   the same model, adapters switched off
                                                                         (adapter_interface.disabled_adapters)
    a method without (full, partial, output_only, features)              a frozen copy made before training,
                                                                         held outside the module tree so it is
                                                                         neither trained nor checkpointed
Both are computed in eval mode (no dropout) and without gradients. With `[task] precompute_reference = true`
the reference log-probs of every pair are computed once at setup (preference_data.py), and the frozen copy is
then dropped. A resumed run rebuilds the reference from model.source, the same start.

Export (run_dir/final). reward: a Hugging Face *ForSequenceClassification directory with num_labels = 1
(minift.align.save_reward_model; adapters are merged into a copy first); transformers scores it as minift does.
If the tokenizer pads with EOS, the export pads with another special token (unk, bos or id 0), because
transformers reads the score at the last token that is not the pad token. preference: the method's own
export (a Hugging Face directory, a PEFT adapter, ...), marked as a causal LM for `minift eval`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from minift.adapter_interface import disabled_adapters, has_adapters, merge_adapters
from minift.align.dpo import LOSS_TYPES, dpo_loss, sequence_logprobs
from minift.align.reward import RewardModel, bradley_terry_loss, save_reward_model
from minift.io.files import write_json_atomic
from minift.losses import pool
from minift.train.tasks import TaskModel, TaskOutput

PAIR_KINDS = ("reward", "preference")


def check_task_options(task, where: str = "config") -> None:
    """Cross-field checks of [task] for the preference kinds (single fields are checked by run_config's rules)."""
    if task.kind == "preference" and not task.beta > 0:
        raise ValueError(f"{where}: task.beta = {task.beta}; DPO needs beta > 0")
    if task.kind == "preference" and task.loss_type == "ipo" and task.label_smoothing:
        raise ValueError(f"{where}: task.label_smoothing = {task.label_smoothing} has no meaning for "
                         "task.loss_type = 'ipo'; set it to 0")


# ----------------------------------------------------------------------------------------------------
# The reference model of DPO (and of the KL terms of RL)
# ----------------------------------------------------------------------------------------------------


class ReferenceHolder:
    """The starting model for KL and DPO: `backbone` with adapters off, or a frozen copy of it.

    take(backbone) is called once the method has prepared the backbone, before any step: a backbone without
    adapters is deep-copied then (its weights are still the starting ones). The copy lives in a plain
    attribute, not as a submodule, so parameters(), state_dict() and checkpoints never see it.
    """

    def __init__(self) -> None:
        self.copy: nn.Module | None = None
        self.needs_copy = False

    def take(self, backbone: nn.Module) -> None:
        self.needs_copy = not has_adapters(backbone)
        if self.needs_copy:
            self.copy = copy.deepcopy(backbone).requires_grad_(False).eval()

    def release(self) -> None:
        """Drop the frozen copy (its log-probs were precomputed)."""
        self.copy = None

    @torch.no_grad()
    def sequence_logprobs(self, backbone: nn.Module, batch: dict) -> torch.Tensor:
        """log pi_ref of every row (B,), in eval mode, without gradients."""
        args = (batch["input_ids"], batch.get("attention_mask"), batch["completion_mask"])
        if self.needs_copy and self.copy is None:
            raise ValueError("the reference model was released (precompute_reference) but a batch came without "
                             "precomputed reference log-probs")
        return self.call(backbone, lambda model: sequence_logprobs(model, *args))

    @torch.no_grad()
    def call(self, backbone: nn.Module, fn):
        """fn(reference model) in eval mode without gradients: the copy, or `backbone` with adapters off (RL tasks)."""
        if self.needs_copy:
            return fn(self.copy)
        was_training = backbone.training
        backbone.eval()
        try:
            with disabled_adapters(backbone):
                return fn(backbone)
        finally:
            backbone.train(was_training)

    def apply(self, fn) -> None:
        if self.copy is not None:
            self.copy._apply(fn)


class AlignTaskModel(TaskModel):
    """A TaskModel of the preference / RL family: it may hold a reference (never a parameter of the module)."""

    KINDS = PAIR_KINDS

    def __init__(self, backbone: nn.Module, kind: str, head: nn.Module | None = None) -> None:
        super().__init__(backbone, kind, head)
        self.reference = ReferenceHolder()

    def method_prepared(self) -> None:
        """Called by the loop once the method has prepared the backbone (and before any training)."""

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .float() move the frozen reference copy too
        result = super()._apply(fn, *args, **kwargs)
        self.reference.apply(fn)
        return result


# ----------------------------------------------------------------------------------------------------
# kind = "reward": Bradley–Terry on a scalar head
# ----------------------------------------------------------------------------------------------------


class RewardTaskModel(AlignTaskModel):
    """backbone + score: Linear(d, 1, no bias), read at the last real token; as minift.align.RewardModel."""

    def __init__(self, backbone: nn.Module, center_rewards_coefficient: float | None = None) -> None:
        score = nn.Linear(backbone.config.dim, 1, bias=False)
        nn.init.normal_(score.weight, std=0.02)  # transformers' init (initializer_range 0.02)
        super().__init__(backbone, "reward", score)
        self.center_rewards_coefficient = center_rewards_coefficient

    def rewards(self, batch: dict) -> torch.Tensor:
        hidden = self.hidden_states(batch)  # (2B, T, d)
        return self.head(pool(hidden, batch.get("attention_mask"), "last")).squeeze(-1).float()  # (2B,)

    def forward(self, batch: dict) -> TaskOutput:
        chosen, rejected = self.rewards(batch).chunk(2)  # (B,), (B,)
        losses = bradley_terry_loss(chosen, rejected)  # (B,)
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * (chosen + rejected) ** 2
        with torch.no_grad():
            sums = {"accuracy": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
                    "rewards/chosen": float(chosen.sum()), "rewards/rejected": float(rejected.sum())}
        return TaskOutput(losses.sum(), chosen.numel(), int((chosen > rejected).sum()), sums)


# ----------------------------------------------------------------------------------------------------
# kind = "preference": DPO
# ----------------------------------------------------------------------------------------------------


class PreferenceTaskModel(AlignTaskModel):
    """The policy is the backbone's own LM; forward(batch) is the DPO loss against the reference."""

    def __init__(self, backbone: nn.Module, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0) -> None:
        if not (backbone.config.causal and backbone.config.lm_head):
            raise ValueError(f"task preference (DPO) needs a decoder with an lm_head; {backbone.config.model_type} "
                             "is not one")
        super().__init__(backbone, "preference")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def method_prepared(self) -> None:
        self.reference.take(self.backbone)

    def forward(self, batch: dict) -> TaskOutput:
        logps = sequence_logprobs(self.backbone, batch["input_ids"], batch.get("attention_mask"),
                                  batch["completion_mask"], fused=self.fused_loss)  # (2B,)
        reference = batch.get("reference_logps")
        if reference is None:
            reference = self.reference.sequence_logprobs(self.backbone, batch)
        policy_chosen, policy_rejected = logps.chunk(2)
        reference_chosen, reference_rejected = reference.to(logps.device, torch.float32).chunk(2)
        lengths = batch["completion_mask"].sum(dim=1).float().chunk(2) if self.loss_type == "ipo" else (None, None)
        losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                            self.beta, self.loss_type, self.label_smoothing, *lengths)
        correct = int((chosen > rejected).sum())
        sums = {"rewards/chosen": float(chosen.sum()), "rewards/rejected": float(rejected.sum()),
                "rewards/accuracies": float(correct), "rewards/margins": float((chosen - rejected).sum()),
                "logps/chosen": float(policy_chosen.detach().sum()),
                "logps/rejected": float(policy_rejected.detach().sum())}
        return TaskOutput(losses.sum(), chosen.numel(), correct, sums)


def build_pair_task_model(backbone: nn.Module, task) -> AlignTaskModel:
    """The TaskModel of [task] kind reward or preference (seed torch first: the reward head is new weights)."""
    if task.kind == "reward":
        if not backbone.config.causal:
            raise ValueError(f"task reward reads the last token of a decoder; {backbone.config.model_type} is an "
                             "encoder")
        return RewardTaskModel(backbone, task.center_rewards_coefficient)
    if task.kind == "preference":
        if task.loss_type not in LOSS_TYPES:
            raise ValueError(f"[task] loss_type = {task.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        return PreferenceTaskModel(backbone, task.beta, task.loss_type, task.label_smoothing)
    raise ValueError(f"[task] kind = {task.kind!r} is not a preference task ({', '.join(PAIR_KINDS)})")


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def reward_export_tokenizer(tokenizer):
    """The tokenizer a reward export is saved with: its pad token must not be EOS (the texts end with EOS)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    for candidate in (tokenizer.unk_token_id, tokenizer.bos_token_id, 0):
        if candidate is not None and candidate != tokenizer.eos_token_id:
            exported = copy.copy(tokenizer)
            exported.pad_token_id = candidate
            return exported
    raise ValueError("reward export: the tokenizer pads with EOS and has no other special token to pad with")


def export_task(model: AlignTaskModel, plan, tokenizer, directory: Path) -> Path:
    """Write a preference task's result to `directory` (see the lesson)."""
    directory = Path(directory)
    if model.kind == "reward":
        backbone = model.backbone
        if has_adapters(backbone):
            backbone = merge_adapters(copy.deepcopy(backbone))  # refuses adapters that cannot be folded
        reward = RewardModel(backbone)
        with torch.no_grad():
            reward.score.weight.copy_(model.head.weight)  # the trained head
        save_reward_model(reward, reward_export_tokenizer(tokenizer), directory)
        return directory
    plan.export(model.backbone, tokenizer, directory)
    write_json_atomic({"kind": "causal_lm", "labels": None, "pooling": None, "trained_as": model.kind},
                      directory / "task.json")
    return directory
