"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use", §5).

Lesson
------
A few-shot prompt carries its own bias: the label that is most frequent among the demonstrations
(majority-label bias), the label of the last demonstration (recency bias), and words the model simply
likes (common-token bias). Zhao et al. estimate that bias by asking the *same* prompt about an input that
carries no content at all:

    p_cf = mean over x in {"N/A", "", "[MASK]"} of  p(label | demonstrations, query = x)
    p_cf = p_cf / sum(p_cf)                                               (L,)

An unbiased model would answer uniformly there, so every prediction is divided by that bias:

    W = diag(p_cf)^-1,  b = 0        q = W p   (then renormalised)        prediction = argmax_l q_l

(The paper writes softmax(W p + b); with b = 0 the argmax is the same. We return W p / sum(W p), which
are probabilities in the usual sense.) Calibrating the content-free distribution itself gives the
uniform distribution: that is exactly the condition the method imposes. The paper reports gains of up to
30 points for GPT-3 and much smaller variance across prompts and example orders.

Averaging: like the paper's released code we average the raw label probabilities (each prompt's
probabilities summed over the label's words, *not* renormalised per input) and normalise once at the end.
"""

from __future__ import annotations

import torch

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


def content_free_distribution(label_scores: torch.Tensor) -> torch.Tensor:
    """(K, L) label log-scores of K content-free inputs -> p_cf (L,), the normalised mean probability."""
    if label_scores.dim() != 2 or label_scores.size(0) == 0:
        raise ValueError(f"content-free scores must be (K >= 1, L), got shape {tuple(label_scores.shape)}")
    # exp of log-scores whose largest entry is 0: keeps tiny multi-token likelihoods away from underflow.
    shift = label_scores.max()
    probs = (label_scores - shift).exp().mean(0)  # (L,)
    return probs / probs.sum()


def calibrate(probabilities: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """q = diag(p_cf)^-1 p, renormalised. probabilities (N, L) or (L,); content_free (L,) or (N, L)."""
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    p_cf = torch.as_tensor(content_free, dtype=torch.float64)
    if p.shape[-1] != p_cf.shape[-1]:
        raise ValueError(f"calibrate: {p.shape[-1]} labels in the probabilities but {p_cf.shape[-1]} in p_cf")
    if bool((p_cf <= 0).any()):
        raise ValueError("calibrate: content-free probabilities must be strictly positive")
    p = p / p.sum(-1, keepdim=True)
    q = p / p_cf  # W p with W = diag(p_cf)^-1
    return (q / q.sum(-1, keepdim=True)).to(torch.as_tensor(probabilities).dtype)


def calibrated_predictions(probabilities: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """argmax_l of the calibrated distribution: (N,) label indices."""
    return calibrate(probabilities, content_free).argmax(-1)
