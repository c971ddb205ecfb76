"""Data parallelism on this CPU: 2 gloo processes x 1 thread vs 1 process x 2 threads, the same global batch.

Both sides do the trainer's own optimizer step (minift.train.loop.accumulate_gradients + optimizer_step,
the World of minift/train/distributed.py) on a random model of the SmolLM2-135M shape with fewer layers,
full fine-tuning, every token a target:

    1 process    2 micro-batches of B sequences, torch threads 2
    2 processes  1 micro-batch of B sequences each (DDP over gloo), torch threads 1 each

so each optimizer step sees 2B sequences of T tokens on both sides, with the same total number of threads.
The share of time in communication is measured, not estimated: the 2-process step is timed once as it
trains (gradients all-reduced in DDP's buckets during backward) and once with every micro-batch under
no_sync (the same computation, no all-reduce); share = 1 - t(no_sync) / t(sync); and the all-reduce of a
gradient-sized buffer is timed alone, the upper bound of that share. A fourth row, 1 process
with 1 thread, shows what the second thread buys (on an oversubscribed machine it can cost). The sides are
run interleaved (A B C D A B C D ...) and the median per side is reported, with the load average, since the
machine may be shared.

    python benchmarks/bench_distributed.py [--layers 2] [--batch 2] [--seq 128] [--steps 3] [--rounds 2]

On GPUs (one process per GPU, nccl), the same worker runs under torchrun, e.g. on one machine with 8 GPUs:

    torchrun --standalone --nproc_per_node 8 benchmarks/bench_distributed.py --worker --mode ddp \\
        --device cuda --layers 30 --batch 8 --seq 2048 --steps 10        # or --mode fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, write_result  # noqa: E402

SMOLLM2 = dict(model_type="llama", vocab_size=49152, dim=576, hidden_dim=1536, n_heads=9, n_kv_heads=3,
               max_seq_len=2048, tie_embeddings=True)


def worker(layers: int, batch: int, seq: int, steps: int, mode: str, device: str, sync: bool) -> dict:
    """One rank (or the single process): time `steps` optimizer steps after one warm-up step."""
    import torch

    from minift.config import ModelConfig
    from minift.model import Transformer
    from minift.train.distributed import init_world
    from minift.train.loop import accumulate_gradients, optimizer_step
    from minift.train.tasks import build_task_model

    world = init_world(mode, torch.device(device))
    device = world.device(torch.device(device))
    torch.manual_seed(0)
    model = build_task_model(Transformer(ModelConfig(n_layers=layers, **SMOLLM2)), "causal_lm").to(device)
    world.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    per_rank = 2 if world.size == 1 else 1  # micro-batches per rank: the global batch is 2 x batch on 2 ranks
    generator = torch.Generator().manual_seed(1 + world.rank)
    if world.active and not sync:
        world.sync_gradients = lambda model, final: type(world).sync_gradients(world, model, False)  # never reduce
    options = {"world": world} if world.active else {}

    def step() -> int:
        micro = []
        for _ in range(per_rank):
            ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, seq), generator=generator).to(device)
            micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        stats = accumulate_gradients(model, micro, **options)
        optimizer_step(optimizer, 1.0)
        return stats["tokens"]

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start, tokens = time.perf_counter(), time.process_time(), 0
    for _ in range(steps):
        tokens += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_s = world.sum([time.process_time() - cpu_start])[0]  # CPU seconds of every thread of every process
    allreduce_s = None
    if world.active:  # the all-reduce of one step's gradients alone, timed on a flat buffer of their size
        import torch.distributed as dist

        flat = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad), device=device)
        dist.all_reduce(flat)
        began = time.perf_counter()
        for _ in range(3):
            dist.all_reduce(flat)
        if device.type == "cuda":
            torch.cuda.synchronize()
        allreduce_s = (time.perf_counter() - began) / 3
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "world_size": world.size,
            "cpu_ms_per_token": 1000 * cpu_s / tokens,
            "threads": torch.get_num_threads(), "allreduce_s": allreduce_s}


def run_side(side: str, args) -> dict:
    """One measurement in fresh processes: "1proc", "2proc" (DDP, syncing) or "2proc_nosync"."""
    common = ["--worker", "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps)]
    env = dict(os.environ)
    if side.startswith("1proc"):
        threads = "1" if side == "1proc_1thread" else "2"
        env["OMP_NUM_THREADS"] = threads
        command = [sys.executable, __file__, *common, "--mode", "none", "--threads", threads]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                   *common, "--mode", "ddp", "--threads", "1", *(["--no-sync"] if side == "2proc_nosync" else [])]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help="run one rank (under torchrun) or the 1 process")
    parser.add_argument("--mode", default="none", choices=["none", "ddp", "fsdp"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-sync", action="store_true", help="worker: never all-reduce (the no-comm baseline)")
    args = parser.parse_args()
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = worker(args.layers, args.batch, args.seq, args.steps, args.mode, args.device, not args.no_sync)
        if int(os.environ.get("RANK", 0)) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return

    sides = ["1proc", "2proc", "2proc_nosync", "1proc_1thread"]
    results = {side: [] for side in sides}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for side in sides:  # interleaved: A B C A B C
            results[side].append(run_side(side, args))
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1} {side}: {results[side][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    median = {side: statistics.median(r["tokens_per_s"] for r in results[side]) for side in sides}
    step = {side: statistics.median(r["step_s"] for r in results[side]) for side in sides}
    cpu = {side: statistics.median(r["cpu_ms_per_token"] for r in results[side]) for side in sides}
    share = 1 - step["2proc_nosync"] / step["2proc"]
    allreduce = statistics.median(r["allreduce_s"] for r in results["2proc"])
    names = {"1proc": "1 process x 2 threads, 2 micro-batches", "2proc": "2 processes x 1 thread (DDP, gloo)",
             "2proc_nosync": "2 processes, no_sync everywhere (no communication)",
             "1proc_1thread": "1 process x 1 thread, 2 micro-batches (half the threads)"}
    comm = {"2proc": f"{share:.0%}", "2proc_nosync": "0%"}
    rows = [[names[side], f"{median[side]:.0f}", f"{step[side]:.2f}", f"{median[side] / median['1proc']:.2f}",
             f"{cpu[side]:.1f}", comm.get(side, "-")] for side in sides]
    table = markdown_table(["setup (same global batch)", "tokens/s", "s/step", "vs 1 process",
                            "CPU ms/token (all processes)", "time in comm"], rows)
    print(table)
    note = (f"One all-reduce of a step's gradients (a flat float32 buffer of the trainable size), timed alone: "
            f"{allreduce:.3f} s, {allreduce / step['2proc']:.0%} of a 2-process step if none of it overlapped "
            f"backward.")
    print(note)
    print(f"load average during the runs: {min(loads):.1f} .. {max(loads):.1f}")
    import torch

    write_result("distributed_scaling.md", (
        "# Data parallelism on this CPU: 2 gloo processes vs 1 process at equal total threads\n\n"
        f"`python benchmarks/bench_distributed.py --layers {args.layers} --batch {args.batch} --seq {args.seq} "
        f"--steps {args.steps} --rounds {args.rounds}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
        f"Machine: {machine_description()}. torch {torch.__version__}.\n"
        f"Model: SmolLM2-135M shape with {args.layers} layers, random weights, full fine-tuning, AdamW; global "
        f"batch {2 * args.batch} x {args.seq} tokens per step on both sides; median of {args.rounds} interleaved "
        f"rounds of {args.steps} timed steps (after one warm-up step).\n"
        f"Load average (1 min) during the runs: {min(loads):.1f} .. {max(loads):.1f} on "
        f"{os.cpu_count()} cores: the machine was shared with other jobs, so the ratios are indicative.\n\n"
        f"{table}\n\n"
        "time in comm = 1 - t(step, no_sync everywhere) / t(step, DDP): the part of a step the gradient\n"
        "all-reduce adds, after what DDP overlaps with backward (negative: below the run-to-run noise).\n"
        "CPU ms/token: CPU time of every thread of every process per token, which the share of a busy machine\n"
        "a process gets does not change (spin-waiting threads count).\n"
        f"{note}\n"))
    print(json.dumps({"machine": machine_description(), "args": vars(args), "median_tokens_per_s": median,
                      "median_step_s": step, "comm_share": share, "loads": loads, "runs": results}))


if __name__ == "__main__":
    main()
