"""Divergence (minift/train/guards.py DivergenceMonitor, minift/train/loop.py): a run that blows up stops with a
clear error and exports nothing, and a normal run, however noisy, is never stopped.

At lr = 1e6 every AdamW step moves each weight by about 1e6. Before this check such a run on the tiny model
ended with exit 0 and an exported model whose weights were about 1e6 times their starting size.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from minift.cli import main
from minift.train import DivergenceError, NonFiniteLossError, fit, read_metrics, setup
from minift.train.guards import DivergenceMonitor
from minift.train.loop import LoopState
from tests.train_helpers import SENTENCES, SENTIMENT, run_config, save_tiny_decoder, save_tiny_encoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)


@pytest.fixture
def text_run(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    return model_dir, data


def test_lr_1e6_stops_with_exit_2_and_exports_nothing(tmp_path, text_run, capsys):
    model_dir, data = text_run
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nsource = "{model_dir}"\n[data]\ntrain = "{data}"\nvalidation_fraction = 0.0\n'
                      f'[train]\noutput_dir = "{tmp_path / "run"}"\ndevice = "cpu"\nbatch_size = 4\nmax_steps = 30\n'
                      f'progress_bar = false\n')
    assert main(["finetune", str(config), "--set", "train.lr=1e6"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error: step 1: the weights diverged"), err
    assert "nothing was exported" in err[0] and "train.divergence_factor" in err[0]
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]  # the diverged step is logged, not saved
    assert (tmp_path / "run" / "training.svg").exists() and not (tmp_path / "run" / "run.lock").exists()

    # divergence_factor = 0 turns the ratio rules off: the old behaviour, a run that ends "fine"
    assert main(["finetune", str(config), "--set", "train.lr=1e6", "--set", "train.divergence_factor=0",
                 "--set", f"train.output_dir={tmp_path / 'off'}", "--set", "train.max_steps=3"]) == 0
    assert (tmp_path / "off" / "final").exists()


NORMAL_RUNS = {  # the most aggressive settings the rest of the suite trains with, each to its end
    "full, lr 1e-2, 60 steps": ("decoder", ["train.max_steps=60", "train.batch_size=4", "train.lr=1e-2"]),
    "classifier head only, lr 3e-2": ("encoder", ["method.name=features", "task.kind=classification",
                                                  "train.max_steps=40", "train.batch_size=8", "train.lr=3e-2"]),
    "prompt tuning, lr 1e-1": ("decoder", ["method.name=prompt_tuning", "method.n_tokens=4", "train.max_steps=12",
                                           "train.batch_size=4", "train.lr=1e-1"]),
}


@pytest.mark.parametrize("case", sorted(NORMAL_RUNS))
def test_normal_runs_are_not_stopped(tmp_path, case):
    model, overrides = NORMAL_RUNS[case]
    if model == "decoder":
        model_dir = save_tiny_decoder(tmp_path / "model")
        data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    else:
        model_dir = save_tiny_encoder(tmp_path / "model")
        data = write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT)
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.export=false", *overrides))
    fit(run)
    assert run.state.step == run.total_steps
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{run.total_steps:06d}" / "state.json").read_text())
    assert state["loop"]["start_loss"] > 0 and state["loop"]["start_weight_norm"] > 0  # saved for a resume


def monitor(factor=10.0) -> DivergenceMonitor:
    watch = DivergenceMonitor(factor, LoopState())
    watch.start([torch.ones(4)])
    return watch


def test_the_loss_rule_needs_a_sustained_rise():
    params = [torch.ones(4)]
    watch = monitor()
    for step, loss in enumerate([2.0, 2.2, 1.8] + [1.0] * 10, start=1):
        watch.check(step, loss, params)
    assert watch.state.start_loss == pytest.approx(2.0)
    watch.check(14, 25.0, params)  # one batch 12x the start: the running mean moves to about 3.4
    watch.check(15, None, params)  # a masked-LM step without a masked token changes nothing
    steps = iter(range(16, 100))
    with pytest.raises(DivergenceError, match=r"the loss diverged: its running mean 2\d\.\d+ is more than "
                                              r"train\.divergence_factor = 10 times the starting loss 2"):
        while True:  # a loss that stays 30x the start: caught after a few steps
            watch.check(next(steps), 60.0, params)
    assert watch.state.loss_ema > 20

    off = monitor(0)
    for step, loss in enumerate([2.0, 2.0, 2.0] + [1e6] * 5, start=1):
        off.check(step, loss, params)  # factor 0: no ratio rule
    with pytest.raises(DivergenceError, match="no longer finite"):
        off.check(9, 1.0, [torch.tensor([math.inf])])


def test_the_weight_rule_and_a_non_finite_gradient(tmp_path, text_run):
    watch = monitor()  # |theta_0| = 2, so the limit is 10 x 10 x 2 = 200
    watch.check(1, 4.0, [torch.full((4,), 99.0)])  # 198
    with pytest.raises(DivergenceError, match=r"step 2: the weights diverged: the norm of the trainable weights grew "
                                              r"from 2 to 202, more than 10 x train.divergence_factor = 100 times, "
                                              r"and the loss is no better than at step 1"):
        watch.check(2, 3.9, [torch.full((4,), 101.0)])
    learning = monitor()  # weights that grow while the loss falls: a prompt or a new head learning, not divergence
    for step, loss in enumerate([4.0] + [1.0] * 19, start=1):
        learning.check(step, loss, [torch.full((4,), float(step) ** 3)])  # |theta| = 2 t^3: 16000 at step 20
    assert learning.state.loss_ema < 0.9 * 4.0

    model_dir, data = text_run  # without clipping the gradient norm is still watched, before the step
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=3", "train.max_grad_norm=none"))
    weight = run.model.backbone.embed.weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * math.inf)
    with pytest.raises(NonFiniteLossError, match=r"step 1: the gradient norm is (inf|nan)"):
        fit(run)
    assert torch.equal(weight.detach(), before) and not (tmp_path / "run" / "final").exists()
