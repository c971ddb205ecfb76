"""BM25 against a hand computation (k1 = 1.5, b = 0.75, Lucene IDF), plus its limiting cases."""

import math

import pytest

from minift.icl.bm25 import BM25Index, bm25_terms
from minift.icl.selectors import BM25Selector

DOCS = ["The cat sat on the mat.", "the dog sat", "Cats and dogs!"]
# Terms: d0 = the, cat, sat, on, the, mat (|d0| = 6); d1 = the, dog, sat (3); d2 = cats, and, dogs (3).
# N = 3, avgdl = 12 / 3 = 4.


def term(idf, tf, doc_len, k1=1.5, b=0.75, avgdl=4.0):
    return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_len / avgdl))


def test_terms_are_lowercased_words():
    assert bm25_terms("The cat, #Sat! @united 42") == ["the", "cat", "sat", "united", "42"]


def test_scores_equal_hand_computation():
    index = BM25Index(DOCS, k1=1.5, b=0.75)
    idf_cat = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # "cat" is in d0 only ("cats" is another word)
    idf_sat = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # "sat" is in d0 and d1
    assert index.idf("cat") == pytest.approx(idf_cat) and index.idf("sat") == pytest.approx(idf_sat)
    # By hand: d0 norm = 1.5 * (0.25 + 0.75 * 6/4) = 2.0625; d1 norm = 1.5 * (0.25 + 0.75 * 3/4) = 1.21875.
    expected_d0 = (idf_cat + idf_sat) * 2.5 / (1 + 2.0625)
    expected_d1 = idf_sat * 2.5 / (1 + 1.21875)
    assert index.scores("cat sat").tolist() == pytest.approx([expected_d0, expected_d1, 0.0])
    assert expected_d0 == pytest.approx(term(idf_cat, 1, 6) + term(idf_sat, 1, 6))
    # "the" occurs twice in d0: term frequency 2, saturated by k1.
    idf_the = math.log(1 + 1.5 / 2.5)
    assert index.scores("the").tolist() == pytest.approx([idf_the * 2 * 2.5 / (2 + 2.0625), idf_the * 2.5 / (1 + 1.21875), 0.0])


def test_repeated_query_terms_count_each_time_and_unknown_terms_add_nothing():
    index = BM25Index(DOCS)
    assert index.scores("cat cat").tolist() == pytest.approx((2 * index.scores("cat")).tolist())
    assert index.scores("zebra").tolist() == [0.0, 0.0, 0.0]
    assert index.scores("cat zebra").tolist() == pytest.approx(index.scores("cat").tolist())


def test_limits_of_k1_and_b():
    # k1 = 0: presence only, every matching document scores exactly the IDF.
    index = BM25Index(DOCS, k1=0.0)
    assert index.scores("the").tolist() == pytest.approx([index.idf("the"), index.idf("the"), 0.0])
    # b = 0: no length normalisation, so d0 and d1 score the same for one occurrence of "sat".
    index = BM25Index(DOCS, b=0.0)
    s = index.scores("sat")
    assert s[0] == pytest.approx(s[1]) and s[0] == pytest.approx(index.idf("sat") * 2.5 / (1 + 1.5))
    with pytest.raises(ValueError, match="b must be"):
        BM25Index(DOCS, b=1.5)
    with pytest.raises(ValueError, match="at least one"):
        BM25Index([])


def test_idf_stays_positive_for_common_terms():
    index = BM25Index(["a b", "a c", "a d"])
    assert index.idf("a") > 0  # in every document: Lucene's +1 keeps it positive


def test_top_k_and_selector_rank_best_first():
    index = BM25Index(DOCS)
    top = index.top_k("dog sat", k=2)
    assert [i for i, _ in top] == [1, 0]
    selector = BM25Selector().fit(DOCS, ["a", "b", "c"])
    chosen = selector.select("dog sat", k=3)
    assert [s.index for s in chosen] == [1, 0, 2]
    assert chosen[0].score == pytest.approx(top[0][1])
