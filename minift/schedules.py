"""Learning-rate schedules for fine-tuning: ULMFiT's three tricks, plus warmup-cosine to compare with.

Lesson
------
ULMFiT (Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text Classification") fine-tunes a
pretrained language model without wrecking what it already knows, with three ideas:

1. Slanted triangular learning rates (§3.2). A short linear climb, then a long linear descent. With T
   optimizer steps, t counted from 0:

       cut = floor(T * cut_frac)
       p   = t / cut                                         if t < cut
             1 - (t - cut) / (cut * (1 / cut_frac - 1))      otherwise
       lr  = lr_max * (1 + p * (ratio - 1)) / ratio

   lr starts at lr_max / ratio, peaks at lr_max on step `cut`, and falls back to lr_max / ratio at t = T.
   Paper defaults: cut_frac = 0.1, ratio = 32, lr_max = 0.01.

        lr_max |      /\
               |     /   \
               |    /      \
               |   /         \
               |  /             \
     lr_max/32 | /                 \
               +---------------------------> t
               0   cut                   T

2. Discriminative fine-tuning (§3.2). Lower layers hold general features, upper layers task-specific
   ones, so each layer group gets its own rate: lr of group l-1 = lr of group l / 2.6. fastai spreads a
   range geometrically instead (`lr_range`, its `slice(lo, hi)`); both give one optimizer param group
   per layer group.

       group:   embeddings   blocks 0-1   blocks 2-3   head
       lr:      lr/2.6^3     lr/2.6^2     lr/2.6       lr

3. Gradual unfreezing (§3.3). Epoch 0 trains only the top group; each later stage unfreezes the next group
   down, until everything trains. Stage s = epoch // epochs_per_stage trains the top s + 1 groups.

`warmup_cosine` (linear warmup, then a half cosine, as in transformers' get_cosine_schedule_with_warmup)
is here so the two can be compared on equal terms.

`LRScheduler` applies any of these schedules at every step to a torch optimizer. Each param group keeps
its own peak rate in group["initial_lr"], so one schedule drives all discriminative groups, and
`state_dict` / `load_state_dict` let a resumed run continue the schedule exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch.nn as nn

# ----------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step
# ----------------------------------------------------------------------------------------------------


def slanted_triangular(step: int, total_steps: int, lr_max: float, cut_frac: float = 0.1, ratio: float = 32) -> float:
    """ULMFiT's slanted triangular learning rate at `step` (counted from 0) of `total_steps` (§3.2, eq. 3).

    The formula is the paper's, exactly, with two guards. When cut = floor(T * cut_frac) is 0 (tiny runs or
    cut_frac = 0) there is no climb and the descent spans all T steps. And p is clamped at 0: the descent
    takes cut / cut_frac - cut steps, which is fewer than T - cut when T * cut_frac is not a whole number
    (T = 15: the floor is reached at t = 10), and the raw formula would then go below lr_max / ratio and
    even negative; from there on, and past T, the rate stays at the floor lr_max / ratio.
    """
    if total_steps < 1:
        raise ValueError(f"slanted_triangular: total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= cut_frac < 1.0:
        raise ValueError(f"slanted_triangular: cut_frac must be in [0, 1), got {cut_frac}")
    if ratio < 1:
        raise ValueError(f"slanted_triangular: ratio must be >= 1 (lr_max / lowest lr), got {ratio}")
    if step < 0:
        raise ValueError(f"slanted_triangular: step must be >= 0, got {step}")
    cut = math.floor(total_steps * cut_frac)
    if cut == 0:
        p = 1.0 - step / total_steps  # no warm-up: descend from the peak over all T steps
    elif step < cut:
        p = step / cut
    else:
        p = 1.0 - (step - cut) / (cut * (1.0 / cut_frac - 1.0))
    p = max(p, 0.0)
    return lr_max * (1.0 + p * (ratio - 1.0)) / ratio


def warmup_cosine(step: int, total_steps: int, lr_max: float, warmup_steps: int, lr_min: float = 0.0) -> float:
    """Linear warmup from 0 over `warmup_steps`, then a half cosine from lr_max down to lr_min at total_steps.

    With lr_min = 0 this equals transformers' get_cosine_schedule_with_warmup (lr_max times its multiplier).
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"warmup_cosine: need total_steps >= 1 and warmup_steps >= 0; "
                         f"got {total_steps} and {warmup_steps}")
    if step < warmup_steps:
        return lr_max * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # 1 -> 0 over the decay
    return lr_min + (lr_max - lr_min) * cosine


def constant(step: int, total_steps: int, lr_max: float) -> float:
    """The base rate at every step (useful as a baseline)."""
    return lr_max


SCHEDULES: dict[str, Callable[..., float]] = {
    "slanted_triangular": slanted_triangular,
    "warmup_cosine": warmup_cosine,
    "constant": constant,
}

# ----------------------------------------------------------------------------------------------------
# Discriminative fine-tuning: one param group per layer group
# ----------------------------------------------------------------------------------------------------


def lr_range(lr_low: float, lr_high: float, n_groups: int) -> list[float]:
    """`n_groups` rates spaced geometrically from lr_low (bottom group) to lr_high (top group), like fastai's slice."""
    if n_groups < 1:
        raise ValueError(f"lr_range: n_groups must be >= 1, got {n_groups}")
    if n_groups == 1:
        return [lr_high]
    step = (lr_high / lr_low) ** (1.0 / (n_groups - 1))
    return [lr_low * step**i for i in range(n_groups)]


def _parameters_of(group: nn.Module | Sequence[nn.Parameter]) -> list[nn.Parameter]:
    return list(group.parameters()) if isinstance(group, nn.Module) else list(group)


def layer_groups(model: nn.Module, blocks_per_group: int = 1) -> list[list[nn.Parameter]]:
    """Split a minift Transformer bottom-up: [embeddings, blocks (blocks_per_group each) ..., top].

    embeddings = embed, pos_embed, type_embed, embed_norm (those present); top = norm, lm_head and a
    classification `head` attached by the trainer. Every parameter lands in exactly one group: a tied
    lm_head weight *is* the embedding matrix, so it stays with the embeddings. Parameters found nowhere
    else (a soft prompt, say) join the top group.
    """
    if blocks_per_group < 1:
        raise ValueError(f"layer_groups: blocks_per_group must be >= 1, got {blocks_per_group}")
    if not hasattr(model, "embed") or not hasattr(model, "blocks"):
        raise ValueError("layer_groups: expected a minift Transformer with `embed` and `blocks` attributes")
    seen: set[int] = set()

    def take(modules: list[nn.Module | None]) -> list[nn.Parameter]:
        params = []
        for module in modules:
            for p in module.parameters() if module is not None else []:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    bottom = take([getattr(model, name, None) for name in ("embed", "pos_embed", "type_embed", "embed_norm")])
    blocks = list(model.blocks)
    middle = [take(blocks[i : i + blocks_per_group]) for i in range(0, len(blocks), blocks_per_group)]
    top = take([getattr(model, name, None) for name in ("norm", "lm_head", "head")])
    top += [p for p in model.parameters() if id(p) not in seen]  # anything else: train it with the top
    return [group for group in [bottom, *middle, top] if group]


def discriminative_param_groups(
    layer_groups: Sequence[nn.Module | Sequence[nn.Parameter]],
    lr: float | Sequence[float],
    factor: float = 2.6,
    trainable_only: bool = True,
    **group_options,
) -> list[dict]:
    """Optimizer param groups, bottom group first: the top group gets `lr`, group k below it lr / factor^k.

    `lr` may also be a list with one rate per group (e.g. from `lr_range`). Each dict carries "lr",
    "initial_lr" (the peak rate that LRScheduler scales) and "layer_group" (its index). Extra keyword
    options (weight_decay=..., betas=...) go into every group. With trainable_only, parameters that are
    frozen now (a LoRA base weight) are left out; build the groups *before* GradualUnfreezing.apply freezes
    the lower ones, so they are in the optimizer when they thaw. Empty groups are dropped.
    """
    n = len(layer_groups)
    if isinstance(lr, (int, float)):
        rates = [lr / factor ** (n - 1 - i) for i in range(n)]
    else:
        rates = list(lr)
        if len(rates) != n:
            raise ValueError(f"discriminative_param_groups: got {len(rates)} learning rates for {n} layer groups")
    groups = []
    for index, (group, rate) in enumerate(zip(layer_groups, rates)):
        params = [p for p in _parameters_of(group) if p.requires_grad or not trainable_only]
        if params:
            groups.append({"params": params, "lr": rate, "initial_lr": rate, "layer_group": index, **group_options})
    return groups


# ----------------------------------------------------------------------------------------------------
# Gradual unfreezing
# ----------------------------------------------------------------------------------------------------


class GradualUnfreezing:
    """Thaw layer groups from the top down: at stage s the top s + 1 groups train (ULMFiT §3.3).

        unfreeze = GradualUnfreezing(layer_groups(model), epochs_per_stage=1)
        for epoch in range(n_epochs):
            unfreeze.apply(epoch)            # sets requires_grad; returns the stage
            ...train one epoch...

    Only parameters that were trainable when this object was built are ever touched, so weights frozen on
    purpose (a LoRA or NF4 base) stay frozen. Frozen parameters get no gradient, and torch optimizers skip
    parameters whose .grad is None (zero_grad(set_to_none=True), the default), so one optimizer holding all
    groups works for every stage. For one slanted triangle per stage, use
    LRScheduler(..., total_steps=steps_per_epoch * epochs_per_stage, cycle=True).
    """

    def __init__(self, groups: Sequence[nn.Module | Sequence[nn.Parameter]], epochs_per_stage: int = 1) -> None:
        if epochs_per_stage < 1:
            raise ValueError(f"GradualUnfreezing: epochs_per_stage must be >= 1, got {epochs_per_stage}")
        self.groups = [[p for p in _parameters_of(g) if p.requires_grad] for g in groups]
        if not any(self.groups):
            raise ValueError("GradualUnfreezing: no trainable parameters in any group")
        self.epochs_per_stage = epochs_per_stage

    @property
    def n_stages(self) -> int:
        return len(self.groups)

    def stage(self, epoch: int) -> int:
        """Stage of `epoch` (from 0); the last stage (everything trainable) lasts for all later epochs."""
        return min(epoch // self.epochs_per_stage, self.n_stages - 1)

    def apply(self, epoch: int) -> int:
        """Set requires_grad for `epoch`: the top stage(epoch) + 1 groups train, the rest are frozen."""
        stage = self.stage(epoch)
        first_trainable = self.n_stages - 1 - stage
        for index, params in enumerate(self.groups):
            for p in params:
                p.requires_grad_(index >= first_trainable)
        return stage


# ----------------------------------------------------------------------------------------------------
# Applying a schedule to an optimizer, step by step
# ----------------------------------------------------------------------------------------------------


class LRScheduler:
    """minift's per-step scheduler: group["lr"] = schedule(step, total_steps, lr_max=group["initial_lr"]).

        optimizer = torch.optim.AdamW(discriminative_param_groups(layer_groups(model), lr=1e-3))
        scheduler = LRScheduler(optimizer, "slanted_triangular", total_steps=1000, cut_frac=0.1, ratio=32)
        for batch in batches:
            ...loss.backward(); optimizer.step(); optimizer.zero_grad()
            scheduler.step()                   # the next optimizer step uses the next rate

    Not torch's LRScheduler: it works with any torch optimizer and any schedule function from this file
    (or your own `fn(step, total_steps, lr_max, **options)`). Groups without "initial_lr" use their current
    "lr" as the peak. With cycle=True the schedule restarts every total_steps (one triangle per unfreezing
    stage). state_dict holds the step and each group's peak, so a resumed run gets exactly the same rates.
    """

    def __init__(self, optimizer, schedule: str | Callable[..., float], total_steps: int, cycle: bool = False,
                 **schedule_options) -> None:
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise ValueError(f"LRScheduler: unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
            self.name, self.schedule = schedule, SCHEDULES[schedule]
        else:
            self.name, self.schedule = getattr(schedule, "__name__", "custom"), schedule
        if total_steps < 1:
            raise ValueError(f"LRScheduler: total_steps must be >= 1, got {total_steps}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.cycle = cycle
        self.options = schedule_options
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def lr_at(self, step: int, lr_max: float) -> float:
        t = step % self.total_steps if self.cycle else step
        return self.schedule(t, self.total_steps, lr_max=lr_max, **self.options)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count, group["initial_lr"])

    def step(self) -> None:
        """Advance one optimizer step and set every group's rate for the next one."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "schedule": self.name,
            "step_count": self.step_count,
            "total_steps": self.total_steps,
            "cycle": self.cycle,
            "options": dict(self.options),
            "initial_lrs": [group["initial_lr"] for group in self.optimizer.param_groups],
        }

    def load_state_dict(self, state: dict) -> None:
        peaks = state["initial_lrs"]
        if len(peaks) != len(self.optimizer.param_groups):
            raise ValueError(f"LRScheduler.load_state_dict: checkpoint has {len(peaks)} param groups, "
                             f"the optimizer has {len(self.optimizer.param_groups)}; build the same groups first")
        if state["schedule"] != self.name:
            raise ValueError(f"LRScheduler.load_state_dict: checkpoint schedule {state['schedule']!r} != {self.name!r}")
        self.step_count = state["step_count"]
        self.total_steps = state["total_steps"]
        self.cycle = state["cycle"]
        self.options = dict(state["options"])
        for group, peak in zip(self.optimizer.param_groups, peaks):
            group["initial_lr"] = peak
        self._apply()
