"""Arranging demonstrations: their order in the prompt, and how many fit in the model's context.

Lesson
------
Order matters. Lu et al. (2022, "Fantastically Ordered Prompts", §3) show that permuting the *same* k
examples can move accuracy from near state of the art to chance, and Zhao et al. (2021, §4) find a
*recency bias*: the model leans to the label of the last demonstrations. Three orders:

    "similarity"  ascending relevance: the most similar example sits right before the query
                  (Liu et al. 2022 found this slightly better than the reverse)
    "random"      a seeded shuffle (same query -> same order)
    "balanced"    labels interleaved round-robin (neg, neu, pos, neg, ...), each label's examples in
                  relevance order, so no label owns the end of the prompt
    "given"       exactly as selected

Budget. A prompt longer than the model's context cannot be scored; a prompt that is merely long is slow.
`fit_to_budget` keeps the most relevant demonstrations that fit:

    tokens(prefix) + tokens(query) + tokens(longest answer) <= max_tokens

It re-renders and re-counts the exact prompt after every change (the count is never an estimate), drops
the least relevant demonstration while the prompt is too long, and as a last resort truncates the
query's text. If even the empty template does not fit it raises: there is nothing sensible to score.

Cost on a long record. Truncation searches n, the number of the query's own tokens kept: the prompt
with decode(ids[:n]) fits, the one with n + 1 does not. Done naively the search is O(L log L) in the
query's length L, with a large constant: every probe tokenized the whole query again to cut it, and
bisecting [0, L] probed n = L/2, L/4, ... (a 1 MB query took 28 s, a 50 MB one never finished). Now

    tokenize once     PromptEncoder remembers the ids of recent texts, so the query is tokenized once
                      to be cut by ids (and once more as it stands in the prompt, however many numbers of
                      demonstrations are tried: the query piece is the same text each time)
    gallop, bisect    probe n = budget, 2 budget, 4 budget, ... until a prompt overflows, then bisect
                      below it: every probe holds at most ~2x the budget, about log2(budget) of them

so the work is O(L) (two tokenizations of the query) plus O(budget log budget), and the number of
tokenizer calls does not depend on L. For a monotone count (more kept tokens, more prompt tokens) the
answer is the same n as bisecting all of [0, L], so normal prompts come out exactly as before.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from minift.icl.selectors import Selection
from minift.icl.templates import Prompt, Template

ORDERS = ("similarity", "random", "balanced", "given")


def order_demonstrations(selections: list[Selection], labels: list[str], how: str = "similarity",
                         seed: int = 0, key: str = "") -> list[Selection]:
    """Reorder selected examples for the prompt (first = farthest from the query, last = nearest).

    selections: most relevant first (as selectors return them); labels: the pool's labels by index;
    key: a string (the query) that makes "random" differ per query but stay reproducible.
    """
    if how == "given":
        return list(selections)
    if how == "similarity":
        ranked = sorted(range(len(selections)), key=lambda i: (-selections[i].score, i))  # most relevant first
        return [selections[i] for i in reversed(ranked)]
    if how == "random":
        rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
        return [selections[int(i)] for i in rng.permutation(len(selections))]
    if how == "balanced":
        groups: dict[str, list[Selection]] = {}
        for s in selections:  # keeps relevance order inside each label
            groups.setdefault(labels[s.index], []).append(s)
        order: list[Selection] = []
        queues = [groups[label] for label in sorted(groups)]
        while any(queues):
            for queue in queues:
                if queue:
                    order.append(queue.pop(0))
        return order
    raise ValueError(f"unknown demonstration order {how!r}; choose one of {', '.join(ORDERS)}")


@dataclass
class FittedPrompt:
    prompt: Prompt
    kept: list[Selection]  # the demonstrations in the prompt, in prompt order
    dropped: int  # how many selected demonstrations did not fit
    query_truncated: bool
    num_tokens: int  # prompt tokens + longest answer: what the scorer will need


def fit_to_budget(template: Template, count_tokens, selections: list[Selection], pool_texts: list[str],
                  pool_labels: list[str], query: str, max_tokens: int, answer_tokens: int = 0,
                  order: str = "similarity", seed: int = 0, truncate_query=None) -> FittedPrompt:
    """The prompt with the most relevant demonstrations that fits in `max_tokens` (never more).

    count_tokens(prompt) -> int counts the prompt exactly as the scorer will feed it;
    answer_tokens is the length of the longest candidate answer;
    truncate_query(text, n) -> text shortened to n tokens, used only if zero demonstrations still overflow.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")

    def render(kept: list[Selection], text: str) -> tuple[Prompt, list[Selection], int]:
        arranged = order_demonstrations(kept, pool_labels, order, seed=seed, key=query)
        prompt = template.build([(pool_texts[s.index], pool_labels[s.index]) for s in arranged], text)
        return prompt, arranged, count_tokens(prompt) + answer_tokens

    ranked = list(selections)  # selectors return the most relevant (or, for MMR, the first picked) first
    for keep in range(len(ranked), -1, -1):  # drop from the end: the least relevant first
        prompt, arranged, n = render(ranked[:keep], query)
        if n <= max_tokens:
            return FittedPrompt(prompt, arranged, len(ranked) - keep, False, n)

    # Not even the zero-shot prompt fits: shorten the query text (binary search on its token count).
    empty_prompt, _, empty_n = render([], "")
    if empty_n > max_tokens or truncate_query is None:
        raise ValueError(
            f"the prompt needs {n} tokens (the template alone {empty_n}) but the budget is {max_tokens}: "
            "shorten the instruction/format or raise max_tokens"
        )
    low, high, best = 0, len(query), None  # `high` bounds the token count: a token is at least one character
    # Gallop up from the budget before bisecting, so no probe holds much more than the budget: a probe at
    # len(query) // 2 would tokenize half of a 50 MB query, and ~25 of them made the search O(L log L).
    step = max_tokens
    while step < high:
        candidate, _, n_step = render([], truncate_query(query, step))
        if n_step > max_tokens:
            high = step - 1
            break
        best, low, step = (candidate, n_step), step + 1, 2 * step
    while low <= high:
        mid = (low + high) // 2
        candidate, _, n_mid = render([], truncate_query(query, mid))
        if n_mid <= max_tokens:
            best, low = (candidate, n_mid), mid + 1
        else:
            high = mid - 1
    prompt, n = best if best is not None else (empty_prompt, empty_n)
    return FittedPrompt(prompt, [], len(ranked), True, n)
