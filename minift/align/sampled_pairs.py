"""Preference pairs from the model's own samples, ranked by a reward model (on-policy data for DPO).

Lesson
------
DPO learns from pairs, but the pairs need not come from people: given a reward model, the policy can make its own
(as in RLHF pipelines that replace PPO by DPO on sampled data; Xiong et al. 2024, "iterative DPO"):

    prompt x --sample n completions from pi (KV-cache generate, seeded)--> y_1 .. y_n
            --reward model r(x + y_i + EOS)--> scores --chosen = argmax, rejected = argmin--> {prompt, chosen, rejected}

Pairs are skipped when the best and worst completions are the same text, have equal scores, or one is empty
(check_preference would refuse them). Each record also keeps chosen_reward and rejected_reward, which DPO ignores
and a reader may look at. `minift pairs` runs this and writes the JSONL atomically.

Sampling is reproducible: one generator seeded with `seed` draws every batch in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minift.io.files import write_text_atomic


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A text prompt's token ids, led by BOS when the tokenizer adds one (as the RL tasks' prompts, rl_data.py)."""
    add_bos = getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
    return ([tokenizer.bos_token_id] if add_bos else []) + tokenizer.encode(prompt)


@torch.no_grad()
def sample_preference_pairs(policy, tokenizer, reward_model, reward_tokenizer, prompts: list[str], samples: int = 4,
                            max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None,
                            top_p: float | None = None, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """For each prompt, the best and the worst of `samples` sampled completions under the reward model."""
    if samples < 2:
        raise ValueError(f"sample_preference_pairs: samples must be >= 2 to rank completions, got {samples}")
    if tokenizer.eos_token_id is None:
        raise ValueError("sample_preference_pairs: the policy's tokenizer has no EOS token to end completions")
    policy.eval()
    reward_model.eval()
    device = next(policy.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(seed)
    eos, reward_eos = tokenizer.eos_token_id, reward_tokenizer.eos_token_id
    pairs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [prompt_ids(tokenizer, p) for p in chunk]
        T = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=device).repeat_interleave(samples, 0)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
        mask = mask.repeat_interleave(samples, 0)
        out = policy.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              eos_token_id=eos, attention_mask=mask, generator=generator)[:, T:].tolist()
        texts = [tokenizer.decode(row[: row.index(eos)] if eos in row else row) for row in out]
        scored = [reward_tokenizer.encode(chunk[i // samples] + text) + ([reward_eos] if reward_eos is not None else [])
                  for i, text in enumerate(texts)]
        L = max(len(s) for s in scored)
        r_ids = torch.tensor([s + [0] * (L - len(s)) for s in scored], device=device)
        r_mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in scored], device=device)
        rewards = reward_model(r_ids, r_mask).view(len(chunk), samples).cpu()
        for i, prompt in enumerate(chunk):
            options = texts[i * samples : (i + 1) * samples]
            best, worst = int(rewards[i].argmax()), int(rewards[i].argmin())
            chosen, rejected = options[best], options[worst]
            if chosen == rejected or rewards[i, best] == rewards[i, worst] or not chosen.strip() or not rejected.strip():
                continue
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                          "chosen_reward": float(rewards[i, best]), "rejected_reward": float(rewards[i, worst])})
    return pairs


def write_pairs(pairs: list[dict], path: str | Path) -> Path:
    """Write pairs as JSONL (one object per line), atomically."""
    return write_text_atomic("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), path)
