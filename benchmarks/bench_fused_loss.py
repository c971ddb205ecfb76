"""Memory of the loss's logits part on SmolLM2-135M: minift's fused linear + cross-entropy vs transformers + PEFT.

What is measured: the step from the final hidden states to the loss and back to the hidden states' gradient,
the part where the (tokens x 49,152) logits live. Everything else of a training step (the blocks' forward
and backward) is the same for a fused or an unfused loss, so it is left out to show this part alone:

    hidden (B, T, 576) requires grad    --loss, backward-->    hidden.grad
    minift fused      TaskModel.vocabulary_loss with train.fused_loss = true   (minift/fused_loss.py, chunked)
    minift unfused    the same with train.fused_loss = false: target rows -> lm_head -> F.cross_entropy
    transformers+peft LlamaForCausalLM's own tail: lm_head over every position, then model.loss_function
                      (ForCausalLMLoss: float32 upcast, shift, cross_entropy), as `model(labels=...)` runs it

Both models are the bundled SmolLM2-135M (GGUF, dequantized to float32; transformers reads the same weights
from a directory minift.save writes), LoRA r = 8 on every linear layer but lm_head (so the tied lm_head /
embedding is frozen on both sides, as in a LoRA run), float32, the same batch of random token ids. The hidden
states come from each model's own forward pass (under no_grad, then made a leaf that requires grad); the
printed losses show both sides compute the same number. Times (wall, and CPU seconds of the child process,
which with one thread do not depend on how busy a shared machine is) are for orientation: this benchmark is
about memory.

How: every measurement runs in a fresh child process. After a warm-up call on 16 tokens (so that lazily
imported code is not counted), right before the loss the child resets the kernel's
peak-RSS counter (writing 5 to /proc/self/clear_refs resets VmHWM) and notes its RSS; after the backward it
reads VmHWM. "logits part MiB" = VmHWM - RSS before: the extra memory this part needed at its peak. RSS
counts what glibc has not yet returned to the system, so it is an upper bound of the tensors' own peak (for
either side). Providers run interleaved (A B C A B C ...) and the median is reported.

Workloads: `all` (every token a target: continued pretraining) and `sft` (completion-only: the last quarter
of each row is the target; minift projects only target rows, transformers projects every position).

    python benchmarks/bench_fused_loss.py                    # batch 4 x 512, writes benchmarks/results/fused_loss.md
    python benchmarks/bench_fused_loss.py --batch 1 --seq 128 --rounds 1 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_description, markdown_table, run_isolated, write_result  # noqa: E402

PROVIDERS = ("minift fused", "minift unfused", "transformers+peft")
WORKLOADS = {"all": "every token is a target", "sft": "completion-only, the last quarter of each row is the target"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT_NAME = "fused_loss.md"
THIS = str(Path(__file__).resolve())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _batch(batch: int, seq: int, vocab: int, workload: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = ids.clone()
    if workload == "sft":
        labels[:, : seq - seq // 4] = -100  # the prompt: no loss
    return ids, labels


def measure(provider: str, workload: str, batch: int, seq: int, hf_dir: str, threads: int) -> dict:
    """One child: build the provider's LoRA model, hidden states under no_grad, then the measured loss part."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if provider.startswith("minift"):
        import minift
        from minift.train.methods import prepare_method
        from minift.train.tasks import build_task_model

        model, _ = minift.load("smollm2-135m")
        prepare_method("lora", model, {"r": 8, "alpha": 16, "targets": LORA_TARGETS})
        task = build_task_model(model, "causal_lm", fused_loss=provider == "minift fused")
        ids, labels = _batch(batch, seq, model.config.vocab_size, workload)
        with torch.no_grad():
            hidden = model(ids, return_hidden=True)

        def loss_part(h, labels):
            h, shifted = h[:, :-1], labels[:, 1:]
            selected = shifted != -100
            return task.vocabulary_loss(h[selected], shifted[selected]) / int(selected.sum())
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
        causal_lm = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers inside
        ids, labels = _batch(batch, seq, hf.config.vocab_size, workload)
        with torch.no_grad():
            hidden = causal_lm.model(input_ids=ids).last_hidden_state

        def loss_part(h, labels):  # LlamaForCausalLM.forward after the body
            logits = causal_lm.lm_head(h)
            return causal_lm.loss_function(logits=logits, labels=labels, vocab_size=causal_lm.config.vocab_size)

    hidden = hidden.detach().requires_grad_()
    loss_part(hidden[:1, :16].detach().requires_grad_(), ids[:1, :16]).backward()  # warm-up: lazy imports, caches
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = loss_part(hidden, labels)
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _rss_kib("VmHWM")
    return {"loss": float(loss), "peak_extra_mib": (peak - before) / 1024, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "grad_norm": float(hidden.grad.norm())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per provider")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import minift

    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = minift.load("smollm2-135m")
        minift.save(model, tokenizer, tmp)  # transformers reads the same weights
        del model
        results = {w: {p: [] for p in PROVIDERS} for w in WORKLOADS}
        for _ in range(args.rounds):
            for workload in WORKLOADS:
                for provider in PROVIDERS:
                    result = run_isolated(THIS, "measure", provider=provider, workload=workload, batch=args.batch,
                                          seq=args.seq, hf_dir=tmp, threads=args.threads)
                    results[workload][provider].append(result)
                    print(f"{workload:4s} {provider:18s} loss {result['loss']:.5f}  logits part "
                          f"{result['peak_extra_mib']:8.1f} MiB  {result['seconds']:.2f} s  "
                          f"{result['cpu_seconds']:.2f} CPU s", flush=True)
    load_after = os.getloadavg()

    import peft
    import transformers

    tokens = args.batch * args.seq
    lines = [
        "# Fused linear + cross-entropy: memory of the logits part, SmolLM2-135M (CPU)", "",
        f"Machine: {machine_description()}; transformers {transformers.__version__}; peft {peft.__version__}.", "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, {time.time() - started:.0f} s; load "
        f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after. The machine was shared with other jobs "
        f"(up to 8 helpers on 2 cores): memory is per process and unaffected; the times are for orientation only.",
        "",
        f"Batch {args.batch} x {args.seq} = {tokens:,} tokens, vocabulary 49,152, float32, LoRA r=8 (lm_head "
        f"frozen), {args.threads} torch thread(s), {args.rounds} interleaved round(s), medians; "
        f"`python benchmarks/bench_fused_loss.py --batch {args.batch} --seq {args.seq} --rounds {args.rounds}`. "
        "Measured part: hidden states (requiring grad) -> loss -> backward to the hidden states; "
        "\"logits part MiB\" = peak RSS during it minus RSS before it (VmHWM reset via /proc/self/clear_refs), "
        "each run in a fresh process.", "",
    ]
    for workload, description in WORKLOADS.items():
        rows, peaks = [], {}
        for provider in PROVIDERS:
            runs = results[workload][provider]
            peaks[provider] = statistics.median(r["peak_extra_mib"] for r in runs)
            rows.append([provider, f"{runs[0]['loss']:.5f}", f"{runs[0]['grad_norm']:.6g}", f"{peaks[provider]:,.1f}",
                         f"{statistics.median(r['seconds'] for r in runs):.2f}",
                         f"{statistics.median(r['cpu_seconds'] for r in runs):.2f}"])
        reference = peaks["transformers+peft"]
        for row, provider in zip(rows, PROVIDERS):
            row.append(f"{peaks[provider] / reference:.3f}x")
        lines += [f"## Workload `{workload}`: {description}", "",
                  markdown_table(["provider", "loss", "|grad hidden|", "logits part MiB", "wall s", "CPU s",
                                  "memory vs transformers+peft"], rows), "",
                  f"**{workload}: minift fused / transformers+PEFT = {peaks['minift fused'] / reference:.3f}x "
                  f"the memory of the logits part (goal <= 0.5x).**", ""]
    full_logits = tokens * 49152 * 4 / 2**20
    lines += [f"For scale: one float32 (tokens x vocabulary) tensor of this batch is {full_logits:,.0f} MiB; "
              f"minift's default chunk is {2**23 // 49152} rows ({2**23 * 4 / 2**20:.0f} MiB of logits). The losses "
              "agree across providers (the `sft` transformers loss is the mean over the same target tokens).", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_result(RESULT_NAME, text)


if __name__ == "__main__":
    main()
