"""Preference learning: preference data, reward models, DPO, and the arithmetic of PPO and GRPO.

Lesson
------
After supervised fine-tuning, a model is taught what people *prefer* rather than what they wrote:

    preference pairs (x, y_w ≻ y_l) --preference.py--> [prompt+chosen ; prompt+rejected] ids, completion masks
        |                                   |
        +--reward.py: r(x, y), Bradley–Terry loss      +--dpo.py: the policy is its own reward model
        |   (InstructGPT §3.5)                         |   (Rafailov et al. 2023), reference = adapters off
        v
    rl.py: GAE advantages + whitening for PPO (Ouyang et al. 2022), group-relative advantages and the k3 KL for
           GRPO (Shao et al. 2024), PPO's clipped losses

Every formula is checked against TRL 1.16 in tests/test_align.py. This package sits below the training engine
(layer 6, beside losses and data): it imports only minift.io, minift.data, minift.losses, minift.fused_loss and
the adapter interface, so the engine (minift/train/preference_tasks.py, rl_tasks.py) can make reward models, DPO,
GRPO and PPO tasks of `minift finetune`.
"""

from minift.align.dpo import (
    LOSS_TYPES,
    dpo_batch_loss,
    dpo_loss,
    dpo_metrics,
    precompute_reference_logprobs,
    reference_logprobs,
    sequence_logprobs,
    sequence_logprobs_from_logits,
)
from minift.align.preference import (
    check_preference,
    collate_preferences,
    read_preferences,
    tokenize_preference,
    tokenize_preferences,
)
from minift.align.reward import (
    RewardModel,
    bradley_terry_loss,
    load_reward_model,
    reward_batch_loss,
    reward_loss,
    reward_metrics,
    save_reward_model,
)
from minift.align.rl import (
    gae,
    grpo_advantages,
    kl_k1,
    kl_k3,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

__all__ = [
    "LOSS_TYPES", "RewardModel", "bradley_terry_loss", "check_preference", "collate_preferences", "dpo_batch_loss",
    "dpo_loss", "dpo_metrics", "gae", "grpo_advantages", "kl_k1", "kl_k3", "load_reward_model", "masked_mean",
    "ppo_policy_loss", "ppo_value_loss", "precompute_reference_logprobs", "read_preferences", "reference_logprobs",
    "reward_batch_loss", "reward_loss", "reward_metrics", "save_reward_model", "sequence_logprobs",
    "sequence_logprobs_from_logits", "tokenize_preference", "tokenize_preferences", "whiten",
]
