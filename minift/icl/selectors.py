"""Example selectors: which k training examples become the demonstrations for a query.

Lesson
------
The same model with the same template can swing by tens of accuracy points depending on which examples
it sees (Liu et al. 2022, KATE; Rubin et al. 2022). Four selectors, all with one interface:

    selector.fit(texts, labels)                      # the pool of labelled examples
    selector.select(query, k) -> [Selection(index, score), ...]   most relevant first

* FixedSelector   the same given examples for every query (order-sensitivity experiments).
* RandomSelector  uniform draws, seeded. `stratified=True` draws the same number of examples from each
                  label (the remainder from randomly chosen labels). `per_query=False` (default) uses one
                  draw for every query: the classic few-shot setting (Brown et al. 2020; Zhao et al.
                  2021), which also lets every query share one cached prefix.
* BM25Selector    lexical overlap with the query (bm25.py).
* KNNSelector     cosine similarity of sentence embeddings (embeddings.py); KATE's "kNN-roberta" rule.
* MMRSelector     maximal marginal relevance (Carbonell & Goldstein 1998). Greedily pick

                      argmax_{d not chosen}  lambda * sim(d, q)  -  (1 - lambda) * max_{s chosen} sim(d, s)

                  lambda = 1 is plain kNN; lower lambda trades relevance for diversity, so the k examples
                  are not k near-copies of one another (a common failure of kNN on tweets and retweets).

`score` is the relevance to the query (BM25 score, cosine similarity, or 0 for random); arrange.py uses
it to order the demonstrations.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from minift.icl.bm25 import BM25Index


@dataclass(frozen=True)
class Selection:
    index: int  # position in the pool given to fit()
    score: float  # relevance to the query (higher = more relevant)


class Selector:
    """Base class: remembers the pool; subclasses implement `select`."""

    name = "base"

    def fit(self, texts: list[str], labels: list[str]) -> "Selector":
        if len(texts) != len(labels):
            raise ValueError(f"{type(self).__name__}.fit: {len(texts)} texts but {len(labels)} labels")
        if len(texts) == 0:
            raise ValueError(f"{type(self).__name__}.fit: the example pool is empty")
        self.texts, self.labels = list(texts), [str(y) for y in labels]
        return self

    def _check(self, k: int) -> int:
        if not hasattr(self, "texts"):
            raise RuntimeError(f"{type(self).__name__}: call fit(texts, labels) before select()")
        if k < 0:
            raise ValueError(f"number of shots must be >= 0, got {k}")
        return min(k, len(self.texts))

    def select(self, query: str, k: int) -> list[Selection]:
        raise NotImplementedError

    def select_many(self, queries: list[str], k: int) -> list[list[Selection]]:
        return [self.select(q, k) for q in queries]


class RandomSelector(Selector):
    name = "random"

    def __init__(self, seed: int = 0, stratified: bool = False, per_query: bool = False) -> None:
        self.seed, self.stratified, self.per_query = seed, stratified, per_query

    def select(self, query: str, k: int) -> list[Selection]:
        k = self._check(k)
        # The same query always gets the same draw, whatever order queries come in.
        salt = zlib.crc32(query.encode("utf-8")) if self.per_query else 0
        rng = np.random.default_rng([self.seed, salt])
        if not self.stratified:
            chosen = rng.choice(len(self.texts), size=k, replace=False)
            return [Selection(int(i), 0.0) for i in chosen]
        by_label: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            by_label.setdefault(label, []).append(i)
        pools = {label: list(rng.permutation(ids)) for label, ids in sorted(by_label.items())}
        labels = list(pools)
        quota = {label: k // len(labels) for label in labels}
        for label in rng.permutation(labels)[: k % len(labels)]:  # the remainder goes to random labels
            quota[str(label)] += 1
        chosen: list[int] = []
        for label in labels:
            take = min(quota[label], len(pools[label]))
            chosen += [int(i) for i in pools[label][:take]]
            quota[label] -= take
        # A label with too few examples: fill the gap from the rest of the pool.
        taken = set(chosen)
        leftover = [i for i in rng.permutation(len(self.texts)) if int(i) not in taken]
        chosen += [int(i) for i in leftover[: k - len(chosen)]]
        rng.shuffle(chosen)
        return [Selection(i, 0.0) for i in chosen]


class FixedSelector(Selector):
    """The same hand-picked examples (pool indices, in prompt order) for every query: order experiments."""

    name = "fixed"

    def __init__(self, indices: list[int]) -> None:
        self.indices = [int(i) for i in indices]

    def select(self, query: str, k: int) -> list[Selection]:
        k = self._check(k)
        bad = [i for i in self.indices if not 0 <= i < len(self.texts)]
        if bad:
            raise ValueError(f"FixedSelector: indices {bad} are outside the pool of {len(self.texts)} examples")
        return [Selection(i, 0.0) for i in self.indices[:k]]


class BM25Selector(Selector):
    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.progress: bool | None = False  # a bar while indexing a large pool (None: on a terminal only)

    def fit(self, texts, labels) -> "BM25Selector":
        super().fit(texts, labels)
        self.index = BM25Index(self.texts, k1=self.k1, b=self.b, progress=self.progress)
        return self

    def select(self, query: str, k: int) -> list[Selection]:
        k = self._check(k)
        scores = self.index.scores(query)  # (N,)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Selection(int(i), float(scores[i])) for i in order]


class KNNSelector(Selector):
    """Nearest neighbours by cosine similarity. `embedder` has `.embed(texts) -> (N, d)` unit vectors."""

    name = "knn"

    def __init__(self, embedder=None) -> None:
        self.embedder = embedder

    def _embedder(self):
        if self.embedder is None:  # loaded lazily: MiniLM costs a couple of seconds
            from minift.icl.embeddings import Embedder

            self.embedder = Embedder.from_pretrained("minilm-l6")
        return self.embedder

    def fit(self, texts, labels) -> "KNNSelector":
        super().fit(texts, labels)
        self.pool_embeddings = torch.nn.functional.normalize(self._embedder().embed(self.texts).float(), dim=-1)  # (N, d)
        return self

    def similarities(self, queries: list[str]) -> torch.Tensor:
        q = torch.nn.functional.normalize(self._embedder().embed(queries).float(), dim=-1)  # (Q, d)
        return q @ self.pool_embeddings.T  # (Q, N) cosine similarities

    def select(self, query: str, k: int) -> list[Selection]:
        return self.select_many([query], k)[0]

    def select_many(self, queries: list[str], k: int) -> list[list[Selection]]:
        k = self._check(k)
        if k == 0:
            return [[] for _ in queries]
        sims = self.similarities(queries)  # (Q, N)
        return [self._choose(row, k) for row in sims]

    def _choose(self, sims: torch.Tensor, k: int) -> list[Selection]:
        top = torch.topk(sims, k)  # ties: torch keeps the lower index first on CPU
        return [Selection(int(i), float(s)) for s, i in zip(top.values, top.indices)]


class MMRSelector(KNNSelector):
    """Maximal marginal relevance over the `fetch_k` nearest neighbours (lambda = relevance weight)."""

    name = "mmr"

    def __init__(self, embedder=None, lambda_: float = 0.5, fetch_k: int = 50) -> None:
        super().__init__(embedder)
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"MMR lambda must be in [0, 1], got {lambda_}")
        self.lambda_, self.fetch_k = lambda_, fetch_k

    def _choose(self, sims: torch.Tensor, k: int) -> list[Selection]:
        shortlist = torch.topk(sims, min(max(self.fetch_k, k), sims.numel())).indices  # (F,)
        vectors = self.pool_embeddings[shortlist]  # (F, d)
        return [Selection(int(shortlist[j]), float(sims[shortlist[j]]))
                for j in mmr_order(sims[shortlist], vectors @ vectors.T, k, self.lambda_)]


def mmr_order(relevance: torch.Tensor, pairwise: torch.Tensor, k: int, lambda_: float) -> list[int]:
    """Greedy MMR over candidates: relevance (F,) to the query, pairwise (F, F) similarities; k picks.

    Step 1 takes the most relevant candidate; each later step maximises
    lambda * relevance - (1 - lambda) * (largest similarity to anything already picked).
    Ties go to the lower candidate index.
    """
    chosen: list[int] = []
    available = torch.ones(relevance.numel(), dtype=torch.bool)
    redundancy = torch.full_like(relevance, float("-inf"))  # max similarity to the chosen set so far
    for _ in range(min(k, relevance.numel())):
        penalty = torch.where(torch.isinf(redundancy), torch.zeros_like(redundancy), redundancy)
        gain = lambda_ * relevance - (1.0 - lambda_) * penalty  # (F,)
        gain = gain.masked_fill(~available, float("-inf"))
        best = int(torch.argmax(gain))  # argmax returns the first maximum
        chosen.append(best)
        available[best] = False
        redundancy = torch.maximum(redundancy, pairwise[best])
    return chosen


SELECTORS = {"random": RandomSelector, "bm25": BM25Selector, "knn": KNNSelector, "mmr": MMRSelector}


def make_selector(name: str, embedder=None, seed: int = 0) -> Selector:
    """A selector by name: random | bm25 | knn | mmr (the embedding ones share `embedder`)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose one of {', '.join(SELECTORS)}")
    if name == "random":
        return RandomSelector(seed=seed)
    if name == "bm25":
        return BM25Selector()
    return SELECTORS[name](embedder=embedder)
