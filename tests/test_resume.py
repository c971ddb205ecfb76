"""Checkpoints and resume (minift/train/checkpoint.py, minift/train/loop.py): a resumed run is the uninterrupted run.

"The same" means bit for bit on the CPU in float32: every logged loss and every final weight, with dropout,
gradient accumulation, a slanted triangular schedule, weight decay, length-grouped shuffling over several
epochs, and (for masked LM) the random masks.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import minift.io.files
import minift.train.loop as train
from minift.train import checkpoint as ckpt
from minift.train import fit, read_metrics, setup
from tests.train_helpers import (ALPACA, SENTENCES, run_config, save_tiny_decoder, save_tiny_encoder,
                                 write_jsonl)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

COMMON = ["train.max_steps=9", "train.save_every=3", "train.grad_accum_steps=2", "train.schedule=slanted_triangular",
          "train.cut_frac=0.3", "train.weight_decay=0.1", "train.discriminative_factor=2.6", "model.dropout=0.1",
          "data.group_by_length=true", "train.eval_every=4", "data.validation_fraction=0.25",
          "train.keep_checkpoints=5"]


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the run die inside step `step`, after its forward/backward started (like a kill -9)."""
    real = train.accumulate_gradients

    def dying(model, micro_batches, precision="fp32", scaler=None, current=0):
        if current == step:
            real(model, micro_batches[:1], precision, scaler, current)  # half a step's gradients, then death
            raise Interrupted
        return real(model, micro_batches, precision, scaler, current)

    monkeypatch.setattr(train, "accumulate_gradients", dying)


def final_weights(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}


def losses(run_dir) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("lr")) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("kind", ["causal_lm", "masked_lm"])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, monkeypatch, kind):
    if kind == "causal_lm":
        model_dir = save_tiny_decoder(tmp_path / "model")
        data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)
        extra = ["data.format=alpaca"]
    else:
        model_dir = save_tiny_encoder(tmp_path / "model")
        data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
        extra = ["task.kind=masked_lm", "task.mlm_probability=0.3"]
    config = lambda out: run_config(model_dir, data, out, *COMMON, *extra)  # noqa: E731

    straight = setup(config(tmp_path / "straight"))
    fit(straight)

    with monkeypatch.context() as patch:
        interrupt_at(patch, 8)
        broken = setup(config(tmp_path / "broken"))
        with pytest.raises(Interrupted):
            fit(broken)
    assert ckpt.latest_checkpoint(tmp_path / "broken").name == "step-000006"
    assert max(r["step"] for r in read_metrics(tmp_path / "broken")) == 7  # logged past the checkpoint

    resumed = setup(config(tmp_path / "broken"), resume=True)
    assert resumed.state.step == 6 and resumed.state.micro_batches == 12
    fit(resumed)

    assert losses(tmp_path / "broken") == losses(tmp_path / "straight")
    expected = final_weights(straight)
    for name, tensor in final_weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name
    assert straight.train_stream.epoch_of(straight.state.micro_batches) > 2  # the data order crossed epochs


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=4", "train.save_every=2"))
    real_save_file = minift.io.files.save_file
    calls = []

    def dies_halfway(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 5:  # the second checkpoint's optimizer file: write half of it, then fail
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(len(open(filename, "rb").read()) // 2)
            raise OSError("No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(minift.io.files, "save_file", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        fit(run)
    root = tmp_path / "run" / "checkpoints"
    assert json.loads((root / "latest.json").read_text())["step"] == 2
    assert not (root / "step-000004").exists()
    assert not (root / "step-000004.tmp").exists()  # the half-written copy is removed at once, freeing the space
    previous = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert previous.step == 2 and set(previous.weights) == set(run.checkpoint_names)

    monkeypatch.setattr(minift.io.files, "save_file", real_save_file)
    resumed = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=4", "train.save_every=2"),
                    resume=True)
    assert resumed.state.step == 2
    fit(resumed)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000004"
    assert not (root / "step-000004.tmp").exists()


def test_checkpoint_files_hold_no_pickle_and_name_every_tensor(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=2", "train.keep_checkpoints=1"))
    fit(run)
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json",
                                                         "weights.safetensors"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-000002"]  # kept 1
    optimizer = load_file(folder / "optimizer.safetensors")
    assert "backbone.blocks.0.attn.q_proj.weight/exp_avg" in optimizer
    assert load_file(folder / "rng.safetensors")["torch_cpu"].dtype == torch.uint8
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 2 and state["loop"]["micro_batches"] == 2 and state["scheduler"]["step_count"] == 2


def test_resume_refuses_a_mismatched_checkpoint(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    fit(setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=1")))
    with pytest.raises(ValueError, match="already holds checkpoints; resume it with --resume"):
        setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        setup(run_config(model_dir, data, tmp_path / "elsewhere"), resume=True)
    with pytest.raises(ValueError, match=r"optimizer has 3 parameter groups, this run builds \d+"):
        setup(run_config(model_dir, data, tmp_path / "run", "train.weight_decay=0.1",
                         "train.discriminative_factor=2.0"), resume=True)

    other = save_tiny_decoder(tmp_path / "wider", extra_texts=["entirely new words here"])
    with pytest.raises(ValueError, match="tensor 'backbone.embed.weight' has shape"):
        setup(run_config(other, data, tmp_path / "run"), resume=True)
