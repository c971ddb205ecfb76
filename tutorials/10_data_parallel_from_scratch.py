# %% [markdown]
# # Lesson 10 — Data parallelism from scratch: all-reduce by hand, DDP, FSDP2
#
# Prerequisites: lesson 01 (the Transformer), lesson 04 (completion-only labels, and why gradient
# accumulation divides by *all* target tokens); what a gradient and an optimizer step are; processes vs
# threads; the `.venv` that `make test` builds. No GPU: everything runs on 2 CPU processes over gloo.
#
# Data parallelism gives each of N processes ("ranks") its own slice of every global batch and keeps one
# model in step on all of them. Done right, N ranks compute *exactly* the gradient one process would compute
# on the whole batch, up to the order of float32 additions. We build it three times, each time handing one
# more piece to PyTorch:
#
# 1. **By hand** with `torch.distributed`: each rank backpropagates its slice, then one `all_reduce` per
#    gradient sums them. The loss must be divided by the *global* number of target tokens, or the result
#    is not the big batch's gradient.
# 2. **DistributedDataParallel** does the same all-reduce, in buckets, overlapped with the backward;
#    `no_sync()` skips it on the micro-batches of an accumulation that are not the last.
# 3. **FSDP2** (`torch.distributed.fsdp.fully_shard`) stops replicating: each rank keeps 1/N of every
#    parameter, gradient and optimizer state, and gathers a block's full weights only while it runs.
#    We measure the bytes per rank and set them beside `minift plan`'s prediction.
#
# Run it as a script (`python tutorials/10_data_parallel_from_scratch.py`) or cell by cell (the ranks are
# forked from this process, so this works in a notebook on Linux too). `MINIFT_FAST=1` uses a 2-block toy
# Transformer (~20 s); the full run uses SmolLM2-135M and records its figures in
# `tutorials/results/10_data_parallel_from_scratch.md`. minift's own multi-process training is
# `minift/train/distributed.py` (torchrun, `[train] distributed = "ddp" | "fsdp"`); this lesson is what it
# does, without the bookkeeping.

# %%
import copy
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import minift
from minift import plan
from minift.config import ModelConfig
from minift.data import collate, read_records, tokenize_example
from minift.io.bundled import resolve_bundled
from minift.io.gguf import read_gguf, tokenizer_from_gguf
from minift.losses import token_loss_sum
from minift.model import Transformer

from _results import results_header, write_results

FAST = os.environ.get("MINIFT_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path("tutorials")
WORLD = 2  # ranks; each is a process with one CPU thread
started = time.perf_counter()
findings: dict[str, str] = {}

# %% [markdown]
# ## 1. One model, one global batch, and the gradient we must reproduce
# The batch: 8 Alpaca examples with completion-only labels (lesson 04), so each example has its own number
# of target tokens: one-word answers from tutorials/data/alpaca_mini.jsonl alternate with sentence-long ones,
# so that rank 0 (the even rows, below) holds far fewer targets than rank 1. The reference is one process
# computing the gradient of
#
#     loss = (sum of every target token's cross-entropy) / (number of target tokens in the whole batch)
#
# Every rank gets a copy of the model and of this gradient (the ranks are forked from this process) and
# compares what it computes with it.

# %%
gguf = read_gguf(resolve_bundled("smollm2-135m"))  # the header only: the tokenizer, no weights
tokenizer = tokenizer_from_gguf(gguf.metadata, str(gguf.path))
gguf.close()
short = read_records(HERE / "data" / "alpaca_mini.jsonl")  # one-word answers ("Paris", "17")
long = [{"instruction": instruction, "input": "", "output": output} for instruction, output in [
    ("Explain why the sky looks blue.", "Air molecules scatter short blue wavelengths of sunlight much more "
                                        "strongly than long red ones, so blue light reaches us from every direction."),
    ("Describe a cat in one sentence.", "A cat is a small, curious and independent animal that sleeps most "
                                        "of the day."),
    ("Why do we have seasons?", "The Earth's axis is tilted, so each hemisphere receives more direct sunlight "
                                "for half of the year and less for the other half."),
    ("What does a compiler do?", "It translates source code written by people into machine code that a "
                                 "processor can run."),
]]
records = [record for pair in zip(short[24:28], long) for record in pair]  # short, long, short, long, ...
examples = [tokenize_example(record, tokenizer, fmt="alpaca", max_length=96) for record in records]
batch = collate(examples, pad_id=tokenizer.pad_token_id)  # input_ids, attention_mask, labels: (8, T)
targets_per_example = (batch["labels"][:, 1:] != -100).sum(dim=1)
print("batch", tuple(batch["input_ids"].shape), "targets per example:", targets_per_example.tolist())

if FAST:  # a toy Transformer with SmolLM2's vocabulary: every code path, numbers meaningless
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=128, tie_embeddings=True))
    model_name = "a 2-block toy Transformer"
else:
    model, _ = minift.load("smollm2-135m")  # float32
    model_name = "SmolLM2-135M"
model.train()
n_params = sum(p.numel() for p in model.parameters())
print(f"{model_name}: {n_params:,} parameters")


def global_batch_loss(module, rows):
    """Sum of token losses over the rows, and their target count (the caller decides the divisor)."""
    logits = module(batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows])
    return token_loss_sum(logits, batch["labels"][rows])


reference_model = copy.deepcopy(model)
loss_sum, n_targets = global_batch_loss(reference_model, slice(None))
(loss_sum / n_targets).backward()
reference = {name: p.grad.detach().clone() for name, p in reference_model.named_parameters()}
print(f"one process: loss {loss_sum.item() / n_targets:.4f} over {n_targets} target tokens")


def max_relative_error(grads: dict[str, torch.Tensor]) -> float:
    """max |g - reference| / max |reference| over every parameter."""
    scale = max(g.abs().max().item() for g in reference.values())
    return max((grads[name] - reference[name]).abs().max().item() for name in reference) / scale


# %% [markdown]
# ## How the ranks start
# `launch(worker)` forks 2 processes. Each joins a process group (gloo: the CPU backend; nccl on GPUs) through
# a rendezvous address on this machine, runs `worker(rank)`, and rank 0 reports back through a queue.
# torchrun does the same from the command line (and across machines), setting RANK, WORLD_SIZE,
# MASTER_ADDR and MASTER_PORT for each process.

# %%
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, worker, port: int, results) -> None:
    torch.set_num_threads(1)  # one thread per rank: 2 ranks use the 2 cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        report = worker(rank)
        if rank == 0:
            results.put(report)
    finally:
        dist.destroy_process_group()


def launch(worker) -> dict:
    results = mp.get_context("fork").SimpleQueue()
    begun = time.perf_counter()
    mp.start_processes(_run_rank, args=(worker, free_port(), results), nprocs=WORLD, start_method="fork")
    print(f"[{worker.__name__}: {WORLD} processes, {time.perf_counter() - begun:.1f} s]")
    return results.get()


def my_rows(rank: int) -> list[int]:
    """This rank's examples of the global batch: rank 0 takes 0, 2, 4, 6 and rank 1 takes 1, 3, 5, 7."""
    return list(range(rank, len(batch["input_ids"]), WORLD))


# %% [markdown]
# ## 2. All-reduce by hand
# Each rank backpropagates its 4 examples. The gradient of a sum is the sum of the gradients, so if every
# rank's loss is *its* token losses divided by the *global* target count N, then summing the ranks'
# gradients (`all_reduce` with SUM: afterwards every rank holds the sum) gives exactly the reference.
# N itself is one more all-reduce, of one integer. The tempting alternative, each rank's mean loss and
# then the average over ranks, weighs a token on the rank with fewer targets more: it is a different
# gradient whenever the ranks' target counts differ (the gradient-accumulation bug of lesson 04, across
# processes). After the sum, every rank takes the same optimizer step and the replicas stay identical.

# %%
def by_hand(rank: int) -> dict:
    local = copy.deepcopy(model)
    loss_sum, local_count = global_batch_loss(local, my_rows(rank))
    count = torch.tensor(local_count)
    dist.all_reduce(count)  # SUM over ranks: the global number of target tokens
    (loss_sum / count).backward()
    sent = 0
    for p in local.parameters():  # one collective per tensor (DDP packs them into buckets instead)
        dist.all_reduce(p.grad)
        sent += p.grad.numel() * p.grad.element_size()
    right = max_relative_error({n: p.grad for n, p in local.named_parameters()})

    wrong_model = copy.deepcopy(model)  # the mean of per-rank means
    loss_sum, local_count = global_batch_loss(wrong_model, my_rows(rank))
    (loss_sum / local_count).backward()
    for p in wrong_model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    wrong = max_relative_error({n: p.grad for n, p in wrong_model.named_parameters()})

    torch.optim.SGD(local.parameters(), lr=0.1).step()  # the same step on every rank
    checksum = torch.tensor([sum(p.double().sum().item() for p in local.parameters())], dtype=torch.float64)
    checksums = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
    dist.all_gather(checksums, checksum)
    return dict(count=local_count, global_count=int(count), right=right, wrong=wrong, sent=sent,
                same_after_step=all(c.item() == checksums[0].item() for c in checksums))


out = launch(by_hand)
print(f"rank 0 holds {out['count']} of {out['global_count']} target tokens")
print(f"all-reduced gradient vs one process:      max relative error {out['right']:.1e}")
print(f"mean of per-rank means instead:           max relative error {out['wrong']:.1e}")
print(f"all-reduced per step: {out['sent'] / 1e6:.1f} MB of gradients per rank (a ring all-reduce sends "
      f"2(N-1)/N of that over the wire); replicas identical after the SGD step: {out['same_after_step']}")
assert out["right"] < 1e-5 and out["wrong"] > 1e-2 and out["same_after_step"]  # the claims above, checked
findings["by hand"] = (f"all-reduced gradient vs 1 process: max relative error {out['right']:.1e}; mean of "
                       f"per-rank means: {out['wrong']:.1e} (rank 0 holds {out['count']} of {out['global_count']} "
                       f"targets); replicas identical after a step: {out['same_after_step']}")

# %% [markdown]
# ## 3. The same with DistributedDataParallel
# `DistributedDataParallel(model)` does three things for us. At construction it broadcasts rank 0's
# parameters, so replicas start equal even if they were not (we perturb rank 1's copy to see it). During the
# backward, autograd hooks all-reduce gradients in buckets of about 25 MB as soon as a bucket is complete,
# overlapping communication with the rest of the backward. And it *averages* (divides by N) rather than sums,
# so the loss we hand it is scaled by N to keep "sum / global count".
#
# Gradient accumulation: with two micro-batches per rank, the first backward runs under `no_sync()` (no
# communication: gradients accumulate locally) and only the last one all-reduces the accumulated sum.

# %%
def with_ddp(rank: int) -> dict:
    local = copy.deepcopy(model)
    if rank == 1:
        with torch.no_grad():
            next(local.parameters()).add_(1.0)  # DDP's broadcast from rank 0 undoes this
    ddp = DistributedDataParallel(local)
    rows = my_rows(rank)
    count = torch.tensor(int((batch["labels"][rows, 1:] != -100).sum()))
    dist.all_reduce(count)
    loss_sum, _ = global_batch_loss(ddp, rows)
    (loss_sum / count * WORLD).backward()
    one_step = max_relative_error({n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()})

    accumulated = DistributedDataParallel(copy.deepcopy(model))
    first, last = rows[: len(rows) // 2], rows[len(rows) // 2:]
    with accumulated.no_sync():  # micro-batch 1: gradients stay local
        loss_sum, _ = global_batch_loss(accumulated, first)
        (loss_sum / count * WORLD).backward()
    loss_sum, _ = global_batch_loss(accumulated, last)  # micro-batch 2: all-reduce the accumulated sum
    (loss_sum / count * WORLD).backward()
    accumulation = max_relative_error({n.removeprefix("module."): p.grad for n, p in accumulated.named_parameters()})
    return dict(one_step=one_step, accumulation=accumulation)


out = launch(with_ddp)
print(f"DDP gradient vs one process:                      max relative error {out['one_step']:.1e}")
print(f"DDP, 2 micro-batches per rank with no_sync first: max relative error {out['accumulation']:.1e}")
assert out["one_step"] < 1e-5 and out["accumulation"] < 1e-5
findings["DDP"] = (f"vs 1 process: {out['one_step']:.1e}; 2 micro-batches per rank, no_sync on the first: "
                   f"{out['accumulation']:.1e}")

# %% [markdown]
# ## 4. FSDP2: shard the parameters, gradients and optimizer state
# DDP keeps a full replica on every rank: 16 bytes per parameter with AdamW (4 weight + 4 gradient + 8 for m
# and v in float32), N times over. `fully_shard(module)` replaces each parameter by a DTensor sharded on
# dim 0: rank r keeps the r-th of N equal slices of its rows. Calling it on every block and then on the root
# makes each block one unit: just before a block's forward its shards are all-gathered into full weights,
# and freed right after; in the backward they are gathered again, and the gradients are reduce-scattered, so
# each rank keeps only its shard of the gradient (averaged over ranks, like DDP). The optimizer then steps on
# shards, and its m and v are born sharded. We count bytes per rank in each state and ask `minift plan`
# (minift/plan.py) what it predicts for the same model on 2 GPUs.

# %%
def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def with_fsdp(rank: int) -> dict:
    local = copy.deepcopy(model)
    unsharded = local_bytes(local.parameters())
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in local.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(local, mesh=mesh)  # the root unit: embeddings, final norm, lm_head
    weight = local.blocks[0].attn.q_proj.weight
    seen = {}

    def look(module, args):  # runs inside the forward, after FSDP has gathered block 0
        seen["inside"] = f"{type(module.weight).__name__} {tuple(module.weight.shape)}"

    hook = local.blocks[0].attn.q_proj.register_forward_pre_hook(look)

    rows = my_rows(rank)
    count = torch.tensor(int((batch["labels"][rows, 1:] != -100).sum()))
    dist.all_reduce(count)
    loss_sum, _ = global_batch_loss(local, rows)
    (loss_sum / count * WORLD).backward()
    hook.remove()
    grads = {name: p.grad.full_tensor() for name, p in local.named_parameters()}  # gathers: a collective
    optimizer = torch.optim.AdamW(local.parameters(), lr=1e-4)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return dict(
        error=max_relative_error(grads), placement=str(weight.placements[0]), full_shape=tuple(weight.shape),
        local_shape=tuple(weight.to_local().shape), inside=seen["inside"], unsharded=unsharded,
        weights=local_bytes(local.parameters()), grads=local_bytes(p.grad for p in local.parameters()),
        optimizer=local_bytes(state))


out = launch(with_fsdp)
print(f"q_proj.weight of block 0: {out['placement']}, full {out['full_shape']}, rank 0 keeps {out['local_shape']}, "
      f"inside its forward it is {out['inside']}")
print(f"FSDP gradient vs one process: max relative error {out['error']:.1e}")
counts = plan.count_parameters(model.config)
predicted = plan.states_per_gpu(counts, "full", "fsdp", WORLD)
rows = [("weights", out["unsharded"], out["weights"]), ("gradients", out["unsharded"], out["grads"]),
        ("AdamW m, v", 2 * out["unsharded"], out["optimizer"])]
table = ["| state | one replica (DDP, per rank) | FSDP, rank 0 | ratio |", "| --- | ---: | ---: | ---: |"]
table += [f"| {name} | {full / 1e6:.2f} MB | {mine / 1e6:.2f} MB | {mine / full:.3f} |" for name, full, mine in rows]
measured = out["weights"] + out["grads"] + out["optimizer"]
planned = predicted["weights"] + predicted["gradients"] + predicted["optimizer"]
table.append(f"| all model states | {4 * out['unsharded'] / 1e6:.2f} MB | {measured / 1e6:.2f} MB | "
             f"{measured / (4 * out['unsharded']):.3f} |")
print("\n".join(table))
print(f"minift plan predicts {planned / 1e6:.2f} MB of model states per GPU for full fine-tuning under FSDP on "
      f"{WORLD} GPUs (16 bytes per parameter / {WORLD}); measured {measured / 1e6:.2f} MB")
assert out["error"] < 1e-5 and measured == planned  # every dimension here splits evenly over 2 ranks: no padding
findings["FSDP2"] = f"vs 1 process: max relative error {out['error']:.1e}"

# %% [markdown]
# ## What to take away
# - Data parallelism is exact: N ranks reproduce one process's big-batch gradient to float32 rounding, *if*
#   the loss is normalized by the global target count. Averaging per-rank means is a different gradient.
# - DDP is that all-reduce, bucketed and overlapped with the backward, plus a broadcast at the start;
#   `no_sync` makes accumulation communicate once per optimizer step.
# - FSDP2 divides weights, gradients and optimizer state by N (here 2), at the price of gathering each
#   block's weights in the forward and the backward; what is left per rank is what `minift plan` predicts.
#   At scale, that is the difference between a 70B model fitting on 8 GPUs or not (README, "Scaling out").

# %%
report = results_header(__file__ if "__file__" in globals() else "tutorials/10_data_parallel_from_scratch.py",
                        "data parallelism from scratch", started)
report += (f"Load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}.\n"
           f"\n{model_name} ({n_params:,} parameters), float32, {WORLD} gloo processes of 1 thread each, a global "
           f"batch of {len(batch['input_ids'])} Alpaca examples ({n_targets} target tokens, completion-only).\n\n")
report += "| step | result |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in findings.items())
report += ("\nBytes per rank after one AdamW step, FSDP2 (`fully_shard` per block, then the root) vs one replica:\n\n"
           + "\n".join(table) + f"\n\n`minift plan` (16 bytes per parameter / {WORLD}): {planned / 1e6:.2f} MB "
           f"predicted, {measured / 1e6:.2f} MB measured.\n")
write_results(__file__ if "__file__" in globals() else "tutorials/10_data_parallel_from_scratch.py", report, started)
