r"""Planning a run on paper: how many bytes each GPU holds, before a single GPU is rented.

Lesson
------
Training memory has four parts, and every one of them is arithmetic on the model's shapes:

    part          what it is                                             bytes
    -----------   ----------------------------------------------------   ---------------------------------------
    weights       the parameters the forward reads                       2 per parameter in bf16; NF4 for QLoRA
    gradients     one per *trainable* parameter                          2 (bf16)
    optimizer     AdamW's fp32 m and v, plus an fp32 master copy of      12 per trainable parameter (4 + 4 + 4)
                  each trainable weight under mixed precision
    activations   what the forward keeps for the backward                grows with tokens: see below

Mixed-precision AdamW is therefore 2 + 2 + 12 = 16 bytes per trainable parameter (Rajbhandari et al. 2020,
"ZeRO", §3.1: 2Ψ + 2Ψ + KΨ with K = 12). PyTorch's own autocast keeps the same 16 bytes split differently
(fp32 weights that the optimizer steps, fp32 gradients, fp32 m and v: 4 + 4 + 8), so the totals below hold
for both; a 16-bit copy made for the compute is short-lived and counted only under FSDP (buffers).

Three methods change *which* parameters are trainable and how the frozen ones are stored:

    full    every parameter trains: 16 bytes each
    lora    the base is frozen in bf16 (2 bytes, no gradient, no optimizer state); only the adapters A (r, in)
            and B (out, r) of each target layer train, at 16 bytes each (Hu et al. 2021, §4.2)
    qlora   the frozen base's linear layers are NF4 with double quantization: 4 bits per weight + 8 bits per
            64-block absmax + 32 bits per 256 of those = 4.127 bits (REFERENCE.md; minift.quant.nf4_nbytes
            counts the bytes exactly); embeddings, norms and lm_head stay bf16. The adapters follow the QLoRA
            recipe (Dettmers et al. 2023; artidoro/qlora casts them to bf16 and uses paged 32-bit AdamW):
            2 (bf16 weight) + 2 (bf16 grad) + 8 (fp32 m, v) bytes. The optimizer state is *paged*: under
            pressure it moves to CPU memory, so a run whose total exceeds the GPU still fits if everything but
            the optimizer does ("paged" in the fit column).

Two ways to use N GPUs change what each one holds:

    ddp     DistributedDataParallel replicates weights, gradients and optimizer state: per GPU = the total.
            (DDP's gradient buckets are views of the gradients with gradient_as_bucket_view=True; the default
            copies add one more gradient copy, not counted here.)
    fsdp    FSDP2 full sharding (ZeRO stage 3, `fully_shard` per transformer block): weights, gradients and
            optimizer state are divided by N. Each GPU gathers one unit (a block, or the root: embeddings,
            final norm, lm_head) at a time, and prefetches the next: buffers = 2 x the largest unit's
            weights + its trainable gradients before the reduce-scatter.

Activations per transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", §4.1), for s tokens per sequence, micro-batch b, width h, a heads, 16-bit activations:

    GPT (4h GELU MLP, dropout):   34 s b h + 5 a s^2 b        bytes per layer

counted piece by piece so that the same count covers Llama-style blocks (RMSNorm, grouped-query attention
with kv width h_kv = n_kv_heads * head_dim, SwiGLU of width i, no dropout):

    norm inputs (2 norms), LayerNorm               4 s b h
                           RMSNorm in fp32         12 s b h + 8 s b   each keeps its input upcast to fp32,
                                                                      the fp32 1/rms and the bf16 normalized x
                                                                      (transformers' LlamaRMSNorm and minift's)
    q,k,v input; MLP input (the norm outputs)      2 s b h + 2 s b h
    Q and K (for Q K^T), V (for P V)               2 s b h + 4 s b h_kv
    attention output (o_proj input)                2 s b h
    attention core, eager                          2 a s^2 b     softmax P (+ 3 a s^2 b: dropout mask and output)
    attention core, SDPA / flash                   4 a s b       only the fp32 logsumexp: P is recomputed
    MLP inside: GELU                               4 s b i       GELU input and output
                SwiGLU                             8 s b i       gate, up, silu(gate), silu(gate) * up
    dropout masks after attention and MLP          2 s b h       (1 byte each, only with dropout)
    q/k norms (Qwen3), per head, in fp32           6 s b (h + h_kv) + 4 s b (a + n_kv_heads)

With LayerNorm, i = 4h, h_kv = h, GELU and dropout this is exactly Korthikanti's 34 s b h + 5 a s^2 b; for a
Llama-style block with SDPA it is exactly what minift's own Transformer saves for its backward in bf16
(tests/test_plan.py checks both; the second by recording every tensor autograd saves). Outside the blocks: the
final norm (as above, one norm) and lm_head's input (2 s b h) and the logits, in bf16 and again in fp32 for
the loss (6 s b V). Not counted: the extra norms and soft-capped attention of Gemma-style blocks. Full activation checkpointing (Korthikanti §4, "full
recomputation") keeps only each block's input, 2 s b h per layer, and rebuilds one block at a time during the
backward: L * 2 s b h + one layer + outside. LoRA and QLoRA keep the same activations (the adapters need
their inputs, which the count already holds; their r-wide intermediate is small and not counted).

What is not counted: the CUDA context and kernels' workspaces (about 0.5-1 GiB), allocator fragmentation,
temporary buffers of the optimizer step. Leave that much headroom below the GPU's memory.

The model comes from its config alone: a published size (SIZES, the LLaMA / Llama 2 architectures), a bundled
name, a .gguf file's metadata or a Hugging Face directory's config.json. A Transformer is built on PyTorch's
"meta" device, which has shapes but no storage, so the counts are the real model's own parameters and the
LoRA targets are those `minift.peft` would pick, with no byte of weights read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from minift.config import ModelConfig
from minift.model import Transformer
from minift.peft.inject import find_targets
from minift.quant.nf4 import nf4_nbytes

GB, GiB = 10**9, 2**30
METHODS = ("full", "lora", "qlora")
STRATEGIES = ("ddp", "fsdp")
ATTENTION = ("sdpa", "eager")
FORMATS = ("text", "markdown", "json")

# The published architectures. LLaMA (Touvron et al. 2023a, Table 2: dimension, heads, layers for 6.7B, 13.0B,
# 32.5B, 65.2B) and Llama 2 (Touvron et al. 2023b, Table 1: 70B uses grouped-query attention); the MLP widths,
# the 8 key/value heads of 70B and the 32,000-token vocabulary are those of the released config.json files
# (intermediate_size = 256 * ceil(8h/3 / 256), and 28672 for 70B). Llama 2 7B and 13B share LLaMA's shapes.
SIZES: dict[str, tuple[str, dict]] = {
    "7b": ("LLaMA / Llama 2 7B", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008)),
    "13b": ("LLaMA / Llama 2 13B", dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824)),
    "33b": ("LLaMA 33B", dict(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, hidden_dim=17920)),
    "65b": ("LLaMA 65B", dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, hidden_dim=22016)),
    "70b": ("Llama 2 70B", dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672)),
}


def size_config(size: str) -> ModelConfig:
    """The ModelConfig of a published size ("7b" ... "70b")."""
    _, shape = SIZES[size]
    return ModelConfig(model_type="llama", vocab_size=32000, max_seq_len=4096, **shape)


def resolve_config(source: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, a name for it) from a size, a bundled name, a .gguf file or a Hugging Face directory.

    Reads config.json or the GGUF header only, never a weight."""
    from minift.io import hf
    from minift.io.bundled import BUNDLED_NAMES, resolve_bundled
    from minift.io.gguf import config_from_gguf, read_gguf

    if not source.strip():
        raise ValueError(f"--model is empty; give a size ({', '.join(SIZES)}), a bundled name "
                         f"({', '.join(BUNDLED_NAMES)}), a .gguf file or a directory with config.json")
    if source.lower() in SIZES:
        return size_config(source.lower()), SIZES[source.lower()][0] + " (published architecture)"
    path = resolve_bundled(source) or Path(source)
    if path.suffix == ".gguf" and path.is_file():
        gguf = read_gguf(path)  # header, metadata and tensor table; tensor bytes stay on disk
        try:
            config = config_from_gguf(gguf.metadata, where=str(path))
            config.tie_embeddings = "output.weight" not in gguf.tensors
        finally:
            gguf.close()
        return config, source
    if path.is_dir():
        raw, config_file = hf.read_config(path)
        return hf.config_from_hf(raw, where=str(config_file)), source
    raise ValueError(f"--model {source!r}: not a size ({', '.join(SIZES)}), a bundled name "
                     f"({', '.join(BUNDLED_NAMES)}), a .gguf file or a directory with config.json")


# ----------------------------------------------------------------------------------------------------
# Counting parameters on the meta device
# ----------------------------------------------------------------------------------------------------

@dataclass
class Counts:
    """Parameter counts of one model and one adapter choice; *_bytes are as stored under the method."""

    total: int  # every parameter of the model
    adapters: int  # LoRA A and B of every target layer
    units: list[int]  # parameters per FSDP unit: each block, then the root (embeddings, final norm, lm_head)
    nf4_bytes: int  # the QLoRA base: NF4 linear weights + bf16 rest
    nf4_unit_bytes: list[int]  # the same per unit
    adapter_units: list[int] = field(default_factory=list)  # adapter parameters per unit


_COUNTS: dict[str, Counts] = {}  # a 70B model takes about a second to build, even on the meta device


def count_parameters(config: ModelConfig, lora_r: int = 16, lora_targets: list[str] | str = "all-linear",
                     blocksize: int = 64, double_quant: bool = True) -> Counts:
    """Build the Transformer on the meta device and count: total, LoRA adapters, per-unit, NF4 bytes.

    QLoRA quantizes every nn.Linear except lm_head (minift.quant.quantize_model); a tied lm_head is the
    embedding and stays dense too."""
    key = json.dumps([config.to_dict(), lora_r, lora_targets, blocksize, double_quant], sort_keys=True, default=str)
    if key not in _COUNTS:
        _COUNTS[key] = _count(config, lora_r, lora_targets, blocksize, double_quant)
    return _COUNTS[key]


def _count(config: ModelConfig, lora_r: int, lora_targets: list[str] | str, blocksize: int,
           double_quant: bool) -> Counts:
    with torch.device("meta"):
        model = Transformer(config)
    targets = set(find_targets(model, lora_targets))
    n_units = config.n_layers + 1
    units, nf4_units, adapter_units = [0] * n_units, [0] * n_units, [0] * n_units

    def unit_of(name: str) -> int:
        return int(name.split(".")[1]) if name.startswith("blocks.") else config.n_layers

    for module_name, module in model.named_modules():
        unit = unit_of(module_name)
        for param_name, param in module.named_parameters(recurse=False):
            if module_name == "lm_head" and config.tie_embeddings:
                continue  # the embedding matrix, counted once under embed
            units[unit] += param.numel()
            quantized = isinstance(module, nn.Linear) and param_name == "weight" and module_name != "lm_head"
            nf4_units[unit] += nf4_nbytes(param.numel(), blocksize, double_quant) if quantized else 2 * param.numel()
        if module_name in targets:
            adapter_units[unit] += lora_r * (module.in_features + module.out_features)
    return Counts(total=sum(units), adapters=sum(adapter_units), units=units, nf4_bytes=sum(nf4_units),
                  nf4_unit_bytes=nf4_units, adapter_units=adapter_units)


# ----------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------

def layer_activation_bytes(config: ModelConfig, seq_len: int, batch: int, attention: str = "sdpa") -> int:
    """Bytes one transformer block keeps for its backward (16-bit activations), counted as in the lesson."""
    s, b, h, a = seq_len, batch, config.dim, config.n_heads
    q_width, kv_width, i = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    dropout = config.dropout > 0
    per_token = (2 * norm_bytes_per_token(config)  # the two norms
                 + 2 * h + 2 * h  # q/k/v input and MLP input (the norms' outputs)
                 + 2 * q_width + 4 * kv_width  # Q, K, V
                 + 2 * q_width  # attention output, o_proj's input
                 + (8 * i if config.mlp == "swiglu" else 4 * i)
                 + (2 * h if dropout else 0))  # 1-byte masks after attention and MLP
    if config.qk_norm:  # Qwen3: an fp32 RMSNorm over each head of q and of k, kept like the block's norms
        per_token += 6 * q_width + 4 * config.n_heads + 6 * kv_width + 4 * config.n_kv_heads
    if attention == "eager":
        core = 2 * a * s * s * b + (3 * a * s * s * b if dropout else 0)
    else:
        core = 4 * a * s * b  # fp32 logsumexp per head and query
    return s * b * per_token + core


def norm_bytes_per_token(config: ModelConfig) -> int:
    """What one norm keeps per token: LayerNorm its bf16 input; RMSNorm (computed in fp32) its fp32 input, the
    fp32 1/rms and the bf16 normalized vector that the weight multiplies."""
    return 6 * config.dim + 4 if config.norm == "rms" else 2 * config.dim


def outside_activation_bytes(config: ModelConfig, seq_len: int, batch: int) -> int:
    """Final norm and lm_head input, and the logits in bf16 and fp32 (an encoder stops at the final norm)."""
    tokens = seq_len * batch
    if not config.lm_head:
        return tokens * norm_bytes_per_token(config)
    return tokens * (norm_bytes_per_token(config) + 2 * config.dim + 6 * config.vocab_size)


def activation_bytes(config: ModelConfig, seq_len: int, batch: int, attention: str = "sdpa",
                     checkpointing: bool = False) -> int:
    """All activations of one micro-batch: every block's, or with checkpointing the block inputs + one block."""
    layer = layer_activation_bytes(config, seq_len, batch, attention)
    outside = outside_activation_bytes(config, seq_len, batch)
    if checkpointing:
        return config.n_layers * 2 * seq_len * batch * config.dim + layer + outside
    return config.n_layers * layer + outside


# ----------------------------------------------------------------------------------------------------
# Model states per GPU
# ----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """Bytes per GPU of one (method, strategy, checkpointing) combination."""

    method: str
    strategy: str
    checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    paged: bool = False  # QLoRA: the optimizer state may move to CPU memory

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    def fit(self, gpu_bytes: float) -> str:
        if self.total <= gpu_bytes:
            return "yes"
        if self.paged and self.total - self.optimizer <= gpu_bytes:
            return "paged"
        return "no"


def model_states(counts: Counts, method: str) -> dict[str, int]:
    """Whole-model bytes of weights, gradients and optimizer state, and the largest unit's gather buffer."""
    if method == "full":
        states = dict(weights=2 * counts.total, gradients=2 * counts.total, optimizer=12 * counts.total)
        largest = max(counts.units)  # its bf16 weights are gathered, its bf16 gradients reduce-scattered
        return {**states, "unit_weights": 2 * largest, "unit_grads": 2 * largest}
    if method == "lora":
        adapters = counts.adapters
        states = dict(weights=2 * counts.total + 2 * adapters, gradients=2 * adapters, optimizer=12 * adapters)
        unit_weights = max(2 * (n + m) for n, m in zip(counts.units, counts.adapter_units))
        return {**states, "unit_weights": unit_weights, "unit_grads": max(2 * m for m in counts.adapter_units)}
    if method == "qlora":
        adapters = counts.adapters
        states = dict(weights=counts.nf4_bytes + 2 * adapters, gradients=2 * adapters, optimizer=8 * adapters)
        unit_weights = max(n + 2 * m for n, m in zip(counts.nf4_unit_bytes, counts.adapter_units))
        return {**states, "unit_weights": unit_weights, "unit_grads": max(2 * m for m in counts.adapter_units)}
    raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")


def plan_rows(config: ModelConfig, counts: Counts, gpus: int, methods=METHODS, seq_len: int = 2048,
              batch: int = 1, attention: str = "sdpa") -> list[Row]:
    """Every (method, strategy, checkpointing) combination; one GPU has no FSDP rows (nothing to shard)."""
    strategies = STRATEGIES if gpus > 1 else ("ddp",)
    rows = []
    for method in methods:
        for strategy in strategies:
            states = states_per_gpu(counts, method, strategy, gpus)
            for checkpointing in (False, True):
                rows.append(Row(method, strategy, checkpointing, **states, paged=method == "qlora",
                                activations=activation_bytes(config, seq_len, batch, attention, checkpointing)))
    return rows


def states_per_gpu(counts: Counts, method: str, strategy: str, gpus: int) -> dict[str, int]:
    """Weights, gradients, optimizer state and gather buffers on one GPU: DDP replicates, FSDP divides by N."""
    states = model_states(counts, method)
    share = gpus if strategy == "fsdp" else 1
    buffers = 2 * states["unit_weights"] + states["unit_grads"] if strategy == "fsdp" else 0
    return {part: -(-states[part] // share) for part in ("weights", "gradients", "optimizer")} | {"buffers": buffers}


# ----------------------------------------------------------------------------------------------------
# The `minift plan` command's checks and report
# ----------------------------------------------------------------------------------------------------

def parse_count(flag: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a whole number >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{flag} {text}: must be >= {minimum}")
    return value


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    wrong = [m for m in methods if m not in METHODS]
    if not methods or wrong:
        raise ValueError(f"--method {text!r}: expected {'|'.join(METHODS)}, or several joined by commas")
    return tuple(dict.fromkeys(methods))


def parse_gpu_memory(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: expected GiB per GPU, a number > 0 (e.g. 80)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"--gpu-memory {text}: must be a finite number of GiB > 0")
    return value


def parse_targets(text: str) -> list[str] | str:
    if text == "all-linear":
        return text
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--lora-targets {text!r}: expected all-linear or layer names joined by commas "
                         "(q_proj,v_proj)")
    return names


def human_bytes(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def report(source: str, gpus: int = 1, methods=METHODS, seq_len: int = 2048, batch: int = 1,
           gpu_memory: float = 80.0, lora_r: int = 16, lora_targets: list[str] | str = "all-linear",
           attention: str = "sdpa", fmt: str = "text") -> str:
    """The text (or markdown, or JSON) that `minift plan` prints."""
    if attention not in ATTENTION:
        raise ValueError(f"--attention {attention!r}: expected {' or '.join(ATTENTION)}")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected {', '.join(FORMATS)}")
    config, name = resolve_config(source)
    try:
        counts = count_parameters(config, lora_r, lora_targets)
    except ValueError as error:  # a LoRA target this model does not have
        raise ValueError(f"--lora-targets: {error}") from None
    rows = plan_rows(config, counts, gpus, methods, seq_len, batch, attention)
    gpu_bytes = gpu_memory * GiB
    if fmt == "json":
        return json.dumps({
            "model": name, "parameters": counts.total, "lora_parameters": counts.adapters, "gpus": gpus,
            "seq_len": seq_len, "batch": batch, "attention": attention, "gpu_memory_gib": gpu_memory,
            "rows": [{**asdict(row), "total": row.total, "fits": row.fit(gpu_bytes)} for row in rows]}, indent=2)
    lines = []
    if fmt in ("text", "markdown"):
        targets = lora_targets if isinstance(lora_targets, str) else ",".join(lora_targets)
        lines += [f"{name}: {human_count(counts.total)} parameters; {config.n_layers} layers, width {config.dim}, "
                  f"{config.n_heads} heads ({config.n_kv_heads} key/value), MLP {config.hidden_dim}, "
                  f"vocabulary {config.vocab_size}",
                  f"{gpus} GPU{'s' if gpus > 1 else ''} x {gpu_memory:g} GiB; sequence {seq_len} tokens x "
                  f"micro-batch {batch} per GPU; "
                  f"attention {attention}",
                  f"LoRA / QLoRA adapters: r={lora_r} on {targets}: {human_count(counts.adapters)} trainable "
                  f"({100 * counts.adapters / counts.total:.2f}%); QLoRA base in NF4: "
                  f"{human_bytes(counts.nf4_bytes)}", ""]
        if fmt == "markdown":  # one bullet per line, or markdown would run them together
            lines = [f"- {line}" for line in lines[:-1]] + [""]
    unit, scale = ("GiB", GiB) if max(row.total for row in rows) >= GiB else ("MiB", 2**20)  # small models: MiB
    header = ["method", "sharding", "ckpt", "weights", "grads", "optimizer", "activations", "buffers", "total",
              f"fits {gpu_memory:g} GiB"]
    table = [[row.method, row.strategy if gpus > 1 else "1 GPU", "on" if row.checkpointing else "off",
              *(f"{n / scale:.1f}" for n in (row.weights, row.gradients, row.optimizer, row.activations, row.buffers,
                                              row.total)), row.fit(gpu_bytes)] for row in rows]
    lines.append(f"{unit} per GPU:")
    if fmt == "markdown":
        lines.append("")
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table]
    else:
        widths = [max(len(str(r[k])) for r in [header, *table]) for k in range(len(header))]
        lines += ["  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                  for r in [header, *table]]
        lines += ["", "weights/grads/optimizer: 2/2/12 bytes per trainable parameter (bf16, bf16, "
                  "fp32 master + m + v); frozen base bf16 (lora) or NF4 (qlora: adapters bf16, paged 32-bit "
                  "AdamW, 'paged' = fits once the optimizer state pages to CPU). fsdp divides model states by "
                  "the GPU count; buffers = two gathered units + one unit's gradients. Activations: Korthikanti "
                  "et al. 2022's per-layer count (minift/plan.py); ckpt on keeps 2sbh per layer. Not counted: "
                  "CUDA context, workspaces, fragmentation: keep ~1-2 GiB free."]
    return "\n".join(lines)
