"""Does torchrun with 2 processes write the adapter 1 process writes with the same global batch? (issue 14)

Runs, from the repository root:

    torchrun --standalone --nproc_per_node 2 -m minift finetune CONFIG --set train.max_steps=4 [...]
    python -m minift finetune CONFIG --set train.max_steps=4 --set train.grad_accum_steps=2 [...]

(2 processes x 1 micro-batch = 1 process x 2 micro-batches of the config's batch_size), once as the config
is and once with `--set method.dropout=0`, then prints the largest difference between the two
final/adapter_model.safetensors and between the logged losses. Results: benchmarks/results/distributed.md.

    python benchmarks/distributed_adapter_check.py [--config configs/lora_sft_alpaca.toml] [--steps 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def finetune(command: list[str], out: Path, extra: list[str]) -> float:
    settings = ["--set", f"train.output_dir={out}", "--set", "train.progress_bar=false", *extra]
    began = time.perf_counter()
    subprocess.run([*command, *settings], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def compare(one: Path, two: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(one / "final" / "adapter_model.safetensors"), load_file(two / "final" / "adapter_model.safetensors")
    if set(a) != set(b):
        raise SystemExit(f"the adapters hold different tensors: {sorted(set(a) ^ set(b))[:3]}")
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    losses = [abs(x.get("loss", x.get("eval_loss", 0.0)) - y.get("loss", y.get("eval_loss", 0.0)))
              for x, y in zip(*metrics)]
    return {"tensors": len(a), "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "max_abs_value": max(float(a[k].abs().max()) for k in a),
            "max_rel_l2": max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if float(a[k].norm()) > 0),
            "max_loss_diff": max(losses), "metric_lines": len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/lora_sft_alpaca.toml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="distributed_check_"))
    base = ["-m", "minift", "finetune", args.config, "--set", f"train.max_steps={args.steps}"]
    for tag, extra in (("config", []), ("no_dropout", ["--set", "method.dropout=0"])):
        one = finetune([sys.executable, *base, "--set", "train.grad_accum_steps=2"], out / f"one_{tag}", extra)
        two = finetune([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base],
                       out / f"two_{tag}", extra)
        result = compare(out / f"one_{tag}", out / f"two_{tag}")
        print(f"{tag}: {json.dumps(result)}; wall 1 process {one:.0f} s, 2 processes {two:.0f} s", flush=True)


if __name__ == "__main__":
    main()
