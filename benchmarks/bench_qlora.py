"""QLoRA training step on the CPU: minift vs transformers + PEFT + bitsandbytes, same weights on both sides.

What: one QLoRA step (Dettmers et al. 2023) on a SmolLM2-135M-shaped Llama (d 576, 30 layers, 9 query / 3
key-value heads, MLP 1536, vocab 49152, tied embeddings) with random weights: its 210 linear layers frozen in
NF4 (blocksize 64, double quantization), LoRA r = 8, alpha = 16 on every linear layer but lm_head, AdamW on
the adapters, next-token cross-entropy on every token of a B x T batch. Three providers:

    minift         minift.load(dir) + prepare_method("qlora", model, {...}): NF4Linear under LoRALinear
    bnb            transformers from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit, nf4,
                   double quant)) + peft.get_peft_model(LoraConfig(target_modules="all-linear"))
    minift-dense   minift LoRA on the float32 base, no quantization: what NF4 adds to a plain LoRA step

Same weights: the parent writes one random checkpoint with `save_pretrained` to a temporary directory and
every provider loads it (never a hub). minift quantizes bitsandbytes-exactly, so the parent checks that both
NF4 models hold the same 4-bit codes byte for byte, counts the differing 8-bit double-quant codes (0 expected:
minift rounds them through bitsandbytes' CPU 65,536-point table, minift/quant/nf4.py), and requires logits and
first loss to agree more closely than NF4 agrees with the dense model.

How (as benchmarks/bench_lora.py): one child process per provider, stepping in turn (A B C, B C A, ...) so a
shared machine's drifting load hits all alike; medians of wall seconds and of each child's own CPU seconds
(with --threads 1 independent of other jobs). Each child then returns freed heap to the OS (malloc_trim) and
resets its peak-RSS mark (/proc/self/clear_refs): "RSS after build" is the model at rest, "peak in training"
the steps' own high-water mark. One more step per provider runs under torch.profiler, and one 576 -> 1536
layer is timed alone, every case in one process.

Why the numbers come out as they do
-----------------------------------
Neither library has a fused 4-bit matmul for training on the CPU. Both do, per linear layer and step:
dequantize W, F.linear; in backward dequantize W again and grad_x = grad_y @ W. That is 417 dequantizations
a step (2 x 210, less layer 0's q/k/v, whose grad_x nothing needs); nothing dequantized is kept, so memory
holds 4-bit weights only. A QLoRA step is a LoRA step plus those dequantizations, and they are cheap next
to the GEMMs: in the one-layer table a (1536, 576) weight dequantizes in about 1.1 ms with either library
(bitsandbytes' C kernel, minift's torch code), against 54 ms for the layer's forward + backward GEMMs over
1,024 tokens; in the profiled step dequantization is 2-4% of the time. The rest is the same work on both
sides: the frozen layers' GEMMs (~40%), lm_head over 49,152 words plus the loss (~30%), attention (~8%). So
the whole-step ratio stays near 1: 1.03x, 1.10x and 1.02x per CPU second in three full runs on this shared
2-core machine, where step-to-step noise is of that order. What minift gains, it gains in the LoRA layer, as
in benchmarks/results/lora_cpu.md: LoRALinear over NF4Linear costs 1.14x the frozen GEMMs, PEFT's
lora.Linear4bit 1.40x (minift adds the update with one addmm and runs the skinny r = 8 GEMMs in the fast
BLAS orientation).

minift's dequantization used to cost 3x bitsandbytes' (3.4 vs 1.1 ms a layer): 2.2 ms of it was the row
gather from the (256, 2) byte -> two-codes table (index_select of 8-byte rows). minift/quant/nf4.py now views
that table as 256 int64 values and gathers 1-D, bit-identical and level with bitsandbytes; the recorded
result was measured after that change.

Memory: both NF4 models store 0.5159 bytes per linear weight (4.127 bits; the same layout), 52.2 MiB for the
210 layers; the float32 embedding (tied to lm_head) is 108 MiB, two thirds of the quantized model, so the
whole model shrinks 3.2x (513 -> 160 MiB), not the 7.8x of its linear layers. minift's peak in training is
lower (0.90x, 0.95x and 0.90x in the three runs). "Train extra" differs between providers mostly by glibc heap
retention, not live tensors: with MALLOC_MMAP_THRESHOLD_=65536 (large blocks go back to the OS when freed)
all three providers needed the same 907 MiB at --layers 8 (measured while writing this) while their steps
slowed down from the extra page faults, which is why the timed run keeps glibc's defaults.

    python benchmarks/bench_qlora.py                  # full size (~7 min), writes benchmarks/results/qlora_cpu.md
    python benchmarks/bench_qlora.py --layers 2 --seq 32 --batch 2 --steps 2 --no-write   # quick look (< 60 s)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: the checkpoint is written by this script
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SHAPE = dict(vocab=49152, dim=576, heads=9, kv_heads=3, hidden=1536)
LORA_R, LORA_ALPHA = 8, 16
PROVIDERS = {"minift": "minift NF4 + LoRA (the qlora method)", "bnb": "transformers + PEFT + bitsandbytes NF4",
             "minift-dense": "minift LoRA on the float32 base (no NF4)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEQUANTIZE_EVENTS = {"minift NF4 dequantize", "bitsandbytes::dequantize_4bit", "bitsandbytes::dequantize_blockwise"}
RESULT_NAME = "qlora_cpu.md"
MiB = 2**20


def write_checkpoint(directory: str, layers: int) -> None:
    """A random SmolLM2-135M-shaped Llama in float32, written with save_pretrained: what every provider loads."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["dim"], num_hidden_layers=layers,
                                      num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                                      intermediate_size=SHAPE["hidden"], tie_word_embeddings=True, rope_theta=1e5,
                                      rms_norm_eps=1e-5, max_position_embeddings=2048)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


# ---------------------------------------- child process: build one provider's model, step when told


def build(provider: str, directory: str, compute_dtype: str):
    """(model, loss of (ids, labels), logits of ids). Same checkpoint, same LoRA settings on every side."""
    torch.manual_seed(0)
    if provider in ("minift", "minift-dense"):
        import minift
        from minift.peft import LoRAConfig, add_lora
        from minift.train.methods import prepare_method
        from minift.train.tasks import build_task_model

        model, _ = minift.load(directory)
        if provider == "minift":
            prepare_method("qlora", model, {"r": LORA_R, "alpha": LORA_ALPHA, "targets": "all-linear", "blocksize": 64,
                                  "double_quant": True, "compute_dtype": compute_dtype})
        else:
            add_lora(model, LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, targets="all-linear"))
        task_model = build_task_model(model, "causal_lm")  # the loss `minift finetune` trains

        def loss_of(ids, labels):
            out = task_model({"input_ids": ids, "labels": labels})  # shifts inside; summed loss + target count
            return out.loss_sum / out.n_targets

        return model.train(), loss_of, model
    import peft
    import transformers

    transformers.utils.logging.disable_progress_bar()
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=DTYPES[compute_dtype])
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map="cpu",
                                                              quantization_config=quantization)
    # No prepare_model_for_kbit_training: it switches on gradient checkpointing, which the minift side does not use.
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear"))

    def loss_of(ids, labels):
        return model(input_ids=ids, labels=labels, use_cache=False).loss  # shifts labels inside

    return model.train(), loss_of, lambda ids: model(input_ids=ids, use_cache=False).logits


def nf4_layers(model) -> dict[str, tuple]:
    """'<block>.<x_proj>' -> (packed 4-bit codes uint8, block-scale codes uint8, storage bytes, weight count)."""
    layers = {}
    for name, module in model.named_modules():
        kind = type(module).__module__.split(".")[0], type(module).__name__
        if kind == ("minift", "NF4Linear"):  # <layer>.base under LoRALinear; weight is an NF4Tensor
            q = module.weight
            entry = (q.packed.reshape(-1), q.absmax, q.nbytes, q.numel())
        elif kind == ("bitsandbytes", "Linear4bit"):  # <layer>.base_layer under PEFT's lora.Linear4bit
            state = module.weight.quant_state
            stats = [state.absmax, state.state2.absmax, state.offset] if state.nested else [state.absmax]
            nbytes = module.weight.numel() + sum(t.numel() * t.element_size() for t in stats)  # code tables not counted
            entry = (module.weight.data.reshape(-1), state.absmax, nbytes, torch.Size(state.shape).numel())
        else:
            continue
        layers[".".join(re.search(r"\.(\d+)\..*?(\w+_proj)", name).groups())] = entry
    return layers


def storage(model, layers: dict) -> dict:
    """Bytes of the NF4 linear weights, of the remaining dense parameters, and of the LoRA adapters."""
    dense = adapters = 0
    for name, p in model.named_parameters():  # a tied embedding is counted once
        if "lora_" in name:
            adapters += p.numel() * p.element_size()
        elif p.dtype != torch.uint8:  # bitsandbytes' Params4bit (uint8) is counted in `layers`
            dense += p.numel() * p.element_size()
    return dict(nf4_bytes=sum(v[2] for v in layers.values()), nf4_params=sum(v[3] for v in layers.values()),
                nf4_layers=len(layers), dense_bytes=dense, adapter_bytes=adapters)


def resident_mib(field: str) -> float:
    """'VmRSS' now, or 'VmHWM' the peak since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def settle_memory() -> None:
    """Give freed heap back to the OS and restart the peak-RSS mark, so that training is measured alone."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def category(event, ancestors: set[str]) -> str:
    if ancestors & DEQUANTIZE_EVENTS:
        return "dequantize"
    if any("scaled_dot_product" in name or "flash_attention" in name for name in ancestors):
        return "attention"
    if any("log_softmax" in name or "nll_loss" in name or "cross_entropy" in name for name in ancestors):
        return "loss"
    if event.name.removeprefix("aten::").strip("_") in ("mm", "addmm", "bmm", "baddbmm", "addmm_activation"):
        dims = {d for shape in event.input_shapes for d in shape[-2:]}
        return "GEMM lm_head" if SHAPE["vocab"] in dims else "GEMM LoRA" if LORA_R in dims else "GEMM frozen"
    return "other ops"


def profile_step(provider: str, train_step) -> dict:
    """One step under torch.profiler, its time split into categories (ms, by each op's self time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from_class = None
    if provider == "minift":  # minift dequantizes with plain aten ops: mark them with a named range
        from minift.quant.nf4 import NF4Tensor

        from_class = NF4Tensor.dequantize

        def traced(self, dtype=None):
            with record_function("minift NF4 dequantize"):
                return from_class(self, dtype)

        NF4Tensor.dequantize = traced
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            train_step()
            wall_ms = (time.perf_counter() - start) * 1e3
    finally:
        if from_class is not None:
            NF4Tensor.dequantize = from_class
    split = dict.fromkeys(["dequantize", "GEMM frozen", "GEMM LoRA", "GEMM lm_head", "attention", "loss",
                           "other ops"], 0.0)
    for event in prof.events():
        ancestors, parent = set(), event
        while parent is not None:
            ancestors.add(parent.name)
            parent = parent.cpu_parent
        split[category(event, ancestors)] += event.self_cpu_time_total / 1e3
    split["outside ops"] = max(wall_ms - sum(split.values()), 0.0)
    calls = sum(e.name in ("minift NF4 dequantize", "bitsandbytes::dequantize_4bit") for e in prof.events())
    return dict(wall_ms=wall_ms, split=split, dequantize_calls=calls)


def worker(args) -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol; anything the libraries print goes to stderr
    os.dup2(2, 1)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model, loss_of, logits_of = build(args.worker, args.checkpoint, args.compute_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()  # every token is a target

    from safetensors.torch import save_file

    layers = nf4_layers(model)
    with torch.no_grad():  # B = 0 at init: the base model's logits
        check = {"logits": logits_of(ids[:1]).float().contiguous()}  # (1, T, V)
    for key, (packed, scale_codes, _, _) in layers.items():
        check[f"packed.{key}"], check[f"scales.{key}"] = packed.contiguous(), scale_codes.contiguous()
    save_file(check, os.path.join(args.checkpoint, f"check-{args.worker}.safetensors"))
    info = dict(ready=True, trainable=sum(p.numel() for p in trainable), **storage(model, layers))
    del check, layers
    settle_memory()
    channel.write(json.dumps(dict(info, rss_after_build=resident_mib("VmRSS"))) + "\n")

    def train_step() -> float:
        loss = loss_of(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for command in sys.stdin:
        if command.strip() == "step":
            start, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            loss = train_step()
            seconds, cpu, after = time.perf_counter() - start, time.process_time() - cpu, resource.getrusage(
                resource.RUSAGE_SELF)
            channel.write(json.dumps(dict(seconds=seconds, cpu_seconds=cpu, loss=loss,
                                          system_seconds=after.ru_stime - usage.ru_stime,
                                          page_faults=after.ru_minflt - usage.ru_minflt)) + "\n")
        elif command.strip() == "profile":
            channel.write(json.dumps(profile_step(args.worker, train_step)) + "\n")
        else:
            break
    channel.write(json.dumps(dict(peak_training=resident_mib("VmHWM"))) + "\n")


# ---------------------------------------- parent: interleave the children, compare, time one layer, report


class Child:
    def __init__(self, provider: str, args) -> None:
        command = [sys.executable, __file__, "--worker", provider, "--checkpoint", args.checkpoint,
                   "--compute-dtype", args.compute_dtype, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--threads", str(args.threads)]
        self.provider = provider
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict = {}  # the children build their models at the same time; see ask(None)
        self.steps: list[dict] = []  # the timed steps' replies
        self.first_loss: float | None = None

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.provider} worker exited (code {self.process.wait()}); see its stderr above")
        return json.loads(line)

    def step(self, timed: bool) -> None:
        reply = self.ask("step")
        self.first_loss = reply["loss"] if self.first_loss is None else self.first_loss
        if timed:
            self.steps.append(reply)

    def median(self, field: str) -> float:
        return statistics.median(step[field] for step in self.steps)


def run_providers(args) -> tuple[list[list[str]], dict]:
    children = [Child(provider, args) for provider in args.providers]
    for child in children:
        child.info = child.ask(None)
    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(children)
        for child in children[shift:] + children[:shift]:  # A B C, B C A, C A B, ...
            child.step(timed=round_ >= args.warmup)
    profiles = {child.provider: child.ask("profile") for child in children} if args.profile else {}
    tokens, rows, summary = args.batch * args.seq, [], {}
    for child in children:
        peak, info = child.ask("done")["peak_training"], child.info
        child.process.wait()
        wall, cpu, times = child.median("seconds"), child.median("cpu_seconds"), [s["seconds"] for s in child.steps]
        summary[child.provider] = dict(info, tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu,
                                       peak_training=peak, first_loss=child.first_loss,
                                       profile=profiles.get(child.provider))
        rows.append([child.provider, f"{info['trainable']:,}", f"{wall:.2f}", f"{min(times):.2f} / {max(times):.2f}",
                     f"{tokens / wall:,.1f}", f"{cpu:.2f}", f"{tokens / cpu:,.1f}",
                     f"{child.median('system_seconds'):.2f}", f"{child.median('page_faults') / 1e3:,.0f}k",
                     f"{info['rss_after_build']:,.0f}", f"{peak:,.0f}", f"{peak - info['rss_after_build']:,.0f}",
                     f"{child.first_loss:.6f}"])
    return rows, summary


def compare_nf4(directory: str, providers: list[str]) -> dict:
    """Codes and logits of the providers' models, from the files their children wrote."""
    from safetensors.torch import load_file

    checks = {p: load_file(os.path.join(directory, f"check-{p}.safetensors")) for p in providers}
    out = {}
    if "minift" in checks and "bnb" in checks:
        ours, theirs = checks["minift"], checks["bnb"]
        keys = sorted(k for k in ours if k.startswith("packed."))
        if sorted(k for k in theirs if k.startswith("packed.")) != keys:
            raise RuntimeError("minift and bitsandbytes quantized different sets of layers")
        steps = torch.cat([(ours[k].int() - theirs[k].int()).abs() for k in ours if k.startswith("scales.")])
        out.update(layers=len(keys), packed_bytes=sum(ours[k].numel() for k in keys),
                   packed_equal=sum(torch.equal(ours[k], theirs[k]) for k in keys), scale_codes=steps.numel(),
                   scale_codes_differ=int((steps > 0).sum()), scale_max_step=int(steps.max()),
                   logits_minift_vs_bnb=(ours["logits"] - theirs["logits"]).abs().max().item())
    if "minift-dense" in checks and "minift" in checks:
        out["logits_nf4_vs_dense"] = (checks["minift"]["logits"] - checks["minift-dense"]["logits"]).abs().max().item()
    return out


def agreement(summary: dict, nf4: dict) -> tuple[str, bool]:
    """Do the two NF4 models compute the same thing? The tolerance is quantization's own effect (vs dense)."""
    if "minift" not in summary or "bnb" not in summary:
        return "(minift and bnb were not both run: no comparison)", True
    ours, theirs = summary["minift"]["first_loss"], summary["bnb"]["first_loss"]
    lines = [f"4-bit codes identical in {nf4['packed_equal']} of {nf4['layers']} layers ({nf4['packed_bytes']:,} "
             f"bytes); double-quant scale codes: {nf4['scale_codes_differ']:,} of {nf4['scale_codes']:,} differ, by at "
             f"most {nf4['scale_max_step']} step(s) (0 expected: both round through bitsandbytes' CPU 65,536-point "
             "table; minift/quant/nf4.py)",
             f"max |logit difference| minift vs bnb: {nf4['logits_minift_vs_bnb']:.2e}",
             f"first loss: minift {ours:.6f}, bnb {theirs:.6f}, |difference| {abs(ours - theirs):.2e}"]
    same = nf4["packed_equal"] == nf4["layers"]
    if "minift-dense" in summary:
        dense_gap = abs(ours - summary["minift-dense"]["first_loss"])
        lines[1] += f"; NF4 vs the dense float32 model: {nf4['logits_nf4_vs_dense']:.2e}"
        lines[2] += f"; NF4 vs dense: {dense_gap:.2e}"
        same = same and nf4["logits_minift_vs_bnb"] < nf4["logits_nf4_vs_dense"] and abs(ours - theirs) <= dense_gap
    else:
        same = same and abs(ours - theirs) < 1e-3
    verdict = ("**Same model: yes** (minift and bnb agree more closely than NF4 agrees with the dense model)." if same
               else "**Same model: NO: the two NF4 models disagree beyond quantization tolerance.**")
    return "\n".join(f"* {line}" for line in lines) + "\n\n" + verdict, same


def layer_table(tokens: int, compute_dtype: str, reps: int = 7) -> list[list[str]]:
    """One 576 -> 1536 layer over `tokens` rows, forward + backward (grad of x and of the adapter), and the
    dequantization alone: median CPU ms of `reps` x 5 runs, the cases interleaved, in this one process."""
    import bitsandbytes
    import peft

    from minift.peft import LoRALinear
    from minift.quant import NF4Linear

    torch.manual_seed(0)
    dim, hidden, dtype = SHAPE["dim"], SHAPE["hidden"], DTYPES[compute_dtype]
    frozen = torch.nn.Linear(dim, hidden, bias=False).requires_grad_(False)
    ours_dense = LoRALinear(copy.deepcopy(frozen))
    ours_nf4 = LoRALinear(NF4Linear.from_linear(frozen, compute_dtype=dtype))
    for layer in (ours_dense, ours_nf4):
        layer.add_adapter("default", r=LORA_R, alpha=LORA_ALPHA)
        layer.set_adapter("default")
    base = bitsandbytes.nn.Linear4bit(dim, hidden, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.weight = bitsandbytes.nn.Params4bit(frozen.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
    base = base.to("cpu")  # bitsandbytes quantizes when the weight moves to its device
    theirs = peft.tuners.lora.Linear4bit(base, "default", config=peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA),
                                         r=LORA_R, lora_alpha=LORA_ALPHA)
    with torch.no_grad():  # non-zero B so that every gradient is really computed
        for layer in (ours_dense, ours_nf4, theirs):
            layer.lora_B["default"].weight.normal_()
    x0, grad = torch.randn(tokens, dim), torch.randn(tokens, hidden)  # (N, in), (N, out)

    def forward_backward(layer):
        def run():
            x = x0.clone().requires_grad_(True)
            layer(x).backward(grad)
        return run

    q, state = ours_nf4.base.weight, base.weight.quant_state
    cases = {"dequantize W: minift (NF4Tensor.dequantize)": lambda: q.dequantize(dtype),
             "dequantize W: bitsandbytes (dequantize_4bit)":
                 lambda: bitsandbytes.functional.dequantize_4bit(base.weight.data, state).to(dtype),
             "frozen nn.Linear, no LoRA (the GEMMs alone)": forward_backward(frozen),
             "minift LoRALinear, dense float32 base": forward_backward(ours_dense),
             "minift LoRALinear over NF4Linear": forward_backward(ours_nf4),
             "PEFT lora.Linear4bit over bitsandbytes Linear4bit": forward_backward(theirs)}
    cpu_ms: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, run in cases.items():
            run()
            start = time.process_time()
            for _ in range(5):
                run()
            cpu_ms[name].append((time.process_time() - start) / 5 * 1e3)
    medians = {name: statistics.median(values) for name, values in cpu_ms.items()}
    frozen_ms = medians["frozen nn.Linear, no LoRA (the GEMMs alone)"]
    return [[name, f"{ms:.2f}", f"{ms / frozen_ms:.2f}x"] for name, ms in medians.items()]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(args, rows, summary, nf4, layer_rows, started, loads) -> tuple[str, bool]:
    import bitsandbytes
    import peft
    import transformers

    from common import machine_description

    check, same = agreement(summary, nf4)
    sections = [markdown(["provider", "trainable", "median step s", "min / max s", "tokens/s", "median CPU s",
                          "tokens / CPU s", "of which system s", "page faults", "RSS after build MiB",
                          "peak in training MiB", "train extra MiB", "first loss"], rows)]
    if "minift" in summary and "bnb" in summary:
        ours, theirs = summary["minift"], summary["bnb"]
        ratio = {key: ours[key] / theirs[key] for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_training",
                                                            "nf4_bytes")}
        sections.append(f"**minift / transformers+PEFT+bitsandbytes: {ratio['tokens_per_s']:.2f}x tokens/s (wall), "
                        f"{ratio['tokens_per_cpu_s']:.2f}x tokens per CPU second; peak memory in training "
                        f"{ratio['peak_training']:.2f}x; NF4 weight bytes {ratio['nf4_bytes']:.2f}x.**")
    sections.append("How to read these numbers, and what the profile shows: the docstring of "
                    "benchmarks/bench_qlora.py.")
    if "minift-dense" in summary:
        dense = summary["minift-dense"]["tokens_per_cpu_s"]
        sections.append("Step CPU time relative to `minift-dense` (plain LoRA, float32 base): " + ", ".join(
            f"{p} {dense / summary[p]['tokens_per_cpu_s']:.2f}x" for p in summary if p != "minift-dense") + ".")
    sections += ["### Same weights, same model?", check,
                 "### Weight bytes (base model; code tables of 16 + 256 floats per bitsandbytes layer not counted)",
                 markdown(["provider", "NF4 layers", "linear layers", "dense rest MiB (embedding, norms)",
                           "base total MiB", "LoRA adapters MiB"],
                          [[p, f"{s['nf4_layers']}", f"{s['nf4_bytes'] / MiB:.2f} MiB NF4 "
                            f"({8 * s['nf4_bytes'] / s['nf4_params']:.3f} bits/weight)" if s["nf4_layers"] else
                            "float32, in the dense column", f"{s['dense_bytes'] / MiB:.2f}",
                            f"{(s['nf4_bytes'] + s['dense_bytes']) / MiB:.2f}", f"{s['adapter_bytes'] / MiB:.2f}"]
                           for p, s in summary.items()])]
    if args.profile:
        profile_rows = [[p, f"{s['profile']['wall_ms'] / 1e3:.2f}", f"{s['profile']['dequantize_calls']}",
                         *(f"{ms / 1e3:.2f} ({100 * ms / s['profile']['wall_ms']:.0f}%)"
                           for ms in s["profile"]["split"].values())] for p, s in summary.items()]
        sections += ["### Where the time goes: one more step per provider under torch.profiler (seconds, % of that "
                     "step; profiling adds overhead, and one step on a shared machine is noisy)",
                     markdown(["provider", "profiled step s", "dequantize calls", "dequantize", "GEMM frozen",
                               "GEMM LoRA", "GEMM lm_head", "attention", "loss", "other ops", "outside ops"],
                              profile_rows),
                     "GEMMs are told apart by shape (a dimension of 49,152: lm_head; of r = 8: LoRA); `outside ops` is "
                     "the step's wall time spent in no profiled op (Python, autograd, the optimizer's loop)."]
    if layer_rows:
        sections += [f"### One layer (576 -> 1536, {args.batch * args.seq} tokens, forward + backward), median CPU "
                     "ms of 7 x 5 runs in one process", markdown(["case", "CPU ms", "vs frozen nn.Linear"], layer_rows)]
    command = " ".join(["python benchmarks/bench_qlora.py", *sys.argv[1:]])
    text = "\n\n".join([
        "# QLoRA training step on the CPU: minift vs transformers + PEFT + bitsandbytes",
        f"Machine: {machine_description()}; transformers {transformers.__version__}; peft {peft.__version__}; "
        f"bitsandbytes {bitsandbytes.__version__}.",
        f"Run: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s; load average "
        f"{loads[0]:.2f} before, {loads[1]:.2f} after (other jobs share the machine: steps are interleaved, and the "
        "CPU seconds of each provider's own process are reported beside wall seconds).",
        f"Model: SmolLM2-135M shape with {args.layers} layers, random weights (one checkpoint written with "
        f"save_pretrained, loaded by every provider); NF4 blocksize 64 + double quantization, compute dtype "
        f"{args.compute_dtype}; LoRA r={LORA_R}, alpha={LORA_ALPHA} on all linear layers but lm_head; AdamW; every "
        f"token a target; batch {args.batch} x {args.seq} tokens; {args.threads} torch thread(s); {args.warmup} "
        f"warm-up + {args.steps} timed steps per provider, interleaved. Command: `{command}`.",
        "Providers: " + "; ".join(f"`{name}`: {PROVIDERS[name]}" for name in args.providers) + ".",
        *sections,
    ])
    return text, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per provider (1: stable CPU timing)")
    parser.add_argument("--compute-dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the NF4 layers' matmul, in both libraries; activations stay float32")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated: {', '.join(PROVIDERS)}")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled step")
    parser.add_argument("--no-layer-table", dest="layer_table", action="store_false", help="skip the one-layer timings")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    parser.add_argument("--worker", choices=list(PROVIDERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.providers = args.providers.split(",")
    if unknown := set(args.providers) - set(PROVIDERS):
        parser.error(f"--providers: unknown {sorted(unknown)}; choose from {', '.join(PROVIDERS)}")
    if min(args.layers, args.batch, args.steps, args.threads) < 1 or args.seq < 2 or args.warmup < 0:
        parser.error("--layers, --batch, --steps, --threads must be >= 1, --seq >= 2, --warmup >= 0")

    torch.set_num_threads(args.threads)  # as in the children, so that the machine line reports it
    started, load_before = time.time(), os.getloadavg()[0]
    args.checkpoint = tempfile.mkdtemp(prefix="bench_qlora_")
    try:
        write_checkpoint(args.checkpoint, args.layers)
        rows, summary = run_providers(args)
        nf4 = compare_nf4(args.checkpoint, args.providers)
    finally:
        shutil.rmtree(args.checkpoint, ignore_errors=True)
    layer_rows = layer_table(args.batch * args.seq, args.compute_dtype) if args.layer_table else []
    text, same = report(args, rows, summary, nf4, layer_rows, started, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        from common import write_result

        write_result(RESULT_NAME, text + "\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
