"""The in-context classifier: select -> arrange -> prompt -> score (or generate) -> calibrate -> label.

Lesson
------
One query goes through every piece of this package:

    query --selector--> k most relevant (or random) training examples        selectors.py
          --arrange---> ordered, and trimmed until the prompt fits            arrange.py
          --template--> Prompt(prefix = instruction + demos, query)          templates.py
          --scorer----> log p(label word | prompt) per label (prefix cached)  scoring.py
          --calibrate-> divide by p(label | same demos, content-free input)   calibration.py
          --argmax----> predicted label

Nothing is trained. "Fitting" an ICLClassifier only hands the pool of labelled examples to the selector
(and embeds it, for kNN/MMR). Calibration needs one content-free distribution per distinct set of
demonstrations: computed once for a fixed random set, once per query for kNN, and always right after the
query itself so the scorer's cached prefix is reused.

`classification_report` turns predictions into accuracy and a per-class precision / recall / F1 table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from minift.icl.arrange import FittedPrompt, fit_to_budget
from minift.icl.calibration import CONTENT_FREE_INPUTS, calibrate, content_free_distribution
from minift.icl.generation import AnswerGenerator
from minift.icl.scoring import LabelScorer
from minift.icl.selectors import Selector
from minift.icl.templates import Template

METHODS = ("score", "generate")


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable` for a progress flag: True shows the bar, False hides it, None shows it on a terminal."""
    return None if progress is None else not progress


@dataclass
class ICLResult:
    labels: list[str]  # the label set, in the template's order
    predictions: list[str | None]  # None only for unparsable generations
    probabilities: torch.Tensor | None  # (N, L) final (calibrated if asked) label distribution; None for generate
    raw_probabilities: torch.Tensor | None  # (N, L) before calibration
    prompts: list[FittedPrompt] = field(repr=False)
    generations: list[str] | None = None


class ICLClassifier:
    """Few-shot classification with a frozen causal LM.

        clf = ICLClassifier(model, tokenizer, template, selector=KNNSelector(), shots=8, calibrate=True)
        clf.fit(train_texts, train_labels)
        result = clf.predict(test_texts)                  # ICLResult
        print(classification_report(test_labels, result.predictions, clf.labels).table())
    """

    def __init__(self, model, tokenizer, template: Template, selector: Selector | None = None, shots: int = 0,
                 order: str = "similarity", calibrate: bool = False, content_free=CONTENT_FREE_INPUTS,
                 normalize: str = "sum", aggregate: str = "logsumexp", use_cache: bool = True,
                 max_tokens: int | None = None, method: str = "score", max_new_tokens: int = 5, seed: int = 0,
                 progress: bool | None = False) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose one of {METHODS}")
        if method == "generate" and calibrate:
            raise ValueError("contextual calibration needs label probabilities: use method='score'")
        if shots > 0 and selector is None:
            raise ValueError(f"shots={shots} needs a selector (random, bm25, knn or mmr)")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.selector, self.shots, self.order, self.seed = selector, shots, order, seed
        self.calibrate, self.content_free, self.method = calibrate, tuple(content_free), method
        self.max_tokens = max_tokens or model.config.max_seq_len
        self.progress = progress
        self.scorer = LabelScorer(model, tokenizer, template, normalize=normalize, aggregate=aggregate,
                                  use_cache=use_cache)
        self.generator = AnswerGenerator(model, tokenizer, template, max_new_tokens) if method == "generate" else None
        if self.generator is not None:
            self.generator.progress = progress
        self.pool_texts: list[str] = []
        self.pool_labels: list[str] = []

    @property
    def labels(self) -> list[str]:
        return self.template.labels

    def fit(self, texts: list[str], labels: list[str]) -> "ICLClassifier":
        """Remember the labelled pool (the selector indexes it). Every label must have verbalizer words."""
        labels = [str(y) for y in labels]
        for i, label in enumerate(labels):
            if label not in self.template.verbalizers:
                raise ValueError(f"training example {i} has label {label!r}, which the template does not know; "
                                 f"its labels are {self.labels}")
        self.pool_texts, self.pool_labels = list(texts), labels
        if self.selector is not None and self.shots > 0:
            self.selector.fit(self.pool_texts, self.pool_labels)
        return self

    def build_prompts(self, queries: list[str]) -> list[FittedPrompt]:
        """Select, order and fit the demonstrations for each query."""
        if self.shots > 0:
            if not self.pool_texts:
                raise RuntimeError("ICLClassifier: call fit(texts, labels) before predict() when shots > 0")
            selections = self.selector.select_many(queries, self.shots)
        else:
            selections = [[] for _ in queries]
        answer_tokens = self.scorer.longest_answer if self.method == "score" else self.generator.max_new_tokens
        return [
            fit_to_budget(self.template, self.scorer.encoder.count, chosen, self.pool_texts, self.pool_labels, query,
                          max_tokens=self.max_tokens, answer_tokens=answer_tokens, order=self.order, seed=self.seed,
                          truncate_query=self.scorer.encoder.truncate)
            for query, chosen in tqdm(list(zip(queries, selections)), desc="icl prompts", unit="query",
                                      disable=bar_disabled(self.progress))
        ]

    def predict(self, queries: list[str]) -> ICLResult:
        fitted = self.build_prompts(queries)
        if self.method == "generate":
            answers = self.generator.generate([f.prompt for f in fitted])
            return ICLResult(self.labels, answers.labels, None, None, fitted, answers.texts)

        raw, final = [], []
        content_free: dict[tuple[int, ...], torch.Tensor] = {}
        for item in tqdm(fitted, desc="icl", disable=bar_disabled(self.progress)):
            probs = self.scorer.score([item.prompt]).probabilities[0]  # (L,)
            raw.append(probs)
            if self.calibrate:
                key = tuple(s.index for s in item.kept)
                if key not in content_free:  # right after the query: the prefix is still cached
                    content_free[key] = self.content_free_distribution(item)
                probs = calibrate(probs, content_free[key])
            final.append(probs)
        raw_t, final_t = torch.stack(raw), torch.stack(final)  # (N, L)
        predictions = [self.labels[i] for i in final_t.argmax(-1).tolist()]
        return ICLResult(self.labels, predictions, final_t, raw_t, fitted)

    def content_free_distribution(self, item: FittedPrompt) -> torch.Tensor:
        """p_cf for the demonstrations of one fitted prompt (same demos, same order). -> (L,)"""
        demos = [(self.pool_texts[s.index], self.pool_labels[s.index]) for s in item.kept]
        prompts = [self.template.build(demos, text) for text in self.content_free]
        return content_free_distribution(self.scorer.score(prompts).label_scores)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@dataclass
class ClassRow:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationReport:
    accuracy: float
    correct: int
    total: int
    rows: list[ClassRow]

    @property
    def macro_f1(self) -> float:
        return sum(r.f1 for r in self.rows) / max(len(self.rows), 1)

    def table(self) -> str:
        """Fixed-width per-class table followed by the macro-F1 line."""
        width = max([len("label")] + [len(r.label) for r in self.rows])
        lines = [f"{'label':<{width}}  precision  recall  f1      support"]
        for r in self.rows:
            lines.append(f"{r.label:<{width}}  {r.precision:9.3f}  {r.recall:6.3f}  {r.f1:6.3f}  {r.support:7d}")
        lines.append(f"{'macro':<{width}}  {'':9}  {'':6}  {self.macro_f1:6.3f}  {self.total:7d}")
        return "\n".join(lines)

    def summary(self) -> str:
        return f"accuracy {self.accuracy:.4f} ({self.correct}/{self.total})"


def classification_report(gold: list[str], predicted: list[str | None], labels: list[str]) -> ClassificationReport:
    """Accuracy and per-class precision/recall/F1; a None prediction is always wrong."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("classification_report: nothing to evaluate (0 examples)")
    correct = sum(g == p for g, p in zip(gold, predicted))
    rows = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        predicted_n = sum(p == label for p in predicted)
        support = sum(g == label for g in gold)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(ClassRow(label, precision, recall, f1, support))
    return ClassificationReport(correct / len(gold), correct, len(gold), rows)
