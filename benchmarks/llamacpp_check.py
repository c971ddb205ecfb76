"""llama.cpp runs minift's GGUF exports: greedy tokens, logits and quantized bytes compared (outside the suite).

What it checks, on the bundled SmolLM2-135M-Instruct exported by `minift export --format gguf`:

1. tokenization: llama.cpp's tokenizer (built from the file's tokenizer.ggml.* keys) gives the ids minift's gives;
2. greedy decoding: for each prompt, llama.cpp's argmax tokens (its own logits, no sampler) against minift's
   `generate` on the same file, for the f16, q8_0, q4_0 and q4_k exports; the first position where they part
   is listed with minift's top-2 logit gap there;
3. logits over the prompt: max |llama.cpp - minift| per file;
4. quantizer bytes: minift's Q8_0, Q4_0 and Q4_K against ggml's own `ggml_quantize_chunk` (the C code
   llama-quantize runs) on SmolLM2's MLP weights and on random data: share of blocks byte-identical, and
   the weight error of each.

llama-cpp-python is not a minift dependency. Install it into its own venv (it compiles llama.cpp):

    python3 -m venv /work/llamacpp-venv && /work/llamacpp-venv/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/llamacpp_check.py --llamacpp-venv /work/llamacpp-venv

The script runs in minift's .venv and appends that venv's site-packages to sys.path (after minift's own, so
numpy and friends stay minift's). If pip's build was stopped once libllama and libggml were linked (it goes
on to build llama-common and the multimodal library, which llama_cpp imports only on demand), copy the
package source and those libraries and point --path at them:

    cp -r <pip build dir>/llama_cpp /work/llamacpp-src/ && cp -a <cmake build>/bin/*.so* /work/llamacpp-src/llama_cpp/lib/
    pip install --no-deps --target /work/llamacpp-deps diskcache        # llama_cpp's one import outside the stdlib
    LD_LIBRARY_PATH=/work/llamacpp-src/llama_cpp/lib .venv/bin/python benchmarks/llamacpp_check.py \
        --path /work/llamacpp-src --path /work/llamacpp-deps

Results: benchmarks/results/llamacpp_check.md.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import minift  # noqa: E402
from minift.io.gguf import dequantize  # noqa: E402
from minift.io.gguf_write import export_gguf, quantize  # noqa: E402

PROMPTS = [  # (label, text, chat?)
    ("chat: capital", "What is the capital of France?", True),
    ("chat: haiku", "Write a haiku about the sea.", True),
    ("plain: story", "Once upon a time, in a small village by the mountains,", False),
    ("plain: code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("plain: list", "Three reasons to learn Python: 1.", False),
]
GGML_TYPE = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12}


def import_llama_cpp(venv: Path, extra: list[Path]):
    """llama_cpp from the venv pip installed it into, or from folders given with --path (a copied llama_cpp
    package whose lib/ holds the libllama / libggml built by pip, and a folder with its pure-Python deps)."""
    for site in glob.glob(str(venv / "lib" / "python*" / "site-packages")) + [str(p) for p in extra]:
        sys.path.append(site)  # after minift's own paths: numpy and friends stay minift's
    try:
        import llama_cpp
    except ImportError as error:
        raise SystemExit(f"llama_cpp cannot be imported ({error}); install llama-cpp-python into {venv} first")
    return llama_cpp


def minift_greedy(model, prompt_ids: list[int], n: int, eos: int) -> tuple[list[int], torch.Tensor]:
    """minift's greedy continuation and the logits over prompt + continuation (T, V)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, eos_token_id=eos)[0, len(prompt_ids):].tolist()
        if eos in out:
            out = out[:out.index(eos) + 1]
        logits = model(torch.tensor([prompt_ids + out]))[0].float()
    return out, logits


def llama_greedy(llm, prompt_ids: list[int], n: int, eos: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's argmax continuation from its raw logits (no sampler), and its logits (T, V)."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out, np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


def compare_file(path: Path, llama_cpp, tokenizer, n_tokens: int, threads: int) -> tuple[list[str], dict]:
    model, file_tokenizer = minift.load(path)
    model.eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False,
                          seed=0)
    eos = tokenizer.eos_token_id
    rows, summary = [], {"same": 0, "prompts": 0, "tokenize_same": 0, "max_prompt_logit_diff": 0.0}
    for label, text, chat in PROMPTS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}]) if chat else text
        ours_ids = file_tokenizer.encode(prompt)
        theirs_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        summary["prompts"] += 1
        summary["tokenize_same"] += ours_ids == list(theirs_ids)
        ours, ours_logits = minift_greedy(model, ours_ids, n_tokens, eos)
        theirs, theirs_logits = llama_greedy(llm, ours_ids, n_tokens, eos)
        length = len(ours_ids)
        prompt_diff = float(np.abs(theirs_logits[:length] - ours_logits[:length].numpy()).max())
        summary["max_prompt_logit_diff"] = max(summary["max_prompt_logit_diff"], prompt_diff)
        same = ours == theirs
        summary["same"] += same
        where = ""
        if not same:
            k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            if k < min(len(ours), len(theirs)):
                row = ours_logits[length + k - 1]  # minift's logits where the choice was made
                top = torch.topk(row, 2)
                where = (f"first differs at token {k}: minift {ours[k]} ({tokenizer.id_to_token(ours[k])!r}), "
                         f"llama.cpp {theirs[k]} ({tokenizer.id_to_token(theirs[k])!r}); minift's top-2 logit gap "
                         f"there {float(top.values[0] - top.values[1]):.3f}")
            else:
                where = f"one stops early: lengths {len(ours)} vs {len(theirs)}"
        rows.append(f"| {path.name} | {label} | {len(ours_ids)} | {'yes' if ours_ids == list(theirs_ids) else 'NO'} "
                    f"| {len(ours)} | {'identical' if same else where} | {prompt_diff:.3g} |")
        rows.append(f"|  |  |  |  |  | minift: {file_tokenizer.decode(ours)!r} |  |")
    del llm
    return rows, summary


def ggml_quantize(lib, type_name: str, x: np.ndarray) -> np.ndarray:
    """ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix=NULL): ggml's own bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, per_row = x.shape
    block, block_bytes = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144)}[type_name]
    dst = np.zeros(rows * per_row // block * block_bytes, dtype=np.uint8)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    written = lib.ggml_quantize_chunk(GGML_TYPE[type_name], x.ctypes.data, dst.ctypes.data, 0, rows, per_row, None)
    assert written == dst.size, (written, dst.size)
    return dst


def compare_quantizers(lib, model) -> list[str]:
    """Share of identical blocks and weight errors, minift's quantizers vs ggml's, on real and random weights."""
    samples = {"SmolLM2 down_proj, blocks 0-3": torch.cat([model.blocks[i].mlp.down_proj.weight.detach()
                                                            for i in range(4)]).float().numpy(),
               "random normal 1024 x 1024": np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)}
    rows = []
    for label, x in samples.items():
        for type_name in ("Q8_0", "Q4_0", "Q4_K"):
            ours = quantize(torch.from_numpy(x), type_name).numpy()
            theirs = ggml_quantize(lib, type_name, x)
            block_bytes = {"Q4_0": 18, "Q8_0": 34, "Q4_K": 144}[type_name]
            same = (ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(1).mean()
            errors = []
            for raw in (ours, theirs):
                back = dequantize(torch.from_numpy(raw.copy()), type_name, x.size).numpy().reshape(x.shape)
                errors.append(float(np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean())))
            rows.append(f"| {label} | {type_name} | {100 * same:.2f}% | {errors[0]:.6f} | {errors[1]:.6f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llamacpp-venv", default="/work/llamacpp-venv", type=Path)
    parser.add_argument("--path", action="append", default=[], type=Path,
                        help="extra folder holding llama_cpp (or its deps); with LD_LIBRARY_PATH=<it>/llama_cpp/lib")
    parser.add_argument("--workdir", default="runs/llamacpp_check", type=Path)
    parser.add_argument("--tokens", default=32, type=int, help="greedy tokens per prompt")
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--quants", default="f16,q8_0,q4_0,q4_k", help="exports to run, joined by commas")
    parser.add_argument("--out", default=HERE / "results" / "llamacpp_check.md", type=Path)
    args = parser.parse_args()
    llama_cpp = import_llama_cpp(args.llamacpp_venv, args.path)
    from common import machine_description

    started = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = minift.load("smollm2-135m")
    files = {}
    for quant in args.quants.split(","):
        files[quant] = export_gguf(model, tokenizer, args.workdir / f"smollm2-135m-{quant}.gguf", quant)
    table, summaries = [], {}
    for quant, path in files.items():
        rows, summaries[quant] = compare_file(path, llama_cpp, tokenizer, args.tokens, args.threads)
        table += rows
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("libggml.*"))
    quant_rows = compare_quantizers(ctypes.CDLL(str(candidates[0])), model) if candidates else [
        f"| (no libggml in {lib_dir}) | | | | |"]
    load = os.getloadavg()
    library_path = os.environ.get("LD_LIBRARY_PATH")
    command = " ".join(([f"LD_LIBRARY_PATH={library_path}"] if library_path else [])
                       + [".venv/bin/python", "benchmarks/llamacpp_check.py", *sys.argv[1:]])
    lines = [
        "# llama.cpp runs minift's GGUF exports", "",
        f"Produced by `{command}` in {time.time() - started:.0f} s.",
        f"Machine: {machine_description()}; load average {load[0]:.1f} (shared with other jobs).",
        f"llama-cpp-python {llama_cpp.__version__} (llama.cpp built from its vendored source by pip, CPU); "
        f"torch {torch.__version__}; model: bundled SmolLM2-135M-Instruct (its Q4_1 file dequantized, then "
        f"exported by minift at {args.quants}).",
        f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()}", "",
        "## Greedy decoding and logits", "",
        f"{args.tokens} greedy tokens per prompt (or up to EOS). llama.cpp's tokens are the argmax of its own "
        "logits (no sampler); minift's come from `generate` (temperature 0) on the model `minift.load` reads "
        "from the same file. The last column is the max |logit difference| over the prompt positions.", "",
        "| file | prompt | prompt tokens | same tokenization | tokens | greedy continuation | prompt logits max diff |",
        "| --- | --- | ---: | --- | ---: | --- | ---: |", *table, ""]
    for quant, s in summaries.items():
        lines.append(f"- {quant}: greedy continuations identical on {s['same']} of {s['prompts']} prompts; "
                     f"tokenization identical on {s['tokenize_same']} of {s['prompts']}; max prompt logit "
                     f"difference {s['max_prompt_logit_diff']:.3g}.")
    lines += ["", "## Quantized bytes: minift vs ggml_quantize_chunk", "",
              "Share of blocks byte-identical, and each side's relative RMS weight error "
              "sqrt(mean((dequant - w)^2) / mean(w^2)).", "",
              "| weights | type | identical blocks | minift error | ggml error |", "| --- | --- | ---: | ---: | ---: |",
              *quant_rows, ""]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
