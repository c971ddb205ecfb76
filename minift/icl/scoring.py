"""Label scoring: which label word does the language model find most likely after the prompt?

Lesson
------
OpenICL's "PPL inferencer" (Wu et al. 2023) and lm-evaluation-harness score a classification prompt by
the log-likelihood of each candidate answer a = (a_1 .. a_m) given the prompt x:

    log p(a | x) = sum_j log p(a_j | x, a_<j)          "sum"  (favours short answers)
    log p(a | x) / m                                    "mean" (length-normalised)

and a label with several verbalizer words gets the log of their total probability, logsumexp over its
words (the choice of Zhao et al. 2021's code; "max" takes the best word instead).

The naive way runs the whole prompt once per candidate:

    [ instruction + 8 demos + query | " negative" ]   -> forward over P + Q + 1 tokens
    [ instruction + 8 demos + query | " neutral"  ]   -> again
    [ instruction + 8 demos + query | " positive" ]   -> and again          3 x (P + Q + 1) tokens

The prompt's keys and values do not depend on the candidate, so we compute them once in a KV cache and
feed only what differs (Pope et al. 2022 call this prefix sharing):

    prefix  (instruction + demos, P tokens)  --forward once, kept while the next query shares it-+
    query   (Q tokens)                       --forward once per query, cache rewound after------+
    answers (C candidates, m-1 tokens each)  --one batch on cache.expand(C); nothing at all when
                                               every answer is a single token: log p(a_1 | x) is
                                               read off the query's last position

Tokenization is done piece by piece (prefix, query, answer encoded separately and concatenated), so the
cached and the naive scorer see *identical* token ids and agree to float rounding; tests check it.
Only the positions that predict answer tokens go through the (vocab-sized) LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minift.icl.templates import Prompt, Template
from minift.model import KVCache

NORMALIZATIONS = ("sum", "mean")
AGGREGATIONS = ("logsumexp", "max")


class PromptEncoder:
    """Token ids of a prompt, piece by piece. Leading special tokens (a Llama BOS) are found by probing.

    The ids of the last few texts are remembered (`remember` of them, as compact int32 arrays): fitting a
    prompt to its budget (arrange.py) counts the same query piece once per number of demonstrations tried,
    truncates the same query text at every step of its search, and the scorer then encodes the winner
    again. With the memo each distinct text goes through the tokenizer once, so a 50 MB query costs two
    tokenizations (the query piece as it stands in the prompt, and the bare text that is cut by ids), plus
    hashing the strings at memory speed, instead of one per step of the search.
    """

    def __init__(self, tokenizer, remember: int = 8) -> None:
        self.tokenizer = tokenizer
        plain = list(tokenizer.encode("a", add_special_tokens=False))
        special = list(tokenizer.encode("a", add_special_tokens=True))
        has_leading = len(special) > len(plain) and special[len(special) - len(plain):] == plain
        self.leading = special[: len(special) - len(plain)] if has_leading else []  # e.g. [bos]
        self.remember = remember
        self._memo: dict[str, np.ndarray] = {}  # text -> ids, oldest first (dicts keep insertion order)

    def _ids(self, text: str) -> np.ndarray:
        ids = self._memo.pop(text, None)
        if ids is None:
            ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
            if len(self._memo) >= self.remember:
                del self._memo[next(iter(self._memo))]  # forget the least recently used text
        self._memo[text] = ids  # (re)inserted last: most recently used
        return ids

    def encode(self, text: str) -> list[int]:
        return self._ids(text).tolist() if text else []

    def prompt_ids(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """(prefix ids with any leading special tokens, query ids)."""
        return self.leading + self.encode(prompt.prefix), self.encode(prompt.query)

    def count(self, prompt: Prompt) -> int:
        """len(prefix ids) + len(query ids) of `prompt_ids`, without building the lists."""
        return len(self.leading) + self.token_count(prompt.prefix) + self.token_count(prompt.query)

    def token_count(self, text: str) -> int:
        return len(self._ids(text)) if text else 0

    def truncate(self, text: str, num_tokens: int) -> str:
        """The first `num_tokens` tokens of `text`, as text: cut by token ids (the text is tokenized once)."""
        if num_tokens <= 0 or not text:
            return ""
        return self.tokenizer.decode(self._ids(text)[:num_tokens].tolist())


def _check_causal(model) -> None:
    if not (model.config.causal and model.config.lm_head):
        raise ValueError("label scoring needs a causal language model with an lm_head (not an encoder)")


def _gather_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from hidden states (n, d) and target ids (n,): LM head on these rows only. -> (n,)"""
    logits = model.logits(hidden).float()  # (n, V): lm_head, then the final soft cap where there is one (Gemma 2)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@torch.no_grad()
def score_full(model, context_ids: list[int], continuations: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Naive: run context + each continuation as its own row (right-padded batch). -> (C,) summed log-probs."""
    _check_causal(model)
    if not context_ids:
        raise ValueError("cannot score a continuation of an empty prompt")
    device = next(model.parameters()).device
    rows = [context_ids + c for c in continuations]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):  # right padding: causal attention never lets a real token see the pads
        ids[i, : len(row)] = torch.tensor(row)
    hidden = model(ids.to(device), return_hidden=True)  # (C, T, d)
    n = len(context_ids)
    row_idx = torch.cat([torch.full((len(c),), i) for i, c in enumerate(continuations)])  # (sum m,)
    pos_idx = torch.cat([torch.arange(n - 1, n - 1 + len(c)) for c in continuations])  # position predicting each
    targets = torch.cat([torch.tensor(c) for c in continuations]).to(device)
    token_lp = _gather_logprobs(model, hidden[row_idx, pos_idx], targets)  # (sum m,)
    return torch.zeros(len(continuations), device=device).index_add_(0, row_idx.to(device), token_lp).cpu()


class PrefixCache:
    """Keys/values of the most recent prefix; rewound (length reset) after each query instead of copied."""

    def __init__(self) -> None:
        self.ids: tuple[int, ...] | None = None
        self.cache: KVCache | None = None
        self.last_hidden: torch.Tensor | None = None  # (1, d) final hidden state of the prefix
        self.hits = self.misses = 0

    def prepare(self, model, prefix_ids: list[int], room: int) -> KVCache:
        """A cache holding the prefix (computed now unless it is the previous one) with `room` free slots."""
        key, P = tuple(prefix_ids), len(prefix_ids)
        if self.ids == key and self.cache is not None:
            self.hits += 1
            if self.cache.k.size(3) < P + room:  # too small for this query: move into a bigger one
                bigger = self._empty(model, P + room)
                bigger.k[:, :, :, :P], bigger.v[:, :, :, :P] = self.cache.k[:, :, :, :P], self.cache.v[:, :, :, :P]
                self.cache = bigger
            self.cache.length = P  # rewind: forget the previous query
            return self.cache
        self.misses += 1
        self.ids, self.cache = key, self._empty(model, P + max(room, 64))
        device = self.cache.k.device
        hidden = model(torch.tensor([prefix_ids], device=device), cache=self.cache, return_hidden=True)  # (1, P, d)
        self.last_hidden = hidden[:, -1]  # (1, d)
        return self.cache

    @staticmethod
    def _empty(model, max_len: int) -> KVCache:
        p = next(model.parameters())
        return KVCache(model.config, batch_size=1, max_len=max_len, dtype=p.dtype, device=p.device)


@torch.no_grad()
def score_cached(model, prefix_ids: list[int], query_ids: list[int], continuations: list[list[int]],
                 prefix_cache: PrefixCache | None = None, pad_id: int = 0) -> torch.Tensor:
    """Prefix once (reused across calls through `prefix_cache`), query once, answers as one batch. -> (C,)"""
    _check_causal(model)
    if not prefix_ids and not query_ids:
        raise ValueError("cannot score a continuation of an empty prompt")
    prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
    longest = max(len(c) for c in continuations)
    device = next(model.parameters()).device
    room = len(query_ids) + longest - 1
    if prefix_ids:
        cache = prefix_cache.prepare(model, prefix_ids, room)
    else:  # nothing to share: a fresh cache for the query alone
        cache = PrefixCache._empty(model, room)
    if query_ids:
        hidden = model(torch.tensor([query_ids], device=device), cache=cache, return_hidden=True)  # (1, Q, d)
        last = hidden[:, -1]  # (1, d)
    else:
        last = prefix_cache.last_hidden
    C = len(continuations)
    first = torch.tensor([c[0] for c in continuations], device=device)  # (C,)
    scores = _gather_logprobs(model, last.expand(C, -1), first)  # (C,) log p(a_1 | prompt)
    if longest > 1:
        # Feed a_1 .. a_{m-1} of every answer in one batch over C copies of the cache.
        batch_cache = cache.expand(C)
        ids = torch.full((C, longest - 1), pad_id, dtype=torch.long)
        for i, c in enumerate(continuations):
            ids[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        hidden = model(ids.to(device), cache=batch_cache, return_hidden=True)  # (C, m-1, d)
        rows = torch.cat([torch.full((len(c) - 1,), i) for i, c in enumerate(continuations)])  # (sum (m-1),)
        cols = torch.cat([torch.arange(len(c) - 1) for c in continuations])
        targets = torch.cat([torch.tensor(c[1:], dtype=torch.long) for c in continuations]).to(device)
        if rows.numel():
            token_lp = _gather_logprobs(model, hidden[rows, cols], targets)
            scores = scores.index_add(0, rows.to(device), token_lp)
    return scores.cpu()


@dataclass
class LabelScores:
    candidate_logprobs: torch.Tensor  # (N, C) summed log-likelihood of each candidate answer
    label_scores: torch.Tensor  # (N, L) per label, after normalisation and aggregation

    @property
    def probabilities(self) -> torch.Tensor:
        """(N, L) label distribution: softmax over the label scores (the p of contextual calibration)."""
        return self.label_scores.softmax(-1)


class LabelScorer:
    """Score prompts against a template's label words.

        scorer = LabelScorer(model, tokenizer, template)          # prefix-cached by default
        result = scorer.score([prompt_1, prompt_2])               # LabelScores (N, L)
    """

    def __init__(self, model, tokenizer, template: Template, normalize: str = "sum", aggregate: str = "logsumexp",
                 use_cache: bool = True) -> None:
        _check_causal(model)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r}; choose one of {NORMALIZATIONS}")
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={aggregate!r}; choose one of {AGGREGATIONS}")
        self.model, self.template = model.eval(), template
        self.normalize, self.aggregate, self.use_cache = normalize, aggregate, use_cache
        self.encoder = PromptEncoder(tokenizer)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.labels = template.labels
        candidates = template.candidates()
        self.candidate_labels = [self.labels.index(label) for label, _ in candidates]
        self.candidate_ids = [self.encoder.encode(text) for _, text in candidates]
        for (label, text), ids in zip(candidates, self.candidate_ids):
            if not ids:
                raise ValueError(f"verbalizer {text!r} of label {label!r} encodes to no tokens")
        self.candidate_lengths = torch.tensor([len(ids) for ids in self.candidate_ids], dtype=torch.float32)
        self.prefix_cache = PrefixCache()

    @property
    def longest_answer(self) -> int:
        return max(len(ids) for ids in self.candidate_ids)

    def candidate_logprobs(self, prompt: Prompt) -> torch.Tensor:
        prefix, query = self.encoder.prompt_ids(prompt)
        if self.use_cache:
            return score_cached(self.model, prefix, query, self.candidate_ids, self.prefix_cache, self.pad_id)
        return score_full(self.model, prefix + query, self.candidate_ids, self.pad_id)

    def score(self, prompts: list[Prompt]) -> LabelScores:
        if not prompts:
            empty = torch.zeros(0, len(self.candidate_ids))
            return LabelScores(empty, torch.zeros(0, len(self.labels)))
        logprobs = torch.stack([self.candidate_logprobs(p) for p in prompts])  # (N, C)
        return LabelScores(logprobs, self.aggregate_labels(logprobs))

    def aggregate_labels(self, candidate_logprobs: torch.Tensor) -> torch.Tensor:
        """(N, C) candidate log-likelihoods -> (N, L) label scores."""
        scores = candidate_logprobs
        if self.normalize == "mean":
            scores = scores / self.candidate_lengths  # per-token average
        out = torch.full((scores.size(0), len(self.labels)), float("-inf"))
        for label in range(len(self.labels)):
            cols = [c for c, owner in enumerate(self.candidate_labels) if owner == label]
            words = scores[:, cols]  # (N, words of this label)
            out[:, label] = words.logsumexp(-1) if self.aggregate == "logsumexp" else words.max(-1).values
        return out
