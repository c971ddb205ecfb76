"""Reward model: a transformer that reads a prompt + answer and returns one number, trained on human rankings.

Lesson
------
InstructGPT (Ouyang et al. 2022, §3.5) trains the reward model r_theta on comparisons: labellers rank answers to
a prompt, and every ranked pair (y_w preferred to y_l) is one example. The Bradley–Terry model says a pair is
ordered as it is with probability sigmoid(r_w - r_l), so its negative log-likelihood is the loss (Eq. 1):

    loss = -log sigmoid(r_theta(x, y_w) - r_theta(x, y_l))          (optionally minus a margin inside the sigmoid)

Only the difference of rewards is learned: r + c fits as well as r. TRL's `center_rewards_coefficient` adds
coef * mean((r_w + r_l)^2) to keep rewards near 0 (Eisenstein et al. 2023); the PPO step later whitens them anyway.

The model is any minift transformer with a scalar head, read at the last real token of the sequence (the only
one whose hidden state has seen the whole text in a causal model):

    tokens   x1 x2 x3 y1 y2 </s> <pad> <pad>
    hidden   h1 h2 h3 h4 h5 h6   .     .          --last real token (attention_mask)--> h6 --score (d -> 1)--> r

The head is `score`, a Linear(d, 1) without bias, as in transformers' *ForSequenceClassification with
num_labels = 1, so the weights map one to one. The last real token is found from the attention mask (by
position), whereas transformers looks for the last token that is not the pad id: the two agree unless the pad
token is also a real token of the text (pad = EOS), where the mask is the right answer.

Metrics, as TRL's RewardTrainer names them: accuracy (how often r_w > r_l), margin (mean r_w - r_l), and
min_reward / mean_reward / max_reward over all scored sequences.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.losses import pool


class RewardModel(nn.Module):
    """backbone (a minift Transformer) + score: Linear(d, 1). forward(input_ids, attention_mask) -> rewards (B,)."""

    def __init__(self, backbone: nn.Module, init_std: float = 0.02) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=init_std)  # transformers' init (initializer_range 0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, d)
        last = pool(hidden, attention_mask, "last")  # (B, d)
        return self.score(last).squeeze(-1).float()  # (B,)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-pair losses (B,): -log sigmoid(r_chosen - r_rejected - margin)."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"bradley_terry_loss: chosen {tuple(chosen_rewards.shape)} and rejected "
                         f"{tuple(rejected_rewards.shape)} rewards must have one shape")
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """The mean Bradley–Terry loss of a batch, plus coef * mean((r_chosen + r_rejected)^2) when centering."""
    loss = bradley_terry_loss(chosen_rewards, rejected_rewards, margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """accuracy, margin, min_reward, mean_reward, max_reward of a batch (TRL's names)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    every = torch.cat([chosen_rewards, rejected_rewards])
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "margin": (chosen_rewards - rejected_rewards).mean().item(),
        "min_reward": every.min().item(),
        "mean_reward": every.mean().item(),
        "max_reward": every.max().item(),
    }


def reward_batch_loss(model: RewardModel, batch: dict, margin: torch.Tensor | None = None,
                      center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics of a preference batch (preference.collate_preferences: [chosen ; rejected] rows)."""
    rewards = model(batch["input_ids"], batch.get("attention_mask"))  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return reward_loss(chosen, rejected, margin, center_rewards_coefficient), reward_metrics(chosen, rejected)
