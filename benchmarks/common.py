"""Shared benchmark plumbing: machine description, isolated runs for fair peak memory, result files.

Every benchmark compares providers side by side in one run and reports ratios. Peak memory is only
comparable when each provider runs in a fresh process, so `run_isolated` starts a child Python that
imports the benchmark module, calls one function, and reports its result plus the child's peak RSS.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_description() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        device += f"; GPU: {torch.cuda.get_device_name(0)}"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def run_isolated(module_path: str, function: str, **kwargs) -> dict:
    """Run `function(**kwargs)` from `module_path` in a fresh interpreter; returns its dict + peak_rss_mb."""
    code = (
        "import json, resource, runpy, sys\n"
        f"ns = runpy.run_path({module_path!r})\n"
        f"result = ns[{function!r}](**json.loads(sys.argv[1]))\n"
        "result['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print('RESULT ' + json.dumps(result))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{function}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (NaN where /proc is missing)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_result(name: str, markdown: str) -> Path:
    """Write under benchmarks/results/, or under $MINIFT_BENCH_RESULTS (run_all --quick uses it so that smoke
    runs never overwrite the recorded full-size results)."""
    directory = Path(os.environ.get("MINIFT_BENCH_RESULTS") or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(markdown)
    print(f"wrote {path}")
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def smollm2_shaped_model(folder: Path, layers: int):
    """A random SmolLM2-shaped Llama (d 576, 9/3 heads, MLP 1536, vocabulary 49,152, tied head) and a word-level
    tokenizer ("w0" .. "w49147" plus <unk> <s> </s> <pad>), saved as a Hugging Face folder `folder`.

    The DPO and GRPO benchmarks feed the same folder to minift and to TRL, so both start from the same weights.
    Returns (words, the transformers tokenizer).
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(49152 - 4)]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=3,
                                      bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return words, tokenizer
