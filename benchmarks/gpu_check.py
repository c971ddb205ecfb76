"""One command that checks minift's GPU claims on a bare H100 or H200, in under 8 minutes.

    python benchmarks/gpu_check.py            # on the GPU machine: writes benchmarks/results/gpu_check_<gpu>.md
    python benchmarks/gpu_check.py --dry      # anywhere: every step on tiny shapes, CPU, Triton interpreter

The machine needs torch, triton, bitsandbytes, transformers and peft (no internet: nothing is downloaded;
the model is a random SmolLM2-135M-shaped checkpoint written to a temporary folder). It runs, in order:

    1. the GPU tests             pytest -m gpu on the test files that hold @pytest.mark.gpu tests
    2. NF4 GEMV / GEMM           minift's Triton kernels vs bitsandbytes vs cuBLAS bf16 on Llama-7B layers
                                 (4096 x 4096, 11008 x 4096, 4096 x 11008), M = 1 and M = 4096, bf16
    3. fused loss                minift.fused_loss.linear_cross_entropy vs lm_head + F.cross_entropy at
                                 SmolLM2's vocabulary (49,152), forward + backward: time and peak memory
    4. QLoRA training step       minift vs transformers + PEFT + bitsandbytes on the same checkpoint:
                                 tokens/s and peak GPU memory (model + the step's own high-water mark)

and prints one pass/fail table against the targets of the NF4 issue:

    GEMV (M = 1)          >= 85% of HBM bandwidth (roofline bound / time, benchmarks/roofline.py) and
                          >= 1.5x bitsandbytes
    GEMM (M = 4096)       >= 0.9x cuBLAS bf16 on the unquantized weight
    fused loss            peak memory <= 0.5x the unfused loss's, same loss
    QLoRA step            >= 1.5x the tokens/s of transformers + PEFT + bitsandbytes

Dry mode runs the same steps on tiny shapes on the CPU with TRITON_INTERPRET=1 (the GPU tests are only
collected, not run, since they skip without CUDA): it proves the script works end to end before a GPU is
lent, and its ratios mean nothing (the table says "dry" instead of pass/fail). tests/test_gpu_check.py runs it.

Timing on the GPU: medians of CUDA-graph replays (triton.testing.do_bench_cudagraph) where the call can be
captured, else of plain launches; training steps are timed alternately (A B A B ...) after a warm-up step.
Each step has a time budget, and the whole run stops starting new steps after --budget seconds (360 by
default), so it ends inside 8 minutes even when something is slow; a step cut short says so in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import machine_description, markdown_table, write_result  # noqa: E402

TARGETS = {
    "gemv_bandwidth": 0.85,  # fraction of the HBM roofline bound
    "gemv_vs_bnb": 1.5,
    "gemm_vs_cublas": 0.9,
    "loss_memory": 0.5,  # fused peak / unfused peak, at most
    "qlora_vs_reference": 1.5,
}
FULL = dict(shapes=[(4096, 4096), (11008, 4096), (4096, 11008)], gemv_rows=1, gemm_rows=4096,
            loss=dict(tokens=8192, dim=576, vocab=49152), model=dict(vocab=49152, dim=576, layers=30, heads=9,
                                                                       kv_heads=3, hidden=1536),
            batch=8, seq=512, steps=6)
DRY = dict(shapes=[(96, 128)], gemv_rows=1, gemm_rows=32, loss=dict(tokens=48, dim=32, vocab=320),
           model=dict(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, hidden=128), batch=2, seq=16, steps=1)


class Check:
    """The rows of the final table, added as the steps run."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.rows: list[list[str]] = []

    def add(self, step: str, what: str, measured: str, target: str, passed: bool | None, note: str = "") -> None:
        verdict = "dry" if self.dry and passed is not None else ("pass" if passed else "FAIL") if passed is not None \
            else "-"
        self.rows.append([step, what, measured, target, verdict, note])
        print(f"  [{verdict}] {step}: {what}: {measured} (target {target}) {note}", flush=True)

    def failed(self) -> bool:
        return any(row[4] == "FAIL" for row in self.rows)


# ---------------------------------------------------------------- timing


def median_seconds(fn, device: str, reps: int, graph: bool = True) -> float:
    """Median seconds of fn(): CUDA graphs (graph=True, when capturable) or launches on a GPU, wall clock on
    the CPU (dry). Calls with autograd inside are timed without graphs."""
    if device == "cuda":
        import torch
        import triton.testing

        fn()
        torch.cuda.synchronize()
        try:
            if not graph:
                raise RuntimeError("timed with plain launches")
            return triton.testing.do_bench_cudagraph(fn, rep=50) / 1e3
        except Exception:  # noqa: BLE001 - not capturable (bitsandbytes, allocations): plain launches
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=10, rep=50) / 1e3
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn, device: str) -> int | None:
    """Peak GPU memory allocated while fn() runs, above what was allocated before; None on the CPU."""
    if device != "cuda":
        fn()
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------- step 1: the GPU tests


def gpu_test_files() -> list[str]:
    """tests/*.py that hold @pytest.mark.gpu tests."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def step_gpu_tests(check: Check, dry: bool, timeout: float) -> None:
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    if dry:
        command.append("--collect-only")  # they skip without CUDA: only check that they are found
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        check.add("1 GPU tests", "pytest -m gpu", f"timed out after {timeout:.0f} s", "all pass", False)
        return
    summary = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    if dry:
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
        check.add("1 GPU tests", f"pytest -m gpu ({len(files)} files), collected only",
                  f"{found.group(1) if found else 0} tests", "all pass", code == 0 and found is not None,
                  summary[0])
    else:
        check.add("1 GPU tests", f"pytest -m gpu ({len(files)} files)", summary[0], "all pass",
                  code == 0 and "passed" in output and "skipped" not in summary[0])


# ---------------------------------------------------------------- step 2: NF4 GEMV / GEMM


def step_nf4(check: Check, dry: bool, device: str, sizes: dict, gpu: str | None) -> None:
    import torch
    import torch.nn.functional as F

    from minift.kernels import nf4_matmul
    from minift.quant import quantize_nf4
    from roofline import work

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        bnb = None
    for N, K in sizes["shapes"]:
        torch.manual_seed(0)
        weight = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)  # (N, K)
        q = quantize_nf4(weight, blocksize=64, double_quant=True)
        bnb_weight = bnb_state = None
        if bnb is not None:
            bnb_weight, bnb_state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                                 quant_type="nf4", quant_storage=torch.uint8)
        for M, kind in ((sizes["gemv_rows"], "GEMV"), (sizes["gemm_rows"], "GEMM")):
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)  # (M, K)
            with torch.no_grad():
                expected = x.float() @ q.dequantize(torch.float32).T  # (M, N)
                error = ((nf4_matmul(x, q).float() - expected).abs().max() / expected.abs().max()).item()
                reps = 1 if dry else 3
                times = {"minift": median_seconds(lambda: nf4_matmul(x, q), device, reps),
                         "cublas": median_seconds(lambda: F.linear(x, weight), device, reps)}
                if bnb is not None:
                    times["bnb"] = median_seconds(lambda: bnb.matmul_4bit(x, bnb_weight, quant_state=bnb_state),
                                                  device, reps)
            label = f"{N} x {K}, M = {M}"
            correct = error < 2e-2
            if kind == "GEMV":
                bound = work("gemv", N, K, M).bound_seconds(gpu) if gpu else None
                share = bound / times["minift"] if bound else None
                check.add("2 NF4 GEMV", f"{label}: roofline share ({gpu or 'no datasheet figures'})",
                          f"{share:.0%} ({times['minift'] * 1e6:.1f} us)" if share else
                          f"{times['minift'] * 1e6:.1f} us", f">= {TARGETS['gemv_bandwidth']:.0%}",
                          (share or 0) >= TARGETS["gemv_bandwidth"] and correct, f"rel. error {error:.1e}")
                if "bnb" in times:
                    ratio = times["bnb"] / times["minift"]
                    check.add("2 NF4 GEMV", f"{label}: vs bitsandbytes", f"{ratio:.2f}x "
                              f"({times['bnb'] * 1e6:.1f} us)", f">= {TARGETS['gemv_vs_bnb']}x",
                              ratio >= TARGETS["gemv_vs_bnb"] and correct)
                else:
                    check.add("2 NF4 GEMV", f"{label}: vs bitsandbytes", "bitsandbytes not installed",
                              f">= {TARGETS['gemv_vs_bnb']}x", False)
            else:
                ratio = times["cublas"] / times["minift"]
                check.add("2 NF4 GEMM", f"{label}: vs cuBLAS bf16", f"{ratio:.2f}x ({times['minift'] * 1e6:.1f} vs "
                          f"{times['cublas'] * 1e6:.1f} us)", f">= {TARGETS['gemm_vs_cublas']}x",
                          ratio >= TARGETS["gemm_vs_cublas"] and correct,
                          f"rel. error {error:.1e}" + (f"; bitsandbytes {times['bnb'] * 1e6:.1f} us"
                                                       if "bnb" in times else ""))
            del x
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- step 3: fused loss


def fused_loss_function():
    """minift's fused linear + cross-entropy, or None while it is not in this tree."""
    try:
        from minift.fused_loss import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy


def step_fused_loss(check: Check, dry: bool, device: str, sizes: dict) -> None:
    import torch
    import torch.nn.functional as F

    fused = fused_loss_function()
    if fused is None:
        check.add("3 fused loss", "minift.fused_loss.linear_cross_entropy", "not present", "<= 0.5x memory", None)
        return
    tokens, dim, vocab = sizes["loss"]["tokens"], sizes["loss"]["dim"], sizes["loss"]["vocab"]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)  # (T, d)
    weight = (torch.randn(vocab, dim, device=device) * 0.02).to(dtype)  # (V, d) frozen, as with LoRA
    targets = torch.randint(0, vocab, (tokens,), device=device)  # (T,)

    def unfused():
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        loss.backward()
        return loss

    backend = "triton" if dry else "auto"  # dry: the Triton kernel under the interpreter

    def fused_step():
        loss = fused(hidden, weight, targets, reduction="sum", backend=backend)
        loss.backward()
        return loss

    results = {}
    for name, fn in (("unfused", unfused), ("fused", fused_step)):
        hidden.grad = None
        loss = fn()
        results[name] = dict(loss=loss.item(), grad=hidden.grad.float().clone())
        hidden.grad = None
        results[name]["peak"] = peak_bytes(fn, device)
        hidden.grad = None
        results[name]["seconds"] = median_seconds(fn, device, 1 if dry else 3, graph=False)
        hidden.grad = None
    same = abs(results["fused"]["loss"] - results["unfused"]["loss"]) <= 1e-3 * abs(results["unfused"]["loss"])
    grad_error = ((results["fused"]["grad"] - results["unfused"]["grad"]).abs().max()
                  / results["unfused"]["grad"].abs().max()).item()
    timing = f"{results['fused']['seconds'] * 1e3:.2f} vs {results['unfused']['seconds'] * 1e3:.2f} ms"
    if results["fused"]["peak"] is None:
        check.add("3 fused loss", f"{tokens} tokens x vocab {vocab}: peak memory", "not measured on the CPU",
                  f"<= {TARGETS['loss_memory']}x unfused", same, f"{timing}; grad rel. error {grad_error:.1e}")
        return
    ratio = results["fused"]["peak"] / results["unfused"]["peak"]
    check.add("3 fused loss", f"{tokens} tokens x vocab {vocab}: peak memory fused / unfused",
              f"{ratio:.2f}x ({results['fused']['peak'] / 2**20:.0f} vs {results['unfused']['peak'] / 2**20:.0f} MiB)",
              f"<= {TARGETS['loss_memory']}x", ratio <= TARGETS["loss_memory"] and same and grad_error < 2e-2,
              f"{timing}; loss {results['fused']['loss']:.4g} vs {results['unfused']['loss']:.4g}; "
              f"grad rel. error {grad_error:.1e}")


# ---------------------------------------------------------------- step 4: QLoRA training step


def write_checkpoint(directory: str, shape: dict) -> None:
    """A random Llama with `shape` (SmolLM2-135M's in the full run), written with save_pretrained."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["dim"],
                                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                      num_key_value_heads=shape["kv_heads"], intermediate_size=shape["hidden"],
                                      tie_word_embeddings=True, rope_theta=1e5, rms_norm_eps=1e-5,
                                      max_position_embeddings=2048)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def build_qlora(provider: str, directory: str, device: str):
    """(trainable model, loss of (ids, labels)) for 'minift' or 'reference' (transformers + PEFT + bnb):
    NF4 blocksize 64 with double quantization, bf16 compute (float32 on the CPU), LoRA r 8 on all linears."""
    import torch

    compute = "bfloat16" if device == "cuda" else "float32"
    if provider == "minift":
        import minift
        from minift.train.methods import prepare_method
        from minift.train.tasks import build_task_model

        model, _ = minift.load(directory)
        prepare_method("qlora", model, {"r": 8, "alpha": 16, "targets": "all-linear", "blocksize": 64,
                                        "double_quant": True, "compute_dtype": compute})
        model.to(device)
        task_model = build_task_model(model, "causal_lm")

        def loss_of(ids, labels):
            out = task_model({"input_ids": ids, "labels": labels})
            return out.loss_sum / out.n_targets

        return model.train(), loss_of
    import peft
    import transformers

    transformers.utils.logging.disable_progress_bar()
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=getattr(torch, compute))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map=device,
                                                              quantization_config=quantization)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

    def loss_of(ids, labels):
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    return model.train(), loss_of


def step_qlora(check: Check, dry: bool, device: str, sizes: dict) -> None:
    import torch

    providers = ("minift", "reference")
    shape = sizes["model"]
    missing = [m for m in ("transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        check.add("4 QLoRA step", "tokens/s vs transformers + PEFT + bitsandbytes", f"{', '.join(missing)} not "
                  "installed", f">= {TARGETS['qlora_vs_reference']}x", False)
        return
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, shape)
        ids = torch.randint(0, shape["vocab"], (sizes["batch"], sizes["seq"]),
                            generator=torch.Generator().manual_seed(1)).to(device)
        steps, resident, peaks, losses = {}, {}, {}, {}
        for provider in providers:
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            model, loss_of = build_qlora(provider, directory, device)
            resident[provider] = (torch.cuda.memory_allocated() - before) if device == "cuda" else None
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4)

            def train_step(loss_of=loss_of, optimizer=optimizer):
                loss = loss_of(ids, ids)  # every token a target
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.item()

            losses[provider] = train_step()  # warm-up: compiles and autotunes the kernels
            steps[provider] = (train_step, [])
            peaks[provider] = peak_bytes(train_step, device)
        for _ in range(sizes["steps"]):  # alternate A B A B so drift hits both alike
            for provider in providers:
                fn, times = steps[provider]
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    tokens = sizes["batch"] * sizes["seq"]
    speed = {p: tokens / statistics.median(steps[p][1]) for p in providers}
    ratio = speed["minift"] / speed["reference"]
    close = abs(losses["minift"] - losses["reference"]) <= 0.05 * abs(losses["reference"])
    memory = ""
    if device == "cuda":
        total = {p: (resident[p] + peaks[p]) / 2**20 for p in providers}
        memory = (f"; peak memory (model + step) minift {total['minift']:.0f} MiB vs reference "
                  f"{total['reference']:.0f} MiB ({total['minift'] / total['reference']:.2f}x)")
    check.add("4 QLoRA step", f"{shape['layers']} layers, d {shape['dim']}, vocab {shape['vocab']}, "
              f"{sizes['batch']} x {sizes['seq']} tokens: tokens/s vs transformers + PEFT + bitsandbytes",
              f"{ratio:.2f}x ({speed['minift']:.0f} vs {speed['reference']:.0f} tokens/s)",
              f">= {TARGETS['qlora_vs_reference']}x", ratio >= TARGETS["qlora_vs_reference"] and close,
              f"first loss {losses['minift']:.4f} vs {losses['reference']:.4f}{memory}")


# ---------------------------------------------------------------- driver


def ensure_minift() -> bool:
    """minift.kernels needs the package installed (pyproject maps kernels/ to it). On a bare machine, install
    this checkout in place, without dependencies or downloads; False if that is not possible."""
    try:
        import minift.kernels  # noqa: F401

        return True
    except ImportError:
        pass
    print("gpu_check: minift is not installed here; pip install --no-deps --no-build-isolation -e .", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                           str(ROOT)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return False
    import importlib
    import site

    importlib.reload(site)  # pick up the new .pth file in this process
    importlib.invalidate_caches()
    try:
        import minift.kernels  # noqa: F401, F811
    except ImportError:
        return False
    return True


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run(dry: bool = False, budget: float = 360.0, out: str | None = None) -> int:
    """Run the four steps; returns 0 when every check passes (always 0 in dry mode unless a step crashed)."""
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are imported (first nf4_matmul)
    import torch

    from roofline import gpu_for

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on the GPU machine, or use --dry to check the script itself")
        return 2
    if not ensure_minift():
        print("gpu_check: could not make minift importable; install it with pip install -e . and rerun")
        return 2
    name = "dry" if dry else torch.cuda.get_device_name(0)
    gpu = None if dry else gpu_for(name)
    sizes = DRY if dry else FULL
    check = Check(dry)
    started = time.perf_counter()
    print(f"gpu_check on {name}{' (dry: tiny shapes, CPU, Triton interpreter; ratios meaningless)' if dry else ''}",
          flush=True)
    steps = [("1 GPU tests", lambda: step_gpu_tests(check, dry, timeout=max(30.0, budget * 0.5))),
             ("2 NF4 GEMV/GEMM", lambda: step_nf4(check, dry, device, sizes, gpu)),
             ("3 fused loss", lambda: step_fused_loss(check, dry, device, sizes)),
             ("4 QLoRA step", lambda: step_qlora(check, dry, device, sizes))]
    for label, step in steps:
        elapsed = time.perf_counter() - started
        if elapsed > budget:
            check.add(label, "not run", f"time budget of {budget:.0f} s spent", "-", False)
            continue
        print(f"== {label} ({elapsed:.0f} s so far)", flush=True)
        try:
            step()
        except Exception as error:  # noqa: BLE001 - a crashed step is a failed row, the others still run
            check.rows.append([label, "crashed", f"{type(error).__name__}: {str(error)[:300]}", "-", "FAIL", ""])
            print(f"  [FAIL] {label} crashed: {type(error).__name__}: {error}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    table = markdown_table(["step", "check", "measured", "target", "result", "notes"], check.rows)
    text = "\n".join([
        f"# GPU check on {name}" + (" (dry run: tiny shapes on the CPU; ratios meaningless)" if dry else ""), "",
        f"Machine: {machine_description()}", f"Command: python benchmarks/gpu_check.py{' --dry' if dry else ''}; "
        f"wall time {seconds:.0f} s.", "", table, ""])
    print("\n" + table)
    filename = f"gpu_check_{device_slug(name)}.md"
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / filename).write_text(text)
        print(f"wrote {Path(out) / filename}")
    else:
        write_result(filename, text)
    return 1 if check.failed() and not dry else (1 if any(r[1] == "crashed" for r in check.rows) else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds after which no new step starts")
    parser.add_argument("--out", help="folder for the result file (default benchmarks/results)")
    args = parser.parse_args(argv)
    return run(dry=args.dry, budget=args.budget, out=args.out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
