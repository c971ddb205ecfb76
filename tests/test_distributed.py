"""Distributed training (minift/train/distributed.py) across a real process boundary: 2 gloo processes on the CPU.

Two launches of two processes (tests/distributed_worker.py, started with the environment torchrun gives its
workers) run every case of this file; everything else runs in this process:

    launch 1   DDP full, DDP LoRA, FSDP full, FSDP LoRA: 4 steps of 2 ranks x 1 micro-batch of 2 examples;
               DDP QLoRA, IA3, bottleneck adapters, prompt tuning: 2 steps each; FSDP with bf16 compute; DDP DPO;
               then an FSDP LoRA run whose rank 1 dies (os._exit) at the start of step 3
    launch 2   that run resumed by 2 processes from its step-2 sharded checkpoint
    in-process the same runs in 1 process with 2 micro-batches of 2 (the same global batch of 4);
               the step-2 checkpoint resumed by 1 FSDP process (world size 1, WORLD_SIZE set here)

Tolerance. In float32 the 2-process run adds the ranks' gradients in gloo's order where one process adds its
micro-batches one after the other, and FSDP reduce-scatters flat shards, so agreement is only guaranteed to
rounding. Measured on this tiny model (pytest -s prints it): 0 for DDP (every method) and FSDP LoRA, 3.7e-9 for
FSDP full fine-tuning, after 4 steps at lr 3e-3. The tests allow 1e-5 relative on every logged loss and 1e-4
absolute on every weight: far below what one step changes (the loss moves by ~1e-1 per step, the weights by
~lr = 3e-3), far above float32 rounding that AdamW's 1/sqrt(v) may amplify.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minift.cli import main
from minift.train import checkpoint as ckpt
from minift.train import distributed, load_trained, read_metrics
from tests.train_helpers import ALPACA, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
CASES = {"ddp_full": ("ddp", "full"), "ddp_lora": ("ddp", "lora"), "fsdp_full": ("fsdp", "full"),
         "fsdp_lora": ("fsdp", "lora")}
EXPORT = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}
OTHER_METHODS = ("qlora", "ia3", "adapters", "prompt_tuning")  # DDP only, 2 steps: checkpoints compared
DROPOUT = ["--set", "method.dropout=0.1", "--set", "model.dropout=0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(out: Path, method: str, distributed_mode: str, accumulate: int, steps: int = 4) -> list[str]:
    lines = [f"train.max_steps={steps}", "train.batch_size=2", f"train.grad_accum_steps={accumulate}", "train.lr=3e-3",
             "train.save_every=2", "train.keep_checkpoints=5", "train.progress_bar=false", "train.device=cpu",
             "train.distributed_timeout=60", f"train.distributed={distributed_mode}", f"train.output_dir={out}",
             "train.eval_every=2", "data.validation_fraction=0.25", f"method.name={method}"]
    if method in ("lora", "qlora"):
        lines += ["method.r=4", "method.alpha=8", "method.dropout=0", "method.targets=all-linear"]
    if method == "prompt_tuning":
        lines += ["method.n_tokens=4"]
    if method == "adapters":
        lines += ["method.bottleneck=8"]
    return [item for line in lines for item in ("--set", line)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_decoder(root / "model")
    data = write_jsonl(root / "alpaca.jsonl", ALPACA * 3)
    config = root / "run.toml"
    config.write_text(f'[model]\nsource = "{model}"\n[data]\ntrain = "{data}"\nformat = "alpaca"\n'
                      'max_length = 64\n[method]\nname = "full"\n')
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": f"the {a} cat sat on the", "chosen": f" {c} mat",
                                                "rejected": f" {d} mat"} for a in ("big", "small", "red")
                                               for c, d in (("blue", "green"), ("green", "blue"))])
    (root / "dpo.toml").write_text(f'[model]\nsource = "{model}"\n[task]\nkind = "preference"\n[data]\n'
                                   f'train = "{pairs}"\nmax_length = 32\n[method]\nname = "lora"\n')
    return root, config


def launch(root: Path, name: str, cases: list[dict], world_size: int = 2) -> list[subprocess.CompletedProcess]:
    """Start `world_size` worker processes with torchrun's environment variables; wait for all of them."""
    out = root / name
    out.mkdir()
    plan = out / "plan.json"
    plan.write_text(json.dumps({"cases": cases, "out": str(out)}))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(plan)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def statuses(root: Path, name: str, rank: int) -> list[int]:
    path = root / name / f"rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else []


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(run_dir)]


def assert_same_curve(got: Path, expected: Path) -> None:
    a, b = losses(got), losses(expected)
    assert [r[0] for r in a] == [r[0] for r in b] and len(a) >= 3, (a, b)
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None), (x, y)
            if u is not None:
                assert u == pytest.approx(v, rel=LOSS_RTOL), (x, y)


def assert_same_export(got: Path, expected: Path, file: str) -> float:
    a, b = load_file(got / "final" / file), load_file(expected / "final" / file)
    assert set(a) == set(b) and a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, worst
    return worst


@pytest.fixture(scope="module")
def runs(tiny):
    """Both launches and the 1-process references, once for the module (the slow part of this file)."""
    root, config = tiny
    cases = [{"argv": ["finetune", str(config), *settings(root / name, method, mode, 1)]}
             for name, (mode, method) in CASES.items()]
    cases += [{"argv": ["finetune", str(config), *settings(root / f"ddp_{method}", method, "ddp", 1, steps=2)]}
              for method in OTHER_METHODS]
    cases.append({"argv": ["finetune", str(config), *settings(root / "fsdp_bf16", "full", "fsdp", 1, steps=2),
                           "--set", "train.fsdp_param_dtype=bfloat16"]})
    cases.append({"argv": ["finetune", str(root / "dpo.toml"), *settings(root / "ddp_dpo", "lora", "ddp", 1, steps=2)]})
    for mode in ("ddp", "fsdp"):  # LoRA and model dropout on: the masks are drawn per micro-batch, not per rank
        cases.append({"argv": ["finetune", str(config), *settings(root / f"{mode}_dropout", "lora", mode, 1, steps=2),
                               *DROPOUT]})
    cases.append({"argv": ["finetune", str(config), *settings(root / "broken", "lora", "fsdp", 1)],
                  "die": {"rank": 1, "step": 3}})
    first = launch(root, "launch1", cases)
    assert (root / "broken").is_dir(), first[0].stdout[-2000:] + first[0].stderr[-3000:]
    shutil.copytree(root / "broken", root / "broken_world1")  # resumed below by 1 process, in this one
    second = launch(root, "launch2", [{"argv": ["finetune", "--resume", str(root / "broken")]}])
    for method in ("full", "lora"):  # the same global batch in one process: 2 micro-batches of 2
        assert main(["finetune", str(config), *settings(root / f"single_{method}", method, "none", 2)]) == 0
    for method in OTHER_METHODS:
        assert main(["finetune", str(config), *settings(root / f"single_{method}", method, "none", 2, steps=2)]) == 0
    assert main(["finetune", str(root / "dpo.toml"), *settings(root / "single_dpo", "lora", "none", 2, steps=2)]) == 0
    assert main(["finetune", str(config), *settings(root / "single_dropout", "lora", "none", 2, steps=2), *DROPOUT]) == 0
    return root, first, second


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    root, first, _ = runs
    assert statuses(root, "launch1", 0)[:10] == [0] * 10, first[0].stderr[-3000:]
    for name, (mode, method) in CASES.items():
        assert_same_curve(root / name, root / f"single_{method}")
        worst = assert_same_export(root / name, root / f"single_{method}", EXPORT[method])
        print(f"{name}: max |weight - 1 process| = {worst:.3g}")  # pytest -s shows what the tolerance leaves
    # only rank 0 wrote: one metrics line per step and evaluation, not two
    assert len(read_metrics(root / "ddp_full")) == len(read_metrics(root / "single_full"))
    sharded = ckpt.latest_checkpoint(root / "fsdp_full")
    assert distributed.is_sharded(sharded) and len(list((sharded / "sharded").glob("*.distcp"))) == 2
    assert json.loads((sharded / "state.json").read_text())["world_size"] == 2
    assert (ckpt.latest_checkpoint(root / "ddp_lora") / "weights.safetensors").exists()  # DDP: the ordinary format
    assert "x 2 processes (fsdp)" in first[0].stdout


def test_ddp_trains_every_method_as_one_process(runs):
    root, _, _ = runs
    for method in OTHER_METHODS:
        assert_same_curve(root / f"ddp_{method}", root / f"single_{method}")
        got = load_file(ckpt.latest_checkpoint(root / f"ddp_{method}") / "weights.safetensors")
        expected = load_file(ckpt.latest_checkpoint(root / f"single_{method}") / "weights.safetensors")
        assert set(got) == set(expected) and got, method
        worst = max(float((got[k].float() - expected[k].float()).abs().max()) for k in got)
        assert worst <= WEIGHT_ATOL, (method, worst)
        print(f"ddp_{method}: max |weight - 1 process| = {worst:.3g}")


def test_ddp_dpo_logs_the_global_batch_metrics_of_one_process(runs):
    root, _, _ = runs  # DPO's rewards and log-probs are summed over all ranks before rank 0 logs them
    got, expected = read_metrics(root / "ddp_dpo"), read_metrics(root / "single_dpo")
    assert len(got) == len(expected) == 3 and "rewards/margins" in got[1]
    for a, b in zip(got, expected):
        assert set(a) == set(b)
        for key in a:
            if key != "tokens_per_s":
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL, abs=1e-7), (key, a, b)


def test_dropout_masks_are_drawn_per_micro_batch_so_two_processes_equal_one(runs):
    root, first, _ = runs  # each micro-batch reseeds dropout from (seed, step, its index in the global batch)
    assert statuses(root, "launch1", 0)[10:12] == [0, 0], first[0].stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        assert_same_curve(root / f"{mode}_dropout", root / "single_dropout")
        worst = assert_same_export(root / f"{mode}_dropout", root / "single_dropout", EXPORT["lora"])
        print(f"{mode} with dropout: max |weight - 1 process| = {worst:.3g}")
    no_dropout = [r["loss"] for r in read_metrics(root / "single_lora") if "loss" in r][:2]
    with_dropout = [r["loss"] for r in read_metrics(root / "single_dropout") if "loss" in r]
    assert len(with_dropout) == 2 and with_dropout != no_dropout  # dropout was on: the losses moved


def test_fsdp_mixed_precision_computes_in_bfloat16_and_exports_float32(runs):
    root, _, _ = runs  # MixedPrecisionPolicy: blocks gathered in bf16 for compute; shards, grads, AdamW fp32
    got = [r["loss"] for r in read_metrics(root / "fsdp_bf16") if "loss" in r]
    fp32 = [r["loss"] for r in read_metrics(root / "single_full") if "loss" in r][:2]
    assert len(got) == 2 and got != fp32  # bf16 rounding shows in the loss...
    assert got == pytest.approx(fp32, rel=1e-2)  # ...and only at bf16's precision (8 bits of mantissa)
    exported = load_file(root / "fsdp_bf16" / "final" / EXPORT["full"])
    assert {t.dtype for t in exported.values()} == {torch.float32}  # the fp32 shards, gathered


def test_a_dead_rank_stops_the_other_with_a_clear_error_and_no_corrupt_checkpoint(runs):
    root, first, _ = runs
    assert first[1].returncode == 1  # rank 1 died during step 3 of the last case
    assert statuses(root, "launch1", 0)[12] == 2, first[0].stderr[-3000:]
    error = [line for line in first[0].stderr.splitlines() if line.startswith("minift: error:")]
    assert len(error) == 1 and "rank 0 of 2: another process of the run stopped" in error[0], first[0].stderr[-3000:]
    assert "during step 3" in error[0] and "step-000002" in error[0]
    latest = ckpt.latest_checkpoint(root / "broken_world1")
    assert latest.name == "step-000002" and (latest / "sharded" / ".metadata").exists()
    assert not (root / "broken_world1" / "run.lock").exists()  # rank 0 released the lock on its way out


def test_a_killed_run_resumed_equals_the_uninterrupted_run(runs):
    root, _, second = runs
    assert [p.returncode for p in second] == [0, 0], second[0].stderr[-3000:]
    assert_same_curve(root / "broken", root / "fsdp_lora")
    assert assert_same_export(root / "broken", root / "fsdp_lora", EXPORT["lora"]) == 0.0  # same ranks: bitwise


def test_fsdp_checkpoint_resumes_at_another_world_size(runs, monkeypatch, capsys):
    root, _, _ = runs
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    try:  # 1 process with 2 micro-batches reads the same global batches as 2 processes with 1
        assert main(["finetune", "--resume", str(root / "broken_world1")]) == 2  # 1 x 1 x 2: half the batch
        assert "= a global batch of 4; this run has 1 x 1 x 2 = 2" in capsys.readouterr().err
        assert main(["finetune", "--resume", str(root / "broken_world1"), "--set", "train.grad_accum_steps=2"]) == 0
    finally:
        distributed.close()
    assert_same_curve(root / "broken_world1", root / "fsdp_lora")
    assert_same_export(root / "broken_world1", root / "fsdp_lora", EXPORT["lora"])


def test_eval_and_export_read_a_sharded_checkpoint_in_one_process(runs):
    root, _, _ = runs  # minift eval --run / export --run: DCP joins the shards without a process group
    model, _, config, _ = load_trained(root / "fsdp_full")
    expected = load_file(ckpt.latest_checkpoint(root / "single_full") / "weights.safetensors")
    params = dict(model.named_parameters())
    assert config.train.distributed == "fsdp" and set(expected) <= set(params)
    assert max(float((params[k].detach() - expected[k]).abs().max()) for k in expected) <= WEIGHT_ATOL


def test_distributed_needs_torchrun_and_fits_the_method(tiny, capsys, monkeypatch):
    root, config = tiny
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(["finetune", str(config), "--set", "train.distributed=ddp", "--set",
                 f"train.output_dir={root / 'never'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not started by torchrun" in err[0] and "--nproc N" in err[0]
    assert not (root / "never").exists()
    assert main(["finetune", str(config), "--set", "train.distributed=fsdp", "--set", "method.name=qlora"]) == 2
    assert "use train.distributed = \"ddp\" for QLoRA" in capsys.readouterr().err
    assert main(["finetune", str(config), "--set", "train.distributed=zero3"]) == 2
    assert "train.distributed = 'zero3'; must be one of auto, none, ddp, fsdp" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["finetune", str(config), "--set", "train.distributed=none", "--set",
                 f"train.output_dir={root / 'never'}"]) == 2
    assert "every process would train the same run alone" in capsys.readouterr().err
    assert main(["finetune", str(config), "--nproc", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err


def test_nproc_starts_torchrun_with_the_same_command():
    command = distributed.torchrun_command(2, ["finetune", "run.toml", "--set", "train.distributed=ddp"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and "--standalone" in command
    assert command[-6:] == ["-m", "minift", "finetune", "run.toml", "--set", "train.distributed=ddp"]
