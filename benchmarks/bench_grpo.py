"""One GRPO iteration with LoRA: minift's engine task vs TRL's GRPOTrainer + PEFT, side by side on the CPU.

An iteration = sample G completions for each of P prompts, score them with a reward function, compute group-
relative advantages and the reference's per-token log-probs (the same model with its adapters off), then one
optimizer step on the GRPO loss (num_iterations = 1, so the ratio pi / pi_old is 1 and carries the policy gradient).

Both sides run it on the same weights and the same prompts: a SmolLM2-shaped Llama (d 576, 9 query / 3 key-value
heads, MLP 1536, vocab 49152, tied embeddings; `--layers` blocks) with random weights and a word-level tokenizer
(as benchmarks/bench_dpo.py builds it), LoRA r = 8, alpha = 16 on q_proj and v_proj, float32, AdamW lr 1e-4.
The settings are matched field by field:

    G completions per prompt            minift task.group_size          TRL num_generations
    max completion length               task.max_new_tokens             max_completion_length
    sampling: temperature 1, no top-k,  task.temperature / top_k /      temperature 1.0, top_k 0, top_p 1.0,
      no top-p, KV cache                  top_p (None)                    min_p None, do_sample (transformers)
    KL weight beta, k3 estimator        task.beta                       beta
    k3's own gradient (the GRPO paper)  (always)                        use_bias_correction_kl = False
                                                                          (TRL's default True: k3 x ratio)
    clip epsilon                        task.clip_range                 epsilon
    advantages (r - mean) / (std + eps) within the group                scale_rewards = "group"
    loss: mean over completions of the mean over each one's tokens       loss_type = "grpo"
    reward: `reward` below, a plain Python function f(prompts, completions) -> list[float], on both sides

minift: the engine's own pieces (build_trainable_model, rl_data.load_rl_datasets / prepare_align_run, the
stream's rollout, GRPOTaskModel.forward). TRL 1.16: `GRPOTrainer._generate_and_score_completions` on the P x G
rows its RepeatSampler would hand it, then `compute_loss`, backward, AdamW step. Neither side clips gradients.
The prompts' token ids are checked to be identical; the samples themselves differ (each library draws its own),
and with random weights EOS is almost never drawn, so both sides write every completion to full length (the
report prints the mean completion length of each side).

How it measures: one process, torch threads 1, the sides alternate (A B B A ...) so a shared machine's drifting
load hits both alike; medians of wall and process-CPU seconds of each phase (generate + score + reference log-probs;
loss + backward + AdamW step) and of the whole iteration.

    python benchmarks/bench_grpo.py                          # writes benchmarks/results/grpo_cpu.md
    python benchmarks/bench_grpo.py --layers 1 --prompts 2 --group 2 --new-tokens 4 --iterations 1 --no-write
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything is built here
os.environ.setdefault("WANDB_DISABLED", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smollm2_shaped_model, write_result  # noqa: E402
from minift.machine import describe_machine  # noqa: E402


def reward(prompts, completions, **_):
    """The share of the completion's words whose number is a multiple of 3 (words are "w<number>"): a reward that
    varies within every group, so the advantages are not all zero. TRL passes extra keyword arguments; minift not."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(sum(w[1:].isdigit() and int(w[1:]) % 3 == 0 for w in words) / max(len(words), 1))
    return scores


def prompt_records(n: int, words: list[str], length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": " ".join(words[int(i)] for i in torch.randint(len(words), (length - k,), generator=g))}
            for k in range(n)]  # lengths differ by one word each, so the prompts are left-padded


def build_sides(folder: Path, data: list[dict], hf_tokenizer, P: int, G: int, C: int, beta: float, seed: int = 0,
                bias_correction: bool = False, lr: float = 1e-4):
    """TRL's GRPOTrainer + PEFT and minift's GRPO task on the model folder/model and the prompts folder/prompts.jsonl,
    each with its AdamW. `seed`: TRL's (its LoRA A and its samples) and minift's train.seed (its samples); minift's
    LoRA A is drawn from torch's global generator as it stands. `bias_correction`: TRL's use_bias_correction_kl
    (its default True multiplies k3 by the ratio, which changes the KL gradient; minift's GRPO is False)."""
    from types import SimpleNamespace

    import datasets
    import peft
    import transformers
    import trl

    import minift
    from minift.train.loop import build_optimizer, build_trainable_model
    from minift.train.rl_data import load_rl_datasets, prepare_align_run
    from minift.train.run_config import RunConfig, apply_override

    # TRL + PEFT
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model")
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trl_args = trl.GRPOConfig(output_dir=str(folder / "trl"), report_to="none", use_cpu=True, save_strategy="no",
                              per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
                              max_completion_length=C, num_iterations=1, beta=beta, epsilon=0.2,
                              loss_type="grpo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
                              use_vllm=False, bf16=False, learning_rate=lr, weight_decay=0.0, seed=seed,
                              use_bias_correction_kl=bias_correction)
    trainer = trl.GRPOTrainer(model=hf_model, reward_funcs=[reward], args=trl_args, peft_config=lora,
                              train_dataset=datasets.Dataset.from_list(data), processing_class=hf_tokenizer)
    trl_model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its first step
    trl_rows = [row for row in data for _ in range(G)]  # what TRL's RepeatSampler feeds one generation
    trl_optimizer = torch.optim.AdamW([p for p in trl_model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=0.0)  # as minift's train.weight_decay = 0

    # minift, through the engine's own pieces
    run_config = RunConfig()
    for item in ("task.kind=grpo", f"task.beta={beta}", f"task.group_size={G}", f"task.max_new_tokens={C}",
                 "task.temperature=1.0", "task.clip_range=0.2", "task.reward_function=bench_grpo:reward",
                 f"data.train={folder / 'prompts.jsonl'}", "data.validation_fraction=0", "data.max_length=512",
                 "method.name=lora", "method.r=8", "method.alpha=16", f"train.lr={lr}", "train.device=cpu",
                 f"train.batch_size={P}", f"train.seed={seed}"):
        apply_override(run_config, item)
    backbone, tokenizer = minift.load(folder / "model")
    task_model, _, _ = build_trainable_model(run_config, backbone, None)
    task_model.train()
    stream, _, _ = load_rl_datasets(run_config, tokenizer)
    prepare_align_run(task_model, stream, None, run_config, tokenizer)
    ours_prompts = stream.collate(stream.prompts)  # the P prompts in file order, left-padded
    ours_optimizer = build_optimizer([[p for p in task_model.parameters() if p.requires_grad]], run_config.train,
                                     torch.device("cpu"))
    return SimpleNamespace(trainer=trainer, trl_model=trl_model, trl_rows=trl_rows, trl_optimizer=trl_optimizer,
                           task_model=task_model, stream=stream, ours_prompts=ours_prompts,
                           ours_optimizer=ours_optimizer, tokenizer=tokenizer)


def ppo_note(trl) -> str:
    """Whether this TRL has a PPO trainer to compare minift's `kind = "ppo"` with (checked, not assumed)."""
    import importlib.util

    places = [f"trl.{name}" for name in ("PPOTrainer",) if hasattr(trl, name)]
    for module in ("trl.trainer.ppo_trainer", "trl.experimental.ppo"):
        try:
            if importlib.util.find_spec(module) is not None:
                places.append(module)
        except ModuleNotFoundError:
            pass
    if places:
        return f"PPO: TRL {trl.__version__} has a PPO trainer ({', '.join(places)}); not benchmarked here."
    return (f"PPO: not benchmarked. TRL {trl.__version__} has no PPO trainer: `trl.PPOTrainer` does not exist and "
            "neither trl.trainer.ppo_trainer nor trl.experimental.ppo is importable (checked when this ran).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per iteration (P)")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--prompt-words", type=int, default=16, help="words in the longest prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="max completion length")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per side (after one warm-up)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import peft
    import transformers
    import trl

    P, G, C = args.prompts, args.group, args.new_tokens
    folder = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    words, hf_tokenizer = smollm2_shaped_model(folder / "model", args.layers)
    data = prompt_records(P, words, args.prompt_words)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))

    built = build_sides(folder, data, hf_tokenizer, P, G, C, args.beta)
    trainer, trl_model, trl_rows, trl_optimizer = built.trainer, built.trl_model, built.trl_rows, built.trl_optimizer
    task_model, stream, ours_optimizer = built.task_model, built.stream, built.ours_optimizer
    ours_prompts = built.ours_prompts  # the P prompts in file order, left-padded

    def ours_generate(i):
        return stream.rollout(*ours_prompts, i)

    def ours_optimize(batch):
        out = task_model(batch)
        loss = out.loss_sum / out.n_targets
        loss.backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), out.metric_sums["kl"] / out.n_targets  # k3 per completion token, as TRL

    def trl_generate(i):
        return trainer._generate_and_score_completions(trl_rows)

    def trl_optimize(batch):
        loss = trainer.compute_loss(trl_model, batch)
        loss.backward()
        trl_optimizer.step()
        trl_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), trainer._metrics["train"]["kl"][-1]  # TRL's masked mean over tokens

    def lengths(batch):  # mean completion length in tokens
        return float(batch["completion_mask"].float().sum(1).mean())

    def mean_reward(name, batch):
        return float(batch["rewards"].mean()) if name == "minift" else trainer._metrics["train"]["reward"][-1]

    sides = {"minift": (ours_generate, ours_optimize), "TRL + PEFT": (trl_generate, trl_optimize)}
    # warm-up iteration; also checks the prompts are the same tokens on both sides
    first = {}
    for name, (generate, optimize) in sides.items():
        batch = generate(0)
        first[name] = (batch, optimize(batch)[0])
    ours_ids = ours_prompts[0]["input_ids"].repeat_interleave(G, 0)
    trl_ids = first["TRL + PEFT"][0]["prompt_ids"]
    assert torch.equal(ours_ids, trl_ids), f"the prompts differ:\n{ours_ids}\n{trl_ids}"
    trainable = {"minift": sum(p.numel() for p in task_model.parameters() if p.requires_grad),
                 "TRL + PEFT": sum(p.numel() for p in trl_model.parameters() if p.requires_grad)}
    assert trainable["minift"] == trainable["TRL + PEFT"], f"different trainable parameters: {trainable}"
    print("first-iteration loss:", {name: loss for name, (_, loss) in first.items()})

    phases = ("generate", "optimize", "iteration")
    wall = {name: {p: [] for p in phases} for name in sides}
    cpu = {name: {p: [] for p in phases} for name in sides}
    info = {name: {"length": [], "kl": [], "reward": []} for name in sides}
    order = list(sides)
    loads = []
    for i in range(args.iterations):
        for name in (order if i % 2 == 0 else order[::-1]):
            generate, optimize = sides[name]
            w0, c0 = time.perf_counter(), time.process_time()
            batch = generate(i + 1)
            w1, c1 = time.perf_counter(), time.process_time()
            loss, kl = optimize(batch)
            w2, c2 = time.perf_counter(), time.process_time()
            for phase, (w, c) in zip(phases, ((w1 - w0, c1 - c0), (w2 - w1, c2 - c1), (w2 - w0, c2 - c0))):
                wall[name][phase].append(w)
                cpu[name][phase].append(c)
            info[name]["length"].append(lengths(batch))
            info[name]["kl"].append(kl)
            info[name]["reward"].append(mean_reward(name, batch))
            print(f"iteration {i + 1} {name}: wall {w2 - w0:.2f} s (generate {w1 - w0:.2f}), cpu {c2 - c0:.2f} s, "
                  f"loss {loss:.3g}, kl {kl:.3g}, reward {info[name]['reward'][-1]:.3f}", flush=True)
        loads.append(os.getloadavg()[0])

    def med(table, name, phase):
        return statistics.median(table[name][phase])

    load = os.getloadavg()
    rows = [f"| {name} | {med(wall, name, 'generate'):.2f} | {med(wall, name, 'optimize'):.2f} | "
            f"{med(wall, name, 'iteration'):.2f} | {med(cpu, name, 'generate'):.2f} | "
            f"{med(cpu, name, 'optimize'):.2f} | {med(cpu, name, 'iteration'):.2f} | "
            f"{statistics.mean(info[name]['length']):.1f} | {statistics.mean(info[name]['reward']):.3f} | "
            f"{info[name]['kl'][-1]:.2e} |" for name in sides]
    ratio = {phase: med(cpu, "TRL + PEFT", phase) / med(cpu, "minift", phase) for phase in phases}
    wall_ratio = med(wall, "TRL + PEFT", "iteration") / med(wall, "minift", "iteration")
    report = "\n".join([
        "# One GRPO iteration with LoRA: minift vs TRL GRPOTrainer + PEFT (CPU)", "",
        f"Produced by `python benchmarks/bench_grpo.py --layers {args.layers} --prompts {P} --group {G} "
        f"--prompt-words {args.prompt_words} --new-tokens {C} --beta {args.beta} --iterations {args.iterations}`.",
        f"Machine: {describe_machine()}. Load average (1 min) after each round: "
        f"{', '.join(f'{x:.1f}' for x in loads)}; at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 "
        "min; the machine was shared with other jobs, so wall seconds mostly measure waiting for a core — compare "
        f"the CPU seconds). torch threads 1; transformers {transformers.__version__}, peft {peft.__version__}, trl "
        f"{trl.__version__}, torch {torch.__version__}; HF_HUB_OFFLINE=1, report_to none.", "",
        f"SmolLM2-shaped Llama with {args.layers} blocks (d 576, vocab 49152, tied), random weights; LoRA r 8 on "
        f"q_proj, v_proj; {P} prompts of {args.prompt_words - P + 1}-{args.prompt_words} tokens, G = {G} "
        f"completions each ({P * G} sequences), at most {C} new tokens, temperature 1, no top-k / top-p; reward = a "
        f"Python function; group-scaled advantages; beta {args.beta} (k3 KL to the adapters-off reference; TRL's "
        "use_bias_correction_kl = False, the k3 gradient minift takes), "
        "epsilon 0.2, loss normalised per completion then averaged (TRL loss_type \"grpo\"), num_iterations 1; "
        "AdamW lr 1e-4, no weight decay, no gradient clipping. Iterations interleaved, medians of the "
        f"{args.iterations} timed iterations after one warm-up.", "",
        "| side | wall s: generate | wall s: optimize | wall s: iteration | CPU s: generate | CPU s: optimize | "
        "CPU s: iteration | mean completion tokens | mean reward | KL per token, last iteration |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "generate = sampling with the KV cache + decoding + reward + reference log-probs (adapters off) + "
        "advantages (minift: the RL stream's rollout; TRL: `_generate_and_score_completions`); optimize = policy "
        "forward with gradients + GRPO loss + backward + AdamW step. The samples differ between the sides (each "
        "library draws its own); the completion lengths show both sides did the same amount of work, the mean "
        "reward that both scored with the same function. The loss of iteration 1 is 0 on both sides (printed: "
        f"minift {first['minift'][1]:.1e}, TRL {first['TRL + PEFT'][1]:.1e}): LoRA B = 0 makes the policy the "
        "reference, and group-centred advantages average to 0. With num_iterations 1 the loss stays about beta x KL, "
        "so the KL to the reference after the last step is shown instead (each side's own \"kl\" metric: k3 "
        "averaged over the completion tokens, in the last iteration's loss forward). The two KL figures are not "
        "expected to be equal: each library draws its own LoRA A and its own samples, and the KL a few steps reach "
        "depends on those draws (minift's was 2x TRL's in one run of this benchmark, 3.1e-5 vs 1.55e-5). "
        "benchmarks/bench_grpo_kl.py (results/grpo_kl_cpu.md) shows why: on the same LoRA A and the same samples "
        "the two sides' KL agree at every iteration, while over independent seeds each library's own KL varies "
        "as much as the two sides differ. Not the same work: TRL's loss forward also computes each "
        "completion token's entropy over the whole vocabulary (compute_entropy=True, for its metrics); minift's "
        "GRPO forward computes only the sampled tokens' log-probs. Both sides train the same "
        f"{trainable['minift']:,} LoRA parameters, and the prompts are the same token ids (both checked).", "",
        ppo_note(trl), "",
        f"TRL + PEFT CPU time / minift CPU time: **{ratio['iteration']:.2f}x** per iteration (generate "
        f"{ratio['generate']:.2f}x, optimize {ratio['optimize']:.2f}x); wall time {wall_ratio:.2f}x.", ""])
    print(report)
    if not args.no_write:
        write_result("grpo_cpu.md", report)  # benchmarks/results/, or $MINIFT_BENCH_RESULTS (run_all --quick)


if __name__ == "__main__":
    main()
