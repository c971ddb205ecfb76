"""Losses for fine-tuning: next-token (completion-only), masked-LM masking and loss, classification.

Lesson
------
Next-token loss. A causal LM's logits at position t predict token t + 1, so logits and labels are shifted
against each other before the cross-entropy. Labels are -100 ("ignore") wherever no loss is wanted: the
prompt of an instruction example, padding. Only the completion (and its EOS) is learned:

    input_ids   <s> Below is an instruction ... ### Response:  Paris  .  </s>  <pad>
    labels      -100 -100 ...                          -100     Paris  .  </s>  -100
    logits[t] is scored against labels[t + 1]

Gradient accumulation. A step over k micro-batches must give the gradient of ONE batch: the sum of all
token losses divided by N, the number of target tokens in ALL k micro-batches together:

    right:  loss_i = sum_tokens(micro-batch i) / N_total          (backward each; the grads add up)
    wrong:  loss_i = mean_tokens(micro-batch i) / k               (a known bug in several trainers)

The wrong version weighs a token in a micro-batch with few targets more than a token in one with many,
so the accumulated gradient differs from the big batch whenever target counts differ (they always do with
completion-only labels and padding). `token_loss_sum` returns (sum, count) so the loop can count N first.

Masked LM (BERT, Devlin et al. 2019, §3.1). Pick 15% of the non-special tokens; of those, 80% become [MASK],
10% a random token, 10% stay as they are; the loss is taken only on the picked tokens. "exact" mode picks
max(1, round(0.15 * n)) tokens per sequence like BERT's original code; "per_token" draws each token
independently with p = 0.15 like transformers' DataCollatorForLanguageModeling. Whole-word masking picks
words, then masks every piece of each picked word.

Classification. Pool the hidden states (B, T, d) to one vector per sequence, then dropout and a linear layer:
"mean" over real tokens (encoders), "cls" the first token (BERT's [CLS]), "last" the last real token
(decoders: only it has seen the whole text).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------
# Next-token loss
# ----------------------------------------------------------------------------------------------------


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   shift: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of target tokens). shift=True for causal LMs, False for MLM.

    Computed in float32 whatever the logits' dtype. The sum is 0.0 (still differentiable) when there are
    no targets.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"token_loss_sum: logits must be (B, T, V) and labels (B, T); "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if shift:
        logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
        labels = labels[:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="sum")
    return loss_sum, int((labels != ignore_index).sum())


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, shift: bool = True) -> int:
    """Number of tokens that contribute to the loss; sum it over all micro-batches to get N_total."""
    return int(((labels[:, 1:] if shift else labels) != ignore_index).sum())


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                    reduction: str = "mean", num_target_tokens: int | None = None) -> torch.Tensor:
    """Shifted cross-entropy of a causal LM: logits (B, T, V) against labels (B, T) (-100 = no loss).

    reduction "sum": the summed token losses. "mean": divided by the number of target tokens, by default
    those in this batch; for gradient accumulation pass num_target_tokens = N_total, the count over all
    accumulated micro-batches (see the module lesson), so the micro-batch losses add up to the big batch's.
    """
    loss_sum, n_targets = token_loss_sum(logits, labels, ignore_index, shift=True)
    if reduction == "sum":
        return loss_sum
    if reduction != "mean":
        raise ValueError(f"next_token_loss: reduction must be 'sum' or 'mean', got {reduction!r}")
    denominator = num_target_tokens if num_target_tokens is not None else n_targets
    return loss_sum / max(denominator, 1)


# ----------------------------------------------------------------------------------------------------
# Masked LM
# ----------------------------------------------------------------------------------------------------


def _choose_exact(maskable: torch.Tensor, words: torch.Tensor | None, probability: float, generator) -> torch.Tensor:
    """Per row, pick random tokens (or whole words) until max(1, round(p * n_maskable)) tokens are picked.

    maskable (B, T) bool; words (B, T) long word index per token, or None for single tokens. As in BERT's
    create_masked_lm_predictions, a word that would overshoot the budget is skipped, except that the
    first word is always taken, so every row has a target. (Python's round: halves go to the even neighbour.)
    """
    chosen = torch.zeros_like(maskable)
    for row in range(maskable.size(0)):
        n_maskable = int(maskable[row].sum())
        if n_maskable == 0:
            continue
        budget = max(1, round(probability * n_maskable))
        if words is None:
            scores = torch.rand(maskable.size(1), generator=generator).masked_fill(~maskable[row], 2.0)  # (T,)
            chosen[row, scores.argsort()[:budget]] = True
            continue
        row_words = words[row][maskable[row]].unique()  # (n_words,)
        picked = 0
        for word in row_words[torch.randperm(len(row_words), generator=generator)].tolist():
            members = maskable[row] & (words[row] == word)  # (T,)
            size = int(members.sum())
            if picked + size <= budget or picked == 0:
                chosen[row] |= members
                picked += size
            if picked >= budget:
                break
    return chosen


def _choose_per_unit(maskable: torch.Tensor, words: torch.Tensor | None, probability: float, generator) -> torch.Tensor:
    """Each token, or each word with all its pieces, is picked independently with `probability`."""
    if words is None:
        draws = torch.rand(maskable.shape, generator=generator)  # (B, T): one draw per token
    else:
        word_draws = torch.rand(maskable.size(0), max(int(words.max()), 0) + 1, generator=generator)  # (B, n_words)
        draws = word_draws.gather(1, words.clamp(min=0))  # (B, T): every piece shares its word's draw
    return maskable & (draws < probability)


def mask_tokens(
    input_ids: torch.Tensor,
    tokenizer=None,
    *,
    mask_token_id: int | None = None,
    vocab_size: int | None = None,
    special_ids: Iterable[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    mlm_probability: float = 0.15,
    mode: str = "per_token",
    whole_word_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of input_ids (B, T) -> (masked_input_ids, labels), labels -100 where nothing was picked.

    Ids come from `tokenizer` (mask_token_id, vocab_size, special_ids, pad_token_id) unless given as keywords.
    Special tokens and padding (attention_mask == 0) are never picked. Of the picked tokens 80% become
    [MASK], 10% a random non-special token, 10% stay. mode "per_token": each token (or word) independently
    with p = mlm_probability; "exact": max(1, round(p * n_maskable)) tokens per row. whole_word_ids (B, T):
    a word index per token (-1 for none); all pieces of a picked word are masked together. Pass a seeded
    torch.Generator for reproducible masks (the same generator drives every draw, on the CPU).
    """
    if tokenizer is not None:
        mask_token_id = mask_token_id if mask_token_id is not None else getattr(tokenizer, "mask_token_id", None)
        vocab_size = vocab_size if vocab_size is not None else tokenizer.vocab_size
        if special_ids is None:
            special_ids = set(tokenizer.special_ids) | {i for i in [tokenizer.pad_token_id] if i is not None}
    if mask_token_id is None:
        raise ValueError("mask_tokens: no mask token id; the tokenizer has no mask token, pass mask_token_id=...")
    if vocab_size is None:
        raise ValueError("mask_tokens: pass vocab_size=... or a tokenizer")
    if mode not in ("per_token", "exact"):
        raise ValueError(f"mask_tokens: mode must be 'per_token' or 'exact', got {mode!r}")
    special = torch.tensor(sorted(set(special_ids or ()) | {mask_token_id}), dtype=torch.long)
    device = input_ids.device
    ids = input_ids.cpu()  # (B, T); draws happen on the CPU so a CPU generator works for any device

    maskable = ~torch.isin(ids, special)  # (B, T)
    if attention_mask is not None:
        maskable &= attention_mask.cpu().bool()
    if whole_word_ids is not None:
        if whole_word_ids.shape != ids.shape:
            raise ValueError(f"mask_tokens: whole_word_ids {tuple(whole_word_ids.shape)} must match "
                             f"input_ids {tuple(ids.shape)}")
        words = whole_word_ids.cpu().long()  # (B, T)
        maskable &= words >= 0
    else:
        words = None
    choose = _choose_exact if mode == "exact" else _choose_per_unit
    picked = choose(maskable, words, mlm_probability, generator)  # (B, T) bool

    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))  # (B, T)
    action = torch.rand(ids.shape, generator=generator)  # (B, T): < 0.8 mask, < 0.9 random, else keep
    to_mask = picked & (action < 0.8)
    to_random = picked & (action >= 0.8) & (action < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    candidates = allowed.nonzero().flatten()  # random replacements are never special tokens
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]  # (B, T)
    masked = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked.to(device), labels.to(device)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (no shift: the logits at t predict the token at t)."""
    loss_sum, n_targets = token_loss_sum(logits, labels, ignore_index, shift=False)
    return loss_sum / max(n_targets, 1)


# ----------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str = "mean") -> torch.Tensor:
    """hidden (B, T, d), attention_mask (B, T) with 1 = real token -> (B, d).

    "mean": average over real tokens. "cls": the first position. "last": the last real token (works with
    right or left padding).
    """
    B, T, _ = hidden.shape
    mask = torch.ones(B, T, device=hidden.device) if attention_mask is None else attention_mask.to(hidden.device)
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, d)
    if how == "cls":
        return hidden[:, 0]  # (B, d)
    if how == "last":
        positions = torch.arange(T, device=hidden.device).expand(B, T)  # (B, T)
        last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
        if (last < 0).any():
            raise ValueError("pool: a row of attention_mask has no real token")
        return hidden[torch.arange(B, device=hidden.device), last]  # (B, d)
    raise ValueError(f"pool: how must be 'mean', 'cls' or 'last', got {how!r}")


class ClassificationHead(nn.Module):
    """Pool -> dropout -> linear: hidden states (B, T, d) to class logits (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"ClassificationHead: pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.pooling)  # (B, d)
        return self.linear(self.dropout(pooled))  # (B, num_classes)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of class logits (B, C) against class ids (B,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"classification_loss: logits must be (B, C) and labels (B,); "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.long())
