"""Ctrl-C under torchrun, and resuming at another world size (minift/train/distributed.py relaunch and
check_batch_layout, minift/train/guards.py StopOnInterrupt, minift/cli.py).

The process boundary is the point: `python -m minift finetune CONFIG --nproc 2` is started in a session of its
own (a terminal's foreground process group) and SIGINT goes to that whole group, as a terminal's Ctrl-C does.
It reaches the launcher and torchrun's agent; torchrun starts each worker in a session of its own, so the
workers get exactly one SIGINT, the agent's. What must hold:

    exit status 130 (from `--nproc`; torchrun itself exits 1 with its own SignalException traceback);
    one Ctrl-C notice and one "interrupted" line, from rank 0, naming the last checkpoint and `--nproc 2`;
    that checkpoint is the step in progress, finished; run.lock is gone; nothing was exported;
    resuming it in 1 process needs the same global batch: 1 x 1 x 2 is refused in one line, 1 x 2 x 2 runs
    and ends where an uninterrupted 1-process run with 2 micro-batches of 2 ends (the 2-process DDP run equals
    that one: tests/test_distributed.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minift.cli import main
from minift.train import checkpoint as ckpt
from tests.test_distributed import EXPORT, assert_same_curve, assert_same_export, settings
from tests.test_interrupts import logged_step
from tests.train_helpers import ALPACA, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_under_torchrun_checkpoints_once_and_resumes_at_another_world_size(tmp_path, capsys, monkeypatch):
    model = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 3)
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nsource = "{model}"\n[data]\ntrain = "{data}"\nformat = "alpaca"\nmax_length = 64\n')
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # max_steps far away: the run is still training when the signal comes; a checkpoint every 2 steps
    proc = subprocess.Popen([sys.executable, "-m", "minift", "finetune", str(config),
                             *settings(run_dir, "lora", "ddp", 1, steps=100_000), "--nproc", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, which gets the "terminal's" SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while ckpt.latest_checkpoint(run_dir) is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == 130, err[-3000:]
    latest = ckpt.latest_checkpoint(run_dir)
    stopped = logged_step(run_dir)
    assert latest.name == f"step-{stopped:06d}" and ckpt.load_checkpoint(latest).step == stopped  # finished, saved
    assert [line for line in (out + err).splitlines() if "interrupted" in line] == [
        f"minift: interrupted; the last complete checkpoint is {latest}; resume with: minift finetune --resume "
        f"{run_dir} --nproc 2"]
    assert err.count("Ctrl-C: finishing this step") == 1  # rank 0's notice only
    # the only traceback is torchrun's agent reporting the signal it got (torch.distributed.elastic)
    assert err.count("Traceback") <= 1 and ("Traceback" not in err or "SignalException" in err), err[-3000:]
    assert not (run_dir / "run.lock").exists() and not (run_dir / "final").exists()

    # Resume in this one process. DDP wrote an ordinary checkpoint of 2 processes x 1 micro-batch x 2 examples.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    end = stopped + 2
    again = ["finetune", "--resume", str(run_dir), "--set", f"train.max_steps={end}", "--set", "train.distributed=none"]
    capsys.readouterr()
    assert main(again) == 2  # half the global batch
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"minift: error: {latest}: written by 2 processes x 1 micro-batches x 2 examples = a global "
                     f"batch of 4; this run has 1 x 1 x 2 = 2, so it would not continue the same training; set "
                     f"train.grad_accum_steps = 2"]
    assert main([*again, "--set", "train.batch_size=4"]) == 2  # the same 4 examples, but cut into other micro-batches
    assert "keep train.batch_size = 2" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(run_dir) == latest and not (run_dir / "run.lock").exists()  # nothing touched

    assert main([*again, "--set", "train.grad_accum_steps=2"]) == 0
    straight = tmp_path / "straight"
    assert main(["finetune", str(config), *settings(straight, "lora", "none", 2, steps=end)]) == 0
    assert_same_curve(run_dir, straight)
    assert_same_export(run_dir, straight, EXPORT["lora"])
