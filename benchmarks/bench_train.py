"""minift's training step vs transformers with a hand-written loop: one full fine-tuning step on the CPU.

Both sides start from the same random checkpoint (a transformers LlamaForCausalLM of the SmolLM2-135M
shape, fewer layers by default, saved to a temporary directory that minift loads), see the same batch
(every token a target), and do the same work per step:

    forward -> next-token loss -> backward -> clip grad norm to 1.0 -> AdamW step -> zero grads

minift runs it through its trainer's own functions (`accumulate_gradients`, `optimizer_step`, the AdamW
param groups of `build_optimizer`); transformers runs `model(ids, labels=ids).loss` and a plain
torch.optim.AdamW, as a user's hand-written loop would. Each provider runs in a fresh process, so peak RSS
is its own. Target (issue "Training engine"): minift tokens/s >= transformers tokens/s; issue 16: >= 1.3x, and
peak memory <= 0.7x.

Trainer options run as extra minift providers (`--variants ckpt,compile,compile+ckpt,inbwd,inbwd+ckpt`): gradient
checkpointing per block (train.gradient_checkpointing), torch.compile per block (train.compile; its compile
seconds, all spent in the warm-up step, are reported apart) and AdamW inside backward (train.optimizer_in_backward:
each weight is updated as soon as its gradient is complete and the gradient freed; such a step cannot clip, so
those rows skip the clipping the others do). "train extra" is peak RSS minus RSS once the model is loaded:
the memory the training itself adds (gradients, AdamW moments, activations), without the Python runtime.

    python benchmarks/bench_train.py [--layers 6] [--batch 4] [--seq 128] [--steps 4] [--rounds 2] [--variants ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, rss_mb, run_isolated, write_result  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e5,
               tie_word_embeddings=True)
LR, MAX_GRAD_NORM = 1e-5, 1.0


def make_checkpoint(directory: str, layers: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, **SMOLLM2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


VARIANTS = {"ckpt": "gradient checkpointing per block", "compile": "torch.compile per block", "compile+ckpt": "both",
            "inbwd": "AdamW inside backward, no clipping", "inbwd+ckpt": "AdamW inside backward + checkpointing"}


def minift_step_function(directory: str, options: tuple[str, ...] = ()):
    import torch

    import minift
    from minift.train.run_config import TrainConfig
    from minift.schedules import layer_groups
    from minift.train.tasks import build_task_model
    from minift.train import accumulate_gradients, build_optimizer, optimizer_step

    backbone, _ = minift.load(directory)
    backbone.gradient_checkpointing = "ckpt" in options
    if "compile" in options:
        from minift.train.compiled import compile_blocks

        compile_blocks(backbone)
    model = build_task_model(backbone, "causal_lm").train()
    optimizer = build_optimizer(layer_groups(backbone), TrainConfig(lr=LR), torch.device("cpu"))
    if "inbwd" in options:  # what fit() does with train.optimizer_in_backward = true (and max_grad_norm = none)
        from minift.train.optimizer_in_backward import OptimizerInBackward

        in_backward = OptimizerInBackward(optimizer)

        def step(batch):
            accumulate_gradients(model, [batch])  # every weight is updated in here
            in_backward.finish_step()

        return step

    def step(batch):
        accumulate_gradients(model, [batch])
        optimizer_step(optimizer, MAX_GRAD_NORM)

    return step


def transformers_step_function(directory: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(batch):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_provider(provider: str, directory: str, batch: int, seq: int, steps: int, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from minift.train.compiled import compile_seconds

    torch.manual_seed(0)
    if provider == "transformers":
        step = transformers_step_function(directory)
    else:
        step = minift_step_function(directory, tuple(provider.split("+")[1:]))
    compile_start = compile_seconds()  # imports torch._dynamo now, so that "train extra" does not count the import
    after_load = rss_mb()
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times, cpu_times = [], []
    for index in range(steps + 1):  # the first step is a warm-up (it also allocates the AdamW moments)
        start, start_cpu = time.perf_counter(), time.process_time()
        step(data)
        if index:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
    best = min(times)
    return {"tokens_per_s": batch * seq / best, "seconds": best, "after_load_mb": after_load,
            "tokens_per_cpu_s": batch * seq / min(cpu_times),
            "compile_s": compile_seconds() - compile_start}


def profile_minift(directory: str, batch: int, seq: int, threads: int | None) -> tuple[float, str]:
    """(GEMMs' and the AdamW kernel's share of one minift step in torch.profiler's elapsed times, its table of the top ops)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    step = minift_step_function(directory)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    step(data)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(data)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events  # GEMMs, and the AdamW update both sides must run
               if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
               or e.key.startswith("aten::_fused_adam"))
    return gemm / total, events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (best one counts)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the providers this many times")
    parser.add_argument("--variants", default="", help="comma-separated extra minift providers: "
                        + ", ".join(f"{name} ({text})" for name, text in VARIANTS.items()))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each provider (default: torch's)")
    parser.add_argument("--result-name", default="train_cpu.md", help="file name under benchmarks/results/")
    parser.add_argument("--profile", action="store_true", help="profile one minift step: the GEMMs' share, and the "
                        "bound it sets on the ratio")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    here = str(Path(__file__).resolve())
    results: dict[str, list[dict]] = {"minift": [], "transformers": [], **{f"minift+{v}": [] for v in variants}}
    load_before = __import__("os").getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        make_checkpoint(directory, args.layers)
        for _ in range(args.rounds):  # alternating rounds: a busy machine slows both sides alike
            for provider in results:
                results[provider].append(run_isolated(here, "time_provider", provider=provider, directory=directory,
                                                      batch=args.batch, seq=args.seq, steps=args.steps,
                                                      threads=args.threads))
        profile = profile_minift(directory, args.batch, args.seq, args.threads) if args.profile else None
    load_after = __import__("os").getloadavg()
    best = {p: max(r, key=lambda x: x["tokens_per_s"]) for p, r in results.items()}
    peak = {p: max(x["peak_rss_mb"] for x in r) for p, r in results.items()}
    extra = {p: max(x["peak_rss_mb"] - x["after_load_mb"] for x in r) for p, r in results.items()}
    reference = best["transformers"]["tokens_per_s"]
    cpu = {p: max(x["tokens_per_cpu_s"] for x in r) for p, r in results.items()}
    rows = [[provider, f"{best[provider]['tokens_per_s']:.0f}", f"{best[provider]['tokens_per_s'] / reference:.2f}x",
             f"{cpu[provider]:.0f}", f"{cpu[provider] / cpu['transformers']:.2f}x",
             f"{peak[provider]:.0f}", f"{peak[provider] / peak['transformers']:.2f}x", f"{extra[provider]:.0f}",
             f"{extra[provider] / extra['transformers']:.2f}x",
             f"{max(x['compile_s'] for x in results[provider]):.1f}" if "compile" in provider else "-"]
            for provider in results]
    table = markdown_table(["provider (forward+backward+clip+AdamW)", "tok/s", "vs transformers", "tok / CPU s",
                            "vs transformers", "peak RSS MB",
                            "vs transformers", "train extra MB", "vs transformers", "compile s (warm-up)"], rows)
    text = (f"# Full fine-tuning step on the CPU: minift trainer vs transformers + hand-written loop\n\n"
            f"SmolLM2-135M shape with {args.layers} layers, batch {args.batch} x {args.seq} tokens (all targets), "
            f"float32, AdamW lr {LR}, grad-norm clipping {MAX_GRAD_NORM}.\n\n"
            f"Machine: {machine_description()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
            f"(a shared machine: the providers alternate so that load hits all alike)\n\n"
            f"Torch threads per provider: {args.threads or 'torch default'}. "
            f"Best of {args.steps} timed steps after one warm-up, best of {args.rounds} alternating rounds; each "
            f"provider in its own process (peak RSS includes the Python runtime and libraries).\n\n{table}\n\n"
            f"minift's step uses torch's fused AdamW kernel (`build_optimizer`) and its own loss (`TaskModel`: only "
            f"target rows meet the vocabulary matrix); the hand-written loop uses `torch.optim.AdamW` defaults and "
            f"`model(..., labels=...).loss`, as most user code does. Both models are float32 with SDPA attention.\n")
    if any("inbwd" in v for v in variants):
        text += ("\nThe +inbwd rows run `train.optimizer_in_backward = true`: each weight's AdamW update runs in a "
                 "post-accumulate-grad hook as soon as its gradient is complete, and the gradient is freed there "
                 "(minift/train/optimizer_in_backward.py). Such a step cannot clip the global norm, so those rows do "
                 "not clip; every other row does.\n")
    if profile is not None:
        share, table_text = profile
        limit = cpu["minift"] / cpu["transformers"] / share
        text += (f"\nIn torch.profiler's elapsed times of one minift step, GEMMs (aten::mm/addmm/addmm_/bmm) and the "
                 f"fused AdamW kernel are {share:.0%}. Both libraries run the same GEMMs (forward, grad of the input, "
                 f"grad of the weight) and an AdamW update of every weight, so with every other op free minift could reach at most {limit:.2f}x transformers per CPU second.\n\n```\n"
                 f"{table_text}\n```\n")
    print(text)
    write_result(args.result_name, text)


if __name__ == "__main__":
    main()
