"""Why bench_grpo.py's KL to the reference differs between minift and TRL (issue 13): one run on shared samples, then
independent seeds.

bench_grpo.py recorded, after 7 GRPO iterations on a random SmolLM2-shaped model, a KL per token of 3.1e-5 for
minift and 1.55e-5 for TRL 1.16 GRPOTrainer + PEFT. The two sides drew their own LoRA A and their own samples, so
the figure is one draw of a random quantity. This script separates the two possible causes:

1. Shared: both sides on the same weights (minift's LoRA A set to PEFT's; B = 0 on both) and the same samples (TRL
   samples each rollout with `_generate_and_score_completions`; minift's GRPOTaskModel.rollout_of takes the very same
   token ids and computes its own rewards, reference log-probs and advantages). Each side then takes its own loss,
   backward and AdamW step. TRL keeps its default use_bias_correction_kl = True (k3 x ratio, whose gradient differs
   from k3's at second order in log pi - log pi_ref; minift's GRPO is the False case, which tests/test_grpo_trl.py
   shows equal to TRL number for number). If the KL figures of the two sides agree here iteration by iteration, the
   computation is the same and the benchmark's gap comes from what was drawn.
2. Independent: as bench_grpo.py runs (its build_sides), each side with its own LoRA A and samples, for several
   seeds (TRL's seed and minift's train.seed; minift's A is drawn after TRL's from the same seeded generator). The
   spread of each side's KL over seeds, and of the ratio between the sides, shows how far one draw can be from
   another.

Both parts report each side's own "kl" metric (k3 averaged over the completion tokens, in the loss forward of the
iteration, i.e. after the previous iterations' updates) at every iteration.

    python benchmarks/bench_grpo_kl.py                          # writes benchmarks/results/grpo_kl_cpu.md
    python benchmarks/bench_grpo_kl.py --layers 1 --new-tokens 4 --iterations 2 --seeds 2 --no-write
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grpo import build_sides, prompt_records  # noqa: E402
from common import smollm2_shaped_model, write_result  # noqa: E402
from minift.machine import describe_machine  # noqa: E402


def share_lora_a(built) -> int:
    """Copy PEFT's LoRA A into minift's (B is zero on both sides); returns how many tensors were copied."""
    from minift.peft.peft_format import hf_module_path

    theirs = dict(built.trl_model.named_parameters())
    copied = 0
    for name, p in built.task_model.named_parameters():
        if not p.requires_grad:
            continue
        module, _, leaf = name.removeprefix("backbone.").partition(".lora_")
        q = theirs[f"base_model.model.{hf_module_path(module, 'llama')}.lora_{leaf}"]
        assert p.shape == q.shape, (name, p.shape, q.shape)
        with torch.no_grad():
            p.copy_(q)
        if leaf.startswith("B"):
            assert not p.any(), f"{name}: LoRA B should start at zero"
        copied += 1
    return copied


def ours_step(built, batch) -> float:
    out = built.task_model(batch)
    (out.loss_sum / out.n_targets).backward()
    built.ours_optimizer.step()
    built.ours_optimizer.zero_grad(set_to_none=True)
    return out.metric_sums["kl"] / out.n_targets


def trl_step(built, batch) -> float:
    built.trainer.compute_loss(built.trl_model, batch).backward()
    built.trl_optimizer.step()
    built.trl_optimizer.zero_grad(set_to_none=True)
    return built.trainer._metrics["train"]["kl"][-1]


def shared_run(folder, data, hf_tokenizer, args) -> list[tuple[float, float]]:
    """Part 1: the same weights and samples on both sides; (minift KL, TRL KL) at each iteration."""
    P, G = args.prompts, args.group
    built = build_sides(folder, data, hf_tokenizer, P, G, args.new_tokens, args.beta, seed=0, bias_correction=True)
    copied = share_lora_a(built)
    prompts, texts = built.ours_prompts
    prompt_ids, prompt_mask = (prompts[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask"))
    out = []
    for i in range(args.iterations + 1):
        theirs = built.trainer._generate_and_score_completions(built.trl_rows)
        assert torch.equal(prompt_ids, theirs["prompt_ids"]), "the prompts differ"
        batch = built.task_model.rollout_of(prompt_ids, prompt_mask, theirs["completion_ids"], texts, built.tokenizer)
        assert torch.equal(batch["completion_mask"], theirs["completion_mask"])
        assert torch.allclose(batch["advantages"], theirs["advantages"], atol=1e-5)
        out.append((ours_step(built, batch), trl_step(built, theirs)))
        print(f"shared, iteration {i + 1}: KL minift {out[-1][0]:.4e}, TRL {out[-1][1]:.4e}", flush=True)
    print(f"({copied} LoRA tensors shared)")
    return out


def independent_run(folder, data, hf_tokenizer, args, seed: int) -> list[tuple[float, float]]:
    """Part 2: each side draws its own LoRA A and samples (seed); (minift KL, TRL KL) at each iteration."""
    built = build_sides(folder, data, hf_tokenizer, args.prompts, args.group, args.new_tokens, args.beta, seed=seed,
                        bias_correction=True)
    out, sampled = [], []  # KL per iteration; mean reference log-prob of the sampled tokens per iteration
    for i in range(args.iterations + 1):
        ours_batch = built.stream.rollout(*built.ours_prompts, i)
        theirs_batch = built.trainer._generate_and_score_completions(built.trl_rows)
        out.append((ours_step(built, ours_batch), trl_step(built, theirs_batch)))
        sampled.append(tuple(float(b[key][b["completion_mask"].bool()].mean()) for b, key in
                             ((ours_batch, "reference_logps"), (theirs_batch, "ref_per_token_logps"))))
    print(f"seed {seed}: KL per iteration minift {[f'{a:.2e}' for a, _ in out]}, TRL {[f'{b:.2e}' for _, b in out]}; "
          f"mean reference log-prob of the sampled tokens minift {[f'{a:.3f}' for a, _ in sampled]}, "
          f"TRL {[f'{b:.3f}' for _, b in sampled]}", flush=True)
    return out, sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--iterations", type=int, default=6, help="iterations after the first (bench_grpo's warm-up)")
    parser.add_argument("--seeds", type=int, default=8, help="independent runs in part 2")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import peft
    import transformers
    import trl

    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="bench_grpo_kl_"))
    words, hf_tokenizer = smollm2_shaped_model(folder / "model", args.layers)
    data = prompt_records(args.prompts, words, args.prompt_words)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))

    shared = shared_run(folder, data, hf_tokenizer, args)
    runs, sampled = {}, []
    for seed in range(args.seeds):
        runs[seed], logps = independent_run(folder, data, hf_tokenizer, args, seed)
        sampled += logps
    load = os.getloadavg()

    n = args.iterations + 1
    shared_rows = [f"| {i + 1} | {a:.4e} | {b:.4e} | {f'{a / b:.4f}' if b else '-'} |"
                   for i, (a, b) in enumerate(shared)]
    worst = max(abs(a / b - 1) for a, b in shared[1:])  # iteration 1: B = 0, both KL are 0
    last = {seed: run[-1] for seed, run in runs.items()}
    seed_rows = [f"| {seed} | {a:.2e} | {b:.2e} | {a / b:.2f} |" for seed, (a, b) in last.items()]
    ours_last, theirs_last = [a for a, _ in last.values()], [b for _, b in last.values()]
    ratios = sorted(a / b for a, b in last.values())
    logs = [math.log(r) for r in ratios]  # the ratio's log: a factor and its inverse are equally far from 1
    mean_log, se_log = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    spread = {name: max(xs) / min(xs) for name, xs in (("minift", ours_last), ("TRL", theirs_last))}
    sampled_means = [statistics.mean(x[k] for x in sampled) for k in (0, 1)]
    rank = 1 + sum(r > last[0][0] / last[0][1] for r in ratios) if 0 in last else 0
    minift_higher_all = sum(all(a > b for a, b in run[1:]) for run in runs.values())
    trl_higher_all = sum(all(a < b for a, b in run[1:]) for run in runs.values())
    report = "\n".join([
        "# GRPO: minift's KL to the reference vs TRL's (issue 13)", "",
        f"Produced by `python benchmarks/bench_grpo_kl.py --layers {args.layers} --prompts {args.prompts} --group "
        f"{args.group} --prompt-words {args.prompt_words} --new-tokens {args.new_tokens} --beta {args.beta} "
        f"--iterations {args.iterations} --seeds {args.seeds}` in {time.perf_counter() - start:.0f} s. Machine: "
        f"{describe_machine()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; "
        f"the machine was shared, which changes no figure here). transformers {transformers.__version__}, peft "
        f"{peft.__version__}, trl {trl.__version__}, torch {torch.__version__}.", "",
        "The setting of bench_grpo.py (its `build_sides`): a random SmolLM2-shaped Llama with "
        f"{args.layers} blocks, LoRA r 8 on q_proj and v_proj, {args.prompts} prompts x G = {args.group}, at most "
        f"{args.new_tokens} new tokens, temperature 1, beta {args.beta}, loss_type \"grpo\", AdamW lr 1e-4; TRL with "
        "its default use_bias_correction_kl = True. KL = each library's own \"kl\" metric: k3 averaged over the "
        "completion tokens, in the loss forward of the iteration, so after the previous iterations' updates "
        "(iteration 1: B = 0, KL 0).", "",
        "## 1. The same LoRA A and the same samples", "",
        "minift's LoRA A set to PEFT's (B = 0 on both); TRL samples every rollout and minift is handed the same token "
        "ids (it computes its own rewards, reference log-probs and advantages); each side takes its own step.", "",
        "| iteration | minift KL | TRL KL | minift / TRL |", "|---|---|---|---|", *shared_rows, "",
        f"Largest |minift / TRL - 1| over iterations 2-{n}: **{worst:.1e}**. Given the same draws the two "
        "computations reach the same KL; what is left comes from TRL's default KL bias correction (a gradient "
        "that differs from k3's at second order in log pi - log pi_ref) and float rounding.",
        "",
        "## 2. Independent draws, as bench_grpo.py runs", "",
        f"Each side with its own LoRA A and its own samples; seed = TRL's seed and minift's train.seed. KL after "
        f"{args.iterations} updates (iteration {n}, bench_grpo's \"last iteration\"):", "",
        "| seed | minift KL | TRL KL | minift / TRL |", "|---|---|---|---|", *seed_rows, "",
        f"Over the {args.seeds} seeds: minift KL median {statistics.median(ours_last):.2e} (range "
        f"{min(ours_last):.2e} - {max(ours_last):.2e}); TRL median {statistics.median(theirs_last):.2e} (range "
        f"{min(theirs_last):.2e} - {max(theirs_last):.2e}); the ratio minift / TRL ranges {ratios[0]:.2f} - "
        f"{ratios[-1]:.2f} (median {statistics.median(ratios):.2f}), while two runs of the same library differ by up "
        f"to {spread['minift']:.2f}x (minift) and {spread['TRL']:.2f}x (TRL). The log of the ratio averages "
        f"{mean_log:.3f} +- {se_log:.3f} (standard error over seeds): a geometric-mean ratio of "
        f"{math.exp(mean_log):.2f}, {abs(mean_log) / se_log:.1f} standard errors from 1 and "
        f"{abs(math.log(2) - mean_log) / se_log:.1f} from 2. minift's KL is above TRL's at every iteration 2-{n} in "
        f"{minift_higher_all} seeds, below at every iteration in {trl_higher_all}: the KL accumulates, so an early "
        "lead persists, and \"higher at every iteration\" is one draw, not a trend. Both sides sample from the same "
        "distribution: the sampled tokens' mean log-probability under the reference, over all iterations and seeds, "
        f"is {sampled_means[0]:.3f} (minift) and {sampled_means[1]:.3f} (TRL).", "",
        f"At bench_grpo.py's default settings, seed 0 is the draw of its run that recorded 3.1e-5 vs 1.55e-5 "
        f"(issue 13); here its ratio is "
        f"{last[0][0] / last[0][1]:.2f}, number {rank} of the {args.seeds} ratios from the top. So the gap is the "
        "spread of the draws (LoRA A and samples), not a difference in how minift computes or optimizes GRPO: on the "
        "same draws the KL agrees to the precision TRL's default KL bias correction allows, and with "
        "use_bias_correction_kl = False the loss, gradients and steps agree number for number "
        "(tests/test_grpo_trl.py).", ""])
    print(report)
    if not args.no_write:
        write_result("grpo_kl_cpu.md", report)


if __name__ == "__main__":
    main()
