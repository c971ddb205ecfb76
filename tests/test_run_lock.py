"""One run per folder (minift/train/guards.py RunLock): run_dir/run.lock holds the pid and host of the process
training there. A second run into the folder, or --resume of a live run, is refused naming that process; a lock
left by a process that is gone is taken over with a note; fit() releases the lock when it ends, also on errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minift.cli import main
from minift.train import NonFiniteLossError, RunLockedError, fit, setup
from tests.train_helpers import SENTENCES, run_config, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    return lambda out, *overrides: run_config(model_dir, data, tmp_path / out, "train.max_steps=2", *overrides)


@pytest.fixture
def live_pid():
    """The pid of a process that runs for the whole test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-01T12:00:00"}))
    return lock


def test_a_live_run_refuses_a_second_run_and_a_resume(tmp_path, tiny, live_pid):
    fit(setup(tiny("run")))  # a finished run with a checkpoint, then a live process takes the folder
    lock = write_lock(tmp_path / "run", live_pid)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunLockedError, match=rf"in use by a running minift process \(pid {live_pid} on "):
        setup(tiny("run"), resume=True)
    with pytest.raises(RunLockedError, match=rf"pid {live_pid}"):  # not "already holds checkpoints"
        setup(tiny("run"))
    assert json.loads(lock.read_text())["pid"] == live_pid  # left alone
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics

    write_lock(tmp_path / "fresh", live_pid)
    with pytest.raises(RunLockedError, match=rf"pid {live_pid}"):
        setup(tiny("fresh"))
    assert not (tmp_path / "fresh" / "config.toml").exists()

    write_lock(tmp_path / "remote", live_pid, host="another-host")  # cannot be checked from here: refused
    with pytest.raises(RunLockedError, match=r"minift process \d+ on host another-host.*delete .*run\.lock"):
        setup(tiny("remote"))


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, tiny, dead_pid, capsys):
    lock = write_lock(tmp_path / "run", dead_pid)
    run = setup(tiny("run"))
    err = capsys.readouterr().err
    assert f"note: {lock} was left by pid {dead_pid}" in err and "no longer running; taking" in err
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    fit(run)
    assert not lock.exists()  # released when fit() ends


def test_the_lock_is_released_on_errors_and_taken_again_by_the_next_fit(tmp_path, tiny):
    run = setup(tiny("run", "train.max_steps=3"))
    lock = tmp_path / "run" / "run.lock"
    assert json.loads(lock.read_text()) | {"started": None} == {"pid": os.getpid(), "host": socket.gethostname(),
                                                                "started": None}
    setup(tiny("other"))  # a lock of this very process is ours: a notebook may set up a run twice
    real_forward = type(run.model).forward

    def poisoned(self, batch):
        out = real_forward(self, batch)
        out.loss_sum = out.loss_sum * float("nan")
        return out

    type(run.model).forward = poisoned
    try:
        with pytest.raises(NonFiniteLossError):
            fit(run)
    finally:
        type(run.model).forward = real_forward
    assert not lock.exists()
    run.total_steps = 1  # fit() again, as tutorial 03 does: it takes the lock again, and releases it
    fit(run)
    assert not lock.exists()

    with pytest.raises(ValueError, match="optimizer has"):  # a failed resume leaves no lock behind
        setup(tiny("run", "train.weight_decay=0.1"), resume=True)
    assert not lock.exists()


def test_the_command_refuses_a_folder_another_process_trains_in(tmp_path, tiny, capsys):
    """The process boundary: this test process holds the lock; `python -m minift finetune` is refused."""
    fit(setup(tiny("run")))
    write_lock(tmp_path / "run", os.getpid())
    done = subprocess.run([sys.executable, "-m", "minift", "finetune", "--resume", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"minift: error: {tmp_path / 'run'} is in use by a running "
                                                   f"minift process (pid {os.getpid()} on {socket.gethostname()}")
    os.remove(tmp_path / "run" / "run.lock")
    assert main(["finetune", "--resume", str(tmp_path / "run"), "--set", "train.max_steps=3"]) == 0
    assert not (tmp_path / "run" / "run.lock").exists()
