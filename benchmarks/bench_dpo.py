"""DPO training step with LoRA: minift's engine task vs TRL's DPOTrainer + PEFT, side by side on the CPU.

Both sides train the same thing on the same weights and the same batch: a SmolLM2-shaped Llama (d 576, 9 query /
3 key-value heads, MLP 1536, vocab 49152, tied embeddings; `--layers` blocks) with random weights, LoRA r = 8,
alpha = 16 on q_proj and v_proj, the sigmoid DPO loss with beta 0.1, the reference = the same model with its
adapters off (minift: adapter_interface.disabled_adapters; TRL: PEFT's disable_adapter), AdamW, float32.
A step = policy forward on [chosen ; rejected], reference forward without gradients, loss, backward, AdamW step.

minift: `minift.train.preference_tasks.PreferenceTaskModel` (what `[task] kind = "preference"` trains), built by
the engine's build_trainable_model, on a batch from preference_data.PairStream. TRL 1.16: `DPOTrainer._compute_loss`
on the batch its own collator made from the same records, with the PEFT model TRL wraps. Both losses are printed
for the first step (they must agree: the same weights, the same tokens).

How it measures: one process, torch threads 1, the two sides step in turn (A B B A ...) so a shared machine's
drifting load hits both alike; medians of wall seconds and of process CPU seconds per step.

    python benchmarks/bench_dpo.py                          # writes benchmarks/results/dpo_cpu.md
    python benchmarks/bench_dpo.py --layers 2 --steps 2 --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smollm2_shaped_model, write_result  # noqa: E402
from minift.machine import describe_machine  # noqa: E402


def records(n: int, words: list[str], length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def text(k):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))

    return [{"prompt": text(length // 2), "chosen": " " + text(length // 2), "rejected": " " + text(length // 2 - 3)}
            for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--length", type=int, default=64, help="words per prompt + completion")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (after one warm-up)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import datasets
    import peft
    import transformers
    import trl

    import minift
    from minift.train.loop import build_optimizer, build_trainable_model
    from minift.train.preference_data import PairStream, tokenize_pairs
    from minift.train.run_config import RunConfig, apply_override

    folder = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    words, hf_tokenizer = smollm2_shaped_model(folder / "model", args.layers)
    data = records(args.pairs, words, args.length)

    # TRL + PEFT
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model")
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=hf_model, ref_model=None, peft_config=lora, train_dataset=datasets.Dataset.from_list(data),
                             processing_class=hf_tokenizer,
                             args=trl.DPOConfig(output_dir=str(folder / "trl"), beta=0.1, max_length=None,
                                                report_to="none", use_cpu=True, save_strategy="no",
                                                per_device_train_batch_size=args.pairs))
    trl_model = trainer.model.train()
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
    trl_optimizer = torch.optim.AdamW([p for p in trl_model.parameters() if p.requires_grad], lr=1e-4,
                                      weight_decay=0.0)  # as minift's train.weight_decay = 0

    # minift, through the engine's own pieces
    run_config = RunConfig()
    for item in ("task.kind=preference", "task.beta=0.1", "method.name=lora", "method.r=8", "method.alpha=16",
                 "train.lr=1e-4", "train.device=cpu"):
        apply_override(run_config, item)
    backbone, tokenizer = minift.load(folder / "model")
    task_model, _, _ = build_trainable_model(run_config, backbone, None)
    task_model.train()
    examples, _ = tokenize_pairs(data, tokenizer, None, "bench")
    ours_batch = PairStream(examples, tokenizer.pad_token_id, args.pairs).collate([[e] for e in examples])
    ours_optimizer = build_optimizer([[p for p in task_model.parameters() if p.requires_grad]], run_config.train,
                                     torch.device("cpu"))
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"]), "the two batches differ"

    def trl_step():
        loss = trainer._compute_loss(trl_model, trl_batch, return_outputs=False)
        loss.backward()
        trl_optimizer.step()
        trl_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ours_step():
        out = task_model(ours_batch)
        loss = out.loss_sum / out.n_targets
        loss.backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    sides = {"minift": ours_step, "TRL + PEFT": trl_step}
    first = {name: step() for name, step in sides.items()}  # warm-up; the same weights give the same loss
    print("first-step loss:", first)
    wall, cpu, last = {name: [] for name in sides}, {name: [] for name in sides}, {}
    order = list(sides)
    for i in range(args.steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            w, c = time.perf_counter(), time.process_time()
            last[name] = sides[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    load = os.getloadavg()
    rows = [f"| {name} | {statistics.median(wall[name]):.3f} | {statistics.median(cpu[name]):.3f} | "
            f"{first[name]:.6f} | {last[name]:.6f} |" for name in sides]
    ratio = statistics.median(cpu["TRL + PEFT"]) / statistics.median(cpu["minift"])
    report = "\n".join([
        "# DPO step with LoRA: minift vs TRL DPOTrainer + PEFT (CPU)", "",
        f"Produced by `python benchmarks/bench_dpo.py --layers {args.layers} --pairs {args.pairs} --length "
        f"{args.length} --steps {args.steps}`.",
        f"Machine: {describe_machine()}. Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1/5/15 min; the machine was shared with other jobs). torch threads 1; transformers "
        f"{transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, torch {torch.__version__}.", "",
        f"SmolLM2-shaped Llama with {args.layers} blocks (d 576, vocab 49152, tied), random weights; LoRA r 8 on "
        f"q_proj, v_proj; {args.pairs} pairs of {args.length} words ({tuple(ours_batch['input_ids'].shape)} tokens "
        "with chosen and rejected stacked); sigmoid DPO, beta 0.1; reference = adapters off; AdamW. Steps "
        "interleaved, medians of the timed steps.", "",
        f"| side | wall s / step | CPU s / step | loss, step 1 | loss, step {args.steps + 1} |", "|---|---|---|---|---|",
        *rows, "", "Both sides start from the same weights with LoRA B = 0, so step 1's loss is log 2 on both; the last "
        "column is after the timed steps (same AdamW settings, lr 1e-4, no weight decay; each library draws its own "
        "random LoRA A, so the trajectories are close but not identical).", "",
        f"TRL + PEFT CPU time / minift CPU time: **{ratio:.2f}x**.", ""])
    print(report)
    if not args.no_write:
        write_result("dpo_cpu.md", report)  # benchmarks/results/, or $MINIFT_BENCH_RESULTS (run_all --quick)


if __name__ == "__main__":
    main()
