"""Stopping a run safely: one run per folder, Ctrl-C, divergence.

Lesson
------
A run can end before its last step in three ways. Each one must leave the run directory usable (a complete
checkpoint to resume from) and must never export a broken model to final/:

    RunLock            run_dir/run.lock = {"pid": 4242, "host": "gpu-box", "started": "2026-12-01T12:00:00"}

                       os.open(..., O_CREAT | O_EXCL) creates the file only if it does not exist, in one atomic
                       step, so of two processes starting in the same folder exactly one gets the lock. The
                       other reads who holds it:
                         a live process (or one on another host, which we cannot check)  -> refused, naming it
                         a process of this host that is gone (a crash, a kill -9)        -> taken over, with a note
                         this very process (setup, then fit, then fit again)             -> already ours
                       fit() releases it when it returns or raises.

    StopOnInterrupt    Ctrl-C sends SIGINT. Python's default turns it into a KeyboardInterrupt wherever the program
                       happens to be: in the middle of a backward pass, or of a checkpoint write. Inside fit()
                       the first Ctrl-C only raises a flag. fit() finishes the optimizer step in progress,
                       writes a checkpoint and raises TrainingInterrupted (a KeyboardInterrupt, so a notebook or
                       a script stops as it would on any Ctrl-C). The second Ctrl-C raises KeyboardInterrupt at
                       once. That is safe, because checkpoints are written atomically (minift/train/checkpoint.py):
                       the last complete checkpoint is never touched by the one being written.

                       Why finish the step instead of abandoning it: half a step has already drawn dropout masks
                       and (masked LM) masking positions from the random generators, and added half the
                       gradients. A checkpoint taken there would not be a state the uninterrupted run ever had.
                       After the step, the state is exactly the one a `save_every` checkpoint would hold at that
                       step, so the resumed run continues bit for bit like the uninterrupted one.

                       Under torchrun the agent forwards one SIGINT to every worker (minift/train/distributed.py);
                       the ranks agree on the flag after each step, so all stop after the same one, and only
                       rank 0 prints the notice.

    DivergenceMonitor  Training that blows up must stop with a clear error, not export a broken model. After each
                       optimizer step (f = divergence_factor, 10 by default):
                         the gradient norm is NaN or infinite                  -> stop before the step (optimizer_step;
                                                                                  with train.optimizer_in_backward the
                                                                                  step ran in backward: stop unsaved)
                         the trainable weights are NaN or infinite             -> stop
                         loss_ema > f x start_loss, when start_loss > 0        -> stop: the loss blew up
                         |theta| > 10 f x |theta_0|  and  loss_ema > 0.9 x loss_1
                                                                               -> stop: the weights blew up, and the
                                                                                  loss is no better than at step 1
                       start_loss is the mean loss of the first 3 steps, loss_1 the loss of the first (measured
                       before any update), loss_ema a running mean that one unlucky batch cannot push over the line:
                           loss_ema <- 0.9 loss_ema + 0.1 loss
                       theta is every tensor the optimizer updates, |.| the L2 norm over all of them.

                       Why the weight rule. At lr = 1e6 each AdamW step moves every weight by about 1e6 (Adam's step
                       is about lr per weight, whatever the gradient). On the 2-block test model (vocab 64, weights
                       of std 0.02) |theta| grows 11 million-fold in step 1 and the logits saturate: the loss sits
                       at exactly ln(64) = 4.159, a uniform guess, from step 2 on, and the gradient is exactly 0.
                       The starting loss of a random model is also about ln(vocab), so no loss rule sees it. At lr =
                       1e3 the loss jumps to 8e6 in step 2, then sits at ln(64) too. Weights alone are not enough:
                       parameters that start at or near zero (a prompt, an adapter, a new head) legitimately grow
                       10-20 fold in the test suite's runs, and a long run may grow them much more, but then its
                       loss goes down. divergence_factor = 0 turns both ratio rules off; the non-finite checks stay.

                       Losses without a scale. Both ratio rules compare the loss with its start, which assumes a
                       loss that starts at its typical size and should go down. The policy losses of GRPO and PPO
                       are not such losses: their advantages average to zero, so they start near 0 (GRPO's first
                       step is exactly beta x KL = 0, the policy being the reference) and then grow with the KL
                       term, or go negative, while training goes well (a 30-block GRPO run's loss rose 15-fold from
                       1e-5 in 12 healthy steps). A task model says so with `loss_has_scale = False`
                       (minift/train/rl_tasks.py); its runs keep the non-finite checks only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LOCK = "run.lock"


# ----------------------------------------------------------------------------------------------------
# One run per folder
# ----------------------------------------------------------------------------------------------------


class RunLockedError(ValueError):
    """Another process is training in this run directory."""


def process_is_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    return True


class RunLock:
    """run_dir/run.lock, created with O_CREAT | O_EXCL; see the lesson above."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False

    def owner(self) -> dict | None:
        """The lock file's contents, or None when there is no lock file."""
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            owner = None
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            raise RunLockedError(f"{self.path}: unreadable lock file; if no minift run is using "
                                 f"{self.path.parent}, delete it")
        return owner

    def is_ours(self, owner: dict) -> bool:
        return owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname()

    def check(self) -> None:
        """Refuse (RunLockedError) if another live process holds the lock; nothing is written."""
        owner = self.owner()
        if owner is not None and not self.is_ours(owner):
            self.refuse_if_live(owner)

    def refuse_if_live(self, owner: dict) -> None:
        host, pid = owner.get("host"), owner["pid"]
        since = f", since {owner['started']}" if owner.get("started") else ""
        if host != socket.gethostname():
            raise RunLockedError(f"{self.path.parent} is in use by minift process {pid} on host {host}{since}; "
                                 f"wait for it to finish, or, if that run is gone, delete {self.path}")
        if process_is_alive(pid):
            raise RunLockedError(f"{self.path.parent} is in use by a running minift process (pid {pid} on "
                                 f"{host}{since}); wait for it to finish or choose another train.output_dir "
                                 f"(if pid {pid} is not a minift run, delete {self.path})")

    def acquire(self) -> None:
        """Take the lock (creating the run directory), or raise RunLockedError naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.path.parent}: cannot create the run directory ({e.strerror})") from None
        for _ in range(3):
            owner = self.owner()
            if owner is not None:
                if self.is_ours(owner):  # from an earlier setup() or fit() of this process
                    self.held = True
                    return
                self.refuse_if_live(owner)
                print(f"minift: note: {self.path} was left by pid {owner['pid']} on {owner.get('host')}, which is "
                      f"no longer running; taking the run directory over", file=sys.stderr)
                self.path.unlink(missing_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # another process created it in between: look again at who holds it
                continue
            except OSError as e:
                raise ValueError(f"{self.path}: cannot create the lock file ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
            self.held = True
            return
        raise RunLockedError(f"{self.path}: other processes keep taking this lock; is another run starting here?")

    def release(self) -> None:
        """Delete the lock file if this process holds it; never fails."""
        if not self.held:
            return
        self.held = False
        try:
            owner = self.owner()
            if owner is not None and self.is_ours(owner):
                self.path.unlink()
        except (OSError, RunLockedError):
            pass


# ----------------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------------


class TrainingInterrupted(KeyboardInterrupt):
    """fit() stopped on Ctrl-C after finishing a step; `checkpoint` is where it can resume from (None when
    train.save_checkpoints is false)."""

    def __init__(self, run_dir: Path, step: int, checkpoint: Path | None) -> None:
        self.run_dir, self.step, self.checkpoint = Path(run_dir), step, checkpoint
        where = (f"checkpoint {checkpoint}; resume with: minift finetune --resume {run_dir}" if checkpoint
                 else "no checkpoint written (train.save_checkpoints = false), so the run cannot be resumed")
        super().__init__(f"interrupted after step {step}: {where}")


class StopOnInterrupt:
    """A SIGINT handler for the duration of a `with` block: the first Ctrl-C sets `requested`, the second
    raises KeyboardInterrupt. The previous handler comes back when the block ends.

    Signal handlers can only be set from the main thread; elsewhere (and when SIGINT is ignored, as for
    a job started in the background) the block changes nothing."""

    def __init__(self, saving: bool = True) -> None:
        self.saving = saving  # what the notice promises: a checkpoint, or (train.save_checkpoints = false) none
        self.requested = False
        self.previous = None
        self.installed = False

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            if self.previous is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, self.handle)
                self.installed = True
        return self

    def __exit__(self, *exc) -> bool:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)
            self.installed = False
        return False

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = True
        if os.environ.get("RANK", "0") != "0":  # under torchrun every worker gets the Ctrl-C: rank 0 speaks
            return
        # os.write, not print: a handler may run while the main program is inside print() itself
        then = "saving a checkpoint" if self.saving else "stopping (train.save_checkpoints = false)"
        message = f"\nminift: Ctrl-C: finishing this step, then {then} (Ctrl-C again stops at once)\n".encode()
        try:
            os.write(2, message)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------------


class DivergenceError(ValueError):
    """Training diverged: the model would be broken, so nothing is exported."""


START_STEPS = 3  # optimizer steps whose mean loss is the starting loss
EMA_DECAY = 0.9  # loss_ema <- EMA_DECAY * loss_ema + (1 - EMA_DECAY) * loss
WEIGHT_FACTOR = 10  # the weight rule's growth limit is WEIGHT_FACTOR x divergence_factor (100 by default)
NO_BETTER = 0.9  # the weight rule needs loss_ema > NO_BETTER x the first step's loss


def weight_norm(params: list[torch.Tensor]) -> float:
    """Global L2 norm of `params`, computed in float32 whatever their dtype."""
    if not params:
        return 0.0
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in params]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


@dataclass
class DivergenceMonitor:
    """The rules of the lesson. Its numbers live in the loop's state (a LoopState), so they are saved in every
    checkpoint and a resumed run checks against the same starting values."""

    factor: float  # train.divergence_factor; 0 = the ratio rules are off
    state: object  # LoopState: start_losses (the first ones), start_loss, loss_ema, start_weight_norm

    def start(self, params: list[torch.Tensor]) -> None:
        """Record |theta_0| before the first step (a resumed run keeps the one from its checkpoint)."""
        if self.state.start_weight_norm is None:
            self.state.start_weight_norm = weight_norm(params)

    def check(self, step: int, loss: float | None, params: list[torch.Tensor]) -> None:
        """After optimizer step `step` (its loss, the trainable tensors): raise DivergenceError if a rule fires."""
        state, advice = self.state, "nothing was exported; lower train.lr"
        if loss is not None:  # None: a masked-LM step that drew no masked token
            state.loss_ema = loss if state.loss_ema is None else EMA_DECAY * state.loss_ema + (1 - EMA_DECAY) * loss
            if state.start_loss is None:
                state.start_losses.append(loss)
                if len(state.start_losses) == START_STEPS:
                    state.start_loss = sum(state.start_losses) / START_STEPS
        norm = weight_norm(params)
        if not math.isfinite(norm):
            raise DivergenceError(f"step {step}: the trainable weights are no longer finite (norm {norm}); {advice}")
        if not self.factor or state.loss_ema is None:
            return
        off = "or set train.divergence_factor = 0 to turn this check off"
        if state.start_loss and state.start_loss > 0 and state.loss_ema > self.factor * state.start_loss:
            raise DivergenceError(
                f"step {step}: the loss diverged: its running mean {state.loss_ema:.4g} is more than "
                f"train.divergence_factor = {self.factor:g} times the starting loss {state.start_loss:.4g}; "
                f"{advice}, {off}")
        limit = WEIGHT_FACTOR * self.factor
        first = state.start_losses[0]
        if state.start_weight_norm and norm > limit * state.start_weight_norm and state.loss_ema > NO_BETTER * first:
            raise DivergenceError(
                f"step {step}: the weights diverged: the norm of the trainable weights grew from "
                f"{state.start_weight_norm:.4g} to {norm:.4g}, more than {WEIGHT_FACTOR} x train.divergence_factor "
                f"= {limit:g} times, and the loss is no better than at step 1 (running mean {state.loss_ema:.4g}, "
                f"step 1 {first:.4g}); {advice}, {off}")
