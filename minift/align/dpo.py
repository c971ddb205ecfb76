"""Direct Preference Optimization: learn from preference pairs with a classification loss, no reward model, no RL.

Lesson
------
RLHF maximizes reward while a KL term keeps the policy pi near a reference pi_ref (the model it started from).
Rafailov et al. (2023, §4) show that this objective's optimum is pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta), so a
policy *defines* its own reward, up to a term that depends on x alone:

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))                      "implicit reward"

Put that into the Bradley–Terry model of preferences, p(y_w ≻ y_l) = sigmoid(r_w - r_l), and x's term cancels. The
negative log-likelihood of the human choices is then a loss on the policy itself (Eq. 7):

    h     = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    L_DPO = -log sigmoid(beta * h)

log pi(y|x) is the *sum* over the completion's tokens of log p(token | everything before it), read from one
forward pass (`sequence_logprobs`): the logits at position t score token t + 1, only completion tokens count.

Variants (`loss_type`, `label_smoothing` = eps), each per pair:

    sigmoid   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   eps = 0: DPO. eps > 0: conservative DPO
                                                                          (cDPO, Mitchell 2023): labels flipped w.p. eps
    robust    [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
                                                                          unbiased under flips (Chowdhury et al. 2024)
    ipo       (h - 1 / (2 beta))^2                                        IPO (Azar et al. 2023, Eq. 17): a squared
                                                                          loss that does not push h to infinity

TRL 1.16 divides IPO's log-ratios by the number of completion tokens (a choice its authors confirmed with IPO's);
pass chosen_lengths and rejected_lengths to get that form, leave them out for the paper's sequence-level h.

The reference. With full fine-tuning pi_ref is a frozen copy of the starting model. With LoRA or QLoRA it is the
same model with its adapters switched off (`minift.adapter_interface.disabled_adapters`), so no second copy sits
in memory; its log-probs can also be computed once, before training, and passed in (`reference_logps`).

Metrics, named as TRL logs them: rewards/chosen and rewards/rejected (the mean implicit rewards beta * log-ratio),
rewards/accuracies (how often r_w > r_l), rewards/margins (mean r_w - r_l); logps/chosen, logps/rejected.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.adapter_interface import disabled_adapters, has_adapters
from minift.align.preference import collate_preferences
from minift.fused_loss import final_softcap, fusable_head, linear_token_logprobs

LOSS_TYPES = ("sigmoid", "robust", "ipo")

# ----------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ----------------------------------------------------------------------------------------------------


def _sum_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """logits (N, V) of the scored positions, their target ids (N,), their row in the batch (N,) -> (batch,) sums."""
    logits = logits.float()
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (N,)
    return torch.zeros(batch, dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)  # (B,)


def sequence_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                                  completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens, from full logits (B, T, V) -> (B,) float32."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(f"sequence_logprobs: logits must be (B, T, V) and input_ids, completion_mask (B, T); got "
                         f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(completion_mask.shape)}")
    scored = completion_mask[:, 1:].bool()  # (B, T-1): token t+1 is scored by the logits at t
    rows = scored.nonzero()[:, 0]  # (N,)
    return _sum_token_logprobs(logits[:, :-1][scored], input_ids[:, 1:][scored], rows, input_ids.size(0))


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      completion_mask: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """log pi(completion | prompt) for each row: (B,) float32, summed over the tokens where completion_mask is 1.

    model: a minift causal LM (LoRA, QLoRA or any adapter inside is fine). As in train/tasks.py, only the scored
    positions meet the vocabulary matrix: hidden (B, T, d) -> select (N, d) -> lm_head -> (N, V), so the (B, T, V)
    logits tensor, the largest activation of a small model, is never made. With fused (the default) and a plain linear
    lm_head, not even the (N, V) logits are: minift.fused_loss.linear_token_logprobs scores a chunk of rows at a
    time and recomputes each chunk's logits in backward (same numbers, one chunk of logits in memory).
    """
    if completion_mask.shape != input_ids.shape:
        raise ValueError(f"sequence_logprobs: completion_mask {tuple(completion_mask.shape)} must have the shape of "
                         f"input_ids {tuple(input_ids.shape)}")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise ValueError("sequence_logprobs: needs a causal LM with an lm_head (a minift Transformer); for other "
                         "models compute the logits and use sequence_logprobs_from_logits")
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, d)
    scored = completion_mask[:, 1:].bool()  # (B, T-1)
    rows = scored.nonzero()[:, 0]  # (N,)
    parts = fusable_head(lm_head) if fused else None
    softcap = final_softcap(getattr(model, "config", None))
    if parts is not None:
        token_logps = linear_token_logprobs(hidden[:, :-1][scored], parts[0], input_ids[:, 1:][scored], parts[1],
                                            softcap=softcap)  # (N,)
        return torch.zeros(input_ids.size(0), dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    logits = lm_head(hidden[:, :-1][scored])  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits.float() / softcap)
    return _sum_token_logprobs(logits, input_ids[:, 1:][scored], rows, input_ids.size(0))


def reference_logprobs(model: nn.Module, batch: dict, reference_model: nn.Module | None = None) -> torch.Tensor:
    """log pi_ref of every row of a preference batch (2B,), without gradients.

    reference_model: a frozen copy of the starting model; None: `model` itself with its adapters disabled (the
    base model), which needs a model with adapters.
    """
    with torch.no_grad():
        if reference_model is not None:
            return sequence_logprobs(reference_model, batch["input_ids"], batch.get("attention_mask"),
                                     batch["completion_mask"])
        if not has_adapters(model):
            raise ValueError("DPO needs a reference model: this model has no adapters to switch off, so pass "
                             "reference_model (a frozen copy of the starting model) or precomputed reference log-probs")
        with disabled_adapters(model):
            return sequence_logprobs(model, batch["input_ids"], batch.get("attention_mask"), batch["completion_mask"])


def precompute_reference_logprobs(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 8,
                                  reference_model: nn.Module | None = None) -> list[dict]:
    """Score every pair under the reference once, before training; returns the examples with
    "reference_chosen_logps" and "reference_rejected_logps" added (floats), which collate_preferences carries
    into batch["reference_logps"] (2B,) and dpo_batch_loss then uses instead of a reference forward pass."""
    scored = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate_preferences(chunk, pad_id)
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        chosen, rejected = reference_logprobs(model, batch, reference_model).cpu().chunk(2)
        scored += [{**example, "reference_chosen_logps": c, "reference_rejected_logps": r}
                   for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist())]
    return scored


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected (B,), detached.

    loss_type: "sigmoid" (DPO; with label_smoothing > 0 conservative DPO), "robust" (rDPO, label_smoothing = the
    flip rate) or "ipo" (with chosen_lengths / rejected_lengths: TRL's per-token form). See the module lesson.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("dpo_loss: label_smoothing has no meaning for loss_type 'ipo'; set it to 0")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("dpo_loss: pass both chosen_lengths and rejected_lengths, or neither")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                       reference_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss: the four log-prob tensors must all be (B,), got shapes {sorted(shapes)}")

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    eps = label_smoothing
    if loss_type == "ipo":
        if chosen_lengths is not None:
            h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1 / (2 * beta)) ** 2  # (B,)
    else:
        h = chosen_logratios - rejected_logratios  # (B,)
        agree, flipped = -F.logsigmoid(beta * h), -F.logsigmoid(-beta * h)  # the pair's NLL as labelled / reversed
        if loss_type == "sigmoid":
            losses = (1 - eps) * agree + eps * flipped
        else:  # robust
            losses = ((1 - eps) * agree - eps * flipped) / (1 - 2 * eps)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                policy_chosen_logps: torch.Tensor | None = None,
                policy_rejected_logps: torch.Tensor | None = None) -> dict[str, float]:
    """Batch means under TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, and
    logps/chosen, logps/rejected when the policy log-probs are given."""
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }
    if policy_chosen_logps is not None and policy_rejected_logps is not None:
        metrics["logps/chosen"] = policy_chosen_logps.detach().mean().item()
        metrics["logps/rejected"] = policy_rejected_logps.detach().mean().item()
    return metrics


def dpo_batch_loss(model: nn.Module, batch: dict, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, reference_model: nn.Module | None = None,
                   reference_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DPO loss of a preference batch (see preference.collate_preferences) and its metrics.

    One forward pass of the policy over the 2B rows, then the reference: `reference_logps` (2B,) or
    batch["reference_logps"] if precomputed (precompute_reference_logprobs), else `reference_model`, else `model`
    with adapters disabled. IPO gets TRL's per-token lengths.
    """
    logps = sequence_logprobs(model, batch["input_ids"], batch.get("attention_mask"), batch["completion_mask"])
    if reference_logps is None:
        reference_logps = batch.get("reference_logps")
    if reference_logps is None:
        reference_logps = reference_logprobs(model, batch, reference_model)
    policy_chosen, policy_rejected = logps.chunk(2)  # (B,), (B,)
    reference_chosen, reference_rejected = reference_logps.to(logps.device).chunk(2)
    lengths = batch["completion_mask"].sum(dim=1).float()  # (2B,)
    chosen_lengths, rejected_lengths = lengths.chunk(2) if loss_type == "ipo" else (None, None)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                        reference_rejected, beta, loss_type, label_smoothing,
                                                        chosen_lengths, rejected_lengths)
    return losses.mean(), dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
