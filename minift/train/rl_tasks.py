"""RL fine-tuning on the one engine: `[task] kind = "grpo"` and `kind = "ppo"` (RLHF).

Lesson
------
RL from a reward differs from the other tasks in one way: the examples are not in a file, the policy writes them.
minift keeps the engine as it is and moves that difference into the data stream (minift/train/rl_data.py):

    prompts --RolloutStream.take()--> rollout: sample completions with the KV-cache `generate`, score them,
                                      log-probs of the sampling policy and of the reference, advantages
            --micro-batches--> TaskModel.forward: policy log-probs (with gradients) -> loss_sum, n_targets
            --the usual loop--> accumulate, clip, AdamW step, schedule, checkpoint

Sampling is seeded by (train.seed, rollout index), not by a running generator, so a resumed run draws the very
completions the interrupted one drew.

GRPO (Shao et al. 2024, §4.1). G completions per prompt (`group_size`); each completion's reward, standardized
within its group, is the advantage of all its tokens (no value model). Each rollout serves `num_iterations` (the
paper's mu, TRL's name) optimizer steps in a row (Algorithm 1). The ratio is pi / pi_old, pi_old the policy that
sampled the rollout: its log-probs are computed once, without gradients, when the rollout is made (old_logps). At
the first step pi = pi_old, so ratio = 1 with the policy gradient as its gradient; from the second on the policy
has moved and the clip bounds how far a step can push it. With num_iterations = 1 (the default) no old log-probs
are stored: the ratio is exp(log pi - sg(log pi)), the same value and gradient. Per token, with the k3 estimate of
KL to the reference (`beta`, GRPO Eq. 3-4):

    l_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta * k3(log pi_t, log pi_ref_t)
    loss = mean over completions of (mean over the completion's tokens of l_t)        ("grpo" normalisation)

This is TRL's GRPOTrainer with loss_type = "grpo" and use_bias_correction_kl = False, number for number
(tests/test_grpo_trl.py). TRL 1.16's default, use_bias_correction_kl = True (DeepSeek-V3.2), multiplies the k3
term by the ratio: the same value (the ratio is 1), but the KL part of the gradient per token becomes
(log pi - log pi_ref) grad log pi instead of k3's (1 - pi_ref / pi) grad log pi. The two agree to first order in
log pi - log pi_ref, so they part only once the policy is far from the reference.

PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; Schulman et al. 2017). A value head V (Linear(d, 1) on
the policy's hidden states, trained with it) predicts the return. One rollout of `num_minibatches` x
grad_accum_steps x batch_size prompts feeds `ppo_epochs` x `num_minibatches` optimizer steps, each on a seeded
random minibatch of the rollout's sequences:

    per-token reward  r_t = -kl_coef (log pi_old_t - log pi_ref_t)  (+ the reward model's score at the last token)
    advantages        GAE(gamma, lam) over r_t and V_old, whitened over the rollout; returns R = A + V_old
    loss per token    max(-A rho, -A clip(rho, 1 +- eps)) + vf_coef * 0.5 max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
    loss              mean over the minibatch's completion tokens

kl_coef is fixed (`beta`), or adaptive when `target_kl` is set (Ziegler et al. §2.2): after each rollout,
e = clip(KL / target - 1, -0.2, 0.2) and kl_coef *= 1 + e * N / kl_horizon. The rollout in use and kl_coef are
part of the checkpoint (task_state), so a run killed between two PPO epochs resumes exactly.

Memory: with `[train] fused_loss = true` (the default) and a plain linear lm_head, the completion tokens'
log-probs (policy, old policy and reference) never hold the (tokens x vocabulary) logits: policy_outputs hands
the rows to minift.fused_loss.linear_token_logprobs with the temperature folded in exactly (its docstring says
how). PPO's entropy, only a metric, is computed without gradients, a chunk of rows at a time.

Rewards: `[task] reward_model` (a sequence-classification directory, e.g. a `kind = "reward"` run's final/) scores
prompt + completion + EOS as it was trained; or `reward_function = "module:function"`, a Python function
f(prompts: list[str], completions: list[str]) -> list[float] (TRL's signature).

Metrics: GRPO logs TRL's reward, reward_std (the std of a rollout's rewards, not within groups), kl (k3 to the
reference averaged over a rollout's completion tokens, measured in the loss forward, so before that step's update)
and completion_length (tokens per completion); a step logs the mean over its micro-batches (rollouts), as TRL does
for kl (TRL's reward_std spans all the step's rollouts at once, so it differs when grad_accum_steps > 1);
PPO logs reward, kl, kl_coef, entropy, clipfrac, approx_kl, policy_loss, value_loss and value_clipfrac. The
progress bar shows reward and kl.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn as nn

from minift.align.rl import gae, grpo_advantages, kl_k1, kl_k3, ppo_policy_loss, ppo_value_loss, whiten
from minift.fused_loss import default_chunk_size, final_softcap, fusable_head, linear_token_logprobs
from minift.train.preference_tasks import AlignTaskModel, build_pair_task_model
from minift.train.tasks import TaskOutput

RL_KINDS = ("grpo", "ppo")


def check_rl_options(task, where: str = "config") -> None:
    """Cross-field checks of [task] for grpo / ppo, before any model loads."""
    if task.kind not in RL_KINDS:
        return
    if (task.reward_model is None) == (task.reward_function is None):
        raise ValueError(f"{where}: task.kind = {task.kind!r} needs exactly one of task.reward_model (a reward model "
                         "directory) or task.reward_function (\"module:function\")")
    if task.reward_function is not None:
        module, _, name = task.reward_function.partition(":")
        if not module or not name:
            raise ValueError(f"{where}: task.reward_function = {task.reward_function!r}; expected \"module:function\"")
    if task.kind != "grpo" and task.num_iterations != 1:
        raise ValueError(f"{where}: task.num_iterations = {task.num_iterations} is GRPO's; task.kind = {task.kind!r} "
                         "reuses a rollout with task.ppo_epochs")
    if task.kind == "grpo" and task.group_size < 2:
        raise ValueError(f"{where}: task.group_size = {task.group_size}; GRPO compares completions within a group, "
                         "so it needs at least 2")


# ----------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------


def load_reward_function(spec: str):
    """"module:function" -> the function; errors name the spec."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"task.reward_function = {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"task.reward_function = {spec!r}: {module_name} has no function {name!r}")
    return function


class RewardModelScorer:
    """A reward model directory as a reward function: r(prompt + completion + EOS), batched."""

    def __init__(self, directory: str | Path, device, batch_size: int = 16) -> None:
        from minift.align.reward import load_reward_model

        self.model, self.tokenizer = load_reward_model(directory)
        if self.tokenizer is None:
            raise ValueError(f"{directory}: the reward model has no tokenizer (tokenizer.json)")
        self.model.to(device).requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        rows = [self.tokenizer.encode(p + c) + eos for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            T = max(len(r) for r in chunk)
            ids = torch.tensor([r + [0] * (T - len(r)) for r in chunk], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk], device=self.device)
            scores += self.model(ids, mask).tolist()
        return scores


def make_reward(task, device):
    if task.reward_model is not None:
        return RewardModelScorer(task.reward_model, device)
    return load_reward_function(task.reward_function)


# ----------------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------------


def completion_mask_of(completions: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first EOS, 0 after (N, C)."""
    if eos_id is None:
        return torch.ones_like(completions)
    is_eos = (completions == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before this position
    return (before == 0).long()


@torch.no_grad()
def sample_completions(backbone: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options,
                       eos_id: int | None, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (N, P) -> completions (N, C) and their mask, sampled with the KV-cache `generate`."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone.generate(prompt_ids, options.max_new_tokens, temperature=options.temperature,
                                top_k=options.top_k, top_p=options.top_p, eos_token_id=eos_id,
                                attention_mask=prompt_mask, generator=generator)
    finally:
        backbone.train(was_training)
    completions = out[:, prompt_ids.size(1):]
    return completions, completion_mask_of(completions, eos_id)


def sequences(prompt_ids, prompt_mask, completions, completion_mask) -> dict:
    """[left-padded prompt | completion] rows with the attention mask and positions `generate` used."""
    input_ids = torch.cat([prompt_ids, completions], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "completion_mask": completion_mask.long(), "prompt_length": prompt_ids.size(1)}


def policy_outputs(backbone: nn.Module, batch: dict, temperature: float = 1.0, value_head: nn.Module | None = None,
                   entropy: bool = False, fused: bool = True) -> dict:
    """Per completion token (N, C): log pi of the sampled token (logits / temperature), and V from `value_head`.

    The token at sequence position P + j is predicted by the hidden state at P + j - 1; that state is also where
    the value of emitting it is read. Only real completion tokens meet the vocabulary matrix, and with `fused`
    (train.fused_loss) and a plain linear lm_head not even their (M, V) logits are made: linear_token_logprobs
    scores a chunk of rows at a time. The temperature folds into it exactly: with z = h W^T + b and cap c,
    c tanh(z / c) / T = (c / T) tanh((z / T) / (c / T)), so rows h / T, bias b / T and cap c / T give the capped,
    then tempered logits (cap first, as model.logits() and TRL do). PPO's entropy is a metric: it is computed
    without gradients, a chunk of rows at a time.
    """
    P, mask = batch["prompt_length"], batch["completion_mask"].bool()  # (N, C)
    hidden = backbone(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                      return_hidden=True)  # (N, P + C, d)
    states = hidden[:, P - 1 : -1]  # (N, C, d)
    targets = batch["input_ids"][:, P:]  # (N, C)
    rows = states[mask]  # (M, d)
    parts = fusable_head(backbone.lm_head) if fused else None
    if parts is not None:
        weight, bias = parts
        cap = final_softcap(backbone.config)
        token_logps = linear_token_logprobs(rows / temperature, weight, targets[mask],
                                            None if bias is None else bias / temperature,
                                            softcap=None if cap is None else cap / temperature)  # (M,)
        entropy_rows = _chunked_entropy(backbone, rows, temperature) if entropy else None
    else:
        logits = backbone.logits(rows).float() / temperature  # (M, V); logits(): lm_head + Gemma's final cap
        logps_rows = logits.log_softmax(-1)
        token_logps = logps_rows.gather(-1, targets[mask][:, None]).squeeze(-1)
        entropy_rows = -(logps_rows.exp() * logps_rows).sum(-1).detach() if entropy else None
    out = {"logps": torch.zeros(mask.shape, device=hidden.device).masked_scatter(mask, token_logps)}
    if entropy:
        out["entropy"] = torch.zeros(mask.shape, device=hidden.device).masked_scatter(mask, entropy_rows)
    if value_head is not None:
        out["values"] = value_head(states).squeeze(-1).float() * mask  # (N, C)
    return out


@torch.no_grad()
def _chunked_entropy(backbone: nn.Module, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row (M,), one chunk of rows' logits in memory at a time (a metric)."""
    size = default_chunk_size(backbone.config.vocab_size)
    parts = []
    for start in range(0, rows.size(0), size):
        logps = (backbone.logits(rows[start : start + size]).float() / temperature).log_softmax(-1)
        parts.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# The task models
# ----------------------------------------------------------------------------------------------------


class RLTaskModel(AlignTaskModel):
    """Policy (+ value head for PPO) and the reference; the rollout code the stream calls."""

    KINDS = RL_KINDS
    # the policy losses start near 0 and need not go down (zero-mean advantages, a growing KL term): the loop's
    # divergence rules that compare the loss with its start do not apply (minift/train/guards.py)
    loss_has_scale = False

    def __init__(self, backbone: nn.Module, task, head: nn.Module | None = None) -> None:
        if not (backbone.config.causal and backbone.config.lm_head):
            raise ValueError(f"task {task.kind} needs a decoder with an lm_head; {backbone.config.model_type} is not one")
        super().__init__(backbone, task.kind, head)
        self.options = task
        self.kl_coef = task.beta
        self.reward = None  # set by rl_data.prepare_align_run (a function of prompts and completions)
        self.rollouts: dict[int, dict] = {}  # PPO: the rollout in use, by index

    def method_prepared(self) -> None:
        self.reference.take(self.backbone)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        T = self.options.temperature
        fused = self.fused_loss
        return self.reference.call(self.backbone,
                                   lambda model: policy_outputs(model, batch, T, fused=fused)["logps"])

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """The reward of each completion: one finite number each, or one line naming the reward that broke it."""
        task = self.options
        source = (f"task.reward_model = {task.reward_model!r}" if task.reward_model is not None
                  else f"task.reward_function = {task.reward_function!r}")
        rewards = self.reward(prompts, completions)
        try:
            values = [float(r) for r in rewards]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source} must return a list of numbers, one per completion ({error})") from None
        if len(values) != len(completions):
            raise ValueError(f"{source} returned {len(values)} rewards for {len(completions)} completions; "
                             "it must return one per completion")
        bad = [i for i, v in enumerate(values) if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            raise ValueError(f"{source} returned {values[bad[0]]} for completion {bad[0]} ({len(bad)} not finite); "
                             "rewards must be finite numbers")
        return torch.tensor(values, dtype=torch.float32)

    def task_state(self) -> dict:
        """What a checkpoint keeps besides weights: kl_coef and (PPO) the rollout in use, as JSON."""
        return {"kl_coef": self.kl_coef,
                "rollouts": {str(i): [to_json(part) for part in parts] for i, parts in self.rollouts.items()}}

    def load_task_state(self, state: dict | None, where: str = "state.json") -> None:
        if state is None:
            return
        try:
            self.kl_coef = float(state["kl_coef"])
            self.rollouts = {int(i): [from_json(part) for part in parts] for i, parts in state["rollouts"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: task: not a rollout state this version wrote ({error})") from None


class GRPOTaskModel(RLTaskModel):
    """GRPO: no head; the batch is a rollout of G completions per prompt with group-relative advantages."""

    @torch.no_grad()
    def rollout(self, prompt_batch: dict, texts: list[str], generator: torch.Generator, tokenizer) -> dict:
        G = self.options.group_size
        prompt_ids = prompt_batch["input_ids"].repeat_interleave(G, dim=0)
        prompt_mask = prompt_batch["attention_mask"].repeat_interleave(G, dim=0)
        completions, _ = sample_completions(self.backbone, prompt_ids, prompt_mask, self.options,
                                            tokenizer.eos_token_id, generator)
        return self.rollout_of(prompt_ids, prompt_mask, completions, texts, tokenizer)

    @torch.no_grad()
    def rollout_of(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                   texts: list[str], tokenizer) -> dict:
        """The rollout batch of given completions (N = prompts x G rows, group by group): mask (cut after the first
        EOS), rewards, the reference's log-probs, advantages, and with num_iterations > 1 the sampling policy's
        log-probs (old_logps). `rollout` samples them; a parity test hands in another library's samples
        (tests/test_grpo_trl.py)."""
        G = self.options.group_size
        mask = completion_mask_of(completions, tokenizer.eos_token_id)
        batch = sequences(prompt_ids, prompt_mask, completions, mask)
        rewards = self.score([t for t in texts for _ in range(G)], decode(tokenizer, completions, mask))
        batch.update(reference_logps=self.reference_logps(batch), rewards=rewards.to(prompt_ids.device),
                     advantages=grpo_advantages(rewards, G).to(prompt_ids.device), n_targets=completions.size(0),
                     group_size=G)
        if self.options.num_iterations > 1:  # the ratio's denominator for every step on this rollout
            batch["old_logps"] = policy_outputs(self.backbone, batch, self.options.temperature,
                                               fused=self.fused_loss)["logps"]
        return batch

    def forward(self, batch: dict) -> TaskOutput:
        out = policy_outputs(self.backbone, batch, self.options.temperature, fused=self.fused_loss)
        loss_sum, sums = grpo_loss_sum(out["logps"], batch["reference_logps"], batch["advantages"],
                                       batch["completion_mask"], self.options.beta, self.options.clip_range,
                                       batch.get("old_logps"))
        rewards = batch["rewards"]  # TRL's reward_std: the std of all the rollout's rewards, not within groups
        sums.update(reward=float(rewards.sum()), reward_std=float(rewards.std()) * rewards.numel())
        return TaskOutput(loss_sum, rewards.numel(), None, sums)


def grpo_loss_sum(logps, reference_logps, advantages, mask, beta: float, clip_range: float,
                  old_logps=None) -> tuple[torch.Tensor, dict]:
    """Sum over completions of the mean GRPO token loss (see the lesson); old_logps None = the policy itself."""
    mask = mask.float()
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # (N, C): 1 at a rollout's first step, with the gradient of log pi
    A = advantages[:, None]  # (N, 1): one advantage for every token of a completion
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * A)
    kl = kl_k3(logps, reference_logps)  # (N, C)
    if beta:
        per_token = per_token + beta * kl
    lengths = mask.sum(1).clamp(min=1)  # (N,)
    loss_sum = ((per_token * mask).sum(1) / lengths).sum()
    with torch.no_grad():  # kl as TRL logs it: the mean over the rollout's completion tokens (x N, see the lesson)
        sums = {"kl": float((kl * mask).sum() / mask.sum().clamp(min=1)) * mask.size(0),
                "completion_length": float(mask.sum())}
    return loss_sum, sums


class PPOTaskModel(RLTaskModel):
    """PPO: a value head on the policy; the batch is a minibatch of a cached rollout (rl_data.RolloutStream)."""

    def __init__(self, backbone: nn.Module, task) -> None:
        head = nn.Linear(backbone.config.dim, 1)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        super().__init__(backbone, task, head)

    @torch.no_grad()
    def rollout(self, prompt_batch: dict, texts: list[str], generator: torch.Generator, tokenizer,
                update_kl: bool = True) -> dict:
        completions, mask = sample_completions(self.backbone, prompt_batch["input_ids"], prompt_batch["attention_mask"],
                                               self.options, tokenizer.eos_token_id, generator)
        batch = sequences(prompt_batch["input_ids"], prompt_batch["attention_mask"], completions, mask)
        was_training = self.training
        self.eval()
        old = policy_outputs(self.backbone, batch, self.options.temperature, self.head, fused=self.fused_loss)
        self.train(was_training)
        reference = self.reference_logps(batch)
        scores = self.score(texts, decode(tokenizer, completions, mask)).to(completions.device)
        rewards, advantages, returns, kl = ppo_advantages(old["logps"], reference, old["values"], scores, mask,
                                                          self.kl_coef, self.options.gamma, self.options.lam)
        batch.update(old_logps=old["logps"], old_values=old["values"], advantages=advantages, returns=returns,
                     scores=scores, kl=kl, kl_coef=self.kl_coef)
        if update_kl and self.options.target_kl is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, float(kl.mean()), self.options.target_kl,
                                            completions.size(0), self.options.kl_horizon)
        return batch

    def forward(self, batch: dict) -> TaskOutput:
        o = self.options
        out = policy_outputs(self.backbone, batch, o.temperature, self.head, entropy=True, fused=self.fused_loss)
        mask = batch["completion_mask"]
        loss_sum, sums = ppo_loss_sum(out["logps"], out["values"], batch, mask, o.clip_range, o.clip_range_value,
                                      o.vf_coef)
        n = float(mask.sum())
        sums["entropy"] = float((out["entropy"] * mask).sum())
        for key in ("reward", "kl", "kl_coef"):  # rollout-level figures, weighted so the loop's mean returns them
            sums[key] = batch["rollout_metrics"][key] * n
        return TaskOutput(loss_sum, int(n), None, sums)


def ppo_advantages(old_logps, reference_logps, old_values, scores, mask, kl_coef: float, gamma: float, lam: float):
    """Per-token rewards (KL penalty + score at the last real token), GAE advantages (whitened) and returns."""
    mask = mask.float()
    kl = kl_k1(old_logps, reference_logps) * mask  # (N, C)
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (N,) the last real completion token
    rewards[torch.arange(rewards.size(0)), last] += scores
    advantages, returns = gae(rewards, old_values, mask, gamma, lam)
    advantages = whiten(advantages, mask) * mask
    return rewards, advantages, returns, kl.sum(1)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. (2019) §2.2: move kl_coef so the observed KL approaches the target."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def ppo_loss_sum(logps, values, batch: dict, mask, clip_range: float, clip_range_value: float,
                 vf_coef: float) -> tuple[torch.Tensor, dict]:
    """Sum over completion tokens of PPO's clipped policy loss + vf_coef x clipped value loss, and metric sums."""
    n = mask.float().sum()
    policy, policy_metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_range)
    value, value_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip_range_value)
    loss_sum = (policy + vf_coef * value) * n  # masked means -> sums over the tokens
    count = float(n)
    sums = {"clipfrac": policy_metrics["clip_fraction"] * count, "approx_kl": policy_metrics["approx_kl"] * count,
            "value_loss": float(value.detach()) * count, "value_clipfrac": value_metrics["value_clip_fraction"] * count,
            "policy_loss": float(policy.detach()) * count}
    return loss_sum, sums


def decode(tokenizer, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(completions.cpu(), mask.cpu())]


def to_json(batch: dict) -> dict:
    """A rollout micro-batch as JSON: tensors as {dtype, data} (float32 values survive the float64 round trip)."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = {"dtype": str(value.dtype).removeprefix("torch."), "data": value.detach().cpu().tolist()}
        else:
            out[key] = value
    return out


def from_json(record: dict) -> dict:
    return {key: torch.tensor(value["data"], dtype=getattr(torch, value["dtype"]))
            if isinstance(value, dict) and set(value) == {"dtype", "data"} else value for key, value in record.items()}


def build_align_task_model(backbone: nn.Module, task) -> AlignTaskModel:
    """The TaskModel of a reward, preference, grpo or ppo task."""
    if task.kind in RL_KINDS:
        return build_rl_task_model(backbone, task)
    return build_pair_task_model(backbone, task)


def build_rl_task_model(backbone: nn.Module, task) -> RLTaskModel:
    if task.kind == "grpo":
        return GRPOTaskModel(backbone, task)
    if task.kind == "ppo":
        return PPOTaskModel(backbone, task)
    raise ValueError(f"[task] kind = {task.kind!r} is not an RL task ({', '.join(RL_KINDS)})")


def rollout_generator(seed: int, index: int, device) -> torch.Generator:
    """The sampling generator of rollout `index`: a pure function of (seed, index), so resume redraws it."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + index) % (2**63 - 1) if index >= 0 else
                          (seed * 1_000_033 + 7919 * -index) % (2**63 - 1))
    return generator

