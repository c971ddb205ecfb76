"""Reward models and DPO as tasks of `minift finetune` (minift/train/preference_tasks.py, preference_data.py).

The formulas are checked against TRL in tests/test_align.py; here the engine is: the loss the loop trains on is
minift.align's on the same batch (reference = adapters off, or a frozen copy), TRL's metric names reach
metrics.jsonl, a killed-and-resumed run equals the uninterrupted one bit for bit, the reward export scores in
transformers as in minift, and bad records or options are one line naming the file, line or field.
"""

import copy
import json
import math

import pytest
import torch

from minift.align import dpo_batch_loss
from minift.cli import main
from minift.train import checkpoint as ckpt
from minift.train import fit, read_metrics, setup
import minift.train.loop as train
from tests.train_helpers import run_config, save_tiny_decoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

GOOD = ["great", "lovely", "happy", "fun", "kind", "sunny"]
BAD = ["awful", "sad", "boring", "rude", "grim", "cold"]
PAIRS = [{"prompt": f"the {thing} was", "chosen": f" {good} and {GOOD[(i + 1) % 6]}", "rejected": f" {bad}"}
         for i, (good, bad) in enumerate(zip(GOOD, BAD)) for thing in ("day", "film")]
WORDS = [" ".join(GOOD + BAD + ["the", "day", "film", "was", "and"])]
COMMON = ["train.max_steps=6", "train.save_every=2", "train.grad_accum_steps=2", "train.keep_checkpoints=5",
          "train.lr=1e-2", "data.validation_fraction=0.25", "train.eval_every=3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    return {"model": save_tiny_decoder(root / "model", WORDS), "pairs": write_jsonl(root / "pairs.jsonl", PAIRS)}


def finetune(*sets: str) -> int:
    """`minift finetune` on the defaults (an empty config file) with these --set overrides."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "run.toml"
        config.write_text("# everything comes from --set\n")
        return main(["finetune", str(config), *[x for s in sets for x in ("--set", str(s))]])


class Interrupted(Exception):
    pass


def test_dpo_with_lora_starts_at_log2_and_logs_trl_metric_names(files, tmp_path):
    """LoRA's B = 0: policy = reference at step 1, so every implicit reward is 0 and the loss is exactly log 2."""
    out = tmp_path / "run"
    sets = [f"model.source={files['model']}", f"data.train={files['pairs']}", f"train.output_dir={out}",
            "task.kind=preference", "task.beta=0.5", "method.name=lora", "method.r=4", "train.max_steps=8",
            "train.batch_size=4", "train.lr=2e-2", "train.progress_bar=false", "train.device=cpu",
            "data.validation_fraction=0.25", "train.eval_every=4"]
    assert finetune(*sets) == 0
    steps = [r for r in read_metrics(out) if "loss" in r]
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0 and first["rewards/margins"] == 0
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert all(name in r for r in steps)
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all("eval_rewards/accuracies" in r for r in evals)
    assert steps[-1]["loss"] < 0.6 and steps[-1]["rewards/margins"] > 0  # it learned to prefer `chosen`
    assert (out / "final" / "adapter_config.json").is_file()  # LoRA's export: a PEFT adapter
    assert json.loads((out / "final" / "task.json").read_text())["kind"] == "causal_lm"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_engine_dpo_loss_is_minift_align_loss(files, tmp_path, method):
    """After some training, the task's loss on a batch = dpo_batch_loss (TRL-checked) with the starting model as the
    reference: a frozen copy (full) or the same model with adapters off (lora)."""
    from minift.io import load

    sets = ["task.kind=preference", "task.beta=0.3", "task.label_smoothing=0.1", f"method.name={method}",
            "train.max_steps=3", "train.save_checkpoints=false", "train.export=false", "train.lr=1e-2"]
    run = setup(run_config(files["model"], files["pairs"], tmp_path / "run", *sets))
    fit(run)
    batch = run.train_stream.batch_at(0)
    out = run.model(batch)
    start, _ = load(files["model"])
    expected, metrics = dpo_batch_loss(run.model.backbone, batch, beta=0.3, label_smoothing=0.1,
                                       reference_model=start if method == "full" else None)
    assert float(out.loss_sum.detach()) / out.n_targets == pytest.approx(float(expected.detach()), rel=1e-5)
    assert out.metric_sums["rewards/margins"] / out.n_targets == pytest.approx(metrics["rewards/margins"], rel=1e-5)
    assert float(expected.detach()) != pytest.approx(math.log(2), abs=1e-3)  # the policy has moved away from the reference


def test_precomputed_reference_gives_the_same_run(files, tmp_path):
    sets = ["task.kind=preference", "method.name=full", "train.max_steps=3", "train.save_checkpoints=false",
            "train.export=false", "train.batch_size=12"]  # one batch: identical padding either way
    runs = {}
    for precompute in ("false", "true"):
        runs[precompute] = setup(run_config(files["model"], files["pairs"], tmp_path / precompute, *sets,
                                            f"task.precompute_reference={precompute}"))
        fit(runs[precompute])
    assert runs["true"].model.reference.copy is None  # released: training holds one model
    on_the_fly, precomputed = read_metrics(tmp_path / "false"), read_metrics(tmp_path / "true")
    assert [r["loss"] for r in precomputed] == pytest.approx([r["loss"] for r in on_the_fly], rel=1e-5)


def interrupt_at(monkeypatch, step: int) -> None:
    real = train.accumulate_gradients

    def dying(model, micro_batches, precision="fp32", scaler=None, current=0):
        if current == step:
            real(model, micro_batches[:1], precision, scaler, current)
            raise Interrupted
        return real(model, micro_batches, precision, scaler, current)

    monkeypatch.setattr(train, "accumulate_gradients", dying)


@pytest.mark.parametrize("kind,method", [("preference", "full"), ("reward", "lora")])
def test_resumed_run_equals_uninterrupted_run(files, tmp_path, monkeypatch, kind, method):
    config = lambda out: run_config(files["model"], files["pairs"], out, *COMMON, f"task.kind={kind}",  # noqa: E731
                                    f"method.name={method}", "train.export=false")
    straight = setup(config(tmp_path / "straight"))
    fit(straight)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 5)
        broken = setup(config(tmp_path / "broken"))
        with pytest.raises(Interrupted):
            fit(broken)
    assert ckpt.latest_checkpoint(tmp_path / "broken").name == "step-000004"
    resumed = setup(config(tmp_path / "broken"), resume=True)
    fit(resumed)
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path / "broken")) == strip(read_metrics(tmp_path / "straight"))
    expected = dict(straight.model.named_parameters())
    for name, tensor in resumed.model.named_parameters():
        assert torch.equal(tensor, expected[name]), name
    metric = "accuracy" if kind == "reward" else "rewards/accuracies"
    assert all(metric in r for r in read_metrics(tmp_path / "broken") if "loss" in r)


def test_reward_run_exports_a_sequence_classifier_transformers_scores_alike(files, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minift.align import load_reward_model

    out = tmp_path / "run"
    sets = [f"model.source={files['model']}", f"data.train={files['pairs']}", f"train.output_dir={out}",
            "task.kind=reward", "method.name=lora", "method.r=4", "train.max_steps=10", "train.batch_size=4",
            "train.lr=2e-2", "train.progress_bar=false", "train.device=cpu", "data.validation_fraction=0.25",
            "train.eval_every=5", "train.early_stopping_metric=eval_accuracy"]
    assert finetune(*sets) == 0
    metrics = read_metrics(out)
    assert any("eval_accuracy" in r for r in metrics) and all("margin" in r for r in metrics if "loss" in r)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] != 1  # not EOS

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    ours, tokenizer = load_reward_model(out / "final")
    texts = ["the day was great and lovely", "the film was awful"]
    ids = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]  # as the pairs were tokenized
    T = max(map(len, ids))
    pad = config["pad_token_id"]
    input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)
        mine = ours(input_ids, mask)
        trained = train.load_trained(out)[0]  # the run's own model from its last checkpoint
        engine = trained.rewards({"input_ids": input_ids, "attention_mask": mask})
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine, theirs, rtol=1e-4, atol=1e-5)
    assert mine[0] > mine[1]  # the reward model prefers the good day


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "the day was", "chosen": " great"}, "missing field 'rejected'"),
    ({"prompt": "the day was", "chosen": " ", "rejected": " sad"}, "'chosen' is an empty completion"),
    ({"prompt": "the day was", "chosen": " sad", "rejected": " sad"}, "chosen and rejected are identical"),
])
def test_bad_preference_record_is_one_line_naming_file_and_line(files, tmp_path, capsys, record, expected):
    data = write_jsonl(tmp_path / "bad.jsonl", PAIRS[:3] + [record] + PAIRS[3:])
    sets = [f"model.source={files['model']}", f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
            "task.kind=preference", "method.name=lora"]
    assert finetune(*sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error:") and f"bad.jsonl:4" in err[0] and expected in err[0]


@pytest.mark.parametrize("setting,expected", [
    ("task.loss_type=hinge", "task.loss_type = 'hinge'; must be one of sigmoid, robust, ipo"),
    ("task.beta=0", "task.beta = 0.0; DPO needs beta > 0"),
    ("task.label_smoothing=0.5", "task.label_smoothing = 0.5; must be in [0, 0.5)"),
    ("task.kind=preferences", "did you mean"),
])
def test_bad_task_option_is_refused_before_any_model_loads(tmp_path, capsys, setting, expected):
    sets = ["model.source=no/such/model", "data.train=no_such.jsonl", f"train.output_dir={tmp_path / 'run'}",
            "task.kind=preference", setting]
    assert finetune(*sets) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minift: error:") and expected in err and "\n" not in err


def test_ipo_with_label_smoothing_is_refused(tmp_path, capsys):
    sets = ["model.source=no/such/model", "data.train=x.jsonl", "task.kind=preference", "task.loss_type=ipo",
            "task.label_smoothing=0.1"]
    assert finetune(*sets) == 2
    assert "no meaning for task.loss_type = 'ipo'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# GRPO and PPO (minift/train/rl_tasks.py, rl_data.py)
# ----------------------------------------------------------------------------------------------------


def good_words(prompts, completions):
    """A reward function for the tests: how many GOOD words the completion has, minus the BAD ones."""
    return [sum(w in GOOD for w in c.split()) - sum(w in BAD for w in c.split()) for c in completions]


PROMPTS = [{"prompt": f"the {thing} was"} for thing in ("day", "film", "cold day", "sad film", "kind day", "fun film")]
RL = ["task.reward_function=tests.test_align_engine:good_words", "task.max_new_tokens=5", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS * 2)


def test_grpo_and_ppo_smoke(files, prompts, tmp_path):
    for kind in ("grpo", "ppo"):
        run = setup(run_config(files["model"], prompts, tmp_path / kind, *RL, f"task.kind={kind}", "train.max_steps=4",
                               "train.export=false", "task.ppo_epochs=2", "data.validation_fraction=0.25"))
        fit(run)
        print(kind, read_metrics(tmp_path / kind))
