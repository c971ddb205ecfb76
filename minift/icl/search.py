"""Prompt search ("hard prompt tuning"): pick the template and label words that score best on a dev split.

Lesson
------
Soft prompt tuning (Lester et al. 2021) learns continuous vectors by gradient descent. *Hard* prompt
search keeps the prompt in words and simply tries candidates, keeping the one with the best dev accuracy:
the template search of LM-BFF (Gao et al. 2021, §5) and the label-word search of PET (Schick & Schütze
2021) and AutoPrompt (Shin et al. 2020, §3) in their simplest, brute-force form.

    for template in candidates:                    search_prompts
        accuracy(template) on dev  ->  keep the best

Label words are cheaper to search than templates. In zero-shot prompts the demonstrations do not mention
label words, so every candidate word can be scored in the *same* forward passes; then each combination
of one word per label is just a different choice of columns of that one table:

    log p(word | prompt) for all words    (N, W)  <- one scoring pass per dev example
    combination (neg=bad, neu=okay, pos=great)    -> argmax over 3 of the W columns -> accuracy

so `search_verbalizers` tries hundreds of combinations for the cost of one. (With demonstrations the
demo labels themselves change with the words, so each combination is a different prompt; use
search_prompts for that.)

Overfitting warning: with a small dev split the best of many prompts is optimistically scored; report
the chosen prompt's accuracy on a separate test split, as the tutorial does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from minift.icl.calibration import CONTENT_FREE_INPUTS, content_free_distribution
from minift.icl.calibration import calibrate as apply_calibration
from minift.icl.classify import ICLClassifier, classification_report
from minift.icl.scoring import LabelScorer
from minift.icl.templates import Template


@dataclass
class SearchEntry:
    template: Template
    accuracy: float
    macro_f1: float


@dataclass
class SearchResult:
    entries: list[SearchEntry]  # best first

    @property
    def best(self) -> Template:
        return self.entries[0].template

    def table(self, top: int | None = None) -> str:
        rows = self.entries[:top] if top else self.entries
        width = max(len(e.template.name or e.template.describe()) for e in rows)
        lines = [f"{'template':<{width}}  accuracy  macro-F1"]
        lines += [f"{e.template.name or e.template.describe():<{width}}  {e.accuracy:8.3f}  {e.macro_f1:8.3f}"
                  for e in rows]
        return "\n".join(lines)


def _ranked(entries: list[SearchEntry]) -> SearchResult:
    # Stable sort: among equal scores the earlier candidate (usually the simpler one) wins.
    return SearchResult(sorted(entries, key=lambda e: (-e.accuracy, -e.macro_f1)))


def search_prompts(model, tokenizer, templates: list[Template], dev_texts: list[str], dev_labels: list[str],
                   pool_texts: list[str] | None = None, pool_labels: list[str] | None = None,
                   make_selector=None, shots: int = 0, calibrate: bool = False, **classifier_options) -> SearchResult:
    """Evaluate every template on the dev split (optionally k-shot) and rank them by accuracy.

    make_selector: a function returning a fresh Selector (each template gets its own); needed if shots > 0.
    classifier_options: passed to ICLClassifier (order, normalize, max_tokens, ...).
    """
    if not templates:
        raise ValueError("search_prompts needs at least one template")
    if len(dev_texts) != len(dev_labels) or not dev_texts:
        raise ValueError(f"dev split: {len(dev_texts)} texts and {len(dev_labels)} labels (need equal, > 0)")
    if shots > 0 and (make_selector is None or not pool_texts):
        raise ValueError("k-shot prompt search needs pool_texts/pool_labels and make_selector")
    entries = []
    for template in templates:
        selector = make_selector() if shots > 0 else None
        clf = ICLClassifier(model, tokenizer, template, selector=selector, shots=shots, calibrate=calibrate,
                            **classifier_options)
        if shots > 0:
            clf.fit(pool_texts, pool_labels)
        report = classification_report(list(dev_labels), clf.predict(list(dev_texts)).predictions, template.labels)
        entries.append(SearchEntry(template, report.accuracy, report.macro_f1))
    return _ranked(entries)


def verbalizer_combinations(word_options: dict[str, list[str]], limit: int | None = None) -> list[dict[str, list[str]]]:
    """Every choice of one word per label, in a fixed order (the first options first)."""
    labels = list(word_options)
    combos = itertools.product(*(word_options[label] for label in labels))
    if limit is not None:
        combos = itertools.islice(combos, limit)
    return [{label: [word] for label, word in zip(labels, choice)} for choice in combos]


def search_verbalizers(model, tokenizer, template: Template, word_options: dict[str, list[str]],
                       dev_texts: list[str], dev_labels: list[str], calibrate: bool = False,
                       content_free=CONTENT_FREE_INPUTS, normalize: str = "sum", limit: int | None = None) -> SearchResult:
    """Zero-shot label-word search: score every candidate word once, evaluate every combination from the table."""
    if set(word_options) != set(template.labels):
        raise ValueError(f"word_options labels {sorted(word_options)} differ from the template's {sorted(template.labels)}")
    union = template.with_verbalizers(word_options)  # validates: no word may serve two labels
    scorer = LabelScorer(model, tokenizer, union, normalize=normalize)
    prompts = [union.build([], text) for text in dev_texts]
    table = scorer.score(prompts).candidate_logprobs  # (N, W): one column per (label, word)
    cf_table = scorer.score([union.build([], x) for x in content_free]).candidate_logprobs if calibrate else None
    if normalize == "mean":
        table = table / scorer.candidate_lengths
        cf_table = cf_table / scorer.candidate_lengths if cf_table is not None else None
    column = {(label, text): c for c, (label, text) in enumerate(union.candidates())}

    entries = []
    for i, words in enumerate(verbalizer_combinations(word_options, limit)):
        cols = [column[(label, union.answer_text(words[label][0]))] for label in union.labels]
        scores = table[:, cols]  # (N, L)
        probs = scores.softmax(-1)
        if cf_table is not None:
            probs = apply_calibration(probs, content_free_distribution(cf_table[:, cols]))
        predictions = [union.labels[j] for j in probs.argmax(-1).tolist()]
        report = classification_report(list(dev_labels), predictions, union.labels)
        name = "/".join(words[label][0] for label in union.labels)
        entries.append(SearchEntry(template.with_verbalizers(words, name=name), report.accuracy, report.macro_f1))
    return _ranked(entries)


def best_of(result: SearchResult) -> tuple[Template, float]:
    """The winning template and its dev accuracy."""
    return result.best, result.entries[0].accuracy


__all__ = ["SearchEntry", "SearchResult", "search_prompts", "search_verbalizers", "verbalizer_combinations",
           "best_of"]
