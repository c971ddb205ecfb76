# %% [markdown]
# # Lesson 06 — LoRA on SmolLM2: what r and the targets cost, merging, and what the rank changes
#
# Prerequisites: lesson 01 (SmolLM2's linear layers), lesson 02 (LoRA as one strategy among six) and lesson 04
# (Alpaca SFT through `setup` and `fit`); matrix rank and the SVD; the `.venv` that `make test` builds.
#
# LoRA (Hu et al. 2021) freezes every weight W (out x in) of the model and learns each update as a
# product of two thin matrices:
#
#     h = W x + s * B A x        A: (r, in)   B: (out, r)   s = alpha / r  (rsLoRA: alpha / sqrt(r))
#
# Three questions, each answered with a measurement on SmolLM2-135M-Instruct (`minift.load("smollm2-135m")`):
#
# 1. **What does it cost?** Trainable parameters for each set of target layers (q,v / attention /
#    all-linear) and rank r = 1, 4, 8, 16, 64, checked against the formula r * (in + out) per layer.
# 2. **What does the rank change?** Thirty SFT steps on a tiny instruction set at r = 1, 8, 64: the
#    training loss, the time per step, and the learned update s·BA itself — its size and its
#    *effective* rank, which turns out to be far below r.
# 3. **How do you get a normal model back?** Merge s·BA into W (the outputs must not change), save the
#    merged model with `minift.save`, load it back; or keep the adapter alone in PEFT's file format.
#
# Lesson 09 then trains these same adapters on a base frozen in 4 bits (QLoRA).
#
# Run it as a script (`python tutorials/06_lora_smollm2.py`) or cell by cell. `MINIFT_FAST=1` trains a
# 2-block slice of the model for 2 steps per run (every code path, under a minute) and writes its report
# under `$MINIFT_TUTORIAL_OUT`; the full run records its figures in `tutorials/results/06_lora_smollm2.md`.

# %%
import copy
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

import minift
from minift.train.batches import split_records
from minift.data import alpaca_prompt, read_records
from minift.peft import LoRAConfig, add_lora, find_targets, load_adapter, lora_layers, merge_lora, save_adapter
from minift.train.run_config import RunConfig
from minift.train import fit, read_metrics, setup

from _results import results_header, scratch_dir, write_results

FAST = os.environ.get("MINIFT_FAST") == "1"
BLOCKS = 2 if FAST else 0  # keep only the first BLOCKS transformer blocks (0 = all 30)
STEPS = 2 if FAST else 30  # optimizer steps per training run
BATCH = 4
LR = 5e-4
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path("tutorials")
DATA = HERE / "data" / "alpaca_mini.jsonl"
OUT = scratch_dir(__file__)  # training runs, the merged model, the adapter files
torch.set_num_threads(1)  # comparable timings on a shared 2-core machine; remove on your own computer
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## 1. The layers LoRA can target
# Every SmolLM2 block has seven linear layers. Attention has 9 query heads but only 3 key/value heads of 64
# (grouped-query attention), so k_proj and v_proj are narrow (576 -> 192). The output layer `lm_head` shares
# its matrix with the input embedding (tied weights); "all-linear" leaves it out, as PEFT does.

# %%
base, tokenizer = minift.load("smollm2-135m")
full_config = copy.deepcopy(base.config)  # the 30-block shapes, for counting
if BLOCKS:
    base.blocks = base.blocks[:BLOCKS]
    base.config.n_layers = BLOCKS
BASE_PARAMS = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
shapes = {name: (module.in_features, module.out_features) for name, module in base.blocks[0].named_modules()
          if isinstance(module, torch.nn.Linear)}
for name, (n_in, n_out) in shapes.items():
    print(f"{name:<15} in {n_in:>5}  out {n_out:>5}   W: {n_in * n_out:>9,}   A + B at r = 8: {8 * (n_in + n_out):>6,}")
print(f"tied output layer: {base.lm_head.weight is base.embed.weight}; "
      f"{full_config.n_layers} blocks in the full model ({BASE_PARAMS:,} parameters loaded here)")

# %% [markdown]
# ## 2. Trainable parameters per target set and rank
# A LoRA layer adds A (r x in) and B (out x r): **r * (in + out)** numbers, against in * out for W. So
# the count is linear in r, and a narrow layer (k, v) costs less than a wide one (the MLP). Summed over
# the targets of 30 blocks:
#
#     q,v:         30 * r * [(576 + 576) + (576 + 192)]                        = 57,600 r
#     attention:   30 * r * [2 (576 + 576) + 2 (576 + 192)]                    = 115,200 r
#     all-linear:  attention + 30 * r * [2 (576 + 1536) + (1536 + 576)]        = 305,280 r
#
# We check the formula against `add_lora`'s own count. Counting needs shapes only, so the model is built
# on PyTorch's "meta" device: every tensor has a shape and no memory, and building it takes milliseconds.

# %%
TARGET_SETS = {"q,v": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "all-linear": "all-linear"}
RANKS = [1, 4, 8, 16, 64]
count_rows = []
for target_name, targets in TARGET_SETS.items():
    for r in RANKS:
        with torch.device("meta"):
            skeleton = minift.Transformer(full_config)  # shapes only
        layers = {name: skeleton.get_submodule(name) for name in find_targets(skeleton, targets)}
        formula = sum(r * (layer.in_features + layer.out_features) for layer in layers.values())
        count = add_lora(skeleton, LoRAConfig(r=r, alpha=16, targets=targets))
        assert count.trainable == formula, (target_name, r, count.trainable, formula)
        count_rows.append(dict(targets=target_name, r=r, layers=len(layers), trainable=count.trainable,
                               formula=formula, percent=count.percent))
print(f"{'targets':<11} {'layers':>6} " + " ".join(f"{'r=' + str(r):>12}" for r in RANKS))
for target_name in TARGET_SETS:
    row = [c for c in count_rows if c["targets"] == target_name]
    print(f"{target_name:<11} {row[0]['layers']:>6} " + " ".join(f"{c['trainable']:>12,}" for c in row))
print("every count equals sum over target layers of r * (in + out)")
print(f"all-linear r=8: {count_rows[-3]['percent']:.2f}% of all parameters (PEFT's print_trainable_parameters)")

# %% [markdown]
# ## 3. Training at r = 1, 8 and 64
# The data: `tutorials/data/alpaca_mini.jsonl`, 46 short instruction/answer pairs (Alpaca format, loss on
# the answer and its EOS only). The trainer holds out 15% of them (6 records, seeded) and trains on the
# rest; batches of 4, so 30 steps are 3 epochs. Every run is the same `RunConfig` except `[method]`:
# LoRA on all linear layers, alpha = 16, seed 0 (the same data order in every run).
#
# With alpha fixed, the usual scaling s = alpha / r shrinks as r grows: 16 at r = 1, 2 at r = 8, 0.25 at
# r = 64. rsLoRA (Kalajdzievski 2023) argues this starves large ranks and uses alpha / sqrt(r) instead,
# which gives r = 64 the same s = 2 as r = 8 — so "r=8" vs "r=64 rsLoRA" compares ranks at equal scaling,
# and "r=64" vs "r=64 rsLoRA" compares scalings at equal rank. A fifth run, r = 8 with alpha = 128, tests
# the explanation given in section 4.

# %%
RUNS = [dict(key="r1", label="r=1", r=1, alpha=16, use_rslora=False),
        dict(key="r8", label="r=8", r=8, alpha=16, use_rslora=False),
        dict(key="r64", label="r=64", r=64, alpha=16, use_rslora=False),
        dict(key="r64_rs", label="r=64 rsLoRA", r=64, alpha=16, use_rslora=True),
        dict(key="r8_a128", label="r=8 alpha=128", r=8, alpha=128, use_rslora=False)]  # see section 4


def sft_config(spec: dict) -> RunConfig:
    config = RunConfig()
    config.model.source = "smollm2-135m"
    config.data.train, config.data.format, config.data.max_length = str(DATA), "alpaca", 128
    config.data.validation_fraction = 0.15  # 6 held-out records, evaluated once at the end
    train = config.train
    train.output_dir = str(OUT / "runs" / spec["key"])
    train.seed, train.batch_size, train.max_steps = 0, BATCH, STEPS
    train.lr, train.schedule, train.warmup_steps = LR, "warmup_cosine", 0 if FAST else 3
    train.save_checkpoints, train.export, train.progress_bar = False, False, False
    config.method.name = "lora"
    config.method.options = {"r": spec["r"], "alpha": spec["alpha"], "targets": "all-linear",
                             "use_rslora": spec["use_rslora"]}
    return config


def update_spectrum(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and left singular vectors of the update s·B·A, without forming the (out, in) matrix.

    B = Q_B R_B and A^T = Q_A R_A (thin QR), so s·B·A = Q_B (s R_B R_A^T) Q_A^T: the update has rank <= r,
    and its singular values are those of the small (r, r) core.
    """
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()  # (r, in), (out, r)
    Q_B, R_B = torch.linalg.qr(B)  # (out, r), (r, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # (in, r), (r, r)
    U, S, _ = torch.linalg.svd(layer.scaling["default"] * R_B @ R_A.T)  # (r, r), (r,)
    return S, Q_B @ U  # (r,), (out, r)


def effective_rank(S: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): r for a flat spectrum of r values,
    1 for a single direction."""
    p = S / S.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


LAYER = f"blocks.{len(base.blocks) // 2}.attn.q_proj"  # one layer whose spectrum we print


def analyse(backbone) -> dict:
    """Size and shape of the learned updates, averaged over all LoRA layers."""
    relative, ranks, top1, vectors, spectrum = [], [], [], {}, None
    for name, layer in lora_layers(backbone):
        S, U = update_spectrum(layer)
        if name == LAYER:
            spectrum = S.tolist()
        relative.append(float(S.square().sum().sqrt() / layer.weight.detach().norm()))  # ||s·BA||_F / ||W||_F
        ranks.append(effective_rank(S))
        top1.append(float(S[0].square() / S.square().sum()))  # share of the update's energy in its top direction
        vectors[name] = U[:, :8]
    n = len(relative)
    return dict(relative_update=sum(relative) / n, effective_rank=sum(ranks) / n, top1_energy=sum(top1) / n,
                vectors=vectors, spectrum=spectrum)


results, kept = {}, {}
for spec in RUNS:
    run = setup(sft_config(spec), model=copy.deepcopy(base), tokenizer=tokenizer)
    start = time.perf_counter()
    last = fit(run)
    seconds = time.perf_counter() - start
    losses = [m["loss"] for m in read_metrics(run.run_dir) if "loss" in m]
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    scaling = next(lora_layers(run.model.backbone))[1].scaling["default"]  # s, as the layers apply it
    results[spec["key"]] = dict(spec, trainable=trainable, scaling=scaling, losses=losses,
                                heldout_loss=last.get("eval_loss"), seconds_per_step=seconds / STEPS,
                                **analyse(run.model.backbone))
    if spec["key"] == "r8":
        kept["r8"] = run.model.backbone  # trained r = 8 model: merged and saved in section 5
    res = results[spec["key"]]
    print(f"{spec['label']:<14} s={res['scaling']:<6g} {trainable:>11,} trainable  "
          f"{res['seconds_per_step']:.2f} s/step  loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
          f"held-out {res['heldout_loss']:.3f}  effective rank {res['effective_rank']:.2f} of {spec['r']}")
    del run

# %% [markdown]
# ## 4. What the rank changes
# The loss per step (each step sees ~10 answer tokens, so single steps are noisy; compare the means):

# %%
tail = min(10, STEPS)
print(f"{'run':<14} {'s':>6} " + " ".join(f"{'step ' + str(i + 1):>8}" for i in range(0, STEPS, max(1, STEPS // 6)))
      + f" {'last ' + str(tail):>8}")
for res in results.values():
    picks = [res["losses"][i] for i in range(0, STEPS, max(1, STEPS // 6))]
    print(f"{res['label']:<14} {res['scaling']:>6g} " + " ".join(f"{v:>8.3f}" for v in picks)
          + f" {sum(res['losses'][-tail:]) / tail:>8.3f}")

# %% [markdown]
# In our full run the rows fall into two groups, and the rank does not decide which:
#
# * r = 1, 8 and 64 with alpha = 16 trace the *same* curve (mean of the last 10 steps 0.35 for all three),
#   although r = 64 trains 64 times as many numbers as r = 1;
# * r = 64 rsLoRA and r = 8 with alpha = 128 trace another one, much faster (0.7 after 6 steps instead
#   of 4.9), and also the same as each other.
#
# What the two groups share is s · r: 16 in the first (s = alpha / r, so s · r = alpha = 16), 128 in the
# second (2 x 64 for rsLoRA at r = 64, 16 x 8 for r = 8 with alpha = 128). A rough argument says why that
# is the number that counts with Adam: Adam moves every entry of B by about lr per step *whatever the size
# of its gradient*, and the r columns of B (each multiplied by its row of A) all push the output down the
# same gradient, so after t steps the output has moved by roughly s · r · lr · t. With s = alpha / r that
# is alpha · lr · t, the same for every rank — which is why Hu et al. (§4.1) can fix alpha and say that
# tuning it is like tuning the learning rate. rsLoRA's alpha / sqrt(r) turns it into alpha · sqrt(r) · lr · t:
# at r = 64, an 8x larger step. The fifth run was added to test this: the same s · r as r = 64 rsLoRA with
# an eighth of the rank — and the same curve. (The held-out loss, on only 6 records, follows the groups
# too: about 0.53 against 0.40-0.44.)
#
# And the update itself, averaged over the 210 adapted layers:
# * ||s·BA||_F / ||W||_F — how far the weights moved;
# * effective rank — exp of the entropy of the singular values: how many directions the update really uses;
# * top-1 energy — the share of the update's squared norm in its first singular direction;
# * overlap with r = 8 — Hu et al. (2021, §7.2) compare the top singular directions learned at two ranks:
#   ||U_8[:, :k]^T U_r[:, :k]||_F^2 / k is 1 when the two k-dimensional subspaces coincide and about k / out
#   (at most 0.02 for k = 4 here) for random ones.
#
# One layer's spectrum makes the point concrete (singular values of s·BA, largest first):

# %%


def overlap(a: dict, b: dict, k: int) -> float:
    values = [float((a[name][:, :k].T @ b[name][:, :k]).square().sum()) / k for name in a]
    return sum(values) / len(values)


for res in results.values():
    res["overlap"] = {} if res["key"] == "r8" else {k: overlap(results["r8"]["vectors"], res["vectors"], k)
                                                    for k in (1, 4) if k <= res["r"]}
print(f"{'run':<14} {'||sBA||/||W||':>14} {'effective rank':>15} {'top-1 energy':>13} {'overlap k=1':>12} {'k=4':>6}")
for res in results.values():
    o = {k: f"{v:.3f}" for k, v in res["overlap"].items()}
    print(f"{res['label']:<14} {res['relative_update']:>14.4f} {res['effective_rank']:>10.2f} of {res['r']:<2} "
          f"{res['top1_energy']:>13.3f} {o.get(1, '-'):>12} {o.get(4, '-'):>6}")

for res in results.values():
    shown = " ".join(f"{v:.4f}" for v in res["spectrum"][:8])
    rest = sum(v * v for v in res["spectrum"][8:]) / sum(v * v for v in res["spectrum"])
    print(f"{LAYER}, {res['label']:<14} {shown}" + (f"  (+ {len(res['spectrum']) - 8} more: {rest:.1%} of the "
                                                    f"energy)" if len(res["spectrum"]) > 8 else ""))
layer = kept["r8"].get_submodule(LAYER)
full_svd = torch.linalg.svdvals(layer.delta_weight("default").detach())[:8]  # the (576, 576) matrix, the slow way
qr_error = float((update_spectrum(layer)[0] - full_svd).abs().max())
print(f"check on r=8: the QR route equals a full SVD of the (576, 576) update to {qr_error:.1e}")

# %% [markdown]
# Reading our full run:
# * Every update is small: ||s·BA|| is 0.1% to 1.2% of ||W||. Its size does not predict the loss:
#   r = 1 moved the weights six times as far as r = 64 (alpha 16), for the same loss curve.
# * Most of each update lies in very few directions: for r >= 8, 52-72% of its energy in the first one; at r = 64
#   an effective rank of 27-36 of the 64 available (the tail of the spectrum is small but not zero).
# * The directions are not arbitrary: the top direction learned at r = 8 is largely the top direction at
#   r = 64 (overlap 0.86 at k = 1, against ~0.002 by chance), and the top 4 overlap by 0.59. A larger rank
#   mostly adds small components around the same few directions — the low "intrinsic rank" of the update
#   that LoRA bets on (Hu et al. 2021, §7.2, found the same kind of overlap on GPT-3).
#
# So here r = 8 buys nothing over r = 1, and r = 64 nothing over r = 8 unless its scaling is changed with
# it. More data and longer training can need more directions; the cheap experiment to run is the one
# above: vary r at fixed s · r (rsLoRA, or alpha proportional to r), and look at the loss.

# %% [markdown]
# ## 5. Merging: fold s·BA into W, save, load back
# `merge_lora` replaces every LoRALinear by a plain nn.Linear whose weight is W + s·B·A, so inference costs
# nothing extra and the model has exactly the parameter names it had before `add_lora`. The merged model's
# outputs must equal the adapter model's up to float rounding; `minift.save` then writes an ordinary
# Hugging Face directory, which `minift.load` (or transformers) reads back.

# %%
_, held_out = split_records(read_records(DATA), 0.15, seed=0)  # the trainer's own held-out split (seed 0)
held_out = held_out[:3]
prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in held_out]
ids, mask = tokenizer.encode_batch(prompts, padding_side="right")  # (3, T)
real = mask.bool()  # compare logits at real (unpadded) positions only
adapted = kept["r8"].eval()
with torch.no_grad():
    unmerged_logits = adapted(ids, attention_mask=mask)[real]  # (N, V)
    merged = merge_lora(copy.deepcopy(adapted))
    merged_logits = merged(ids, attention_mask=mask)[real]
print(f"merged vs unmerged: max |logit difference| {float((merged_logits - unmerged_logits).abs().max()):.2e} "
      f"(logits range {float(unmerged_logits.abs().max()):.1f})")
print(f"LoRA layers left after merging: {len(list(lora_layers(merged)))}")

merged_dir = minift.save(merged, tokenizer, OUT / "merged")
reloaded, _ = minift.load(merged_dir)
with torch.no_grad():
    reloaded_logits = reloaded.eval()(ids, attention_mask=mask)[real]
merge_errors = dict(merged=float((merged_logits - unmerged_logits).abs().max()),
                    reloaded=float((reloaded_logits - unmerged_logits).abs().max()))
merged_files = {p.name: p.stat().st_size for p in sorted(Path(merged_dir).iterdir())}
print(f"saved to {merged_dir}: " + ", ".join(f"{n} ({s / 1e6:.1f} MB)" for n, s in merged_files.items()))
print(f"reloaded vs unmerged: max |logit difference| {merge_errors['reloaded']:.2e}")

for prompt, record in list(zip(prompts, held_out))[:2]:
    prompt_ids = torch.tensor([tokenizer.encode(prompt)])
    answer = reloaded.generate(prompt_ids, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    question = f"{record['instruction']} {record['input']}".strip()
    print(f"{question!r} -> {tokenizer.decode(answer[0, prompt_ids.size(1):].tolist())!r} "
          f"(expected {record['output']!r})")
del merged, reloaded  # two full copies of the model: free them before loading more

# %% [markdown]
# ## 6. Or keep only the adapter, in PEFT's format
# The merged model is a full copy (hundreds of MB). The adapter alone is r * (in + out) numbers per layer:
# `save_adapter` writes `adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names, so
# `peft.PeftModel.from_pretrained(hf_model, directory)` loads it, and `load_adapter` puts it back onto a
# fresh minift base.

# %%
adapter_dir = save_adapter(adapted, OUT / "adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
adapter_files = {p.name: p.stat().st_size for p in sorted(Path(adapter_dir).iterdir())}
adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
    tensor_names = sorted(f.keys())
    adapter_numbers = sum(f.get_slice(n).get_shape()[0] * f.get_slice(n).get_shape()[1] for n in tensor_names)
    first_shapes = {n: f.get_slice(n).get_shape() for n in tensor_names[:2]}
print(", ".join(f"{n} ({s / 1e6:.2f} MB)" for n, s in adapter_files.items()))
print({k: adapter_config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "task_type")})
print(f"{len(tensor_names)} tensors, {adapter_numbers:,} numbers (= the trainable count of r=8); e.g. {first_shapes}")

fresh = load_adapter(copy.deepcopy(base), adapter_dir)
with torch.no_grad():
    reattached_logits = fresh.eval()(ids, attention_mask=mask)[real]
merge_errors["load_adapter"] = float((reattached_logits - unmerged_logits).abs().max())
print(f"fresh base + load_adapter vs the trained model: max |logit difference| {merge_errors['load_adapter']:.2e}")
del fresh

# %% [markdown]
# If transformers and PEFT are installed (they are test extras, never imported by minift), the same two
# directories open in the reference libraries: the base model saved by `minift.save` + our adapter through
# `PeftModel`, and the merged directory through `AutoModelForCausalLM`.

# %%
reference = {}
if importlib.util.find_spec("transformers") and importlib.util.find_spec("peft"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = minift.save(base, tokenizer, OUT / "base")
    with torch.no_grad():
        hf_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf_base, adapter_dir).eval()
        reference["PEFT (base + our adapter)"] = (peft_model(input_ids=ids, attention_mask=mask).logits[real]
                                                  - unmerged_logits).abs().max().item()
        hf_merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        reference["transformers (our merged dir)"] = (hf_merged(input_ids=ids, attention_mask=mask).logits[real]
                                                      - unmerged_logits).abs().max().item()
    del hf_base, peft_model, hf_merged
    for name, error in reference.items():
        print(f"{name} vs the trained minift model: max |logit difference| {error:.2e}")
else:
    print("transformers/peft not installed: skipped the cross-check")

# %% [markdown]
# ## 7. What to look for
# (The figures of the full run are in `tutorials/results/06_lora_smollm2.md`.)
#
# * **Cost.** Trainable parameters grow linearly in r and with the width of the targeted layers: all-linear
#   at r = 64 trains 19.5M numbers, 14.5% of the base model's 134.5M; at r = 8, 2.4M (under 2%).
# * **Time.** The frozen base's forward and backward dominate a step: r = 1 and r = 8 cost the same, r = 64
#   20-30% more in our runs (the adapters' matmuls are skinny, but not free at r = 64).
# * **The rank.** With alpha fixed, r hardly changes training: the loss follows s · r, not r (section 4).
#   The learned updates use a few directions, and the same ones at r = 8 and r = 64.
# * **Merging** is exact to float rounding (1e-4 on logits of size ~37: float32 rounding through 30 blocks), in
#   memory and after a save/load round trip, and transformers reads the merged directory; PEFT reads the
#   adapter directory and computes the very same logits. The adapter file is 9.8 MB at r = 8; the merged
#   model, 538 MB.

# %%


count_table = ["| targets | layers | " + " | ".join(f"r={r}" for r in RANKS) + " |",
               "| --- | --- | " + " | ".join("---" for _ in RANKS) + " |"]
for target_name in TARGET_SETS:
    row = [c for c in count_rows if c["targets"] == target_name]
    count_table.append(f"| {target_name} | {row[0]['layers']} | "
                       + " | ".join(f"{c['trainable']:,} ({c['percent']:.2f}%)" for c in row) + " |")
train_table = ["| run | scaling s | trainable | s / step | train loss, step 1 | train loss, mean of last "
               f"{tail} | held-out loss | ‖s·BA‖_F / ‖W‖_F | effective rank | top-1 energy | "
               "overlap with r=8 (k=1, k=4) |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for res in results.values():
    o = res["overlap"]
    overlaps = ", ".join(f"{o[k]:.3f}" for k in sorted(o)) or "-"
    train_table.append(f"| {res['label']} | {res['scaling']:g} | {res['trainable']:,} | "
                       f"{res['seconds_per_step']:.2f} | {res['losses'][0]:.3f} | "
                       f"{sum(res['losses'][-tail:]) / tail:.3f} | {res['heldout_loss']:.3f} | "
                       f"{res['relative_update']:.4f} | {res['effective_rank']:.2f} of {res['r']} | "
                       f"{res['top1_energy']:.3f} | {overlaps} |")
curves = "\n".join(f"{res['label']:<14} " + " ".join(f"{v:.2f}" for v in res["losses"]) for res in results.values())
spectra_table = "\n".join(f"- {res['label']}: " + ", ".join(f"{v:.4f}" for v in res["spectrum"][:8])
                          + (" ..." if len(res["spectrum"]) > 8 else "") for res in results.values())
merge_table = ["| compared with the trained adapter model | max abs logit difference |", "| --- | --- |",
               f"| merged in memory (`merge_lora`) | {merge_errors['merged']:.2e} |",
               f"| merged, saved with `minift.save`, loaded with `minift.load` | {merge_errors['reloaded']:.2e} |",
               f"| fresh base + `load_adapter` (PEFT-format files) | {merge_errors['load_adapter']:.2e} |"]
merge_table += [f"| {name} | {error:.2e} |" for name, error in reference.items()]
scope = f"the first {BLOCKS} blocks (fast mode)" if BLOCKS else "all 30 blocks"
result = results_header(__file__, "LoRA on SmolLM2-135M", started) + f"""
## Trainable parameters (30 blocks; count from `add_lora`, % of all parameters as PEFT prints it)

Each count equals the formula: sum over the target layers of r * (in + out) (checked with an assert).

{chr(10).join(count_table)}

## Training: {STEPS} SFT steps at each rank

Model: SmolLM2-135M-Instruct ({scope}), bundled GGUF dequantized to float32. Data:
`tutorials/data/alpaca_mini.jsonl` (Alpaca format, completion-only loss; 15% held out by the trainer, seeded),
batches of {BATCH}, AdamW lr {LR}, warm-up + cosine, seed 0; LoRA on all linear layers, no dropout, alpha 16
(128 in the last run); s is the scaling the layers apply.
Update statistics are means over the {len(results['r8']['vectors'])} LoRA layers; effective rank =
exp(entropy of the normalised singular values of s·BA); overlap = ||U_8[:, :k]^T U_r[:, :k]||_F^2 / k of the top-k
left singular vectors (1 = same subspace, about k / out for random ones).

{chr(10).join(train_table)}

Training loss per step:

```
{curves}
```

Largest singular values of s·BA on {LAYER}:

{spectra_table}

The QR route (singular values of the r x r core) matches a full SVD of the 576 x 576 update to {qr_error:.1e}.

## Merging and saving (r=8 model, {int(real.sum())} positions of 3 held-out prompts)

{chr(10).join(merge_table)}

Merged directory: {", ".join(f"{n} ({s / 1e6:.1f} MB)" for n, s in merged_files.items())}.
Adapter directory (PEFT format): {", ".join(f"{n} ({s / 1e6:.2f} MB)" for n, s in adapter_files.items())};
{len(tensor_names)} tensors, {adapter_numbers:,} numbers; target_modules {adapter_config['target_modules']}.
"""
write_results(__file__, result, started)
