"""BM25: the classic lexical relevance score, used to pick demonstrations that share words with the query.

Lesson
------
Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond", §3.4)
scores a document D for a query Q by summing, over the query's terms t,

                         tf(t, D) * (k1 + 1)
    IDF(t) * ----------------------------------------------
              tf(t, D) + k1 * (1 - b + b * |D| / avgdl)

    IDF(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

    tf(t, D)  how often t occurs in D          N      number of documents
    |D|       D's length in terms              n(t)   number of documents containing t
    avgdl     average document length

* k1 (default 1.5) caps term frequency: the 2nd occurrence of a word adds less than the 1st, and the
  score for one term never exceeds IDF * (k1 + 1). k1 = 0 counts presence only.
* b (default 0.75) normalises for length: b = 1 divides tf by the relative length fully, b = 0 ignores
  length. A long document matches many words by chance; b discounts that.
* The IDF is Lucene's variant (the "+ 1" inside the log), which is always positive: a term that occurs in
  more than half the documents still counts a little instead of subtracting from the score.
* A term repeated in the query is counted once per occurrence (as rank_bm25 and Lucene do).

Terms are lower-cased runs of letters and digits (`\\w+`), no stemming, no stop words: for tweets the
hashtags and @-handles that survive this are exactly the words that find the right topic.

OpenICL uses BM25 as one of its retrievers (Wu et al. 2023); for ICL the demonstrations with the highest
BM25 score are the ones most lexically similar to the query.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
from tqdm import tqdm

TOKEN = re.compile(r"\w+", re.UNICODE)


def bm25_terms(text: str) -> list[str]:
    """Lower-cased word tokens: 'Hello, World! #ai' -> ['hello', 'world', 'ai']."""
    return TOKEN.findall(text.lower())


class BM25Index:
    """An inverted index over a fixed list of documents that scores any query against all of them at once.

        index = BM25Index(["the cat sat", "the dog barked"], k1=1.5, b=0.75)
        index.scores("cat")          # array of N scores, one per document
        index.top_k("cat", k=1)      # [(0, score)]
    """

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75, tokenize=bm25_terms,
                 progress: bool | None = False) -> None:
        if k1 < 0:
            raise ValueError(f"BM25 k1 must be >= 0, got {k1}")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25 b must be in [0, 1], got {b}")
        if len(documents) == 0:
            raise ValueError("BM25Index needs at least one document")
        self.k1, self.b, self.tokenize = k1, b, tokenize
        self.num_documents = len(documents)
        # progress: a bar over the documents (True, False, or None: on a terminal only) for large pools.
        bar_off = None if progress is None else not progress
        term_counts = [Counter(tokenize(doc)) for doc in tqdm(documents, desc="bm25 index", unit="doc",
                                                               disable=True if len(documents) < 1000 else bar_off)]
        self.lengths = np.array([sum(c.values()) for c in term_counts], dtype=np.float64)  # (N,) |D|
        self.average_length = float(self.lengths.mean()) or 1.0  # avgdl (1.0 if every document is empty)

        # Inverted index: term -> (ids of documents containing it, its frequency in each).
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for doc_id, counts in enumerate(term_counts):
            for term, tf in counts.items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(doc_id)
                tfs.append(tf)
        self.postings = {t: (np.array(ids), np.array(tfs, dtype=np.float64)) for t, (ids, tfs) in postings.items()}
        # The length-normalisation part of the denominator depends only on the document: precompute it.
        self.length_norm = k1 * (1.0 - b + b * self.lengths / self.average_length)  # (N,)

    def idf(self, term: str) -> float:
        """ln(1 + (N - n + 0.5) / (n + 0.5)); 0 documents containing the term gives the largest value."""
        n = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1.0 + (self.num_documents - n + 0.5) / (n + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`: (N,) float64; terms absent from the index add 0."""
        total = np.zeros(self.num_documents, dtype=np.float64)
        # A repeated query term counts once per occurrence: weight it by its count, one array update per
        # distinct term (a 10 MB query has ~2M words but only as many distinct ones as its vocabulary).
        for term, occurrences in Counter(self.tokenize(query)).items():
            if term not in self.postings:
                continue
            ids, tf = self.postings[term]
            total[ids] += occurrences * (self.idf(term) * tf * (self.k1 + 1.0) / (tf + self.length_norm[ids]))
        return total

    def top_k(self, query: str, k: int, exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """The k best (document id, score) pairs, best first; ties broken by the lower id (stable)."""
        scores = self.scores(query)
        if exclude:
            scores[list(exclude)] = -np.inf
        order = np.argsort(-scores, kind="stable")[: min(k, self.num_documents)]
        return [(int(i), float(scores[i])) for i in order if np.isfinite(scores[i])]
