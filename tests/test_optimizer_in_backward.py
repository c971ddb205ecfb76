"""train.optimizer_in_backward (minift/train/optimizer_in_backward.py): AdamW inside backward is the ordinary step.

"The same" means bit for bit on the CPU in float32: every weight, every AdamW moment and step counter, and every
logged loss, learning rate and gradient norm, after several steps of full fine-tuning with discriminative
learning rates, a slanted triangular schedule and weight decay (with and without gradual unfreezing and
gradient checkpointing), and of LoRA. The rates themselves are checked by their effect: after one AdamW step
every weight moves by at most its group's rate (by almost exactly it where the gradient is not tiny), the tied
embedding / lm_head matrix by the top group's. A run stopped by Ctrl-C and resumed ends where the straight run
ends; a NaN gradient stops the run before anything is saved; the hooks are gone after fit; and what cannot work
with it is refused in one line before any model loads.
"""

from __future__ import annotations

import signal

import pytest
import torch

import minift.train.loop as loop
from minift.cli import main
from minift.schedules import slanted_triangular
from minift.train import TrainingInterrupted, fit, read_metrics, setup
from minift.train import checkpoint as ckpt
from minift.train.tasks import prepare_batch, to_device
from tests.train_helpers import ALPACA, run_config, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

ULMFIT = ["train.max_steps=6", "train.schedule=slanted_triangular", "train.cut_frac=0.34", "train.weight_decay=0.1",
          "train.discriminative_factor=2.6", "model.dropout=0.1", "train.max_grad_norm=none", "data.format=alpaca",
          "train.export=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in_backward")
    return {"model": save_tiny_decoder(folder / "model"), "data": write_jsonl(folder / "alpaca.jsonl", ALPACA * 2)}


def trained(files, out, *overrides):
    run = setup(run_config(files["model"], files["data"], out, *ULMFIT, *overrides))
    fit(run)
    return run


def optimizer_state(run) -> dict[str, dict[str, torch.Tensor]]:
    names = run.parameter_names
    return {names[p]: dict(state) for p, state in run.optimizer.state.items()}


def logged(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir)]


@pytest.mark.parametrize("extra", [[], ["train.gradual_unfreezing=2", "train.gradient_checkpointing=true"],
                                   ["method.name=lora", "method.r=4", "method.alpha=8"]],
                         ids=["full", "unfreezing+checkpointing", "lora"])
def test_in_backward_equals_the_ordinary_step_bitwise(files, tmp_path, extra):
    plain = trained(files, tmp_path / "plain", *extra)
    fused = trained(files, tmp_path / "fused", *extra, "train.optimizer_in_backward=true")
    assert len({g["lr"] for g in fused.optimizer.param_groups}) >= 2  # discriminative rates really differ
    expected = dict(plain.model.named_parameters())
    for name, p in fused.model.named_parameters():
        assert torch.equal(p, expected[name]), name
        assert p.grad is None, name  # every gradient was freed in backward
    plain_state, fused_state = optimizer_state(plain), optimizer_state(fused)
    assert plain_state.keys() == fused_state.keys() and plain_state
    for name, state in plain_state.items():
        assert state.keys() == fused_state[name].keys(), name
        for key, value in state.items():
            assert torch.equal(fused_state[name][key], value), (name, key)
    records = logged(tmp_path / "fused")
    assert records == logged(tmp_path / "plain")
    assert [r["step"] for r in records if "grad_norm" in r] == list(range(1, 7))
    assert all(r["grad_norm"] > 0 for r in records if "grad_norm" in r)
    assert len({r["lr"] for r in records if "lr" in r}) > 2  # the schedule moved the rate between steps
    if extra and extra[0].startswith("train.gradual"):  # step 1 trained the top group alone
        first = [p for g in fused.optimizer.param_groups[:-2] for p in g["params"]]
        assert all(fused.optimizer.state[p]["step"].item() < 6 for p in first)


def test_each_weight_moves_by_its_own_groups_rate(files, tmp_path):
    """Adam's first step moves each element by lr * g / (|g| + eps): by its group's lr wherever |g| >> eps."""
    run = setup(run_config(files["model"], files["data"], tmp_path / "run", *ULMFIT, "train.max_steps=10",
                           "train.weight_decay=0", "model.dropout=0", "train.lr=0.05", "train.stlr_ratio=4",
                           "train.optimizer_in_backward=true",
                           "train.save_checkpoints=false"))
    run.total_steps = 1  # stop after the first step of a 10-step schedule (its rate: the peak / stlr_ratio)
    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    groups = run.optimizer.param_groups
    depth = {id(p): run.optimizer.param_groups[-1]["layer_group"] - g["layer_group"] for g in groups
             for p in g["params"]}
    fit(run)
    train = run.config.train
    tied = run.model.backbone.lm_head.weight
    assert tied is run.model.backbone.embed.weight and depth[id(tied)] == 0  # the tied matrix: the top group
    assert max(depth.values()) >= 2
    for name, p in run.model.named_parameters():
        if id(p) not in depth:
            continue
        rate = slanted_triangular(0, 10, train.lr / train.discriminative_factor ** depth[id(p)],
                                  cut_frac=train.cut_frac, ratio=train.stlr_ratio)
        moved = float((p.detach() - before[name]).abs().max())
        assert moved == pytest.approx(rate, rel=2e-3), (name, depth[id(p)], moved, rate)


def test_resumed_after_ctrl_c_equals_the_straight_run(files, tmp_path, monkeypatch):
    settings = ["train.optimizer_in_backward=true", "train.save_every=2"]
    straight = trained(files, tmp_path / "straight", *settings)

    real = loop.accumulate_gradients

    def ctrl_c_in_step_3(model, micro_batches, precision="fp32", scaler=None, step=0, **kwargs):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # the real handler: this step finishes, then a checkpoint
        return real(model, micro_batches, precision, scaler, step, **kwargs)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if this test runs in a background job
    try:
        with monkeypatch.context() as patch:
            patch.setattr(loop, "accumulate_gradients", ctrl_c_in_step_3)
            stopped = setup(run_config(files["model"], files["data"], tmp_path / "resumed", *ULMFIT, *settings))
            with pytest.raises(TrainingInterrupted):
                fit(stopped)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step-000003"
    resumed = setup(run_config(files["model"], files["data"], tmp_path / "resumed", *ULMFIT, *settings), resume=True)
    assert resumed.state.step == 3
    fit(resumed)
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")
    expected = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[name]), name
    straight_state = optimizer_state(straight)
    for name, state in optimizer_state(resumed).items():
        for key, value in state.items():
            assert torch.equal(value, straight_state[name][key]), (name, key)


def test_hooks_are_gone_after_fit(files, tmp_path):
    run = trained(files, tmp_path / "run", "train.max_steps=2", "train.optimizer_in_backward=true",
                  "train.save_checkpoints=false")
    weights = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    batch = next(iter(run.train_stream.take(0, 1)))
    out = run.model(prepare_batch(to_device(batch, run.device), run.model.kind, run.tokenizer, 0.15, None))
    out.loss_sum.backward()  # a plain backward after fit: gradients stay in .grad, no weight moves
    trainable = [p for g in run.optimizer.param_groups for p in g["params"]]
    assert all(p.grad is not None for p in trainable)
    for name, p in run.model.named_parameters():
        assert torch.equal(p, weights[name]), name


@pytest.mark.parametrize("sets,field", [
    ([], "train.max_grad_norm"),
    (["train.max_grad_norm=none", "train.grad_accum_steps=2"], "train.grad_accum_steps"),
    (["train.max_grad_norm=none", "train.precision=fp16"], "train.precision"),
    (["train.max_grad_norm=none", "train.distributed=fsdp"], "train.distributed"),
    (["train.max_grad_norm=none", "train.distributed=ddp", "--nproc", "2"], "train.distributed"),
])
def test_what_cannot_work_is_refused_in_one_line(tmp_path, capsys, sets, field):
    """Refused before any model loads: the model folder named here does not even exist."""
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nsource = "{tmp_path / "no-model"}"\n[data]\ntrain = "{tmp_path / "no.jsonl"}"\n'
                      f'[train]\noutput_dir = "{tmp_path / "run"}"\noptimizer_in_backward = true\n')
    args = [a for s in sets for a in (["--set", s] if "=" in s else [s])]
    assert main(["finetune", str(config), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error: "), err
    assert "train.optimizer_in_backward" in err[0] and field in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_nan_gradient_stops_the_run_unsaved(files, tmp_path):
    """The update is already applied when the step's norm is known, so the run stops before anything is saved."""
    from minift.train import NonFiniteLossError

    run = setup(run_config(files["model"], files["data"], tmp_path / "run", *ULMFIT, "train.save_every=1",
                           "train.optimizer_in_backward=true"))
    run.model.backbone.blocks[0].mlp.down_proj.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 1: the gradient norm is nan"):
        fit(run)
    assert ckpt.latest_checkpoint(tmp_path / "run") is None
