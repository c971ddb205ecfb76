"""Losses: shifted next-token loss, gradient accumulation by total target tokens, BERT masking, classification."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.losses import (
    ClassificationHead,
    classification_loss,
    count_target_tokens,
    mask_tokens,
    mlm_loss,
    next_token_loss,
    pool,
    token_loss_sum,
)

# ----------------------------------------------------------------------------------------------------
# Next-token loss and gradient accumulation
# ----------------------------------------------------------------------------------------------------


def test_next_token_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    manual = [F.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
              for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    total, n = token_loss_sum(logits, labels)
    assert n == len(manual) == count_target_tokens(labels) == 5
    assert torch.allclose(total, torch.stack(manual).sum())
    assert torch.allclose(next_token_loss(logits, labels, reduction="sum"), total)
    assert torch.allclose(next_token_loss(logits, labels), total / 5)
    assert torch.allclose(next_token_loss(logits, labels, num_target_tokens=20), total / 20)
    assert next_token_loss(logits, torch.full_like(labels, -100)).item() == 0.0  # no targets: 0, not NaN


class TinyLM(nn.Module):
    """Embedding + linear: logits depend only on the current token, so padding changes nothing."""

    def __init__(self, vocab=13, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.embed(input_ids)))  # (B, T, V)


def make_batch(generator):
    """8 examples of different lengths and prompt lengths: 1 to 9 target tokens each, padded with -100."""
    input_ids = torch.randint(0, 13, (8, 12), generator=generator)
    labels = input_ids.clone()
    lengths = [12, 5, 9, 3, 11, 7, 4, 10]
    prompts = [2, 1, 6, 0, 1, 3, 2, 8]
    for row, (n, prompt) in enumerate(zip(lengths, prompts)):
        labels[row, n:] = -100
        labels[row, :prompt] = -100
    return input_ids, labels


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_divides_by_total_target_tokens():
    generator = torch.Generator().manual_seed(0)
    input_ids, labels = make_batch(generator)
    torch.manual_seed(0)
    model = TinyLM()
    per_example = [count_target_tokens(labels[i : i + 1]) for i in range(8)]
    assert len(set(per_example)) > 3  # unequal target counts, the case where averaging goes wrong

    next_token_loss(model(input_ids), labels).backward()  # one batch of 8
    big_batch = gradients(model)

    model.zero_grad()
    micro = [(input_ids[i : i + 2], labels[i : i + 2]) for i in range(0, 8, 2)]  # 4 micro-batches of 2
    n_total = sum(count_target_tokens(y) for _, y in micro)
    for x, y in micro:
        next_token_loss(model(x), y, num_target_tokens=n_total).backward()
    accumulated = gradients(model)
    for a, b in zip(big_batch, accumulated):
        assert torch.allclose(a, b, atol=1e-6)

    model.zero_grad()
    for x, y in micro:  # the known failure: mean per micro-batch, then / number of micro-batches
        (next_token_loss(model(x), y) / len(micro)).backward()
    naive = gradients(model)
    worst = max((a - b).abs().max().item() for a, b in zip(big_batch, naive))
    assert worst > 1e-3


# ----------------------------------------------------------------------------------------------------
# Masked LM
# ----------------------------------------------------------------------------------------------------

VOCAB, MASK, CLS, SEP, PAD = 1000, 3, 1, 2, 0
SPECIAL = {PAD, CLS, SEP, MASK}


def bert_like_batch(rows=1000, length=64, seed=0):
    """[CLS] tokens [SEP] [PAD]... with random lengths; ordinary ids are >= 4."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(5, length + 1, (rows,), generator=generator)
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def binomial_tolerance(p, n, sigmas=5):
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_mask_tokens_statistics_per_token():
    ids, attention = bert_like_batch()
    masked, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                                 attention_mask=attention, generator=torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    picked = labels != -100
    maskable = ~special & (attention == 1)
    n_maskable, n_picked = int(maskable.sum()), int(picked.sum())

    assert not (picked & special).any() and not (picked & (attention == 0)).any()  # never special, never padding
    assert torch.equal(labels[picked], ids[picked])  # the label is the original token ...
    assert torch.equal(masked[~picked], ids[~picked])  # ... and nothing else changes
    # 15% of the maskable tokens; binomial standard deviation sqrt(p (1 - p) / n), 5 sigma tolerance
    assert abs(n_picked / n_maskable - 0.15) < binomial_tolerance(0.15, n_maskable)
    became_mask = masked[picked] == MASK
    unchanged = masked[picked] == ids[picked]  # includes random draws that hit the same id (p = 1/996)
    became_random = ~became_mask & ~unchanged
    for fraction, expected in [(became_mask, 0.8), (became_random, 0.1), (unchanged, 0.1)]:
        assert abs(fraction.float().mean().item() - expected) < binomial_tolerance(expected, n_picked)
    assert not torch.isin(masked[picked][became_random], torch.tensor(sorted(SPECIAL))).any()


def test_mask_tokens_exact_count():
    ids, attention = bert_like_batch(rows=200)
    masked, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                                 attention_mask=attention, mode="exact", generator=torch.Generator().manual_seed(2))
    for row in range(ids.size(0)):
        n_maskable = int(((attention[row] == 1) & ~torch.isin(ids[row], torch.tensor(sorted(SPECIAL)))).sum())
        assert int((labels[row] != -100).sum()) == max(1, round(0.15 * n_maskable))
    assert (labels[ids == CLS] == -100).all() and (labels[attention == 0] == -100).all()


@pytest.mark.parametrize("mode", ["per_token", "exact"])
def test_whole_word_masking_masks_all_pieces(mode):
    rows = 200
    ids, attention = bert_like_batch(rows=rows, length=40, seed=3)
    generator = torch.Generator().manual_seed(4)
    piece_counts = torch.randint(1, 4, (rows, 40), generator=generator)  # words of 1-3 pieces
    word_ids = torch.stack([torch.repeat_interleave(torch.arange(40), counts)[:40] for counts in piece_counts])
    word_ids[ids == CLS] = -1
    word_ids[ids == SEP] = -1
    word_ids[attention == 0] = -1
    masked, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                                 attention_mask=attention, mode=mode, whole_word_ids=word_ids,
                                 generator=torch.Generator().manual_seed(5))
    picked = labels != -100
    n_words = n_words_picked = 0
    for row in range(rows):
        words = word_ids[row][word_ids[row] >= 0]
        picked_words = word_ids[row][picked[row]].unique()
        # a word goes together: every piece of a picked word is picked
        assert torch.equal(picked[row], torch.isin(word_ids[row], picked_words) & (word_ids[row] >= 0))
        n_words += len(words.unique())
        n_words_picked += len(picked_words)
        if mode == "exact":  # the budget in tokens; one word may overshoot it only when it is the only pick
            n_picked, budget = int(picked[row].sum()), max(1, round(0.15 * len(words)))
            assert n_picked >= 1 and (n_picked <= budget or len(picked_words) == 1)
    if mode == "per_token":
        assert abs(n_words_picked / n_words - 0.15) < binomial_tolerance(0.15, n_words)
    assert not picked[word_ids < 0].any()


def test_mask_tokens_reads_ids_from_tokenizer_and_is_reproducible():
    class Tok:
        vocab_size, pad_token_id, mask_token_id, special_ids = VOCAB, PAD, MASK, {CLS, SEP, MASK}

    ids, attention = bert_like_batch(rows=20)
    first = mask_tokens(ids, Tok(), generator=torch.Generator().manual_seed(7))
    second = mask_tokens(ids, Tok(), generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert (first[1][ids == PAD] == -100).all()  # pad id treated as special even without attention_mask
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, vocab_size=VOCAB)


def test_mlm_loss_is_unshifted_mean_over_masked():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9)
    labels = torch.tensor([[-100, 5, -100, -100], [2, -100, -100, 8]])
    expected = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(mlm_loss(logits, labels), expected)


# ----------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------


def test_pooling_right_and_left_padding():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.allclose(pool(hidden, right, "mean")[0], hidden[0, :3].mean(0))
    assert torch.allclose(pool(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.equal(pool(hidden, left, "last"), hidden[:, 4])
    with pytest.raises(ValueError, match="no real token"):
        pool(hidden, torch.zeros(2, 5), "last")


def test_classification_head_and_loss():
    torch.manual_seed(0)
    head = ClassificationHead(dim=4, num_classes=3, pooling="last", dropout=0.0)
    hidden, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    logits = head(hidden, mask)
    assert logits.shape == (2, 3)
    assert torch.allclose(logits, head.linear(pool(hidden, mask, "last")))
    labels = torch.tensor([2, 0])
    assert torch.allclose(classification_loss(logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="logits must be"):
        classification_loss(logits, torch.tensor([1]))
