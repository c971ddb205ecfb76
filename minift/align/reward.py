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

Export. `save_reward_model` writes a Hugging Face sequence-classification directory (num_labels = 1): the
backbone's tensors under transformers' names, no lm_head, plus score.weight, and config.json naming
LlamaForSequenceClassification (or Mistral/Qwen2/Qwen3/GPT2's) with the pad token set, so
AutoModelForSequenceClassification loads it and scores as minift does. `load_reward_model` reads such a
directory back (from minift, transformers or TRL's RewardTrainer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.io import hf
from minift.io.files import write_json_atomic, write_safetensors_atomic
from minift.io.weights import base_model_state, build_model
from minift.losses import pool

SEQUENCE_CLASSIFIERS = {"LlamaForCausalLM": "LlamaForSequenceClassification",
                        "MistralForCausalLM": "MistralForSequenceClassification",
                        "Qwen2ForCausalLM": "Qwen2ForSequenceClassification",
                        "Qwen3ForCausalLM": "Qwen3ForSequenceClassification",
                        "GPT2LMHeadModel": "GPT2ForSequenceClassification"}


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


# ----------------------------------------------------------------------------------------------------
# A Hugging Face sequence-classification directory (num_labels = 1)
# ----------------------------------------------------------------------------------------------------


def save_reward_model(model: RewardModel, tokenizer, directory: str | Path) -> Path:
    """Write `model` as a Hugging Face *ForSequenceClassification directory that transformers loads.

    transformers finds the scored token as the last one that is not the pad id, so the tokenizer's pad token must
    not be a token the texts end with (pad = EOS would score the token before the EOS): it is refused then.
    """
    directory = Path(directory)
    config = model.backbone.config
    hf_config = hf.config_to_hf(config)
    architecture = SEQUENCE_CLASSIFIERS.get(hf_config["architectures"][0])
    if architecture is None or not config.causal:
        raise ValueError(f"save_reward_model: no Hugging Face sequence-classification layout for "
                         f"{config.model_type} ({hf_config['architectures'][0]}); decoders of the Llama family and "
                         "GPT-2 are supported")
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else config.pad_token_id
    if pad_id is None:
        raise ValueError("save_reward_model: transformers needs a pad token id to find the last token; give a "
                         "tokenizer with one")
    if tokenizer is not None and pad_id == tokenizer.eos_token_id:
        raise ValueError(f"save_reward_model: the pad token (id {pad_id}) is the EOS token, so transformers would "
                         "score the token before each EOS; set a distinct pad token")
    state = hf.state_dict_to_hf(base_model_state(model.backbone, where="save_reward_model"), config)
    state.pop("lm_head.weight", None)
    state["score.weight"] = model.score.weight.detach()
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors",
                             metadata={"format": "pt"})
    hf_config.update(architectures=[architecture], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                     pad_token_id=pad_id)
    write_json_atomic(hf_config, directory / "config.json")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_reward_model(directory: str | Path) -> tuple[RewardModel, object]:
    """Read a sequence-classification directory with one label -> (RewardModel, tokenizer or None).

    The backbone is built without an lm_head (a reward model does not need one, so nothing is tied either).
    """
    directory = Path(directory)
    raw, config_file = hf.read_config(directory)
    architectures = raw.get("architectures") or ["?"]
    if not str(architectures[0]).endswith("ForSequenceClassification"):
        raise ValueError(f"{config_file}: architecture {architectures[0]!r} is not a sequence classifier; a reward "
                         "model directory has *ForSequenceClassification with one label")
    n_labels = len(raw.get("id2label") or {"0": ""})
    if n_labels != 1:
        raise ValueError(f"{config_file}: {n_labels} labels; a reward model has exactly one (num_labels = 1)")
    config = dataclasses.replace(hf.config_from_hf(raw, where=str(config_file)), lm_head=False,
                                 tie_embeddings=False)
    tensors = hf.read_tensors(directory)
    if "score.weight" not in tensors:
        raise ValueError(f"{directory}: no tensor 'score.weight' (the reward head)")
    score_file, score = tensors.pop("score.weight")
    if tuple(score.shape) != (1, config.dim):
        raise ValueError(f"{score_file}: tensor 'score.weight' has shape {tuple(score.shape)}, "
                         f"expected (1, {config.dim})")
    tensors.pop("lm_head.weight", None)
    backbone = build_model(config, hf.state_dict_from_tensors(tensors, config), where=str(directory))
    model = RewardModel(backbone)
    with torch.no_grad():
        model.score.weight.copy_(score)
    return model.eval(), hf.read_tokenizer(directory)
