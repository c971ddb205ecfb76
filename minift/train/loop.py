"""The training loop: setup -> fit -> evaluate, with checkpoints a run resumes from exactly.

Lesson
------
Fine-tuning is a short loop; what makes it right is in the details this file spells out:

    setup(config)   seed -> load model + tokenizer -> data (and the labels) -> task head -> method (what
                    trains) -> AdamW param groups (discriminative LRs, no decay on biases/norms) -> LR schedule
                    -> (resume: weights, optimizer, schedule, RNG and data position from the checkpoint)

    fit(run)        for each optimizer step:
                      take k = grad_accum_steps micro-batches, count their targets N (all k together)
                      for each micro-batch: forward (autocast) -> loss_sum / N -> backward
                      clip the gradient norm -> AdamW step -> next learning rate
                      (train.optimizer_in_backward: each weight's AdamW step runs inside backward, as soon
                      as its gradient is complete, and frees it: minift/train/optimizer_in_backward.py)
                      every eval_every steps: evaluate, early stopping; every save_every: checkpoint

    evaluate(...)   mean loss, perplexity (LM tasks) or accuracy (classification, reward), and a task's own
                    metrics (DPO's rewards/*, RL's reward and kl), no gradients

Every [task] kind runs this one loop: causal_lm, masked_lm and classification (minift/train/tasks.py),
reward and preference (DPO; preference_tasks.py), grpo and ppo (rl_tasks.py, whose micro-batches are
rollouts the data stream samples with the policy as it is: rl_data.py). Several processes
(minift/train/distributed.py): each rank takes its own share of the micro-batches; rank 0 alone writes
metrics.jsonl, the progress bar, run.lock, ordinary checkpoints and the export (FSDP: every rank writes
its own shards of a checkpoint).

Dividing every micro-batch by the *total* N makes the k accumulated gradients add up to exactly the
gradient of one batch of k micro-batches (minift/losses.py explains the common bug). Mixed precision:
`bf16` runs the forward under torch.autocast (CPU or GPU); `fp16` also scales the loss with a GradScaler
so small gradients do not underflow (GPU only). One seed fixes the head's init, the data order (a fresh
permutation per epoch from seed + epoch), dropout and masking (both reseeded before every micro-batch from
seed, step and the micro-batch's index in the step, so N processes draw what one process draws: see
minift/train/distributed.py); a checkpoint stores every generator's state, so a resumed run reproduces the
uninterrupted one bit for bit on the CPU.

Run directory:  config.toml  metrics.jsonl  training.svg (loss, eval, learning rate per step; minift/svg_chart.py)
                checkpoints/step-NNNNNN/  final/ (the exported model)
                run.lock (pid and host of the process training here: one run per folder, minift/train/guards.py)

A run stops at total_steps, or earlier (minift/train/guards.py explains the last two):
    early stopping     eval metric has not improved for early_stopping_patience evaluations -> checkpoint, export
    Ctrl-C             the step in progress finishes -> checkpoint -> TrainingInterrupted (a KeyboardInterrupt);
                       `minift finetune` prints the resume command and exits 130; a second Ctrl-C stops at once
    divergence         NaN/inf loss, gradients or weights; loss > divergence_factor x its start; or weights
                       10 x divergence_factor x their start with no better loss (the two ratio rules only for
                       losses with a scale: not GRPO/PPO's) -> NonFiniteLossError / DivergenceError, the step
                       not saved, nothing exported, exit 2
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minift.dtypes import parse_dtype
from minift.io.files import WriteError, check_output_dir, read_json_file
from minift.schedules import GradualUnfreezing, LRScheduler, discriminative_param_groups, layer_groups
from minift.svg_chart import write_training_chart
from minift.train import checkpoint as ckpt
from minift.train.batches import BatchStream, load_datasets
from minift.train.distributed import (DROPOUT_SEED, World, batch_layout, check_batch_layout,
                                      check_config as check_distributed_config, init_world, is_collective_failure,
                                      is_sharded, load_sharded, load_sharded_weights, micro_batch_seed,
                                      reseed_dropout, save_sharded)
from minift.train.compiled import CompileClock, compile_blocks
from minift.train.guards import (DivergenceError, DivergenceMonitor, RunLock, StopOnInterrupt, TrainingInterrupted,
                                 weight_norm)
from minift.train.methods import MethodPlan, prepare_method
from minift.train.optimizer_in_backward import OptimizerInBackward
from minift.train.preference_tasks import export_task
from minift.train.rl_data import ALIGN_KINDS, check_align_run, load_align_datasets, prepare_align_run
from minift.train.rl_tasks import build_align_task_model
from minift.train.run_config import RunConfig, TrainConfig, to_toml, validate_run_config
from minift.train.tasks import (TaskModel, build_task_model, count_targets, count_tokens, prepare_batch, save_head,
                                summarize, to_device)

METRICS = "metrics.jsonl"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SHOWN_METRICS = ("accuracy", "margin", "rewards/accuracies", "rewards/margins", "reward", "kl")  # on the progress bar


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite: training cannot continue from this state."""


@dataclass
class LoopState:
    """The loop's scalars; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed: the position in the data order
    tokens: int = 0  # real tokens seen
    best_metric: float | None = None  # best value of train.early_stopping_metric so far
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    # divergence (minift/train/guards.py): the starting values a resumed run must compare against
    start_losses: list[float] = field(default_factory=list)  # losses of the first steps, until start_loss is set
    start_loss: float | None = None
    loss_ema: float | None = None
    start_weight_norm: float | None = None
    task: dict | None = None  # a task's own state (PPO: the KL coefficient and the rollout in use; rl_tasks.py)


@dataclass
class Run:
    """Everything setup() builds; fit() and evaluate() read it, and only fit() changes it."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    model: TaskModel
    tokenizer: object
    plan: MethodPlan
    checkpoint_names: list[str]  # TaskModel parameter names a checkpoint holds
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler | None
    unfreezing: GradualUnfreezing | None
    train_stream: BatchStream
    eval_stream: BatchStream | None
    total_steps: int
    labels: list[str] | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)  # masking draws (masked_lm)
    state: LoopState = field(default_factory=LoopState)
    lock: RunLock | None = None  # run_dir/run.lock: taken by setup() and fit(), released when fit() ends
    world: World = field(default_factory=World)  # this process among the others (minift/train/distributed.py)

    @property
    def parameter_names(self) -> dict:
        return {p: name for name, p in self.model.named_parameters()}


# ----------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """One seed for every generator a run may touch: torch (CPU and CUDA), numpy, Python's random."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r} but no CUDA device is available; use cpu or auto")
    return device


def setup(config: RunConfig, resume: bool = False, model=None, tokenizer=None) -> Run:
    """Build a run from its config; with resume=True, continue from the run directory's latest checkpoint.

    `model`/`tokenizer` may be passed already loaded (tests, notebooks); otherwise config.model.source is loaded.
    """
    train = config.train
    validate_run_config(config)  # before anything loads: every field's type and range, and the method's options
    check_distributed_config(config)
    world = init_world(train.distributed, resolve_device(train.device), train.distributed_timeout)  # torchrun's
    run_dir = check_output_dir(train.output_dir)  # a file, or a place that refuses new files, fails here too
    world.on_main(RunLock(run_dir).check)  # one run per folder (its rank 0 holds the lock): a live run is refused
    latest = ckpt.latest_checkpoint(run_dir)
    if resume and latest is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (looked in {run_dir / ckpt.CHECKPOINTS})")
    if not resume and latest is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; resume it with --resume {run_dir}, "
                         f"or set train.output_dir to a new folder")
    removed = world.on_main(lambda: ckpt.clean_interrupted_writes(run_dir))  # rank 0 cleans; every rank gets the list
    for leftover in removed if world.is_main else []:  # and rank 0 alone says so
        print(f"minift: note: removed {leftover}, left over from an interrupted write", file=sys.stderr)
    device = world.device(resolve_device(train.device))
    if train.precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision = fp16 needs a CUDA device (fp16 gradients need a grad scaler on a GPU); "
                         "use bf16 or fp32 on the CPU")
    seed_everything(train.seed)

    if model is None:
        from minift.io import load

        dtype = parse_dtype(config.model.dtype, "model.dtype")
        model, tokenizer = load(config.model.source, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"{config.model.source}: no tokenizer found; fine-tuning needs one (tokenizer.json)")
    if config.model.dropout is not None:
        set_dropout(model, config.model.dropout)

    align = config.task.kind in ALIGN_KINDS  # reward, preference (DPO), grpo, ppo: minift/train/rl_data.py
    if align:
        check_align_run(config, model)  # an encoder, or data.packing, refused before any record is tokenized
    train_data, eval_data, labels = (load_align_datasets if align else load_datasets)(config, tokenizer)
    task_model, plan, checkpoint_names = build_trainable_model(config, model, labels)
    model.gradient_checkpointing = train.gradient_checkpointing
    if train.compile:
        compile_blocks(model)  # in place: parameter names, hence checkpoints, unchanged
    task_model.to(device).train()
    world.wrap(task_model, train.fsdp_param_dtype)  # DDP wrapper, or FSDP shards: before the optimizer sees them
    task_model.register_forward_pre_hook(reseed_dropout)  # each training micro-batch's own dropout seed
    if align:
        prepare_align_run(task_model, train_data, eval_data, config, tokenizer)

    groups = build_layer_groups(task_model, train.layer_groups)  # bottom-up: body groups..., the head alone on top
    optimizer = build_optimizer(groups, train, device)
    steps_per_epoch = len(train_data) / (train.grad_accum_steps * world.size)  # micro-batches per step, all ranks
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, train, total_steps)
    unfreezing = GradualUnfreezing(groups) if train.gradual_unfreezing else None
    scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" else None

    run = Run(config=config, run_dir=run_dir, device=device, model=task_model, tokenizer=tokenizer, plan=plan,
              checkpoint_names=checkpoint_names, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              unfreezing=unfreezing, train_stream=train_data, eval_stream=eval_data, total_steps=total_steps,
              labels=labels)
    run.generator.manual_seed(train.seed)
    run.world = world
    run.lock = RunLock(run_dir)
    world.on_main(run.lock.acquire)  # atomic (O_EXCL): of two runs set up at once in this folder, one gets here
    try:
        if resume:
            restore_checkpoint(run, latest)
        else:
            world.on_main(lambda: start_run_dir(run_dir, config))
    except BaseException:
        run.lock.release()
        raise
    return run


def start_run_dir(run_dir: Path, config: RunConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(config))
    (run_dir / METRICS).write_text("")


def build_trainable_model(config: RunConfig, model: nn.Module, labels: list[str] | None):
    """Backbone + task head, prepared by the method. Returns (task model, method plan, checkpoint names)."""
    task = config.task
    if task.kind in ALIGN_KINDS:
        task_model = build_align_task_model(model, task)
    else:
        task_model = build_task_model(model, task.kind, num_labels=len(labels) if labels else None,
                                      pooling=task.pooling, head_dropout=task.head_dropout)
    task_model.fused_loss = config.train.fused_loss  # the LM losses' fused, chunked vocabulary projection
    plan = prepare_method(config.method.name, model, config.method.options)
    if hasattr(task_model, "method_prepared"):
        task_model.method_prepared()  # e.g. DPO's frozen reference copy, made before any step
    head = task_model.head_parameters()
    for p in head.values():
        p.requires_grad_(True)  # a new head always trains, whatever the method froze
    names = [f"backbone.{n}" for n in plan.checkpoint_names] + list(head)
    if not names:  # a method may freeze the whole backbone ("features"), but something must train
        raise ValueError(f"[method] {config.method.name!r} left nothing trainable (no backbone tensor, no task head)")
    return task_model, plan, names


def set_dropout(model: nn.Module, rate: float) -> None:
    model.config.dropout = rate  # attention dropout reads the config
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate


def build_layer_groups(model: TaskModel, n_groups: int) -> list[list[nn.Parameter]]:
    """ULMFiT layer groups of a task model, bottom-up (minift/schedules.py): the task's head alone on top —
    the classifier or MLM head, or for causal_lm the backbone's own final norm + lm_head.

    Call it after the method has chosen what trains. A group the method froze entirely (the frozen head of a
    causal LM under LoRA, the embeddings under "partial") is dropped, so the top group that trains gets
    train.lr, each trainable group below it one more factor, and no unfreezing stage is spent on nothing.
    """
    groups = layer_groups(model.backbone, n_groups, head=model.head)
    return [group for group in groups if any(p.requires_grad for p in group)]


def build_optimizer(groups: list[list[nn.Parameter]], train: TrainConfig, device) -> torch.optim.AdamW:
    """AdamW over discriminative layer groups; biases and norm weights (1-D tensors) get no weight decay.

    Splitting off the no-decay tensors makes two param groups per layer group, both at that layer group's
    rate (the depth counts layer groups, not param groups). They are ordered bottom-up, so the last param
    group always belongs to the top layer group (fit() logs its rate). Frozen tensors are left out.
    """
    options = dict(betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    factor = train.discriminative_factor
    if train.weight_decay:
        decay = [[p for p in g if p.dim() >= 2] for g in groups]
        no_decay = [[p for p in g if p.dim() < 2] for g in groups]
        param_groups = (discriminative_param_groups(decay, train.lr, factor, weight_decay=train.weight_decay)
                        + discriminative_param_groups(no_decay, train.lr, factor, weight_decay=0.0))
        param_groups.sort(key=lambda g: g["layer_group"])  # stable: decay before no-decay within a layer group
    else:
        param_groups = discriminative_param_groups(groups, train.lr, factor, weight_decay=0.0)
    if not param_groups:
        raise ValueError("no trainable parameters: the method froze everything")
    fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, fused=fused and device.type in ("cpu", "cuda"), **options)


def build_scheduler(optimizer, train: TrainConfig, total_steps: int) -> LRScheduler:
    options = {"constant": {}, "warmup_cosine": {"warmup_steps": train.warmup_steps},
               "slanted_triangular": {"cut_frac": train.cut_frac, "ratio": train.stlr_ratio}}
    if train.schedule not in options:
        raise ValueError(f"train.schedule = {train.schedule!r}; expected one of {', '.join(options)}")
    return LRScheduler(optimizer, train.schedule, total_steps=total_steps, **options[train.schedule])


# ----------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------


def autocast(precision: str, device: torch.device):
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def accumulate_gradients(model: TaskModel, micro_batches: list[dict], precision: str = "fp32",
                         scaler: torch.amp.GradScaler | None = None, step: int = 0, world: World | None = None) -> dict:
    """Forward + backward over k micro-batches so the gradients equal those of one batch of all of them.

    Each micro-batch's summed loss is divided by N_total, the number of targets in *all* k micro-batches,
    counted before any forward pass. Returns {"loss": mean loss per target, "targets": N_total, "tokens"}.
    Distributed (`world`): N_total counts every rank's micro-batches (all-reduced), and the loss and tokens
    returned are the global batch's (minift/train/distributed.py).
    """
    world = world or World()
    n_total = int(world.sum([sum(count_targets(batch, model.kind) for batch in micro_batches)])[0])
    if n_total == 0 and model.kind == "masked_lm":  # by chance no token was picked for masking: nothing to learn
        return {"loss": None, "targets": 0, "tokens": sum(count_tokens(batch) for batch in micro_batches)}
    if n_total == 0:
        raise ValueError(f"step {step}: the batch has no target tokens (every label is -100); check the data "
                         f"format and max_length (a prompt longer than max_length leaves no completion)")
    device = next(model.parameters()).device
    loss_total, tokens, sums = 0.0, 0, {}
    forward = world.forward_module(model)  # DDP: its wrapper, whose backward hooks all-reduce the gradients
    for index, batch in enumerate(micro_batches):
        world.sync_gradients(model, final=index == len(micro_batches) - 1)  # no_sync on all but the last
        with autocast(precision, device):
            out = forward(batch)
        for key, value in (out.metric_sums or {}).items():  # task metrics (DPO rewards, ...), summed over targets
            sums[key] = sums.get(key, 0.0) + value
        value = float(out.loss_sum.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"step {step}: the loss is {value} (micro-batch {index + 1} of {len(micro_batches)}); lower "
                f"train.lr, keep train.max_grad_norm set, or train in fp32/bf16 instead of fp16")
        loss = out.loss_sum * world.size / n_total  # DDP/FSDP average the ranks' gradients: x N makes it the sum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += value
        tokens += count_tokens(batch)
    if world.active:  # the global batch's loss, tokens and task metrics, the same on every rank
        keys = sorted(sums)
        loss_total, tokens, *values = world.sum([loss_total, tokens, *(float(sums[key]) for key in keys)])
        sums = dict(zip(keys, values))
        tokens = int(tokens)
    return {"loss": loss_total / n_total, "targets": n_total, "tokens": tokens,
            "metrics": {key: value / n_total for key, value in sums.items()}}


def optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None,
                   scaler: torch.amp.GradScaler | None = None, step: int = 0) -> float | None:
    """Clip, step, zero the gradients; returns the gradient norm before clipping (None without clipping)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = None
    if max_grad_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    elif scaler is None:  # not clipped, but watched: a NaN gradient would make every weight NaN
        norm = weight_norm([p.grad for p in params])
    if norm is not None and not math.isfinite(norm) and scaler is None:  # fp16: the scaler skips such steps
        raise NonFiniteLossError(f"step {step}: the gradient norm is {norm}; lower train.lr or check the data")
    if scaler is not None:
        scaler.step(optimizer)  # skipped if fp16 gradients overflowed; the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------


def fit(run: Run) -> dict:
    """Train until total_steps (or early stopping); returns the last metrics. Checkpoints along the way.

    Holds the run directory's lock while it runs (minift/train/guards.py). Two ways to stop early leave the run
    resumable and export nothing: Ctrl-C (the step in progress finishes, a checkpoint is written, then
    TrainingInterrupted, a KeyboardInterrupt, is raised; a second Ctrl-C raises KeyboardInterrupt at once) and
    divergence (DivergenceError, a ValueError; the diverged step is not checkpointed).
    """
    train = run.config.train
    if run.lock is None:
        run.lock = RunLock(run.run_dir)
    run.world.on_main(run.lock.acquire)  # again, if an earlier fit() of this run released it
    try:
        with StopOnInterrupt(saving=train.save_checkpoints) as interrupt:
            try:
                last = train_steps(run, interrupt)
            except RuntimeError as error:  # distributed: a collective failed, because another rank stopped
                if not (run.world.active and is_collective_failure(error)):
                    raise
                raise run.world.lost(error, run.state.step + 1, run.run_dir) from None
        if run.world.is_main:
            write_training_chart(run.run_dir / METRICS, run.run_dir / "training.svg")  # warns, never raises
        if interrupt.requested:
            checkpoint = ckpt.latest_checkpoint(run.run_dir) if train.save_checkpoints else None
            raise TrainingInterrupted(run.run_dir, run.state.step, checkpoint)
        if train.export:
            with run.world.gathered(run.model):  # FSDP: the full weights on every rank while rank 0 exports
                run.world.on_main(lambda: export(run))
        return last
    except (DivergenceError, NonFiniteLossError):
        if run.world.is_main:
            write_training_chart(run.run_dir / METRICS, run.run_dir / "training.svg")  # shows where it went wrong
        raise
    finally:
        run.lock.release()


def train_steps(run: Run, interrupt: StopOnInterrupt) -> dict:
    """The optimizer steps of fit(), until total_steps, early stopping or a Ctrl-C (`interrupt.requested`)."""
    train, state = run.config.train, run.state
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not train.progress_bar or not run.world.is_main,
               desc="finetune", dynamic_ncols=True)
    start, start_tokens, last = time.perf_counter(), state.tokens, {"step": state.step}
    compile_clock = CompileClock() if train.compile else None  # compiling time is logged apart, not in tokens/s
    trainable = [p for group in run.optimizer.param_groups for p in group["params"]]
    factor = train.divergence_factor if getattr(run.model, "loss_has_scale", True) else 0.0  # see guards.py
    monitor = DivergenceMonitor(factor, state)
    monitor.start(trainable)
    if state.task is not None and hasattr(run.model, "load_task_state"):
        run.model.load_task_state(state.task)  # resumed: e.g. PPO's rollout in use
    saved_step = state.step  # the step of the newest checkpoint (a fresh run: 0, nothing to save)
    run.model.train()
    in_backward = OptimizerInBackward(run.optimizer) if train.optimizer_in_backward else None  # off at the end
    try:
        while state.step < run.total_steps and not state.stopped_early and not interrupt.requested:
            step = state.step + 1
            if run.unfreezing is not None:
                run.unfreezing.apply((step - 1) // train.gradual_unfreezing)
            micro_batches, first = [], run.world.first_micro_batch(train.grad_accum_steps)
            for index, b in enumerate(run.train_stream.take(run.world.shard_start(state.micro_batches,
                                                                                  train.grad_accum_steps),
                                                            train.grad_accum_steps)):  # this rank's share
                seed = micro_batch_seed(train.seed, step, first + index)  # the same on any rank, any world size
                run.generator.manual_seed(seed + 1)  # masked LM: the masked positions
                batch = prepare_batch(to_device(b, run.device), run.model.kind, run.tokenizer,
                                      run.config.task.mlm_probability, run.generator)
                micro_batches.append({**batch, DROPOUT_SEED: seed})  # dropout: reseed_dropout, before its forward
            lr = run.optimizer.param_groups[-1]["lr"]
            stats = accumulate_gradients(run.model, micro_batches, train.precision, run.scaler, step,
                                         **({"world": run.world} if run.world.active else {}))
            if in_backward is None:
                grad_norm = optimizer_step(run.optimizer, train.max_grad_norm, run.scaler, step)
            else:  # every weight was updated during backward (minift/train/optimizer_in_backward.py)
                grad_norm = in_backward.finish_step()
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(f"step {step}: the gradient norm is {grad_norm}; lower train.lr or "
                                             f"check the data")
            run.scheduler.step()
            if hasattr(run.model, "task_state"):
                state.task = run.model.task_state()  # saved with the loop's counters in every checkpoint
            state.step, state.micro_batches = step, state.micro_batches + len(micro_batches) * run.world.size
            state.tokens += stats["tokens"]
            compile_s = compile_clock.elapsed() if compile_clock else 0.0
            tokens_per_s = (state.tokens - start_tokens) / max(time.perf_counter() - start - compile_s, 1e-9)
            last = {"step": step, "epoch": round(run.train_stream.epoch_of(state.micro_batches), 4),
                    "loss": stats["loss"], "lr": lr, "grad_norm": grad_norm, "targets": stats["targets"],
                    "tokens_per_s": round(tokens_per_s, 1), **stats.get("metrics", {}),
                    **({"compile_s": round(compile_s, 2)} if compile_clock else {})}
            bar.update(1)
            shown_loss = "-" if stats["loss"] is None else f"{stats['loss']:.4f}"  # None: no masked token drawn
            shown = {key.split("/")[-1]: f"{value:.3g}" for key, value in stats.get("metrics", {}).items()
                     if key in SHOWN_METRICS}
            bar.set_postfix(loss=shown_loss, lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", **shown)
            if (step % train.log_every == 0 or step == run.total_steps) and run.world.is_main:
                append_metrics(run.run_dir, last)
            monitor.check(step, stats["loss"], trainable)  # before evaluating or saving a diverged model
            if (train.eval_every and step % train.eval_every == 0) or step == run.total_steps:
                last.update(evaluate_run(run))
            at_end = step == run.total_steps or state.stopped_early
            if train.save_checkpoints and ((train.save_every and step % train.save_every == 0) or at_end):
                save(run)
                saved_step = step
            if run.world.active and run.world.any(interrupt.requested):  # a Ctrl-C seen by one rank stops all
                interrupt.requested = True
        if interrupt.requested and train.save_checkpoints and saved_step != state.step:
            save(run)  # Ctrl-C: the step in progress has finished; this is where the resumed run starts
    finally:
        bar.close()
        if in_backward is not None:
            in_backward.remove()  # a later fit(), or the caller's own backward, gets plain gradients again
    return last


def evaluate_run(run: Run) -> dict:
    """Evaluate on the validation set, log it, and update early stopping."""
    if run.eval_stream is None:
        return {}
    metrics = evaluate(run.model, eval_batches(run), run.config.train.precision)
    state, train = run.state, run.config.train
    if run.world.is_main:
        append_metrics(run.run_dir, {"step": state.step, **metrics})
    value = metrics.get(train.early_stopping_metric)
    if value is not None:
        higher_is_better = train.early_stopping_metric == "eval_accuracy"
        better = state.best_metric is None or (value > state.best_metric if higher_is_better
                                               else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        else:
            state.evals_without_improvement += 1
            if train.early_stopping_patience and state.evals_without_improvement >= train.early_stopping_patience:
                state.stopped_early = True
                tqdm.write(f"early stopping at step {state.step}: {train.early_stopping_metric} has not improved "
                           f"for {state.evals_without_improvement} evaluations (best {state.best_metric:.4f} "
                           f"at step {state.best_step})")
    return metrics


def eval_batches(run: Run):
    """Validation batches; masked_lm masks come from a generator seeded afresh, so every evaluation is the same
    and the training generator is not disturbed."""
    generator = torch.Generator().manual_seed(run.config.train.seed + 1)
    for batch in run.eval_stream.in_order():
        yield prepare_batch(to_device(batch, run.device), run.model.kind, run.tokenizer,
                            run.config.task.mlm_probability, generator)


@torch.no_grad()
def evaluate(model: TaskModel, batches, precision: str = "fp32") -> dict:
    """Mean loss per target, and perplexity or accuracy, over all `batches` (dicts already on the device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n_targets, n_correct, sums = 0.0, 0, 0, {}
    for batch in batches:
        with autocast(precision, device):
            out = model(batch)
        loss_sum += float(out.loss_sum)
        n_targets += out.n_targets
        n_correct += out.n_correct or 0
        for key, value in (out.metric_sums or {}).items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    if n_targets == 0:
        raise ValueError("evaluate: the evaluation data has no targets")
    return {**summarize(model.kind, loss_sum, n_targets, n_correct),
            **{f"eval_{key}": value / n_targets for key, value in sums.items()}}


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ----------------------------------------------------------------------------------------------------
# Checkpoint, resume, export
# ----------------------------------------------------------------------------------------------------


def save(run: Run) -> Path:
    """Write a checkpoint. Distributed: DDP ranks hold equal copies, so rank 0 writes the ordinary checkpoint;
    FSDP ranks each write their shards (torch.distributed.checkpoint, minift/train/distributed.py)."""
    if run.world.mode == "fsdp":
        state = {"loop": asdict(run.state), "scheduler": run.scheduler.state_dict(), "labels": run.labels,
                 "batch_layout": batch_layout(run.world, run.config.train)}
        return save_sharded(run.run_dir, run.state.step, run.model, run.optimizer, state, run.world,
                            keep=run.config.train.keep_checkpoints)
    return run.world.on_main(lambda: write_checkpoint(run))


def write_checkpoint(run: Run) -> Path:
    params = dict(run.model.named_parameters())
    weights = {name: params[name] for name in run.checkpoint_names}
    state = {"loop": asdict(run.state), "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict() if run.scaler is not None else None, "labels": run.labels,
             "batch_layout": batch_layout(run.world, run.config.train)}  # checked when resumed at another world size
    return ckpt.save_checkpoint(run.run_dir, run.state.step, weights, run.optimizer, run.parameter_names, state,
                                generators={"masking": run.generator}, keep=run.config.train.keep_checkpoints)


def restore_checkpoint(run: Run, path: Path) -> None:
    """Resume from checkpoint folder `path`: an ordinary one (single process, DDP), or an FSDP sharded one."""
    if not is_sharded(path):
        if run.world.mode == "fsdp":
            raise ValueError(f"{path}: written without FSDP (one safetensors copy); resume it with "
                             f"train.distributed = \"none\" or \"ddp\"")
        return restore(run, ckpt.load_checkpoint(path))
    if run.world.mode != "fsdp":
        raise ValueError(f"{path}: a sharded FSDP checkpoint; resume it with train.distributed = \"fsdp\" "
                         f"(any number of processes, even --nproc 1)")
    check_batch_layout(read_json_file(path / "state.json").get("batch_layout"), run.world, run.config.train, path)
    state = load_sharded(path, run.model, run.optimizer)  # any world size: DCP reshards
    if state.get("labels") != run.labels:
        raise ValueError(f"{path}: labels {state.get('labels')} differ from this run's {run.labels}")
    run.scheduler.load_state_dict(state["scheduler"])
    try:
        run.state = LoopState(**state["loop"])
    except TypeError as error:
        raise ValueError(f"{path / 'state.json'}: loop: {error}; written by another minift version?") from None
    if run.world.is_main:
        kept = [r for r in read_metrics(run.run_dir) if r.get("step", 0) <= run.state.step]
        (run.run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))


def restore(run: Run, checkpoint: ckpt.Checkpoint) -> None:
    """Put weights, optimizer, schedule, grad scaler, RNG and loop position back as they were at the checkpoint."""
    check_batch_layout(checkpoint.state.get("batch_layout"), run.world, run.config.train, checkpoint.path)
    saved_labels = checkpoint.state.get("labels")
    if saved_labels != run.labels:
        raise ValueError(f"{checkpoint.path}: labels {saved_labels} differ from this run's {run.labels}")
    ckpt.load_weights(run.model, checkpoint.weights, run.checkpoint_names, str(checkpoint.path))
    ckpt.load_optimizer_state(run.optimizer, run.parameter_names, checkpoint)
    run.scheduler.load_state_dict(checkpoint.state["scheduler"])
    if run.scaler is not None and checkpoint.state.get("scaler"):
        run.scaler.load_state_dict(checkpoint.state["scaler"])
    try:
        run.state = LoopState(**checkpoint.state["loop"])
    except TypeError as error:  # a key this version does not know, or one missing
        raise ValueError(f"{checkpoint.path / 'state.json'}: loop: {error}; written by another minift "
                         "version?") from None
    ckpt.restore_rng(checkpoint, {"masking": run.generator})
    # metrics.jsonl may hold lines the interrupted run wrote after this checkpoint: drop them.
    if run.world.is_main:
        kept = [r for r in read_metrics(run.run_dir) if r.get("step", 0) <= run.state.step]
        (run.run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))


def export(run: Run) -> Path | None:
    """Write the result to run_dir/final with the method's exporter (full: a Hugging Face directory), plus
    the task head and task.json, so `minift eval --model run_dir/final` can load it back."""
    if run.plan.export is None:
        return None
    final = run.run_dir / "final"
    try:
        if run.model.kind in ALIGN_KINDS:  # reward: a sequence-classification dir; DPO, RL: the method's export
            export_task(run.model, run.plan, run.tokenizer, final)
        else:
            run.plan.export(run.model.backbone, run.tokenizer, final)
            save_head(run.model, final, run.labels)
    except OSError as error:  # a full disk: the checkpoints are complete, so the export can be redone from them
        checkpoint = ckpt.latest_checkpoint(run.run_dir)
        kept = (f"the last checkpoint {checkpoint} is intact; free some space and export it with "
                f"`minift export --run {run.run_dir} --out DIR`" if checkpoint is not None else
                "no checkpoint was kept (train.save_checkpoints = false)")
        raise WriteError(f"{final}: could not write the exported model ({error.strerror or error}); {kept}") from error
    return final


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[TaskModel, object, RunConfig, list[str] | None]:
    """Rebuild a run's model from its config.toml and latest checkpoint (any method): for evaluation."""
    from minift.io import load
    from minift.train.run_config import load_run_config

    run_dir = Path(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint found under {run_dir / ckpt.CHECKPOINTS}")
    config = load_run_config(run_dir / "config.toml")
    sharded = is_sharded(latest)  # an FSDP run's checkpoint: its shards are joined here, in this one process
    checkpoint = None if sharded else ckpt.load_checkpoint(latest)
    seed_everything(config.train.seed)
    model, tokenizer = load(config.model.source)
    labels = (read_json_file(latest / "state.json") if sharded else checkpoint.state).get("labels")
    task_model, _, names = build_trainable_model(config, model, labels)
    if sharded:
        load_sharded_weights(latest, task_model, names)
    else:
        ckpt.load_weights(task_model, checkpoint.weights, names, str(latest))
    return task_model.to(device).eval(), tokenizer, config, labels
