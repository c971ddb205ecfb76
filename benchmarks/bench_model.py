"""minift vs transformers: forward and forward+backward of the SmolLM2-135M shape on the CPU.

Both models get the same random weights (minift loads the directory transformers saved), the same batch,
and run in separate processes so each one's peak memory is its own. On a 2-core machine one run's timing
can move by 10-20%, so the providers alternate over several rounds (minift, transformers, minift, ...) and
each keeps its best round: a slow moment of the machine then hits both. Prints and writes a table of
tokens/s, the minift/transformers ratio and peak RSS. Target (issue 2): forward+backward ratio >= 1.0, aim 1.3x,
with no more peak memory.

    python benchmarks/bench_model.py [--batch 2] [--seq 256] [--steps 3] [--layers 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, run_isolated, write_result  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e5,
               tie_word_embeddings=True)


def make_checkpoint(directory: str, layers: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, **SMOLLM2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def time_provider(provider: str, directory: str, batch: int, seq: int, steps: int, backward: bool) -> dict:
    import torch

    torch.manual_seed(0)
    if provider == "minift":
        import minift

        model, _ = minift.load(directory)
        forward = lambda ids: model(ids)  # noqa: E731
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
        forward = lambda ids: model(ids).logits  # noqa: E731
    model.train(backward)
    ids = torch.randint(0, 49152, (batch, seq))
    times = []
    for step in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        if backward:
            logits = forward(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                forward(ids)
        if step:
            times.append(time.perf_counter() - start)
    best = min(times)
    return {"tokens_per_s": batch * seq / best, "seconds": best}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per provider; each keeps its best")
    args = parser.parse_args()
    here = str(Path(__file__).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        make_checkpoint(directory, args.layers)
        for mode, backward in (("forward", False), ("forward+backward", True)):
            runs = {"minift": [], "transformers": []}
            for _ in range(args.rounds):
                for p in runs:
                    runs[p].append(run_isolated(here, "time_provider", provider=p, directory=directory,
                                                batch=args.batch, seq=args.seq, steps=args.steps, backward=backward))
            ours, theirs = (max(runs[p], key=lambda r: r["tokens_per_s"]) for p in ("minift", "transformers"))
            rows.append([mode, f"{ours['tokens_per_s']:.0f}", f"{theirs['tokens_per_s']:.0f}",
                         f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x",
                         f"{ours['peak_rss_mb']:.0f}", f"{theirs['peak_rss_mb']:.0f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["mode", "minift tok/s", "transformers tok/s", "ratio", "minift peak MB",
                            "transformers peak MB"], rows)
    report = (f"# minift vs transformers: SmolLM2-135M shape ({args.layers} layers), batch {args.batch} x {args.seq} "
              f"tokens, float32\n\nMachine: {machine_description()}\n\nBest of {args.steps} timed steps after one "
              f"warm-up, best of {args.rounds} alternating rounds; each provider in its own process (peak RSS includes the Python runtime and libraries).\n\n"
              f"{table}\n")
    print(report)
    write_result("model_cpu.md", report)


if __name__ == "__main__":
    main()
