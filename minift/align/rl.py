"""The arithmetic of RL fine-tuning: advantages (GAE, group-relative), whitening, KL estimates, PPO's clipped losses.

Lesson
------
In RLHF a completion is an episode: each generated token is an action, the reward model's score arrives at the
last token, and a per-token KL penalty to the reference model is paid along the way (Ziegler et al. 2019, §2;
Ouyang et al. 2022, §3.5). The policy gradient needs, per token, an *advantage*: how much better this action was
than the critic V expected.

Generalized Advantage Estimation (Schulman et al. 2016, Eq. 16), with TD errors delta, computed right to left:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * A_{t+1}            returns R_t = A_t + V_t (the value head's target)

`mask` marks the real steps (generated tokens); past the last real step there is nothing: V_{T_end} = 0 and
A = 0, whatever the padded tensors hold. lambda = 1 gives Monte-Carlo returns minus V, lambda = 0 one-step TD.

Whitening. Advantages are standardized over the real steps of the batch, (A - mean) / sqrt(var + 1e-8), with the
unbiased (Bessel) variance, as TRL's `masked_whiten` does; with shift_mean=False the mean is added back (used
for rewards, whose sign matters).

GRPO (Shao et al. 2024, DeepSeekMath §4.1.2) drops the critic. It samples G completions per prompt, scores each
once, and takes the reward standardized within its group as the advantage of every token of that completion:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)          std unbiased, eps = 1e-4 (TRL's constants)

KL to the reference, per token, from log-probs of the sampled token only (Schulman, "Approximating KL", 2020):

    k1 = log pi - log pi_ref                         unbiased, can be negative
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1     unbiased, always >= 0, low variance (GRPO, Eq. 4)

PPO's clipped objective (Schulman et al. 2017, Eq. 7), ratio rho = pi / pi_old, per token:

    policy loss = max(-A rho, -A clip(rho, 1 - c, 1 + c))
    value loss  = 0.5 * max((V - R)^2, (clip(V, V_old - c_v, V_old + c_v) - R)^2)
"""

from __future__ import annotations

import torch


def _check_same_shape(name: str, **tensors: torch.Tensor) -> None:
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: {', '.join(shapes)} must have one shape, got {shapes}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the positions where mask is 1 (unbiased variance); positions outside
    the mask are returned as they are computed, so zero them if they must be zero."""
    if mask is None:
        mask = torch.ones_like(values)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whiten: needs at least 2 real values to estimate a variance, got {int(count)}")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1)  # Bessel's correction
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns, both (B, T), zero wherever mask is 0.

    rewards, values, mask: (B, T) per step; mask 1 on the real steps of each row (padded steps may hold anything).
    """
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # padded steps contribute nothing
    B, T = values.shape
    advantages = torch.zeros_like(values)  # (B, T)
    next_advantage = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,) A_{t+1}
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,) V_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # zero on a padded step
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (N,) of N = prompts * group_size rewards laid out prompt by prompt.

    scale: "group" divides by the group's std (GRPO), "batch" by the whole batch's std, "none" only centers
    (Dr. GRPO, Liu et al. 2025).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"grpo_advantages: rewards must be (prompts * group_size,), got {tuple(rewards.shape)} "
                         f"with group_size={group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"grpo_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    groups = rewards.view(-1, group_size)  # (P, G)
    centered = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)
    if scale == "none":
        return centered
    if scale == "group":
        std = (groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)).expand_as(groups)
        std = std.reshape(-1)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    return centered / (std + eps)


def kl_k1(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log pi - log pi_ref (unbiased, may be negative)."""
    return logps - reference_logps


def kl_k3(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(ref - pi) - (ref - pi) - 1 (unbiased, >= 0): GRPO's KL term."""
    log_ratio = reference_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, averaged over the real tokens; metrics clip_fraction and approx_kl."""
    _check_same_shape("ppo_policy_loss", logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask).item(),
                   "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item()}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) over the real tokens; metric
    value_clip_fraction."""
    _check_same_shape("ppo_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((clipped_loss > unclipped_loss).float(), mask).item()}
    return loss, metrics
