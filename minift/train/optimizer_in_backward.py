"""train.optimizer_in_backward = true: each weight takes its AdamW step the moment its gradient is complete.

Lesson
------
Full fine-tuning keeps four numbers per trainable weight: the weight, its gradient, and AdamW's two moments
(exp_avg, exp_avg_sq): 16 bytes in float32. The usual step holds every gradient at once,

    backward()                  all N gradients exist together (4 N bytes)
    optimizer.step()            reads them all
    zero_grad(set_to_none)      frees them all

but AdamW is elementwise and per tensor: the update of weight p reads p, p's gradient, p's own moments and
step count, and its param group's numbers (lr, betas, eps, weight decay) — nothing of any other tensor. So
p can be updated as soon as its gradient is final, and the gradient freed right then. Autograd says when
that is: each leaf tensor has one AccumulateGrad node, which runs once per backward after every
contribution to its gradient has been summed (a tied embedding / lm_head matrix gets both before it runs),
and `p.register_post_accumulate_grad_hook(hook)` calls `hook(p)` right after it. In the hook:

    state = optimizer.state[p]                  created on first use exactly as torch's AdamW does it
    AdamW update of p alone                     torch's own functional adam(), with the group's numbers now
    p.grad = None                               the gradient's memory is free for the rest of backward

Changing p during backward is safe: the nodes that saved p in forward are the ones that send it gradient,
so all of them have run before p's AccumulateGrad can (and autograd's version counters would raise if a
saved tensor were changed under a node that still needs it). The gradients of the layers are produced
top-down and freed one by one, so instead of all N only a few live at a time; the moments and the weights
stay. The optimizer is still the one AdamW the loop built: its state and param groups are what checkpoints
save and resume, the LR schedule still sets each group's lr between steps (discriminative rates, ULMFiT),
and the hook reads the group's lr at the time it runs — the rate the ordinary step would have used.

What cannot coexist with it, refused before anything loads (minift/train/run_config.py):

    train.max_grad_norm     clipping scales every gradient by max_norm / ||g|| over *all* tensors, a number
                            known only when backward has finished — after the hook has already used the first
                            gradients. (Clipping each tensor alone would be a different algorithm.) Set none.
    grad_accum_steps > 1    the update must wait for k micro-batches' gradients, so they must be kept: the
                            memory this saves, and one update per step instead of k.
    precision = fp16        the grad scaler skips the whole step when any gradient overflowed, which is
                            known only after backward.
    DDP / FSDP              gradients are averaged across processes after they accumulate; an update from
                            the local gradient alone would be wrong (minift/train/distributed.py refuses it).

What it cannot free early: a gradient that is complete only at the end of backward. A tied embedding / lm_head
matrix gets its first part from the loss (the first node of backward) and its last from the embedding lookup
(the last node), so its whole gradient lives through backward; in a small model with a large vocabulary
(SmolLM2-135M: 28 M of 135 M weights) that one matrix bounds what this saves. And the saving shows in the peak
only where gradients pile up: without gradient checkpointing the peak is usually at the start of backward,
when every activation is still alive and no block has a gradient yet (benchmarks/results/cpu_training.md).

Gradual unfreezing just works: a frozen weight gets no gradient, so its hook does not run — exactly as
torch's AdamW skips a parameter whose .grad is None. The gradient norm is still reported: each hook adds
its tensor's float32 norm, and the step's norm is the norm of those norms (what the loop logs when it does
not clip). Results equal the ordinary step bit for bit on the CPU (tests/test_optimizer_in_backward.py).
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam


class OptimizerInBackward:
    """Hooks that run `optimizer` (a torch AdamW) one parameter at a time during backward; call finish_step()
    after each backward (returns the step's gradient norm) and remove() when training ends.

        hooks = OptimizerInBackward(optimizer)
        for batch in batches:
            loss(batch).backward()              # every trainable weight is updated here; no .grad is left
            grad_norm = hooks.finish_step()
            scheduler.step()
        hooks.remove()
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
            raise ValueError(f"train.optimizer_in_backward: expected torch's AdamW, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.position: dict[torch.Tensor, tuple[int, int]] = {}  # param -> (its group's index, its index overall)
        for group_index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self.position[p] = (group_index, len(self.position))
        self.norms: dict[int, torch.Tensor] = {}  # this step's gradient norms, by parameter index
        self.handles = [self._register(p) for p in self.position]

    def _register(self, p: torch.Tensor):
        """Hook p even if it is frozen now (gradual unfreezing thaws it later): torch refuses a hook on a tensor
        that needs no gradient, so p needs one for the moment of registering."""
        frozen = not p.requires_grad
        if frozen:
            p.requires_grad_(True)
        try:
            return p.register_post_accumulate_grad_hook(self._update)
        finally:
            if frozen:
                p.requires_grad_(False)

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        """AdamW on p alone, with its param group's current numbers; then p's gradient is freed."""
        group_index, index = self.position[p]
        if index in self.norms:
            raise RuntimeError("train.optimizer_in_backward: a parameter got two gradients in one step (a second "
                               "backward before finish_step); its update would be applied twice")
        grad = p.grad
        self.norms[index] = torch.linalg.vector_norm(grad, dtype=torch.float32)
        # the group's dict is looked up now, not kept: loading a checkpoint replaces the optimizer's group dicts
        group = self.optimizer.param_groups[group_index]
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        # torch's own lazy state creation (step counter, exp_avg, exp_avg_sq), for this one parameter
        has_complex = self.optimizer._init_group({**group, "params": [p]}, params, grads, exp_avgs, exp_avg_sqs,
                                                 max_exp_avg_sqs, steps)
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, foreach=group["foreach"],
             capturable=group["capturable"], differentiable=group["differentiable"], fused=group["fused"],
             grad_scale=None, found_inf=None, has_complex=has_complex,
             decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"], beta1=beta1,
             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=group["maximize"])
        p.grad = None

    def finish_step(self) -> float:
        """The step's global gradient norm (float32 norm of the per-tensor norms, in parameter order: what
        guards.weight_norm gives for the gradients); 0.0 if no gradient came (nothing was updated)."""
        norms = [self.norms[i] for i in sorted(self.norms)]
        self.norms = {}
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def remove(self) -> None:
        """Take the hooks off: afterwards backward leaves gradients in .grad as usual."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.norms = [], {}
