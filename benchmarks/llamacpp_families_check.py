"""llama.cpp runs minift's Gemma 1/2/3 and Phi-3 GGUF exports (outside the test suite).

The tiny random models of tests/test_gguf_families.py (transformers models converted the way llama.cpp's
converter does, then loaded by minift) are exported by `minift.io.gguf_write.export_gguf` at f16 and q8_0 and
given to llama.cpp through llama-cpp-python. For each file and prompt: does llama.cpp tokenize the prompt as
minift does (its SentencePiece "llama" vocabulary rebuilt from the scores minift wrote), the max |logit
difference| over the prompt, and whether the greedy continuations (argmax of llama.cpp's raw logits vs minift's
`generate` at temperature 0) are identical. Random weights make near-ties likely, so the top-2 gap is printed
where they differ. Run as benchmarks/llamacpp_check.py is (see its docstring for the llama_cpp build):

    LD_LIBRARY_PATH=/work/llamacpp-src/llama_cpp/lib .venv/bin/python benchmarks/llamacpp_families_check.py \\
        --path /work/llamacpp-src --path /work/llamacpp-deps
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import minift  # noqa: E402
from benchmarks.llamacpp_check import import_llama_cpp, llama_greedy, minift_greedy  # noqa: E402
from minift.io.gguf_write import export_gguf  # noqa: E402
from tests.test_gguf_families import convert, tiny_hf  # noqa: E402

PROMPTS = ["the tin then the hint", "he in the  ant", "a thing é 東"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp-venv", default="/work/llamacpp-venv", type=Path)
    parser.add_argument("--path", action="append", type=Path, default=[])
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    llama_cpp = import_llama_cpp(args.llamacpp_venv, args.path)
    start = time.time()
    rows = ["| file | prompt | tokens | same tokenization | prompt logits max diff | greedy continuation |",
            "| --- | --- | ---: | --- | ---: | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("gemma", "gemma2", "gemma3", "phi3"):
            source = convert(tiny_hf(arch), arch, Path(tmp) / f"{arch}-source.gguf")
            model, tokenizer = minift.load(source)
            for quant in ("f16", "q8_0"):
                path = export_gguf(model, tokenizer, Path(tmp) / f"{arch}-{quant}.gguf", quant)
                ours_model, ours_tok = minift.load(path)
                ours_model.eval()
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                                      seed=0)
                for text in PROMPTS:
                    ids = ours_tok.encode(text, add_special_tokens=True)
                    theirs_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
                    ours, ours_logits = minift_greedy(ours_model, ids, args.tokens, ours_tok.eos_token_id)
                    theirs, theirs_logits = llama_greedy(llm, ids, args.tokens, ours_tok.eos_token_id)
                    diff = float(np.abs(theirs_logits[:len(ids)] - ours_logits[:len(ids)].numpy()).max())
                    if ours == theirs:
                        verdict = "identical"
                    else:
                        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
                        if k is None:
                            verdict = f"one stops early: lengths {len(ours)} vs {len(theirs)}"
                        else:
                            top = torch.topk(ours_logits[len(ids) + k - 1], 2).values
                            verdict = (f"first differs at token {k} (minift {ours[k]}, llama.cpp {theirs[k]}); "
                                       f"minift's top-2 gap there {float(top[0] - top[1]):.4f}")
                    rows.append(f"| {path.name} | {text!r} | {len(ids)} | {'yes' if ids == theirs_ids else 'NO'} "
                                f"| {diff:.3g} | {verdict} |")
                del llm
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"llama-cpp-python {llama_cpp.__version__}; load average {Path('/proc/loadavg').read_text().split()[0]}; "
          f"{time.time() - start:.0f} s\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
