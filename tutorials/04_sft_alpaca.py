# %% [markdown]
# # Lesson 04 — Supervised instruction tuning (SFT) in Alpaca format
#
# Prerequisites: lesson 01 (SmolLM2, its tokenizer, `generate`) and lesson 02 (a `RunConfig` through `setup` and
# `fit`); next-token cross-entropy; the `make test` `.venv`.
#
# We teach SmolLM2-135M-Instruct a house style: answer an instruction with *just the answer* ("cold",
# "Paris", "17") and stop. Along the way we look at the three details that decide whether SFT works:
#
# 1. **Completion-only loss.** The prompt is given, not learned: its labels are -100, so only the response
#    tokens contribute to the loss.
# 2. **EOS is a target.** The response is followed by the end-of-sequence token, and *that token is trained*.
#    SmolLM2 pads with its EOS token (pad == eos); a trainer that masks "every EOS" to hide the padding also
#    hides the one EOS that teaches the model to stop. minift masks padding by position, never by id.
# 3. **Gradient accumulation divides by all target tokens.** k micro-batches must give the gradient of one
#    big batch, so each micro-batch's summed loss is divided by the number of targets in all k together.
#
# Run it as a script (`python tutorials/04_sft_alpaca.py`) or cell by cell. `MINIFT_FAST=1` trains for two
# steps on a few examples (under a minute); the full run takes a few minutes on a laptop CPU.

# %%
import json
import os
import random
from pathlib import Path

import torch

import minift
from minift.data import alpaca_prompt, read_records, tokenize_example
from minift.train.run_config import RunConfig, to_toml
from minift.train import fit, read_metrics, setup

from _results import scratch_dir

FAST = os.environ.get("MINIFT_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path("tutorials")
OUT = scratch_dir(__file__)  # $MINIFT_TUTORIAL_OUT/04_sft_alpaca (default runs/): the training file and the run
torch.manual_seed(0)

# %% [markdown]
# ## 1. The data: Alpaca records
# Each line of `tutorials/data/alpaca_mini.jsonl` is `{"instruction", "input", "output"}`: short tasks
# (opposites, plurals, capitals, sums, sentiment) with one-word answers. We hold out one record per task
# family to see whether the *style* generalises to instructions the model never saw.

# %%
records = read_records(HERE / "data" / "alpaca_mini.jsonl")
held_out_instructions = {"Give the opposite of the word.": "strong", "Write the plural of the noun.": "woman",
                         "Name the capital city of the country.": "Norway", "Add the two numbers.": "6 and 9"}
held_out = [r for r in records if held_out_instructions.get(r["instruction"]) == r["input"]]
train_records = [r for r in records if r not in held_out]
random.Random(0).shuffle(train_records)
if FAST:
    train_records = train_records[:8]
with open(OUT / "train.jsonl", "w") as f:
    f.writelines(json.dumps(dict(r)) + "\n" for r in train_records)
print(f"{len(train_records)} training records, {len(held_out)} held out; one of them:")
print(json.dumps(dict(train_records[0]), indent=1))

# %% [markdown]
# ## 2. The model and its special tokens
# SmolLM2's tokenizer has no pad token of its own, so minift pads with EOS, as most trainers do.

# %%
model, tokenizer = minift.load("smollm2-135m")
print(tokenizer)
print("pad == eos:", tokenizer.pad_token_id == tokenizer.eos_token_id)

# %% [markdown]
# ## 3. One example, token by token
# The Alpaca prompt (REFERENCE.md) wraps the instruction; the output follows "### Response:". `tokenize_example`
# encodes prompt and response separately (so the prompt tokens are exactly those seen at inference), appends
# EOS, and sets the label of every prompt token to -100. Only the marked tokens are learned:

# %%
example = tokenize_example(train_records[0], tokenizer, "alpaca")
print(repr(alpaca_prompt(train_records[0]["instruction"], train_records[0]["input"])))
for token, label in list(zip(example["input_ids"], example["labels"]))[-8:]:
    print(f"{tokenizer.id_to_token(token)!r:>16}  {'learned' if label != -100 else '-'}")
print(f"... {sum(l != -100 for l in example['labels'])} of {len(example['labels'])} tokens are targets; "
      f"the last one is EOS: {example['labels'][-1] == tokenizer.eos_token_id}")

# %% [markdown]
# ## 4. Before fine-tuning
# We ask the held-out questions with the same Alpaca prompt. The instruct model answers in its own, chattier
# style, and does not necessarily stop where we want.

# %%
MAX_NEW = 8 if FAST else 24


def answer(record) -> tuple[str, bool]:
    """Greedy answer to an Alpaca prompt, and whether the model ended it with EOS."""
    prompt = tokenizer.encode(alpaca_prompt(record["instruction"], record["input"]))
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_token_id)
    new = out[0, len(prompt):].tolist()
    return tokenizer.decode(new).strip(), tokenizer.eos_token_id in new


model.eval()
before = {r["input"]: answer(r) for r in held_out[: 2 if FAST else None]}
for question, (text, stopped) in before.items():
    print(f"{question:>10} -> {text!r}{'  [EOS]' if stopped else '  [no EOS yet]'}")

# %% [markdown]
# ## 5. Fine-tune
# A run is configured by dataclasses, one per concern; `minift finetune CONFIG.toml` reads the same thing
# from TOML (see `configs/sft_alpaca.toml`). Batches of 2 examples, 2 micro-batches accumulated per step:
# each micro-batch's summed loss is divided by the target count of *both*, so a step equals a batch of 4.
# We skip checkpoints here (a full-model checkpoint of SmolLM2 with its AdamW state is 1.6 GB).

# %%
config = RunConfig()
config.model.source = "smollm2-135m"
config.data.train, config.data.format, config.data.max_length = str(OUT / "train.jsonl"), "alpaca", 128
config.data.validation_fraction = 0.0
config.train.output_dir = str(OUT / "run")
config.train.batch_size, config.train.grad_accum_steps = 2, 2
config.train.max_steps = 2 if FAST else 40
config.train.lr, config.train.schedule, config.train.warmup_steps = 5e-5, "warmup_cosine", 0 if FAST else 4
config.train.save_checkpoints, config.train.export = False, not FAST
config.train.progress_bar = not FAST
print(to_toml(config))

run = setup(config, model=model, tokenizer=tokenizer)
print(run.plan.description, "|", run.train_stream.report)
last = fit(run)

# %% [markdown]
# ## 6. The loss curve
# `metrics.jsonl` in the run directory holds one line per step (loss, learning rate, gradient norm, tokens/s).

# %%
for record in read_metrics(OUT / "run"):
    if "loss" in record:
        print(f"step {record['step']:>3}  loss {record['loss']:.3f}  lr {record['lr']:.2e}  "
              f"{record['targets']} target tokens")

# %% [markdown]
# ## 7. After fine-tuning
# The same held-out questions. The answers are now one word followed by EOS: the model learned the style *and*
# when to stop (even the two fast-mode steps go a long way). Not every answer is right: in our full run
# "Norway" got "Lille". 40 steps of 4 examples are four epochs of 42 records — the format is learned in a
# few steps, while facts can suffer from overfitting a tiny set. Try fewer steps or a lower learning rate.

# %%
model.eval()
for record in held_out[: 2 if FAST else None]:
    text, stopped = answer(record)
    mark = "  [EOS]" if stopped else "  [no EOS yet]"
    print(f"{record['input']:>10} -> {text!r}{mark}  (expected {record['output']!r})")

# %% [markdown]
# ## 8. Where to go next
# * The same run from the command line: `minift finetune configs/sft_alpaca.toml`, interrupted and resumed with
#   `minift finetune --resume runs/sft_alpaca` — the loss curve continues exactly as if it had never stopped.
# * Evaluate the exported model (full mode):
#   `minift eval --model runs/04_sft_alpaca/run/final --data tutorials/data/alpaca_mini.jsonl`.
# * Try `config.train.grad_accum_steps = 4` with `batch_size = 1`: the loss curve barely changes, because the
#   accumulated gradient is the big batch's gradient.
