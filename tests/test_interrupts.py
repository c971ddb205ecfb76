"""Ctrl-C during `minift finetune` (minift/train/guards.py StopOnInterrupt, minift/train/loop.py fit, minift/cli.py).

The first SIGINT finishes the optimizer step in progress, writes a checkpoint and exits 130 with one line that
says how to resume; the resumed run ends bit for bit where the uninterrupted run ends. A second SIGINT stops at
once and leaves the last complete checkpoint as it was. The process boundary is the point: the signal is really
sent, with os.kill, to a `python -m minift finetune` child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import minift.train.loop as loop
from minift.train import TrainingInterrupted, fit, read_metrics, setup
from minift.train import checkpoint as ckpt
from minift.train.run_config import load_run_config
from tests.train_helpers import SENTENCES, run_config, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, run_dir: Path, *train_lines: str) -> Path:
    """A TOML config for a tiny decoder on the test sentences; `train_lines` are extra [train] lines."""
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nsource = "{model_dir}"\ndropout = 0.1\n'
                    f'[data]\ntrain = "{data}"\nvalidation_fraction = 0.0\n'
                    f'[train]\noutput_dir = "{run_dir}"\ndevice = "cpu"\nbatch_size = 2\nlr = 3e-3\n'
                    f'weight_decay = 0.1\nprogress_bar = false\nmax_steps = 100000\n' + "".join(f"{line}\n" for line in train_lines))
    return path


def collect(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


class Child:
    """`python -m minift ARGS` in a child process; stderr is read line by line as it comes."""

    def __init__(self, *args) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread, as in this process
        # A job started in the background may inherit SIGINT ignored; give the child Python's usual Ctrl-C.
        self.proc = subprocess.Popen([sys.executable, "-m", "minift", *map(str, args)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self.readers = [threading.Thread(target=collect, args=(self.proc.stdout, self.out_lines), daemon=True),
                        threading.Thread(target=collect, args=(self.proc.stderr, self.err_lines), daemon=True)]
        for reader in self.readers:
            reader.start()

    def wait_until(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the child exited ({self.proc.returncode}) before {what}:\n{''.join(self.err_lines)}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.01)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return self.proc.returncode, "".join(self.out_lines), "".join(self.err_lines)


def logged_step(run_dir: Path) -> int:
    """The last optimizer step in metrics.jsonl (a line may be half written: skip it)."""
    steps = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.endswith("}") and '"step": ' in line:
                steps.append(int(line.split('"step": ')[1].split(",")[0].rstrip("}")))
    return max(steps, default=0)


def weights(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}


def test_first_ctrl_c_saves_the_step_and_the_resumed_run_is_exact(tmp_path):
    run_dir = tmp_path / "run"
    config_path = write_config(tmp_path, run_dir, "grad_accum_steps = 2")
    child = Child("finetune", config_path)
    child.wait_until(lambda: logged_step(run_dir) >= 3, "step 3")
    child.proc.send_signal(signal.SIGINT)
    status, out, err = child.finish()

    assert status == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    resume_lines = [line for line in (out + err).splitlines() if "--resume" in line]
    assert resume_lines == [f"minift: interrupted; the last complete checkpoint is "
                            f"{ckpt.latest_checkpoint(run_dir)}; resume with: minift finetune --resume {run_dir}"]
    stopped = logged_step(run_dir)
    assert ckpt.latest_checkpoint(run_dir).name == f"step-{stopped:06d}"  # the step in progress was finished
    assert not (run_dir / "final").exists() and not (run_dir / "run.lock").exists()
    assert (run_dir / "training.svg").exists()

    end = [f"train.max_steps={stopped + 3}"]  # constant schedule: the step count changes nothing else
    resumed = setup(load_run_config(run_dir / "config.toml", end), resume=True)
    assert resumed.state.step == stopped
    fit(resumed)
    straight = setup(load_run_config(config_path, end + [f"train.output_dir={tmp_path / 'straight'}"]))
    fit(straight)

    def losses(directory):
        return [(r["step"], r["loss"]) for r in read_metrics(directory)]

    assert losses(run_dir) == losses(tmp_path / "straight") and len(losses(run_dir)) == stopped + 3
    expected = weights(straight)
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # 400 micro-batches per optimizer step: a step lasts about a second, so both signals land inside one
    config_path = write_config(tmp_path, run_dir, "grad_accum_steps = 400", "save_every = 2")
    child = Child("finetune", config_path)
    child.wait_until(lambda: ckpt.latest_checkpoint(run_dir) is not None, "the checkpoint of step 2", timeout=300)
    seen = logged_step(run_dir)  # step 3 has just begun
    child.proc.send_signal(signal.SIGINT)
    child.wait_until(lambda: any("Ctrl-C again stops at once" in line for line in child.err_lines), "the notice")
    child.proc.send_signal(signal.SIGINT)
    status, out, err = child.finish()

    assert status == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    assert logged_step(run_dir) == seen  # the step in progress was abandoned, not finished
    latest = ckpt.latest_checkpoint(run_dir)
    checkpoint = ckpt.load_checkpoint(latest)  # complete and readable
    assert checkpoint.step == seen == 2
    assert [line for line in err.splitlines() if "--resume" in line] == [
        f"minift: interrupted; the last complete checkpoint is {latest}; resume with: "
        f"minift finetune --resume {run_dir}"]
    assert not (run_dir / "run.lock").exists()
    resumed = setup(load_run_config(run_dir / "config.toml", [f"train.max_steps={checkpoint.step + 1}",
                                                              "train.grad_accum_steps=1"]), resume=True)
    assert resumed.state.step == checkpoint.step
    resumed.lock.release()


# ----------------------------------------------------------------------------------------------------
# The library: fit() raises TrainingInterrupted, a KeyboardInterrupt, after the checkpoint
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def python_ctrl_c():
    """Python's usual SIGINT handler during the test (a job started in the background may ignore SIGINT)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)


def ctrl_c_in_step(monkeypatch, step: int) -> None:
    """Deliver a real SIGINT to this process in the middle of optimizer step `step`."""
    real = loop.accumulate_gradients

    def accumulate(model, micro_batches, precision="fp32", scaler=None, current=0):
        if current == step:
            signal.raise_signal(signal.SIGINT)
        return real(model, micro_batches, precision, scaler, current)

    monkeypatch.setattr(loop, "accumulate_gradients", accumulate)


def test_fit_finishes_the_step_checkpoints_and_raises_a_keyboard_interrupt(tmp_path, monkeypatch, capfd,
                                                                            python_ctrl_c):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    before = signal.getsignal(signal.SIGINT)
    ctrl_c_in_step(monkeypatch, 3)
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=10", "train.save_every=2"))
    with pytest.raises(KeyboardInterrupt) as caught:
        fit(run)
    assert isinstance(caught.value, TrainingInterrupted)
    assert caught.value.step == 3 and caught.value.checkpoint == tmp_path / "run" / "checkpoints" / "step-000003"
    assert f"resume with: minift finetune --resume {tmp_path / 'run'}" in str(caught.value)
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    assert "Ctrl-C again stops at once" in capfd.readouterr().err
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run")).step == 3
    assert not (tmp_path / "run" / "final").exists()

    run = setup(run_config(model_dir, data, tmp_path / "quick", "train.max_steps=10",
                           "train.save_checkpoints=false"))
    with pytest.raises(TrainingInterrupted, match=r"after step 3: no checkpoint written"):
        fit(run)
    assert not (tmp_path / "quick" / "checkpoints").exists() and (tmp_path / "quick" / "training.svg").exists()
    assert signal.getsignal(signal.SIGINT) is before
