"""LoRA training step: minift vs transformers + PEFT, side by side on the CPU.

Both sides train the same thing: a SmolLM2-135M-shaped Llama (d 576, 30 layers, 9 query / 3 key-value heads,
MLP 1536, vocab 49152, tied embeddings) with random weights, LoRA r = 8, alpha = 16 on every linear layer
except lm_head, AdamW on the adapter tensors, next-token cross-entropy, float32, batch B x T tokens.

Two workloads, each a table:
* `all`: every token is a target (continued pretraining on raw text).
* `sft`: completion-only supervised fine-tuning, the usual LoRA job: the first 3/4 of each row is the prompt
  (labels -100) and only the last 1/4, the response, is trained. minift runs the loss its trainer runs
  (`minift.train.tasks.TaskModel`: only target rows are projected onto the 49,152-word vocabulary); transformers
  computes logits for every position and lets cross-entropy ignore the prompt, as `model(labels=...)` does.
  Both compute the same loss (the "first loss" column).

How it measures, and why:
* Each provider lives in its own child process, so its peak resident memory (getrusage ru_maxrss) is its own.
  The parent tells the two children to take steps in turn (A B B A A B ...): on a shared machine the load
  drifts, and interleaving gives both sides the same conditions. Step times are reported as medians, in wall
  seconds and in CPU seconds of the provider's process (with --threads 1 the latter does not depend on how
  much of the machine other jobs take).
* "train extra" = peak RSS minus RSS after building the model: the memory the training step itself needs.
* A third child, `no-lora`, runs minift's model without adapters but with the full backward through every block:
  the speed of a LoRA that cost nothing, hence the most any LoRA implementation can gain here.
* A second table times one LoRA layer (576 -> 1536, 1024 tokens, forward + backward) in one process:
  minift's LoRALinear, PEFT's lora.Linear, and the frozen nn.Linear alone, to show what LoRA itself costs.

What to expect (profiled with torch.profiler on the 2-core CPU this was written on): the LoRA matmuls with
r = 8 are skinny and memory-bound, so a LoRA layer's cost is its passes over (tokens x out) tensors. minift's
LoRALinear adds the update with one in-place addmm and picks the fast BLAS orientation for grad_B and
grad_h (see minift/peft/lora.py), which cuts LoRA's extra cost per layer several-fold (second table). But the
whole step is ~90% the frozen base model's own work — its GEMMs (forward and grad of x), lm_head and the
softmax over 49,152 tokens, attention — identical in both libraries, so in the `all` workload the step gains
little; the `no-lora` row bounds what any LoRA implementation could gain there. In the `sft` workload the
lm_head (a fifth of the model's GEMM work at this shape) and the softmax run only on the response rows in
minift. Peak memory is lower because no (tokens x out) temporaries are allocated per layer, and in `sft`
because no logits are kept for the prompt.

Options of minift's trainer can run as extra children, each its own provider (`--variants ckpt,compile`):
`minift+ckpt` recomputes each block in backward (train.gradient_checkpointing), `minift+compile` compiles each
block (train.compile; its compile seconds, spent in the warm-up steps, are a column of their own). `--profile`
adds torch.profiler's table of one minift step and the share of its CPU time spent in GEMMs, and from it the
most any change to the non-GEMM work could gain over PEFT.

    python benchmarks/bench_lora.py --threads 1        # full size, writes benchmarks/results/lora_cpu.md
    python benchmarks/bench_lora.py --layers 4 --steps 2 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

SHAPE = dict(vocab=49152, dim=576, heads=9, kv_heads=3, hidden=1536)
VARIANTS = {"ckpt": "gradient checkpointing per block", "compile": "torch.compile per block",
            "compile+ckpt": "both"}
WORKLOADS = {"all": "every token is a target", "sft": "completion-only, the last quarter of each row is the target"}
RESULT_NAME = "lora_cpu.md"


# ----------------------------------------------------------------------------------------------------
# Child process: build one provider's model, then take a step whenever the parent says so
# ----------------------------------------------------------------------------------------------------


def build(provider: str, layers: int):
    """(model, loss function of (input ids, labels)). Same shape, same LoRA settings on both sides."""
    torch.manual_seed(0)
    if provider.startswith("minift+"):  # a trainer option on top of minift's LoRA model
        model, loss_of = build("minift", layers)
        options = provider.split("+")[1:]
        model.backbone.gradient_checkpointing = "ckpt" in options
        if "compile" in options:
            from minift.train.compiled import compile_blocks

            compile_blocks(model.backbone)
        return model, loss_of
    if provider in ("minift", "no-lora"):
        import minift
        from minift.peft import LoRAConfig, add_lora

        config = minift.ModelConfig(vocab_size=SHAPE["vocab"], dim=SHAPE["dim"], n_layers=layers,
                                    n_heads=SHAPE["heads"], n_kv_heads=SHAPE["kv_heads"], hidden_dim=SHAPE["hidden"],
                                    tie_embeddings=True)
        model = minift.Transformer(config)
        if provider == "minift":
            add_lora(model, LoRAConfig(r=8, alpha=16, targets="all-linear"))
        else:  # the bound: no adapters, yet the backward still runs through every block (grad of the embeddings'
            # output), i.e. the whole step of a LoRA that cost nothing
            model.requires_grad_(False)
            model.embed.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_())

        from minift.train.tasks import build_task_model

        task_model = build_task_model(model, "causal_lm")  # what `minift finetune` trains

        def loss_of(ids, labels):
            out = task_model({"input_ids": ids, "labels": labels})  # shifts inside; summed loss + target count
            return out.loss_sum / out.n_targets

        return task_model.train(), loss_of
    else:
        import peft
        import transformers

        config = transformers.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["dim"], num_hidden_layers=layers,
                                          num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                                          intermediate_size=SHAPE["hidden"], tie_word_embeddings=True)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

        def loss_of(ids, labels):
            return model(input_ids=ids, labels=labels, use_cache=False).loss  # shifts labels inside
    return model.train(), loss_of


def worker(provider: str, layers: int, batch: int, seq: int, threads: int, workload: str) -> None:
    torch.set_num_threads(threads)
    model, loss_of = build(provider, layers)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=1e-4) if trainable_params else None
    trainable = sum(p.numel() for p in trainable_params)
    ids = torch.randint(0, SHAPE["vocab"], (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if workload == "sft":
        labels[:, : seq * 3 // 4] = -100  # the prompt: given, not learned
    from common import rss_mb
    from minift.train.compiled import compile_seconds

    compile_seconds()  # imports torch._dynamo now, so that "train extra" does not count the import
    after_build = rss_mb()
    print(json.dumps(dict(ready=True, trainable=trainable, rss_after_build=after_build)), flush=True)
    for command in sys.stdin:
        if command.strip() != "step":
            break
        start, start_cpu, start_compile = time.perf_counter(), time.process_time(), compile_seconds()
        loss = loss_of(ids, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu_seconds, loss=loss.item(),
                              compile_seconds=compile_seconds() - start_compile)), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps(dict(peak_rss=peak, rss_after_build=after_build)), flush=True)


# ----------------------------------------------------------------------------------------------------
# Parent: interleave the two children, then time single layers
# ----------------------------------------------------------------------------------------------------


class Child:
    def __init__(self, provider: str, args, workload: str) -> None:
        command = [sys.executable, __file__, "--worker", provider, "--layers", str(args.layers),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
                   "--workloads", workload]
        self.provider = provider
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.read()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        self.compile_seconds = 0.0

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.provider} worker exited (code {self.process.wait()})")
        return json.loads(line)

    def step(self, timed: bool) -> None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        reply = self.read()
        self.losses.append(reply["loss"])
        self.compile_seconds += reply["compile_seconds"]
        if timed:
            self.times.append(reply["seconds"])
            self.cpu_times.append(reply["cpu_seconds"])

    def finish(self) -> dict:
        self.process.stdin.write("done\n")
        self.process.stdin.flush()
        final = self.read()
        self.process.wait()
        return final


def train_step_table(args, workload: str) -> tuple[list[list[str]], dict]:
    providers = ["minift", "peft"] + ([] if args.no_bound else ["no-lora"]) + [f"minift+{v}" for v in args.variants]
    children = [Child(provider, args, workload) for provider in providers]
    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(children)
        for child in children[shift:] + children[:shift]:  # A B C, B C A, C A B, ...
            child.step(timed=round_ >= args.warmup)
    tokens = args.batch * args.seq
    rows, summary = [], {}
    for child in children:
        final = child.finish()
        wall, cpu = statistics.median(child.times), statistics.median(child.cpu_times)
        summary[child.provider] = dict(tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu,
                                       peak=final["peak_rss"], extra=final["peak_rss"] - final["rss_after_build"],
                                       cpu_step=cpu)
        rows.append([child.provider, f"{child.info['trainable']:,}", f"{wall:.2f}",
                     f"{min(child.times):.2f} / {max(child.times):.2f}", f"{tokens / wall:,.1f}", f"{cpu:.2f}",
                     f"{tokens / cpu:,.1f}", f"{final['peak_rss']:,.0f}", f"{summary[child.provider]['extra']:,.0f}",
                     f"{child.losses[0]:.4f}", f"{child.compile_seconds:.1f}" if "compile" in child.provider else "-"])
    return rows, summary


def layer_table(reps: int = 7) -> list[list[str]]:
    """One 576 -> 1536 layer, 1024 tokens, forward + backward (grad of x and of the adapter): median ms."""
    import peft

    from minift.peft import LoRALinear

    torch.manual_seed(0)
    dim, hidden, r = SHAPE["dim"], SHAPE["hidden"], 8
    x0 = torch.randn(4, 256, dim)
    grad = torch.randn(4, 256, hidden)
    frozen = nn.Linear(dim, hidden, bias=False).requires_grad_(False)
    ours = LoRALinear(frozen)
    ours.add_adapter("default", r=r, alpha=16)
    ours.set_adapter("default")
    theirs = peft.tuners.lora.Linear(nn.Linear(dim, hidden, bias=False).requires_grad_(False), "default",
                                     config=peft.LoraConfig(r=r, lora_alpha=16), r=r, lora_alpha=16)
    with torch.no_grad():  # non-zero B so every gradient is really computed
        for layer in (ours, theirs):
            layer.lora_B["default"].weight.normal_()
    layers = {"nn.Linear (frozen, no LoRA)": frozen, "minift LoRALinear": ours, "PEFT lora.Linear": theirs}

    def run(layer):
        x = x0.clone().requires_grad_(True)
        layer(x).backward(grad)

    wall: dict[str, list[float]] = {name: [] for name in layers}
    cpu: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(reps):
        for name, layer in layers.items():
            run(layer)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(5):
                run(layer)
            wall[name].append((time.perf_counter() - start) / 5 * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / 5 * 1e3)
    frozen_wall = statistics.median(wall["nn.Linear (frozen, no LoRA)"])
    frozen_cpu = statistics.median(cpu["nn.Linear (frozen, no LoRA)"])
    return [[name, f"{statistics.median(wall[name]):.1f}", f"{statistics.median(wall[name]) / frozen_wall:.2f}x",
             f"{statistics.median(cpu[name]):.1f}", f"{statistics.median(cpu[name]) / frozen_cpu:.2f}x"]
            for name in layers]


def profile_step(args) -> tuple[float, str]:
    """(GEMMs' share of the self CPU time of one minift step, torch.profiler's table of the top ops)."""
    model, loss_of = build("minift", args.layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if args.workloads.split(",")[0] == "sft":
        labels[:, : args.seq * 3 // 4] = -100

    def step():
        loss_of(ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm",
                                                                  "aten::addmm_", "aten::baddbmm"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40)
    return gemm / total, table.strip()


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine() -> str:
    import peft
    import transformers

    from common import machine_description

    return f"{machine_description()}; transformers {transformers.__version__}; peft {peft.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per provider")
    parser.add_argument("--workloads", default="all,sft", help="comma-separated: all (every token a target), sft "
                        "(completion-only: the last quarter of each row)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    parser.add_argument("--result-name", default=RESULT_NAME, help="file name under benchmarks/results/")
    parser.add_argument("--variants", default="", help="comma-separated minift options run as extra providers: "
                        + ", ".join(f"{name} ({text})" for name, text in VARIANTS.items()))
    parser.add_argument("--profile", action="store_true", help="profile one minift step (in this process) and "
                        "report the GEMMs' share of its CPU time")
    parser.add_argument("--no-layer-table", action="store_true", help="skip the one-layer table")
    parser.add_argument("--no-bound", action="store_true", help="skip the no-lora provider (saves memory and time)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.worker:
        return worker(args.worker, args.layers, args.batch, args.seq, args.threads, args.workloads)
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")

    started, load_before = time.time(), os.getloadavg()
    tables = {workload: train_step_table(args, workload) for workload in workloads}
    torch.set_num_threads(args.threads)
    layer_rows = None if args.no_layer_table else layer_table()
    profile = profile_step(args) if args.profile else None
    load_after = os.getloadavg()
    sections = []
    for workload, (rows, summary) in tables.items():
        ratio = summary["minift"]["tokens_per_s"] / summary["peft"]["tokens_per_s"]
        cpu_ratio = summary["minift"]["tokens_per_cpu_s"] / summary["peft"]["tokens_per_cpu_s"]
        memory = summary["minift"]["peak"] / summary["peft"]["peak"]
        bound = summary["no-lora"]["tokens_per_cpu_s"] / summary["peft"]["tokens_per_cpu_s"] if "no-lora" in summary \
            else float("nan")
        sections += [
            f"## Workload `{workload}`: {WORKLOADS[workload]}",
            markdown(["provider", "trainable", "median step s", "min / max s", "tokens/s", "median CPU s",
                      "tokens / CPU s", "peak RSS MiB", "train extra MiB", "first loss", "compile s (warm-up)"], rows),
            f"**{workload}: minift / PEFT: {ratio:.2f}x tokens/s (wall), {cpu_ratio:.2f}x tokens per CPU second; "
            f"peak memory {memory:.2f}x.**" + ("" if args.no_bound else f" `no-lora` / PEFT: {bound:.2f}x per CPU second."),
        ]
        for variant in args.variants:
            ours = summary[f"minift+{variant}"]
            sections.append(
                f"`minift+{variant}` ({VARIANTS[variant]}) / PEFT: {ours['tokens_per_s'] / summary['peft']['tokens_per_s']:.2f}x "
                f"tokens/s (wall), {ours['tokens_per_cpu_s'] / summary['peft']['tokens_per_cpu_s']:.2f}x per CPU second; "
                f"peak memory {ours['peak'] / summary['peft']['peak']:.2f}x, train extra "
                f"{ours['extra'] / summary['peft']['extra']:.2f}x.")
        if profile is not None:
            share, _ = profile
            limit = summary["peft"]["cpu_step"] / (summary["minift"]["cpu_step"] * share)
            sections.append(
                f"In torch.profiler's times (elapsed per op; on a loaded machine every op stretches alike), GEMMs (aten::mm/addmm/bmm) are {share:.0%} of minift's step (profile below). Both libraries run "
                f"the same GEMMs, so even with every other op free minift could reach at most PEFT's CPU seconds / "
                f"minift's GEMM seconds = {limit:.2f}x PEFT in `{workload}`.")
    report = "\n\n".join([
        "# LoRA training step on the CPU: minift vs transformers + PEFT",
        f"Machine: {machine()}.",
        f"Run: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. Other jobs may share the machine: "
        "steps are interleaved so both providers see the same conditions, and CPU seconds (process time of the "
        "provider's own process) are reported beside wall seconds; with 1 thread they measure the work done "
        "independently of time-slicing.",
        f"Model: SmolLM2-135M shape with {args.layers} layers, random weights, float32; LoRA r=8, alpha=16, all linear "
        f"layers but lm_head; AdamW; batch {args.batch} x {args.seq} tokens; {args.threads} torch thread(s); "
        f"{args.warmup} warm-up + {args.steps} timed steps per provider, interleaved; "
        f"`python benchmarks/bench_lora.py {' '.join(sys.argv[1:])}`.",
        *sections,
        "`no-lora` is minift's model with no adapters at all, the backward still running through every block: "
        "the speed a LoRA layer that cost nothing would reach. Its speed over PEFT's is the most any LoRA layer "
        "can gain on this model; what is left is the frozen base model's own work (its GEMMs, lm_head over 49k "
        "tokens, attention, softmax). In the `sft` workload minift also skips the lm_head and softmax for the "
        "prompt rows, which carry no loss.",
        *([] if layer_rows is None else [
            "One LoRA layer (576 -> 1536, 4 x 256 tokens, forward + backward), median of 7 x 5 runs:",
            markdown(["layer", "wall ms", "vs frozen", "CPU ms", "vs frozen"], layer_rows)]),
        *([] if profile is None else [
            f"torch.profiler, one minift step of the `{workloads[0]}` workload after a warm-up step (this process, "
            f"{args.threads} thread(s)), ops by their own CPU time:", "```\n" + profile[1] + "\n```"]),
    ])
    print(report)
    if not args.no_write:
        from common import write_result

        write_result(args.result_name, report + "\n")


if __name__ == "__main__":
    main()
