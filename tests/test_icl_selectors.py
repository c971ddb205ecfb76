"""Selectors (random, kNN, MMR), demonstration orders and the token-budget fitter."""

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from minift.icl.arrange import fit_to_budget, order_demonstrations
from minift.icl.embeddings import Embedder, PrecomputedEmbedder
from minift.icl.scoring import PromptEncoder
from minift.icl.selectors import FixedSelector, KNNSelector, MMRSelector, RandomSelector, Selection, make_selector, mmr_order
from minift.icl.templates import Template
from tests.test_icl_support import ByteTokenizer, tiny_decoder, tiny_encoder


def vectors_embedder(n_pool=60, n_query=6, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = {f"p{i}": torch.randn(dim, generator=g) for i in range(n_pool)}
    queries = {f"q{i}": torch.randn(dim, generator=g) for i in range(n_query)}
    return PrecomputedEmbedder({**pool, **queries}), list(pool), list(queries)


# ---------------------------------------------------------------------------------------------- kNN


def test_knn_returns_the_true_nearest_neighbours():
    embedder, pool, queries = vectors_embedder()
    selector = KNNSelector(embedder).fit(pool, ["x"] * len(pool))
    P = F.normalize(torch.stack([embedder.table[t] for t in pool]), dim=-1)
    for query, chosen in zip(queries, selector.select_many(queries, k=5)):
        q = F.normalize(embedder.table[query], dim=0)
        brute = sorted(range(len(pool)), key=lambda i: -float(P[i] @ q))[:5]  # brute-force cosine ranking
        assert [s.index for s in chosen] == brute
        assert [s.score for s in chosen] == pytest.approx([float(P[i] @ q) for i in brute], abs=1e-6)
    assert selector.select(queries[0], 5) == selector.select_many(queries[:1], 5)[0]


@pytest.mark.parametrize("make_model", [tiny_encoder, tiny_decoder])
def test_embedder_is_independent_of_batching_and_padding(make_model):
    texts = ["short", "a much longer sentence with many more bytes in it", "mid length text", "x"]
    embedder = Embedder(make_model(), ByteTokenizer(), batch_size=3)
    together = embedder.embed(texts)  # (4, d), padded batches
    alone = torch.cat([embedder.embed([t]) for t in texts])
    assert together.shape == (4, 32)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(4), atol=1e-5)


# ---------------------------------------------------------------------------------------------- MMR


def reference_mmr(relevance, pairwise, k, lam):
    """MMR written straight from Carbonell & Goldstein's formula, one candidate at a time."""
    chosen = []
    for _ in range(k):
        best, best_gain = None, None
        for d in range(len(relevance)):
            if d in chosen:
                continue
            redundancy = max((pairwise[d][s] for s in chosen), default=0.0)
            gain = lam * relevance[d] - (1 - lam) * redundancy
            if best_gain is None or gain > best_gain:
                best, best_gain = d, gain
        chosen.append(best)
    return chosen


def test_mmr_picks_a_diverse_example_over_a_near_duplicate():
    q = torch.tensor([1.0, 0.0, 0.0])
    table = {"query": q,
             "a": torch.tensor([0.9, 0.436, 0.0]),  # most relevant
             "a_copy": torch.tensor([0.89, 0.44, 0.09]),  # almost the same as a, nearly as relevant
             "b": torch.tensor([0.8, 0.0, 0.6])}  # less relevant, but different from a
    embedder = PrecomputedEmbedder(table)
    pool = ["a", "a_copy", "b"]
    knn = KNNSelector(embedder).fit(pool, ["x"] * 3).select("query", 2)
    assert [pool[s.index] for s in knn] == ["a", "a_copy"]
    relevance_only = MMRSelector(embedder, lambda_=1.0).fit(pool, ["x"] * 3).select("query", 2)
    assert [pool[s.index] for s in relevance_only] == ["a", "a_copy"]  # lambda = 1 is plain kNN
    diverse = MMRSelector(embedder, lambda_=0.5).fit(pool, ["x"] * 3).select("query", 2)
    assert [pool[s.index] for s in diverse] == ["a", "b"]
    assert diverse[1].score == pytest.approx(0.8, abs=1e-3)  # the score stays the relevance to the query


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_mmr_matches_the_formula_on_random_data(lam):
    g = torch.Generator().manual_seed(1)
    vectors = F.normalize(torch.randn(25, 8, generator=g), dim=-1)
    query = F.normalize(torch.randn(8, generator=g), dim=0)
    relevance, pairwise = vectors @ query, vectors @ vectors.T
    ours = mmr_order(relevance, pairwise, k=7, lambda_=lam)
    assert ours == reference_mmr(relevance.tolist(), pairwise.tolist(), 7, lam)
    if lam == 1.0:
        assert ours == torch.argsort(relevance, descending=True)[:7].tolist()


def test_mmr_lowers_redundancy_of_the_selection():
    embedder, pool, queries = vectors_embedder(n_pool=200, dim=4, seed=3)
    knn = KNNSelector(embedder).fit(pool, ["x"] * len(pool))
    mmr = MMRSelector(embedder, lambda_=0.3, fetch_k=200).fit(pool, ["x"] * len(pool))

    def stats(selector):
        relevance, redundancy = [], []
        for chosen in selector.select_many(queries, 6):
            vecs = selector.pool_embeddings[[s.index for s in chosen]]
            sims = vecs @ vecs.T
            redundancy.append(float((sims.sum() - sims.diag().sum()) / (6 * 5)))
            relevance.append(sum(s.score for s in chosen) / 6)
        return sum(relevance) / len(relevance), sum(redundancy) / len(redundancy)

    knn_rel, knn_red = stats(knn)
    mmr_rel, mmr_red = stats(mmr)
    assert mmr_red < knn_red and mmr_rel <= knn_rel  # diversity bought with relevance


# ---------------------------------------------------------------------------------------------- random


def test_random_selector_is_seeded_and_stratified():
    texts = [f"t{i}" for i in range(30)]
    labels = ["a"] * 20 + ["b"] * 7 + ["c"] * 3
    s1 = RandomSelector(seed=4).fit(texts, labels)
    assert s1.select("q1", 5) == s1.select("q2", 5) == RandomSelector(seed=4).fit(texts, labels).select("q1", 5)
    assert s1.select("q", 5) != RandomSelector(seed=5).fit(texts, labels).select("q", 5)
    per_query = RandomSelector(seed=4, per_query=True).fit(texts, labels)
    assert per_query.select("q1", 5) == per_query.select("q1", 5) != per_query.select("q2", 5)
    strat = RandomSelector(seed=0, stratified=True).fit(texts, labels)
    for k in (3, 6, 8):
        chosen = strat.select("q", k)
        counts = Counter(labels[s.index] for s in chosen)
        assert len({s.index for s in chosen}) == k and sum(counts.values()) == k
        assert max(counts.values()) - min(counts[c] for c in "abc") <= 1
    chosen = strat.select("q", 12)  # "c" has only 3: the rest is filled from other labels
    assert len({s.index for s in chosen}) == 12 and Counter(labels[s.index] for s in chosen)["c"] == 3


def test_selector_errors():
    with pytest.raises(ValueError, match="unknown selector"):
        make_selector("votek")
    with pytest.raises(RuntimeError, match="fit"):
        RandomSelector().select("q", 2)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        RandomSelector().fit(["a", "b"], ["x"])


# ---------------------------------------------------------------------------------------------- orders


def test_orders():
    labels = ["neg", "neg", "pos", "neu", "pos", "neg"]
    picked = [Selection(0, 0.9), Selection(2, 0.8), Selection(1, 0.7), Selection(3, 0.6), Selection(4, 0.5)]
    by_sim = order_demonstrations(picked, labels, "similarity")
    assert [s.score for s in by_sim] == [0.5, 0.6, 0.7, 0.8, 0.9]  # most similar nearest the query
    balanced = order_demonstrations(picked, labels, "balanced")
    assert [labels[s.index] for s in balanced] == ["neg", "neu", "pos", "neg", "pos"]
    assert [s.index for s in balanced] == [0, 3, 2, 1, 4]  # relevance order kept within a label
    shuffled = order_demonstrations(picked, labels, "random", seed=1, key="q")
    assert sorted(s.index for s in shuffled) == [0, 1, 2, 3, 4]
    assert shuffled == order_demonstrations(picked, labels, "random", seed=1, key="q")
    assert order_demonstrations(picked, labels, "given") == picked
    with pytest.raises(ValueError, match="unknown demonstration order"):
        order_demonstrations(picked, labels, "backwards")


# ---------------------------------------------------------------------------------------------- budget

TEMPLATE = Template(instruction="Classify.", example_format="Text: {text}\nLabel: {label}",
                    verbalizers={"a": ["alpha"], "b": ["beta"]})


def test_budget_fitter_never_exceeds_and_keeps_as_many_as_fit():
    rng = random.Random(0)
    encoder = PromptEncoder(ByteTokenizer())
    pool = ["w" * rng.randint(1, 60) for _ in range(40)]
    labels = [rng.choice("ab") for _ in pool]
    outcomes = Counter()
    for trial in range(60):
        chosen = [Selection(i, 1.0 - j / 10) for j, i in enumerate(rng.sample(range(40), 8))]
        query = "q" * rng.randint(1, 80)
        budget = rng.randint(30, 100 if trial % 3 == 0 else 600)  # the template alone needs 30
        fitted = fit_to_budget(TEMPLATE, encoder.count, chosen, pool, labels, query, budget, answer_tokens=6,
                               truncate_query=encoder.truncate)
        assert fitted.num_tokens == encoder.count(fitted.prompt) + 6 <= budget
        kept = len(fitted.kept)
        assert {s.index for s in fitted.kept} == {s.index for s in chosen[:kept]}  # the most relevant survive
        if kept < len(chosen) and not fitted.query_truncated:  # maximal: one more would not fit
            more = fit_to_budget(TEMPLATE, encoder.count, chosen[: kept + 1], pool, labels, query, 10**6, 6)
            assert more.num_tokens > budget
        if fitted.query_truncated:
            assert kept == 0 and fitted.prompt.query.endswith(":") and len(fitted.prompt.query) < len(query) + 20
        outcomes["truncated" if fitted.query_truncated else "all" if kept == len(chosen) else "some"] += 1
    assert set(outcomes) == {"truncated", "all", "some"}  # every branch was exercised


def test_budget_fitter_errors_when_even_the_template_does_not_fit():
    encoder = PromptEncoder(ByteTokenizer())
    with pytest.raises(ValueError, match="budget is 10"):
        fit_to_budget(TEMPLATE, encoder.count, [], ["x"], ["a"], "query", 10, 2, truncate_query=encoder.truncate)


def test_fixed_selector_returns_the_given_examples_in_order():
    selector = FixedSelector([3, 0, 2]).fit(["a", "b", "c", "d"], ["x", "y", "x", "y"])
    assert [s.index for s in selector.select("any query", 3)] == [3, 0, 2]
    assert [s.index for s in selector.select("other", 2)] == [3, 0]
    with pytest.raises(ValueError, match="outside the pool"):
        FixedSelector([9]).fit(["a"], ["x"]).select("q", 1)
