"""ULMFiT schedules: slanted triangular values, discriminative rates, gradual unfreezing, resumable scheduler."""

import pytest
import torch
import torch.nn as nn

from minift.config import ModelConfig
from minift.model import Transformer
from minift.schedules import (
    GradualUnfreezing,
    LRScheduler,
    discriminative_param_groups,
    layer_group_names,
    layer_groups,
    lr_range,
    slanted_triangular,
    warmup_cosine,
)


def paper_stlr(t, T, lr_max, cut_frac, ratio):
    """Howard & Ruder 2018, eq. (3), transcribed from the paper; the floor at lr_max / ratio is minift's guard."""
    cut = int(T * cut_frac)
    if t < cut:
        p = t / cut
    else:
        p = 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return max(lr_max * (1 + p * (ratio - 1)) / ratio, lr_max / ratio)


@pytest.mark.parametrize("total_steps, cut_frac, ratio", [
    (100, 0.1, 32), (1000, 0.1, 32), (50, 0.2, 10), (37, 0.25, 8), (15, 0.1, 32), (7, 0.5, 2), (20, 0.05, 100),
])
def test_slanted_triangular_equals_paper_formula_every_step(total_steps, cut_frac, ratio):
    lr_max = 0.01
    for t in range(total_steps + 1):
        ours = slanted_triangular(t, total_steps, lr_max, cut_frac, ratio)
        assert ours == pytest.approx(paper_stlr(t, total_steps, lr_max, cut_frac, ratio), rel=1e-12, abs=1e-15)


def test_slanted_triangular_hand_points():
    T, lr_max, ratio = 100, 0.01, 32  # cut = 10, decay over 90 steps
    assert slanted_triangular(0, T, lr_max) == pytest.approx(lr_max / ratio)
    assert slanted_triangular(5, T, lr_max) == pytest.approx(lr_max * (1 + 0.5 * 31) / 32)
    assert slanted_triangular(10, T, lr_max) == pytest.approx(lr_max)
    assert max(slanted_triangular(t, T, lr_max) for t in range(T)) == pytest.approx(lr_max)
    assert slanted_triangular(55, T, lr_max) == pytest.approx(lr_max * (1 + 0.5 * 31) / 32)
    assert slanted_triangular(T - 1, T, lr_max) == pytest.approx(lr_max * (1 + 31 / 90) / 32)  # p = 1/90
    assert slanted_triangular(T, T, lr_max) == pytest.approx(lr_max / ratio)
    assert slanted_triangular(T + 10, T, lr_max) == pytest.approx(lr_max / ratio)  # stays at the floor


def test_slanted_triangular_without_warmup_and_bad_input():
    values = [slanted_triangular(t, 5, 1.0, cut_frac=0.1, ratio=4) for t in range(6)]  # cut = floor(0.5) = 0
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="cut_frac"):
        slanted_triangular(0, 10, 1.0, cut_frac=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        slanted_triangular(0, 0, 1.0)


def test_warmup_cosine_matches_transformers():
    transformers = pytest.importorskip("transformers")
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=3e-4)
    theirs = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=7, num_training_steps=53)
    for step in range(60):
        theirs_lr = optimizer.param_groups[0]["lr"]
        assert warmup_cosine(step, 53, 3e-4, warmup_steps=7) == pytest.approx(theirs_lr, rel=1e-12)
        optimizer.step()
        theirs.step()
    assert warmup_cosine(53, 53, 1.0, 7, lr_min=0.1) == pytest.approx(0.1)
    assert warmup_cosine(7, 53, 1.0, 7, lr_min=0.1) == pytest.approx(1.0)


def tiny_model(n_layers=5, tie=True):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, dim=16, n_layers=n_layers, n_heads=2, hidden_dim=32, max_seq_len=32,
                         tie_embeddings=tie)
    return Transformer(config)


def expected_body(units, n_groups):
    """The split the lesson in minift/schedules.py states: k = min(n - 1, U) groups of U // k units,
    the top U % k groups one unit more; written out here independently of the library's loop."""
    k = min(n_groups - 1, len(units))
    sizes = [len(units) // k] * k
    for index in range(len(units) % k):
        sizes[k - 1 - index] += 1
    bounds = [sum(sizes[:i]) for i in range(k + 1)]
    return [units[a:b] for a, b in zip(bounds, bounds[1:])]


def ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("n_groups", [2, 3, 4, 5, 6, 50])
@pytest.mark.parametrize("tie", [True, False])
def test_layer_groups_cover_each_parameter_once_head_on_top(n_groups, tie):
    model = tiny_model(n_layers=5, tie=tie)
    groups = layer_groups(model, n_groups)
    flat = [id(p) for group in groups for p in group]
    assert len(flat) == len(set(flat)) == len(list(model.parameters()))
    # the top group is the causal LM's head: final norm + lm_head, which for a tied model *is* the embedding
    assert ids(groups[-1]) == ids([*model.norm.parameters(), *model.lm_head.parameters()])
    assert any(p is model.embed.weight for p in groups[-1]) == tie
    units = ([] if tie else [model.embed]) + list(model.blocks)  # tied: nothing of the embeddings is left below
    body = expected_body(units, n_groups)
    assert len(groups) == len(body) + 1 <= n_groups
    for group, modules in zip(groups, body):
        assert ids(group) == ids(p for m in modules for p in m.parameters())


def test_layer_groups_with_a_task_head_and_one_group():
    model = tiny_model(n_layers=4, tie=True)
    head = nn.Linear(16, 3)  # a classifier: it alone is the top group; the final norm rides with the last block
    groups = layer_groups(model, 3, head=head)  # U = 5 (embeddings, 4 blocks), k = 2: sizes 2, 3
    assert ids(groups[-1]) == ids(head.parameters())
    assert ids(groups[0]) == ids([*model.embed.parameters(), *model.blocks[0].parameters()])
    assert ids(groups[1]) == ids([*model.blocks[1:].parameters(), *model.norm.parameters()])
    assert layer_group_names(model, groups) == ["embed=lm_head, block 0", "blocks 1-3, norm", "?"]  # head: not in model
    assert layer_group_names(model, layer_groups(model, 3)) == ["blocks 0-1", "blocks 2-3", "norm, embed=lm_head"]
    assert len(layer_groups(model, 1, head=head)) == 1
    assert len(layer_groups(model, 1, head=head)[0]) == len(list(model.parameters())) + 2
    model.soft_prompt = nn.Parameter(torch.zeros(2, 16))  # found in no known module: trains with the top
    assert any(p is model.soft_prompt for p in layer_groups(model, 3, head=head)[-1])
    with pytest.raises(ValueError, match="n_groups must be >= 1"):
        layer_groups(model, 0)


def test_discriminative_rates_follow_factor():
    model = tiny_model(n_layers=4, tie=False)
    groups = discriminative_param_groups(layer_groups(model, 6), lr=0.01, factor=2.6, weight_decay=0.1)
    assert len(groups) == 6  # embeddings, 4 blocks, head
    for k, group in enumerate(reversed(groups)):
        assert group["lr"] == pytest.approx(0.01 / 2.6**k) and group["initial_lr"] == group["lr"]
        assert group["weight_decay"] == 0.1
    torch.optim.AdamW(groups)  # a real optimizer accepts the groups (no parameter appears twice)

    rates = lr_range(1e-5, 1e-3, 5)
    assert rates[0] == pytest.approx(1e-5) and rates[-1] == pytest.approx(1e-3)
    assert all(b / a == pytest.approx(10 ** 0.5) for a, b in zip(rates, rates[1:]))
    groups = discriminative_param_groups([nn.Linear(2, 2) for _ in range(5)], lr=rates)
    assert [g["lr"] for g in groups] == rates
    with pytest.raises(ValueError, match="3 learning rates for 5 layer groups"):
        discriminative_param_groups([nn.Linear(2, 2) for _ in range(5)], lr=rates[:3])


def test_gradual_unfreezing_frozen_set_per_stage():
    model = tiny_model(n_layers=4, tie=False)
    model.blocks[1].attn.q_proj.weight.requires_grad_(False)  # frozen on purpose (like a LoRA base): stays frozen
    groups = layer_groups(model, 4)  # [embeddings, blocks 0-1, blocks 2-3, norm + lm_head]
    unfreeze = GradualUnfreezing(groups, epochs_per_stage=2)
    assert unfreeze.n_stages == 4
    for epoch in range(12):
        stage = unfreeze.apply(epoch)
        assert stage == min(epoch // 2, 3)
        for index, group in enumerate(groups):
            for p in group:
                expected = index >= 4 - 1 - stage and p is not model.blocks[1].attn.q_proj.weight
                assert p.requires_grad == expected


def test_gradual_unfreezing_skips_groups_the_method_froze_entirely():
    model = tiny_model(n_layers=4, tie=False)
    groups = layer_groups(model, 4)  # [embeddings, blocks 0-1, blocks 2-3, norm + lm_head]
    for p in [*groups[0], *groups[1]]:
        p.requires_grad_(False)  # "partial": the bottom two groups never train
    unfreeze = GradualUnfreezing(groups)
    assert unfreeze.n_stages == 2  # no stage is spent thawing nothing
    assert unfreeze.apply(0) == 0 and [any(p.requires_grad for p in g) for g in groups] == [False] * 3 + [True]
    assert unfreeze.apply(5) == 1 and [any(p.requires_grad for p in g) for g in groups] == [False] * 2 + [True] * 2


def test_frozen_groups_do_not_move_under_adamw():
    model = tiny_model(n_layers=2, tie=False)
    groups = layer_groups(model)
    optimizer = torch.optim.AdamW(discriminative_param_groups(groups, lr=1e-2, weight_decay=0.1))
    GradualUnfreezing(groups).apply(epoch=0)  # only the top group (final norm, lm_head) trains
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randint(0, 40, (2, 6))).square().mean()
    loss.backward()
    optimizer.step()
    top = {id(p) for p in groups[-1]}
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old) != (id(p) in top)


def make_optimizer():
    layers = [nn.Linear(3, 3) for _ in range(3)]
    return torch.optim.SGD(discriminative_param_groups(layers, lr=0.1, factor=2.0))


@pytest.mark.parametrize("name, options", [("slanted_triangular", {"cut_frac": 0.2, "ratio": 8}),
                                           ("warmup_cosine", {"warmup_steps": 4})])
def test_scheduler_applies_schedule_per_group_and_resumes(name, options):
    total = 30
    optimizer = make_optimizer()
    scheduler = LRScheduler(optimizer, name, total_steps=total, **options)
    function = slanted_triangular if name == "slanted_triangular" else warmup_cosine
    history = []
    for step in range(total):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(function(step, total, group["initial_lr"], **options))
        history.append(scheduler.get_last_lr())
        scheduler.step()
        if step == 11:
            state = scheduler.state_dict()  # a checkpoint taken after 12 optimizer steps

    resumed_optimizer = make_optimizer()
    for group in resumed_optimizer.param_groups:
        group["lr"] = 123.0  # garbage that load_state_dict must overwrite
        del group["initial_lr"]
    resumed = LRScheduler(resumed_optimizer, name, total_steps=total, **options)
    resumed.load_state_dict(state)
    for step in range(12, total):
        assert resumed.get_last_lr() == history[step]
        resumed.step()


def test_scheduler_cycles_and_checks_state():
    optimizer = make_optimizer()
    scheduler = LRScheduler(optimizer, "slanted_triangular", total_steps=10, cycle=True)
    first = []
    for _ in range(10):
        first.append(scheduler.get_last_lr())
        scheduler.step()
    for step in range(10):
        assert scheduler.get_last_lr() == first[step]  # a new triangle for the next stage
        scheduler.step()
    other = LRScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "slanted_triangular", 10)
    with pytest.raises(ValueError, match="param groups"):
        other.load_state_dict(scheduler.state_dict())
    with pytest.raises(ValueError, match="unknown schedule"):
        LRScheduler(optimizer, "one_cycle", total_steps=10)
