"""Training on several processes at once: torch.distributed, DDP and FSDP2, started by torchrun.

Lesson
------
One process trains on one device. To use N devices (or N machines) we start N copies of the *same*
program and let them talk. PyTorch ships every piece; this file only wires them into the loop.

Process group, ranks, world size. `torchrun --nproc_per_node N -m minift finetune CONFIG` starts N
processes and gives each, in environment variables, its RANK (0 .. N-1 over all machines), its LOCAL_RANK
(which device of this machine), WORLD_SIZE (N) and a rendezvous point (MASTER_ADDR:MASTER_PORT). Each calls
`torch.distributed.init_process_group(backend)`, which connects them all into one *process group*. The
backend moves the bytes: gloo over TCP between CPUs, nccl over NVLink/InfiniBand between GPUs. Rank 0 is
the "main" process: the only one that writes metrics, progress bars, run.lock, checkpoints and exports
(an FSDP checkpoint excepted: every rank writes its own shards, see "checkpoints" below).

All-reduce. The one collective that data parallelism needs: every rank gives a tensor, every rank gets the
sum (or mean) of all of them. If each rank computes the gradient of its own share of the batch, an
all-reduce of the gradients gives every rank the gradient of the whole batch, so their optimizer steps
are identical and the N copies of the model stay equal without ever sending weights.

    rank 0:  batch share 0 -> grad g0 --.
                                         all-reduce -> g0 + g1 on both -> same AdamW step on both
    rank 1:  batch share 1 -> grad g1 --'

DDP (DistributedDataParallel) does exactly that, but overlapped with the backward pass: it groups the
gradients into *buckets* (~25 MB each, in reverse order of use) and starts a bucket's all-reduce as soon as
backward has filled it, while backward keeps computing the earlier layers. With gradient accumulation
(k micro-batches per step) only the last micro-batch needs the all-reduce: `with ddp.no_sync():` skips it
for the first k - 1, whose gradients simply add up locally. DDP averages (sum / N); minift multiplies each
rank's loss by N so the average is the plain sum it wants (see "the global target count" below).

FSDP2 (`torch.distributed.fsdp.fully_shard`) also splits the *model*: each rank keeps 1/N of every
parameter, gradient and optimizer moment. Applied per transformer block, it gathers one block's full
weights just before the block runs (all-gather), frees them after, and after backward turns the block's
full gradients into each rank's 1/N shard (reduce-scatter). Memory per rank for weights + gradients +
AdamW state falls by N, at the price of one all-gather in forward and in backward per block. Parameters
become DTensors (a local shard plus the rule saying how the shards make up the whole); AdamW, gradient
clipping and norms work on them unchanged. A frozen base (LoRA) is sharded too, and only the adapter
tensors get gradients. A MixedPrecisionPolicy gathers the weights in bfloat16 for compute while the
shards, gradient reduction and optimizer stay float32 (train.fsdp_param_dtype).

What minift adds, so that N ranks x k micro-batches of b examples equal *one* batch of N*k*b exactly:

    the data      step s takes global micro-batches p .. p + N*k - 1 of the one seeded stream
                  (p = micro-batches consumed so far); rank r reads p + r*k .. p + r*k + k - 1.
                  A checkpoint stores p, so a resumed run reads the same shards, at any world size, as long
                  as N x k x b stays the same and b too (p counts micro-batches of b): a checkpoint records its
                  N, k and b, and resuming with another N checks them (k' = N k / N'), refused otherwise.
    the loss      each micro-batch's summed loss is divided by the number of targets of the whole global
                  batch: each rank counts its own, one all-reduce adds them up (before any forward).
    randomness    dropout and masking draw from generators reseeded before every micro-batch from (seed,
                  step, index of the micro-batch in the global batch) — in one process too. Micro-batch j of
                  a step holds the same examples (same shapes) whether one process reads it as its j-th of
                  N k, or rank r as its (j - r k)-th: it draws the same dropout masks and masked positions,
                  so N ranks equal one process even with dropout (to float32 rounding: the ranks' gradients
                  are added in another order), and a resumed run draws what the uninterrupted one drew.
                  The seed travels in the micro-batch (DROPOUT_SEED), read by a forward pre-hook of the task
                  model (reseed_dropout), so torch.manual_seed runs right before that micro-batch's forward
                  and nothing between two forwards can shift the draws. Cost: one manual_seed per
                  micro-batch (microseconds; on a GPU it also reseeds the CUDA generators).
    checkpoints   DDP: every rank holds the same weights, so rank 0 writes the ordinary checkpoint.
                  FSDP: every rank writes its shards with torch.distributed.checkpoint (DCP) into one
                  folder (a shared file system across machines); DCP records how the tensors were cut, so
                  it can load them into another world size. Atomic as always: a .tmp folder, renamed by
                  rank 0 when every rank has finished.
    export        FSDP all-gathers each parameter whole into rank 0's model, which writes the Hugging Face
                  directory or PEFT adapter; then the shards go back in place.

Ctrl-C. A terminal sends SIGINT to its foreground process group: torchrun's agent (and `--nproc`'s
launcher), not the workers, which torchrun starts each in a session of its own. The agent forwards one SIGINT
to every worker, waits for them (30 s, TORCH_ELASTIC_SHUTDOWN_TIMEOUT, then SIGKILL), logs "Received 2 death
signal" with a SignalException traceback of its own and exits 1 (`--nproc` exits 130). Each worker finishes
its step as one process would (minift/train/guards.py); the ranks agree through one all-reduce of the flag
after every step, so all of them stop after the same step; the checkpoint is written and rank 0 alone prints
the notice and the line saying how to resume (`--nproc N`). A step longer than the agent's 30 s is killed:
raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT (or torchrun --shutdown_timeout) for long steps. A second Ctrl-C reaches
only the agent (torch.distributed.elastic's code, not tested here): it stops waiting, and the workers still
finish their step and checkpoint.

When a rank dies, the others find out at their next collective (the connection closes, or
train.distributed_timeout passes) and stop with an error naming the last complete checkpoint; a
checkpoint being written is still a .tmp folder and is cleaned up when the run resumes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn

from minift.io.files import WriteError, read_json_file, write_json_atomic
from minift.train import checkpoint as ckpt

MODES = ("auto", "none", "ddp", "fsdp")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
SHARDED = "sharded"  # the DCP folder inside an FSDP checkpoint
SHARDED_FORMAT = "dcp"


class PeerLostError(ValueError):
    """Another process of a distributed run stopped (died, or did not answer within the timeout)."""


# ----------------------------------------------------------------------------------------------------
# The world: this process's place among the others
# ----------------------------------------------------------------------------------------------------


@dataclass
class World:
    """Which process this is. `World()` is the ordinary single process: every method is then a no-op."""

    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper (mode "ddp"); forward goes through it

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process of a machine gets its own GPU: cuda:LOCAL_RANK."""
        if self.active and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    # -- collectives -----------------------------------------------------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce: the sum over all ranks of each value (float64, so integer counts stay exact)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on at least one (e.g. a Ctrl-C seen by one process)."""
        return self.sum([float(flag)])[0] > 0 if self.active else flag

    def collective_device(self) -> torch.device:
        """nccl moves CUDA tensors only; gloo moves CPU ones."""
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def on_main(self, work):
        """Run `work()` on rank 0 only; every rank returns its result, or raises its error (as ValueError,
        or the same OSError), so no rank waits forever for one that failed alone."""
        if not self.active:
            return work()
        import torch.distributed as dist

        outcome = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", work())
            except (ValueError, OSError) as error:
                outcome[0] = ("error", error)
                dist.broadcast_object_list(outcome, src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise value if isinstance(value, (ValueError, OSError)) else ValueError(str(value))
        return value

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # -- the model -------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, param_dtype: str = "float32") -> nn.Module:
        """DDP: keep `model`, forward through a DistributedDataParallel wrapper (which broadcasts rank 0's
        weights at once). FSDP: shard each transformer block, then the rest (embeddings, final norm, head)
        as the root unit; parameters become DTensors in place. Call before building the optimizer."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.local_rank] if next(model.parameters()).device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
            blocks = getattr(getattr(model, "backbone", model), "blocks", None)
            if blocks is None:
                raise ValueError("train.distributed = fsdp needs a model with transformer blocks (model.blocks)")
            for block in blocks:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        return model

    def forward_module(self, model: nn.Module) -> nn.Module:
        """What to call for a training forward: the DDP wrapper (it hooks the gradient all-reduce), or the model."""
        return self.ddp if self.ddp is not None else model

    def sync_gradients(self, model: nn.Module, final: bool) -> None:
        """Before one micro-batch's forward: reduce its gradients across ranks only if it is the last of the step.

        DDP: this is what `with ddp.no_sync():` does (the flag it clears is read when forward prepares the
        backward hooks); FSDP: the unsharded gradients stay on each rank until the final reduce-scatter."""
        if self.mode == "ddp":
            self.ddp.require_backward_grad_sync = final
        elif self.mode == "fsdp":
            model.set_requires_gradient_sync(final)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module):
        """FSDP: inside the block, rank 0's model holds every parameter whole (float32, as the shards are),
        e.g. to export it; the other ranks take part in the all-gathers only. DDP and one process: nothing.

        Each sharded parameter is all-gathered (DTensor.full_tensor) and rank 0 puts a plain copy in its place
        (tied weights stay tied); the sharded parameters go back when the block ends, so training could go on.
        """
        if self.mode != "fsdp":
            yield model
            return
        from torch.distributed.tensor import DTensor

        full, swapped = {}, []
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in full:
                    whole = param.full_tensor() if isinstance(param, DTensor) else param.detach()
                    full[id(param)] = nn.Parameter(whole.detach().clone(), requires_grad=param.requires_grad) \
                        if self.is_main else None
                if self.is_main:
                    module._parameters[name] = full[id(param)]
                    swapped.append((module, name, param))
        try:
            yield model
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param

    # -- data and randomness ---------------------------------------------------------------------------

    def shard_start(self, position: int, per_rank: int) -> int:
        """Where this rank's micro-batches of a global batch start in the seeded stream."""
        return position + self.rank * per_rank

    def first_micro_batch(self, per_rank: int) -> int:
        """The index, within the step's global batch, of this rank's first micro-batch."""
        return self.rank * per_rank

    def lost(self, error: BaseException, step: int, run_dir: Path) -> PeerLostError:
        """The one-line error a surviving rank raises when a collective fails."""
        global _peers_lost
        _peers_lost = True
        try:
            latest = ckpt.latest_checkpoint(run_dir)
        except ValueError:
            latest = None
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        kept = (f"the last complete checkpoint is {latest}; resume with the same launcher and "
                f"`minift finetune --resume {run_dir}`" if latest is not None else "no checkpoint was written yet")
        return PeerLostError(f"rank {self.rank} of {self.size}: another process of the run stopped or stopped "
                             f"answering during step {step} ({reason}); {kept}")


DROPOUT_SEED = "dropout_seed"  # the key a training micro-batch carries its seed in


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of micro-batch `index` (0 .. N k - 1, over all ranks) of optimizer step `step`: the same
    micro-batch gets the same seed whichever rank reads it, at any world size, and in a resumed run."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % 2**63


def reseed_dropout(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the task model: a training micro-batch carrying DROPOUT_SEED reseeds torch's
    generator (dropout masks) right before its forward. The key is removed, so the forward never sees it;
    batches without it (evaluation) draw as they come."""
    if args and isinstance(args[0], dict) and DROPOUT_SEED in args[0]:
        torch.manual_seed(args[0].pop(DROPOUT_SEED))


def is_collective_failure(error: BaseException) -> bool:
    """Whether a RuntimeError came from the process group (a peer closed its connection, or timed out)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                         "timeout", "broken pipe"))


# ----------------------------------------------------------------------------------------------------
# Starting: the process group from torchrun's environment
# ----------------------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE"))


def resolve_mode(mode: str) -> str:
    """train.distributed = "auto": ddp when torchrun started 2 or more processes, else none."""
    if mode == "auto":
        return "ddp" if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 else "none"
    return mode


def check_launch(mode: str) -> str:
    """train.distributed against how this process was started, before anything is loaded; returns the mode."""
    if mode not in MODES:
        raise ValueError(f"train.distributed = {mode!r}; must be one of {', '.join(MODES)}")
    mode = resolve_mode(mode)
    if mode != "none" and not launched_by_torchrun():
        raise ValueError(f"train.distributed = {mode!r} but this process was not started by torchrun (RANK and "
                         f"WORLD_SIZE are not set); launch with `minift finetune CONFIG --nproc N` or `torchrun "
                         f"--nproc_per_node N -m minift finetune CONFIG`, or set train.distributed = \"none\"")
    if mode == "none" and launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise ValueError(f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but train.distributed = "
                         f"\"none\": every process would train the same run alone; set train.distributed = "
                         f"\"ddp\", \"fsdp\" or \"auto\" (e.g. --set train.distributed=ddp)")
    return mode


def check_config(config) -> None:
    """What the distributed modes do not support, refused before anything is loaded."""
    train, where, mode = config.train, "train.distributed", resolve_mode(config.train.distributed)
    if mode == "none":
        return
    if train.optimizer_in_backward:  # minift/train/optimizer_in_backward.py
        raise ValueError(f"{where} = {mode!r} with train.optimizer_in_backward = true: each rank's gradients are "
                         "averaged with the others' after backward, and these weights would be updated during "
                         "backward from this rank's alone; train in one process (train.distributed = \"none\")")
    if config.task.kind in ("grpo", "ppo"):
        raise ValueError(f"{where} = {mode!r} with [task] kind = {config.task.kind!r}: rollouts are not "
                         "distributed here; train RL tasks in one process (train.distributed = \"none\")")
    if train.gradual_unfreezing:
        raise ValueError(f"{where} = {mode!r} with train.gradual_unfreezing: the set of trainable "
                         "tensors must stay fixed under DDP/FSDP; set train.gradual_unfreezing = 0")
    if mode == "fsdp" and config.method.name == "qlora":
        raise ValueError(f"{where} = \"fsdp\" with [method] qlora: the 4-bit packed base is not sharded here; "
                         "use train.distributed = \"ddp\" for QLoRA")
    if mode == "fsdp" and train.precision == "fp16":
        raise ValueError(f"{where} = \"fsdp\" with train.precision = fp16 (a grad scaler per shard is not "
                         "supported); use bf16, or train.fsdp_param_dtype = \"bfloat16\"")


def init_world(mode: str, device: torch.device, timeout_s: float = 600.0) -> World:
    """Join the process group torchrun prepared (gloo on CPUs, nccl on GPUs); `World()` when mode is none."""
    mode = check_launch(mode)
    if mode == "none":
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":  # before joining: each process talks to the GPU it trains on
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(close)
    return World(mode=mode, rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


_peers_lost = False  # set when a collective failed: then no rank waits for the others on the way out


def close() -> None:
    """Leave the process group (at exit). The ranks first meet at a barrier, so that none tears down its
    connections while another still uses them (gloo aborts a process whose peer vanished mid-teardown)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if not _peers_lost:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=30))  # names a rank that does not arrive
            else:
                dist.barrier()
        except RuntimeError:
            pass
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The launcher: `minift finetune CONFIG --nproc N` is torchrun starting N copies of `python -m minift`
# ----------------------------------------------------------------------------------------------------


def torchrun_command(nproc: int, minift_args: list[str]) -> list[str]:
    """torchrun (torch.distributed.run) on this machine, starting `python -m minift <minift_args>` N times.
    For several machines, call torchrun yourself with --nnodes, --node_rank and --rdzv_endpoint (README)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "minift", *minift_args]


def relaunch(nproc: int, minift_args: list[str]) -> int:
    """Run torchrun as a child and return its exit status: 0, 130 after a Ctrl-C, else 2 (as the CLI's errors).

    Ctrl-C. The terminal sends SIGINT to its foreground process group: this process and torchrun's agent, not
    the workers (torchrun starts each in a session of its own). The agent forwards one SIGINT to every worker,
    waits for them (30 s, TORCH_ELASTIC_SHUTDOWN_TIMEOUT, then SIGKILL), logs "Received 2 death signal" and
    exits 1 with a SignalException traceback of its own. The workers finish their step, rank 0 checkpoints and
    prints how to resume. This process must not raise KeyboardInterrupt meanwhile (subprocess.call would
    SIGKILL the agent and return while the workers still write): it only notes the Ctrl-C and keeps waiting."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}; must be >= 1")
    import signal
    import threading

    interrupted = []
    handling = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if handling else None
    try:
        status = subprocess.call(torchrun_command(nproc, minift_args))
    finally:
        if handling:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if interrupted or status in (130, -2):
        return 130
    return 0 if status == 0 else 2


# ----------------------------------------------------------------------------------------------------
# Resuming at another world size: the same global batch, cut differently
# ----------------------------------------------------------------------------------------------------


def batch_layout(world: World, train) -> dict:
    """How a step's global batch is cut, saved in every checkpoint (one process included): processes x
    micro-batches per process x examples per micro-batch."""
    return {"world_size": world.size, "grad_accum_steps": train.grad_accum_steps, "batch_size": train.batch_size}


def check_batch_layout(saved, world: World, train, path: Path) -> None:
    """A checkpoint resumed by another number of processes must keep its global batch, N x k x b, and its
    micro-batch size b (the data position counts micro-batches): then the resumed run reads the same examples
    per step and, with the global target count, computes the same update. Only k may change (k' = N k / N').
    A checkpoint written before minift recorded its layout is not checked."""
    if not isinstance(saved, dict) or saved.get("world_size", world.size) == world.size:
        return
    now = batch_layout(world, train)
    n, k, b = (saved.get(key) for key in ("world_size", "grad_accum_steps", "batch_size"))
    if not all(isinstance(value, int) for value in (n, k, b)):
        return
    if b == now["batch_size"] and n * k == world.size * now["grad_accum_steps"]:
        return
    hint = (f"; set train.grad_accum_steps = {n * k // world.size}" if (n * k) % world.size == 0 else
            f"; resume with a number of processes that divides {n * k}") if b == now["batch_size"] else \
        f"; keep train.batch_size = {b}"
    raise ValueError(f"{path}: written by {n} processes x {k} micro-batches x {b} examples = a global batch of "
                     f"{n * k * b}; this run has {world.size} x {now['grad_accum_steps']} x {now['batch_size']} = "
                     f"{world.size * now['grad_accum_steps'] * now['batch_size']}, so it would not continue the "
                     f"same training{hint}")


# ----------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): torch.distributed.checkpoint, written atomically
# ----------------------------------------------------------------------------------------------------


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def save_sharded(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 world: World, keep: int = 2) -> Path:
    """Every rank writes its shards of the trainable weights and their AdamW state into step-N.tmp/sharded
    (DCP), rank 0 adds state.json, then renames the folder: the checkpoint appears whole or not at all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root = Path(run_dir) / ckpt.CHECKPOINTS
    name = f"step-{step:06d}"
    final, tmp = root / name, root / (name + ".tmp")

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    world.on_main(prepare)
    options = StateDictOptions(ignore_frozen_params=True)  # LoRA: the adapter, not the frozen base
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / SHARDED))
    except (OSError, RuntimeError) as error:  # a full disk on any rank
        raise WriteError(f"{final}: could not write the sharded checkpoint ({error}); "
                         f"{ckpt.previous_checkpoint_note(run_dir, final)}") from error
    world.barrier()  # every rank's shards are on disk

    def publish():
        try:
            write_json_atomic({**state, "step": step, "format": SHARDED_FORMAT, "world_size": world.size},
                              tmp / "state.json")
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(f"{final}: could not write the checkpoint ({error.strerror or error}); "
                             f"{ckpt.previous_checkpoint_note(run_dir, final)}") from error
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_json_atomic({"directory": name, "step": step}, root / ckpt.LATEST)
        ckpt.prune_checkpoints(root, keep)
        return final

    return world.on_main(publish)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load an FSDP checkpoint into this (sharded) model and optimizer, whatever world size wrote it;
    returns its state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = Path(path)
    state = read_json_file(path / "state.json")
    if state.get("format") != SHARDED_FORMAT or not isinstance(state.get("loop"), dict):
        raise ValueError(f"{path / 'state.json'}: not a sharded (FSDP) checkpoint's state")
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    target = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(target, checkpoint_id=str(path / SHARDED))
    except Exception as error:  # DCP reports a missing key or a corrupt file as one of several exception types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"{path / SHARDED}: the sharded checkpoint does not load ({reason})") from None
    # strict=False: the frozen base is not in the checkpoint (it comes from model.source); the trainable
    # tensors are, or dcp.load above has already named the missing one
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return state


def load_sharded_weights(path: Path, model: nn.Module, names: list[str]) -> None:
    """Read an FSDP checkpoint's trainable tensors whole into an ordinary model, in one process without a
    process group (what `minift eval --run` and `minift export --run` need); DCP joins the shards."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    params = dict(model.named_parameters())
    state = {"model": {name: params[name].detach().clone() for name in names}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(path / SHARDED), no_dist=not torch.distributed.is_initialized())
    except Exception as error:  # a missing tensor or a damaged file, reported by DCP in several exception types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"{path / SHARDED}: the sharded checkpoint does not load ({reason}); written with "
                         "another method or task?") from None
    with torch.no_grad():
        for name in names:
            params[name].copy_(state["model"][name])
