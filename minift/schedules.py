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

3. Gradual unfreezing (§3.3). Epoch 0 trains only the top group; each later stage unfreezes the next group
   down, until everything trains. Stage s = epoch // epochs_per_stage trains the top s + 1 groups.

Layer groups. Both tricks need the model cut into a handful of groups, bottom-up. The paper's classifier
is an AWD-LSTM, and fastai cuts it into 5: the embedding, each of the 3 LSTM layers, and the new
classifier head on top (its language model into 4: the 3 LSTM layers, then embedding + tied decoder, the
"head"). `layer_groups` does the same to a transformer:

    top group     the head: whatever turns the last block's hidden states into the task's outputs, alone,
                  so the first unfreezing stage trains the head only and the block below gets lr / 2.6
                    classification   the new classifier
                    masked LM        the MLM head, *with* the embedding matrix its decoder is tied to
                    causal LM        final norm + lm_head (a tied lm_head *is* the embedding matrix:
                                     it goes up with the head, as in fastai's language model)
    body groups   the U units below, in order: the embeddings (those not already in the head), then each
                  block (the final norm, when the head does not use it, rides with the last block).
                  With n = layer_groups groups in all, k = min(n - 1, U) body groups; each takes U // k
                  units and the top U % k groups one more (uneven splits make the upper groups the larger
                  ones, so MiniLM's embeddings keep a group of their own, like fastai's).

    MiniLM-L6 classifier, n = 5 (U = 7):  embeddings | blocks 0-1 | blocks 2-3 | blocks 4-5 | classifier
    lr:                                   lr/2.6^4     lr/2.6^3     lr/2.6^2     lr/2.6       lr
    SmolLM2 causal LM, n = 5 (U = 30, the tied embedding sits in the head):
                                          blocks 0-6 | 7-13 | 14-21 | 22-29 | norm + lm_head (= embedding)

Five groups by default, like fastai's AWD-LSTM classifier: the bottom rate is then lr / 2.6^4 = lr / 46,
where one group per block of a 30-layer model would give lr / 2.6^31 ~ 1e-13 lr — weights that cannot move.
With an adapter method the groups hold what trains (LoRA matrices inside the blocks); the trainer drops a
group the method froze entirely (a causal LM's head under LoRA), so the top group that trains gets lr.

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


EMBEDDINGS = ("embed", "pos_embed", "type_embed", "embed_norm")  # the bottom of a minift Transformer
DEFAULT_LAYER_GROUPS = 5  # fastai's AWD-LSTM classifier: embedding, 3 LSTM layers, head


def layer_groups(model: nn.Module, n_groups: int = DEFAULT_LAYER_GROUPS,
                 head: nn.Module | Sequence[nn.Module | nn.Parameter] | None = None) -> list[list[nn.Parameter]]:
    """Cut a minift Transformer bottom-up into at most `n_groups` layer groups: [body groups ..., head].

    `head` is what the task puts on top of the last block (a classifier, an MLM head), as a module or a
    list of modules/parameters; None means the model's own output head, final norm + lm_head (a causal LM).
    The head is claimed first, so a tied embedding matrix (lm_head.weight, the MLM decoder) goes to the
    top group. The rest, bottom-up, forms U units: the embeddings (what is left of them), then one unit per
    block, with the final norm and an unused lm_head joining the last block. They are split into
    k = min(n_groups - 1, U) contiguous body groups of U // k units, the top U % k groups taking one more.
    Parameters found nowhere else (a soft prompt) join the top group; each parameter lands in exactly one
    group, and empty groups are dropped. n_groups = 1 puts everything in one group.
    """
    if n_groups < 1:
        raise ValueError(f"layer_groups: n_groups must be >= 1, got {n_groups}")
    if not hasattr(model, "embed") or not hasattr(model, "blocks"):
        raise ValueError("layer_groups: expected a minift Transformer with `embed` and `blocks` attributes")
    seen: set[int] = set()

    def take(parts) -> list[nn.Parameter]:
        params = []
        for part in parts:
            if part is None:
                continue
            for p in [part] if isinstance(part, nn.Parameter) else part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    output = [getattr(model, "norm", None), getattr(model, "lm_head", None)]
    top = take(output if head is None else [head] if isinstance(head, (nn.Module, nn.Parameter)) else head)
    embeddings = take([getattr(model, name, None) for name in EMBEDDINGS])
    units = ([embeddings] if embeddings else []) + [take([block]) for block in model.blocks]
    tail = take(output)  # the final norm (and an lm_head) the head does not use: after the last block
    if units:
        units[-1] += tail
    else:
        top += tail
    top += [p for p in model.parameters() if id(p) not in seen]  # anything else: train it with the top
    k = min(n_groups - 1, len(units))
    if k == 0:
        return [group for group in [[p for unit in units for p in unit] + top] if group]
    size, extra = divmod(len(units), k)
    body, start = [], 0
    for index in range(k):
        stop = start + size + (1 if index >= k - extra else 0)  # the top `extra` groups hold one more unit
        body.append([p for unit in units[start:stop] for p in unit])
        start = stop
    return [group for group in [*body, top] if group]


def layer_group_names(model: nn.Module, groups: Sequence[Sequence[nn.Parameter]]) -> list[str]:
    """A short label per group, for logs and tutorials: "embed, pos_embed", "blocks 2-3", "norm, embed=lm_head".

    Names are the modules right under `model` (or under its `backbone`), blocks as a range of indices; a
    tied matrix shows all its names joined by "=".
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.removeprefix("backbone.").split(".")
        label = f"blocks.{parts[1]}" if parts[0] == "blocks" else parts[0]
        if label not in names.setdefault(id(p), []):
            names[id(p)].append(label)
    labels = []
    for group in groups:
        seen: list[str] = []
        for p in group:
            label = "=".join(names.get(id(p), ["?"]))
            if label not in seen:
                seen.append(label)
        blocks = sorted(int(label.split(".")[1]) for label in seen if label.startswith("blocks."))
        parts = [label for label in seen if not label.startswith("blocks.")]
        if blocks:  # one entry for the run of blocks, where the first of them came
            where = next(i for i, label in enumerate(seen) if label.startswith("blocks."))
            parts.insert(where, f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
        labels.append(", ".join(parts))
    return labels


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
    purpose (a LoRA or NF4 base, the embeddings under "partial") stay frozen: build it after the method has
    chosen what trains and before the first apply. A group with nothing trainable (all frozen by the method)
    is not a stage: stage s thaws the top s + 1 groups that have something to train. Frozen parameters get
    no gradient, and torch optimizers skip parameters whose .grad is None (zero_grad(set_to_none=True), the
    default) — no update, no weight decay — so one optimizer holding all groups works for every stage. For
    one slanted triangle per stage, use LRScheduler(..., total_steps=steps_per_epoch * epochs_per_stage, cycle=True).
    """

    def __init__(self, groups: Sequence[nn.Module | Sequence[nn.Parameter]], epochs_per_stage: int = 1) -> None:
        if epochs_per_stage < 1:
            raise ValueError(f"GradualUnfreezing: epochs_per_stage must be >= 1, got {epochs_per_stage}")
        trainable = [[p for p in _parameters_of(g) if p.requires_grad] for g in groups]
        self.groups = [params for params in trainable if params]  # bottom-up, only groups that can train
        if not self.groups:
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
