"""Getting a model out of minift: quantize it to NF4, merge an adapter into it, export a run — and check each.

Lesson
------
Training leaves a model in minift's own shape (LoRALinear layers, NF4 weights, a checkpoint that holds only
the tensors that trained). Other tools want one of two standard directories, and three commands make them:

    command           reads                                        writes
    ---------------   ------------------------------------------   -------------------------------------------
    minift quantize   a dense model (any source)                   4-bit directory: NF4 bytes in bitsandbytes'
                                                                   layout (minift/io/nf4dir.py)
    minift merge      a base model + a PEFT LoRA / IA3 adapter dir dense Hugging Face directory, W' = W + s B A
    minift export     a run dir (its latest checkpoint), or any    dense Hugging Face directory (--format hf),
                      source minift loads (+ an adapter)           a run's LoRA / IA3 adapter (--format peft),
                                                                   or one llama.cpp file (--format gguf --quant
                                                                   f16|q8_0|q4_0|q4_k; minift/io/gguf_write.py)

merge vs export: `merge` is one operation on files you already have: fold a PEFT adapter into its base.
`export` is a conversion: whatever minift can load — a fine-tuning run directory of any method, a GGUF
file, a bundled name, a 4-bit directory, optionally plus an adapter — becomes the directory the Hugging
Face ecosystem reads. `export --model M --adapter A` does exactly what `merge` does (same code below).

What folding does to each kind of layer (the math lives where the layer does):

    LoRALinear over nn.Linear     W' = W + scaling * B A                      minift/peft/lora.py
    IA3Linear over nn.Linear      W' = diag(l) W (rows) or W diag(l) (cols)   minift/peft/ia3.py
    LoRALinear over NF4Linear     W' = dequantize(W_nf4) + scaling * B A      minift/peft/qlora.py (never
                                                                              re-quantized: see its lesson)
    NF4Linear without adapter     W' = dequantize(W_nf4)
    full / partial / output-only / features runs: the backbone already is a plain model
    bottleneck adapters, soft prompts: extra computation no Hugging Face architecture has, so they cannot
                                  be folded; export refuses and points to the run's own final/ directory

--format gguf folds adapters exactly as --format hf does (LoRA and QLoRA merged in float32), then writes
the dense model with llama.cpp's names, Q/K row order, metadata and tokenizer, quantized as asked.

Every command checks what it wrote: it runs a probe sentence through the model before and after, and
through the directory read back from disk, and prints the largest output difference (and, for a causal
LM, how often the next-token prediction agrees). A merge in float32 agrees to ~1e-6; in bfloat16 to the
rounding of bf16; NF4 quantization moves logits by a visible amount, which is the point of printing it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from minift.adapter_interface import adapter_layers
from minift.dtypes import parse_dtype
from minift.io import load, save
from minift.io.nf4dir import load_quantized, nf4_layers, save_quantized

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Fine-tuning adapts a pretrained model to a new task."
FORMATS = ("hf", "peft", "gguf")


@dataclass
class Report:
    """What a command wrote and the checks it ran, as printable lines."""

    directory: Path
    lines: list[str] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)  # name -> max |output difference|

    def __str__(self) -> str:
        return "\n".join(self.lines)


# ----------------------------------------------------------------------------------------------------
# Loading, probing, comparing
# ----------------------------------------------------------------------------------------------------


def load_source(source: str | Path, dtype: torch.dtype | None = None):
    """minift.load (4-bit directories included) and an optional dtype cast."""
    model, tokenizer = load(source)
    if dtype is not None:
        model = model.to(dtype)  # NF4Linear keeps its 4-bit data; RoPE frequencies stay float32
    return model, tokenizer


def probe_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """(1, T) token ids of PROBE_TEXT, or the first 16 ids of the vocabulary when there is no tokenizer."""
    ids = tokenizer.encode(PROBE_TEXT) if tokenizer is not None else []
    if len(ids) < 2:
        ids = list(range(min(16, vocab_size)))
    return torch.tensor([ids[:64]])


@torch.no_grad()
def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM, hidden states (B, T, D) of an encoder; float32, on the CPU."""
    was_training = model.training
    model.eval()
    result = model(ids.to(next(model.parameters()).device)).float().cpu()
    model.train(was_training)
    return result


def compare(label: str, reference: torch.Tensor, other: torch.Tensor, report: Report, logits: bool) -> None:
    """Add one line: max |difference| and the outputs' scale; for logits also the next-token agreement."""
    if reference.shape != other.shape:
        raise ValueError(f"{label}: output shapes differ, {tuple(reference.shape)} vs {tuple(other.shape)}")
    diff = (reference - other).abs().max().item()
    line = f"  {label}: max |output difference| {diff:.3g} (outputs up to {reference.abs().max().item():.3g})"
    if logits:
        agree = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
        line += f"; next-token argmax agrees at {100 * agree:.0f}% of {reference.shape[1]} positions"
    report.lines.append(line)
    report.checks[label] = diff


def has_logits(model: nn.Module) -> bool:
    """A causal LM returns logits; an encoder returns hidden states."""
    return bool(getattr(model.config, "lm_head", False))


def file_bytes(source: str | Path) -> int | None:
    """Bytes of a checkpoint on disk: a .gguf file, or the .safetensors files of a directory."""
    from minift.io.bundled import resolve_bundled

    path = resolve_bundled(str(source)) or Path(source)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return None


def megabytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


def check_output_file(out: str | Path, *inputs: str | Path | None) -> Path:
    """--format gguf writes one file: it must end in .gguf, not be an input, and its folder must exist."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: --format gguf writes one file; name it *.gguf")
    for source in inputs:
        if source is not None and Path(source).exists() and out.resolve() == Path(source).resolve():
            raise ValueError(f"--out {out} is also an input; write to a new file")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; --format gguf writes a file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    return out


def check_output_directory(out: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse to write over an input (a source model or adapter directory)."""
    out = Path(out)
    for source in inputs:
        if source is not None and Path(source).exists() and out.resolve() == Path(source).resolve():
            raise ValueError(f"--out {out} is also an input; write to a new directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory (it is created if missing)")
    return out


# ----------------------------------------------------------------------------------------------------
# Folding everything into plain nn.Linear layers
# ----------------------------------------------------------------------------------------------------


def unfoldable_modules(model: nn.Module) -> list[str]:
    """Adapter layers that add computation a Hugging Face architecture does not have (the adapter interface says
    which: bottleneck adapters, soft prompts)."""
    return [name for name, layer in adapter_layers(model).items() if not layer.foldable]


def fold_into_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every foldable adapter merged (minift.adapter_interface.merge_adapters), NF4 weights dequantized, every linear layer a plain nn.Linear,
    the model cast to `dtype` (default: its dense dtype). Afterwards minift.save writes it."""
    from minift.peft.qlora import merge_qlora

    extra = unfoldable_modules(model)
    if extra:
        raise ValueError(f"the model has {extra[0]} ({adapter_layers(model)[extra[0]].adapter_kind}), which cannot be folded "
                         "into a Hugging Face model; keep it as minift files (a run's final/ directory) instead")
    return merge_qlora(model, dtype)


class PhaseBar:
    """A bar over a command's phases (fold, write, read back...): each can take minutes on a large model.
    Shown on a terminal only (tqdm's disable=None), so piped output and tests see nothing of it.

        bar = PhaseBar("export", 3)
        with bar.phase("writing out/"):      # the label shows while the phase runs; the bar advances after it
            save(...)
    """

    def __init__(self, desc: str, phases: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=phases, desc=desc, unit="phase", disable=None, leave=False,
                        bar_format="{desc}: {n}/{total} phases {postfix} [{elapsed}]")

    @contextlib.contextmanager
    def phase(self, label: str):
        self.bar.set_postfix_str(label)
        yield
        self.bar.update()
        if self.bar.n >= self.bar.total:
            self.bar.close()


def write_dense(model: nn.Module, tokenizer, out: Path, dtype: torch.dtype | None, report: Report) -> nn.Module:
    """Fold `model` (in place), save it to `out`, read it back and compare all three outputs."""
    bar = PhaseBar("export", 3)
    ids, logits = probe_ids(tokenizer, model.config.vocab_size), has_logits(model)
    before = outputs(model, ids)
    with bar.phase("folding adapters"):
        fold_into_dense(model, dtype)
    with bar.phase(f"writing {out}"):
        save(model, tokenizer, out)
    with bar.phase("reading back"):
        reloaded, _ = load(out)
    loader = "AutoModelForCausalLM" if has_logits(model) else "AutoModel"
    report.lines.append(f"wrote {out} ({megabytes(file_bytes(out))}, {str(next(model.parameters()).dtype)[6:]}); "
                        f"transformers.{loader}.from_pretrained reads it")
    compare("merged vs before", before, outputs(model, ids), report, logits)
    compare(f"{out} read back vs before", before, outputs(reloaded, ids), report, logits)
    return model


def write_gguf_file(model: nn.Module, tokenizer, out: Path, quant: str, report: Report) -> nn.Module:
    """Fold `model` (in place, float32), write it as GGUF at `quant`, read the file back and compare outputs."""
    from minift.io.gguf_write import QUANTS, check_exportable, export_gguf

    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    if not has_logits(model):
        raise ValueError(f"--format gguf writes causal language models; this model (model_type "
                         f"{model.config.model_type!r}) has no language-model head")
    check_exportable(model.config)  # before the slow part
    bar = PhaseBar("export", 3)
    ids = probe_ids(tokenizer, model.config.vocab_size)
    before = outputs(model, ids)
    with bar.phase("folding adapters"):
        fold_into_dense(model, torch.float32)
    with bar.phase(f"writing {out} ({quant})"):
        export_gguf(model, tokenizer, out, quant)
    with bar.phase("reading back"):
        reloaded, _ = load(out)
    report.lines.append(f"wrote {out} ({megabytes(file_bytes(out))}, {quant}); llama.cpp runs it "
                        f"(llama-cli -m {out}); minift reads it back (minift generate --model {out})")
    compare("merged vs before", before, outputs(model, ids), report, True)
    compare(f"{out} read back vs before", before, outputs(reloaded, ids), report, True)
    return model


# ----------------------------------------------------------------------------------------------------
# The three commands
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize(source: str | Path, out: str | Path, blocksize: int = 64, double_quant: bool = True,
             dtype: str | None = None) -> Report:
    """Quantize every linear layer but lm_head to NF4, write a 4-bit directory, read it back and compare.

    `dtype` is the dtype the model is loaded in: it is what the embeddings, norms and lm_head keep, and
    the dtype the NF4 layers dequantize to (default: the source's own, float32 for GGUF files)."""
    from minift.quant.linear import quantize_model

    out = check_output_directory(out, source)
    bar = PhaseBar("quantize", 5)
    with bar.phase(f"loading {source}"):
        model, tokenizer = load_source(source, dtype=parse_dtype(dtype, "--dtype"))
    if nf4_layers(model):
        raise ValueError(f"{source} is already quantized (it has NF4 layers); quantize the dense model instead")
    report = Report(out, [f"quantize {source} -> {out} (NF4, blocksize {blocksize}, "
                          f"double quantization {'on' if double_quant else 'off'})"])
    ids, logits = probe_ids(tokenizer, model.config.vocab_size), has_logits(model)
    before = outputs(model, ids)
    dense = {name: module.weight for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with bar.phase("quantizing to NF4"):
        stats = quantize_model(model, blocksize=blocksize, double_quant=double_quant)
    if not stats.quantized:
        raise ValueError(f"{source}: no linear layer could be quantized ({stats.skipped or 'none found'})")
    max_error, error_sum = 0.0, 0.0
    with bar.phase("measuring the weight error"):
        for name, layer in nf4_layers(model).items():
            error = (dense.pop(name).float() - layer.dequantize(torch.float32)).abs()  # (out, in)
            max_error, error_sum = max(max_error, error.max().item()), error_sum + error.sum().item()
    with bar.phase(f"writing {out}"):
        save_quantized(model, tokenizer, out)
    with bar.phase("reading back"):
        reloaded, _ = load_quantized(out)

    report.lines += [f"  {line.strip()}" for line in str(stats).splitlines()]
    rest_dtype = next(model.parameters()).dtype
    hint = "; the layers left dense stay float32 (--dtype bfloat16 halves them)" if rest_dtype == torch.float32 else ""
    report.lines.append(f"  on disk: {megabytes(file_bytes(source))} -> {megabytes(file_bytes(out))} "
                        f"({out / 'model.safetensors'}{hint})")
    report.lines.append(f"  weight error |W - dequantize(W_nf4)|: max {max_error:.4g}, "
                        f"mean {error_sum / max(stats.quantized_params, 1):.4g}")
    quantized = outputs(model, ids)
    compare("NF4 vs dense", before, quantized, report, logits)
    compare(f"{out} read back vs NF4 in memory", quantized, outputs(reloaded, ids), report, logits)
    report.lines.append(f"  load it: minift generate --model {out} ...; transformers + bitsandbytes: "
                        "AutoModelForCausalLM.from_pretrained(dir)")
    return report


def merge(source: str | Path, adapter: str | Path, out: str | Path, dtype: str | None = None) -> Report:
    """Load `source`, add the PEFT LoRA or IA3 adapter in `adapter`, fold it in, write a dense Hugging Face directory."""
    from minift.peft import load_adapter

    out = check_output_directory(out, source, adapter)
    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: not a directory (expected a PEFT adapter directory with "
                                "adapter_config.json and adapter_model.safetensors)")
    model, tokenizer = load_source(source)
    load_adapter(model, adapter)
    report = Report(out, [f"merge {adapter} into {source} -> {out}"])
    write_dense(model, tokenizer, out, parse_dtype(dtype, "--dtype"), report)
    return report


def export_model(source: str | Path, out: str | Path, adapter: str | Path | None = None, format: str = "hf",
                 dtype: str | None = None, quant: str | None = None) -> Report:
    """Any source minift loads (+ an optional adapter) as a dense Hugging Face directory, or a GGUF file."""
    check_format(format)
    quant = gguf_quant(format, quant, dtype)
    if format == "gguf":
        from minift.peft import load_adapter

        out = check_output_file(out, source, adapter)
        model, tokenizer = load_source(source)
        if adapter is not None:
            load_adapter(model, adapter)
        report = Report(out, [f"export {source}{f' + {adapter}' if adapter else ''} -> {out} (GGUF, {quant})"])
        write_gguf_file(model, tokenizer, out, quant, report)
        return report
    if format == "peft":
        raise ValueError("--format peft exports the LoRA adapter of a fine-tuning run (--run RUN_DIR); with "
                         "--model there is no trained adapter to export (an --adapter directory already is one)")
    if adapter is not None:
        return merge(source, adapter, out, dtype)
    out = check_output_directory(out, source)
    model, tokenizer = load_source(source)
    report = Report(out, [f"export {source} -> {out} (Hugging Face directory)"])
    write_dense(model, tokenizer, out, parse_dtype(dtype, "--dtype"), report)
    return report


def export_run(run_dir: str | Path, out: str | Path, format: str = "hf", dtype: str | None = None,
               quant: str | None = None) -> Report:
    """A fine-tuning run's latest checkpoint as a dense Hugging Face directory (any foldable method) with the
    task head beside it, or (--format peft) its LoRA or (IA)^3 adapter as a PEFT adapter directory."""
    from minift.train.tasks import save_head
    from minift.train import load_trained

    check_format(format)
    quant = gguf_quant(format, quant, dtype)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: not a directory (expected a `minift finetune` output_dir)")
    out = check_output_file(out, run_dir) if format == "gguf" else check_output_directory(out, run_dir)
    task_model, tokenizer, config, labels = load_trained(run_dir)
    backbone, method = task_model.backbone, config.method.name
    report = Report(out, [f"export run {run_dir} (method {method}, task {task_model.kind}) -> {out} ({format})"])
    if format == "peft":
        kinds = {layer.adapter_kind for layer in adapter_layers(backbone).values()}
        if not kinds or not kinds <= {"lora", "ia3"}:
            raise ValueError(f"--format peft: run {run_dir} used method {method!r}, which has no LoRA or (IA)^3 "
                             "adapter (PEFT's file formats); use --format hf")
        export_adapter(backbone, tokenizer, out, config.model.source, report)
        return report
    if unfoldable_modules(backbone):
        raise ValueError(f"run {run_dir} used method {method!r} (bottleneck adapters or a soft prompt), which has "
                         f"no Hugging Face equivalent; its trained tensors are in {run_dir / 'final'} for minift "
                         "(minift.peft.load_adapter reads them)")
    if format == "gguf":
        if task_model.kind != "causal_lm":
            raise ValueError(f"--format gguf: run {run_dir} trained a {task_model.kind} head, which llama.cpp "
                             "cannot run; export it with --format hf")
        write_gguf_file(backbone, tokenizer, out, quant, report)
        return report
    chosen = parse_dtype(dtype, "--dtype") or parse_dtype(config.method.options.get("export_dtype"), "method.export_dtype")
    write_dense(backbone, tokenizer, out, chosen, report)
    if task_model.kind != "causal_lm":
        save_head(task_model, out, labels)
        report.lines.append(f"  task head: {out / 'task.json'}, {out / 'head.safetensors'} "
                            f"(minift eval --model {out} reads them; transformers loads the backbone only)")
    return report


def export_adapter(backbone: nn.Module, tokenizer, out: Path, base: str, report: Report) -> None:
    """Write the active LoRA (or (IA)^3) adapter in PEFT's format, then load the files onto a copy and compare."""
    from minift.peft import load_adapter, save_adapter, set_adapter
    from minift.peft.ia3 import remove_ia3

    save_adapter(backbone, out, base_model_name_or_path=str(base))
    report.lines.append(f"wrote {out} (adapter_config.json + adapter_model.safetensors, "
                        f"{megabytes(file_bytes(out))}); peft.PeftModel.from_pretrained(base, dir) reads it")
    ids = probe_ids(tokenizer, backbone.config.vocab_size)
    check = copy.deepcopy(backbone)
    if any(layer.adapter_kind == "ia3" for layer in adapter_layers(check).values()):
        load_adapter(remove_ia3(check), out)  # the file's vectors on the bare base
    else:  # the run's adapter stays as "default"; the file's is added beside it
        load_adapter(check, out, adapter_name="from_file")
        set_adapter(check, "from_file", trainable=False)
    compare(f"{out} read back vs the run", outputs(backbone, ids), outputs(check, ids), report, has_logits(backbone))


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not supported; choose one of {', '.join(FORMATS)}")


def gguf_quant(format: str, quant: str | None, dtype: str | None) -> str | None:
    """--quant belongs to --format gguf, and --dtype does not: refuse the other pairings (before any work);
    returns the storage type (default f16) for gguf, None otherwise."""
    if format != "gguf":
        if quant is not None:
            raise ValueError(f"--quant {quant} goes with --format gguf; --format {format} does not quantize")
        return None
    if dtype is not None:
        raise ValueError(f"--dtype {dtype} does not apply to --format gguf: --quant chooses how the matrices are "
                         "stored (f16, q8_0, q4_0, q4_k) and norms stay float32")
    return quant or "f16"
