"""Preference and RL tasks of `minift finetune` (minift/train/preference_tasks.py, preference_data.py, rl_tasks.py,
rl_data.py), the four tweet configs and `minift pairs`.

The formulas are checked against TRL in tests/test_align.py; here the engine is: the loss the loop trains on is
minift.align's on the same batch (reference = adapters off, or a frozen copy), TRL's metric names reach
metrics.jsonl, a killed-and-resumed run equals the uninterrupted one bit for bit (DPO, reward, GRPO, and PPO stopped
between two epochs of a rollout), the reward export scores in transformers as in minift, rollouts are `generate`
sampled with the same seed, a GRPO step's loss and gradients and PPO's losses and advantages equal plain loops, and
bad records or options are one line naming the file, line or field.
"""

import json
import math
from pathlib import Path

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


def straight_and_killed(config, tmp_path, monkeypatch, kill_at: int):
    """Run config(tmp_path/"straight") to the end, and config(tmp_path/"broken") killed inside step `kill_at`;
    returns (the finished straight run, the broken run set up again with resume=True, not yet fitted)."""
    straight = setup(config(tmp_path / "straight"))
    fit(straight)
    with monkeypatch.context() as patch:
        interrupt_at(patch, kill_at)
        broken = setup(config(tmp_path / "broken"))
        with pytest.raises(Interrupted):
            fit(broken)
    return straight, setup(config(tmp_path / "broken"), resume=True)


def assert_same_run(tmp_path, straight, resumed) -> None:
    """The resumed run logged the straight run's metrics (speed aside) and ended with bit-equal weights."""
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path / "broken")) == strip(read_metrics(tmp_path / "straight"))
    expected = dict(straight.model.named_parameters())
    for name, tensor in resumed.model.named_parameters():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("kind,method", [("preference", "full"), ("reward", "lora")])
def test_resumed_run_equals_uninterrupted_run(files, tmp_path, monkeypatch, kind, method):
    config = lambda out: run_config(files["model"], files["pairs"], out, *COMMON, f"task.kind={kind}",  # noqa: E731
                                    f"method.name={method}", "train.export=false")
    straight, resumed = straight_and_killed(config, tmp_path, monkeypatch, 5)
    assert ckpt.latest_checkpoint(tmp_path / "broken").name == "step-000004"
    fit(resumed)
    assert_same_run(tmp_path, straight, resumed)
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


def test_a_task_model_names_its_own_kinds_when_given_another():
    from minift.train.preference_tasks import AlignTaskModel

    with pytest.raises(ValueError, match=r"^\[task\] kind = 'causal_lm'; expected one of reward, preference$"):
        AlignTaskModel(torch.nn.Linear(1, 1), "causal_lm")


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


def rl_run(files, prompts, out, kind, *sets):
    return setup(run_config(files["model"], prompts, out, *RL, f"task.kind={kind}", "train.export=false", *sets))


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rollout_is_generate_sampled_with_the_same_seed(files, prompts, tmp_path, kind):
    from minift.train.rl_tasks import rollout_generator

    run = rl_run(files, prompts, tmp_path / "run", kind, "task.group_size=3", "task.top_k=20")
    stream = run.train_stream
    batch = stream.take(0, 1)[0]
    prompt, _ = stream.prompt_batch(0)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    if kind == "grpo":
        ids, mask = ids.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0)
    run.model.backbone.eval()
    expected = run.model.backbone.generate(ids, 5, temperature=1.0, top_k=20, eos_token_id=run.tokenizer.eos_token_id,
                                           attention_mask=mask, generator=rollout_generator(0, 0, "cpu"))
    P = ids.size(1)
    assert torch.equal(batch["input_ids"], expected) and batch["prompt_length"] == P
    assert torch.equal(batch["attention_mask"][:, :P], mask)
    assert len({tuple(row.tolist()) for row in expected[:, P:]}) > 1  # sampled, not greedy


def plain_token_logps(backbone, batch, temperature=1.0):
    """log pi of every completion token from full logits, in plain loops (the reference for rl_tasks.policy_outputs)."""
    logits = backbone(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    P, (N, C) = batch["prompt_length"], batch["completion_mask"].shape
    out = torch.zeros(N, C)
    for n in range(N):
        for j in range(C):
            if batch["completion_mask"][n, j]:
                row = torch.log_softmax(logits[n, P + j - 1].float() / temperature, -1)
                out[n, j] = row[batch["input_ids"][n, P + j]]
    return out


def plain_grpo_loss(logps, reference, advantages, mask, beta, eps):
    """GRPO's loss written out: per token -min(r A, clip(r) A) + beta k3, mean per completion, mean over completions."""
    total = 0.0
    for n in range(logps.size(0)):
        terms = []
        for j in range(logps.size(1)):
            if mask[n, j]:
                ratio = torch.exp(logps[n, j] - logps[n, j].detach())
                a = advantages[n]
                policy = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
                d = reference[n, j] - logps[n, j]
                terms.append(policy + beta * (torch.exp(d) - d - 1))
        total = total + sum(terms) / len(terms)
    return total / logps.size(0)


def test_grpo_step_loss_and_gradient_equal_the_plain_reference(files, prompts, tmp_path):
    run = rl_run(files, prompts, tmp_path / "run", "grpo", "task.beta=0.2", "method.name=lora", "train.max_steps=2",
                 "train.save_checkpoints=false")
    fit(run)  # the policy has moved: the KL term is not zero
    batch = run.train_stream.take(2, 1)[0]
    params = [p for p in run.model.parameters() if p.requires_grad]
    out = run.model(batch)
    ours = out.loss_sum / out.n_targets
    ours_grads = torch.autograd.grad(ours, params)
    logps = plain_token_logps(run.model.backbone, batch)
    with torch.no_grad(), disabled(run.model.backbone):
        reference = plain_token_logps(run.model.backbone, batch)
    rewards = torch.tensor(good_words(None, [run.tokenizer.decode(r[m.bool()].tolist()) for r, m in
                                             zip(batch["input_ids"][:, batch["prompt_length"]:], batch["completion_mask"])]),
                           dtype=torch.float32)
    groups = rewards.view(-1, 4)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(batch["advantages"], advantages)
    expected = plain_grpo_loss(logps, reference, advantages, batch["completion_mask"], 0.2, 0.2)
    expected_grads = torch.autograd.grad(expected, params)
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert out.metric_sums["kl"] > 0
    for a, b in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def disabled(model):
    from minift.adapter_interface import disabled_adapters

    return disabled_adapters(model)


def test_ppo_losses_advantages_and_adaptive_kl_equal_plain_references():
    from minift.train.rl_tasks import adaptive_kl_coef, ppo_advantages, ppo_loss_sum

    g = torch.Generator().manual_seed(0)
    N, C = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    old_logps, reference = -torch.rand(N, C, generator=g) * 3, -torch.rand(N, C, generator=g) * 3
    old_values, scores = torch.randn(N, C, generator=g), torch.randn(N, generator=g)
    rewards, advantages, returns, kl = ppo_advantages(old_logps, reference, old_values * mask, scores, mask, 0.05,
                                                      0.9, 0.8)
    # written out: KL-penalised rewards, the score on the last real token, GAE right to left, whitening
    raw, plain_returns = torch.zeros(N, C), torch.zeros(N, C)
    for n in range(N):
        L = int(mask[n].sum())
        r = [-0.05 * (old_logps[n, t] - reference[n, t]) for t in range(L)]
        r[-1] = r[-1] + scores[n]
        assert torch.allclose(rewards[n, :L], torch.stack(r))
        running = 0.0
        for t in reversed(range(L)):
            next_value = old_values[n, t + 1] if t + 1 < L else 0.0
            running = r[t] + 0.9 * next_value - old_values[n, t] + 0.9 * 0.8 * running
            raw[n, t], plain_returns[n, t] = running, running + old_values[n, t]
        assert float(kl[n]) == pytest.approx(float((old_logps[n, :L] - reference[n, :L]).sum()), rel=1e-6)
    real = raw[mask.bool()]
    whitened = (raw - real.mean()) / torch.sqrt(real.var(unbiased=True) + 1e-8) * mask
    torch.testing.assert_close(advantages, whitened)
    torch.testing.assert_close(returns, plain_returns)

    logps = (old_logps + 0.3 * torch.randn(N, C, generator=g)).requires_grad_()
    values = (old_values + torch.randn(N, C, generator=g)).requires_grad_()
    batch = {"old_logps": old_logps, "old_values": old_values, "advantages": advantages, "returns": returns}
    loss_sum, sums = ppo_loss_sum(logps, values, batch, mask, 0.2, 0.3, 0.1)
    expected, clipped = 0.0, 0
    for n in range(N):
        for t in range(C):
            if mask[n, t]:
                ratio = torch.exp(logps[n, t] - old_logps[n, t])
                a = advantages[n, t]
                policy = max(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.2))
                clipped += bool(-a * torch.clamp(ratio, 0.8, 1.2) > -a * ratio)
                v_clip = torch.clamp(values[n, t], old_values[n, t] - 0.3, old_values[n, t] + 0.3)
                value = 0.5 * max((values[n, t] - returns[n, t]) ** 2, (v_clip - returns[n, t]) ** 2)
                expected = expected + policy + 0.1 * value
    assert float(loss_sum.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert sums["clipfrac"] == pytest.approx(clipped, abs=1e-5)
    grads, expected_grads = torch.autograd.grad(loss_sum, [logps, values]), torch.autograd.grad(expected, [logps, values])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
    # Ziegler et al. (2019) §2.2: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 64, 10000) == pytest.approx(0.1 * (1 - 0.1 * 64 / 10000))


@pytest.mark.parametrize("kind,iterations", [("grpo", 1), ("ppo", 1), ("grpo", 2)])
def test_rl_run_killed_between_steps_resumes_exactly(files, prompts, tmp_path, monkeypatch, kind, iterations):
    """PPO: 2 epochs x 2 minibatches per rollout, killed inside step 4 with the checkpoint at step 3: the resumed
    run must reuse the saved rollout (and kl_coef) to match. GRPO with num_iterations = 2: step 4 is the second
    step on the rollout of steps 3-4, which the resumed run must take from the checkpoint (old_logps included)."""
    sets = [f"task.num_iterations={iterations}", "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=8", "task.ppo_epochs=2",
            "task.num_minibatches=2", "task.target_kl=0.01", "task.kl_horizon=10", "data.validation_fraction=0.25",
            "train.eval_every=3", "method.name=lora", "task.group_size=2"]
    config = lambda out: run_config(files["model"], prompts, out, *RL, f"task.kind={kind}",  # noqa: E731
                                    "train.export=false", *sets)
    straight, resumed = straight_and_killed(config, tmp_path, monkeypatch, 4)
    assert resumed.state.step == 3
    fit(resumed)
    assert_same_run(tmp_path, straight, resumed)
    metrics = read_metrics(tmp_path / "straight")
    names = ("reward", "kl") + (("kl_coef", "clipfrac", "approx_kl", "entropy", "value_loss") if kind == "ppo" else ())
    assert all(all(n in r for n in names) for r in metrics if "loss" in r)
    assert any("eval_reward" in r for r in metrics)
    if kind == "ppo":  # the adaptive coefficient moved, and was restored
        assert len({r["kl_coef"] for r in metrics if "loss" in r}) > 1
    if iterations == 2:  # steps 2k+1 and 2k+2 share a rollout (the same rewards); the next one is sampled anew
        rewards = [r["reward"] for r in metrics if "loss" in r]
        assert rewards[0] == rewards[1] and rewards[2] == rewards[3] and rewards[4] == rewards[5]
        assert len(set(rewards[::2])) > 1


def test_grpo_with_a_reward_model_directory(files, prompts, tmp_path):
    """task.reward_model: the rollout's rewards are the reward model's scores of prompt + completion + EOS."""
    from minift.align import RewardModel, load_reward_model, save_reward_model
    from minift.io import load

    backbone, tokenizer = load(files["model"])
    torch.manual_seed(3)
    reward_dir = save_reward_model(RewardModel(backbone), reward_export_tokenizer(tokenizer), tmp_path / "rm")
    run = setup(run_config(files["model"], prompts, tmp_path / "run", "task.kind=grpo", f"task.reward_model={reward_dir}",
                           "task.max_new_tokens=4", "train.max_steps=1", "train.save_checkpoints=false",
                           "train.export=false"))
    batch = run.train_stream.take(0, 1)[0]
    _, texts = run.train_stream.prompt_batch(0)
    model, rm_tokenizer = load_reward_model(reward_dir)
    P = batch["prompt_length"]
    completions = [tokenizer.decode(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"][:, P:],
                                                                          batch["completion_mask"])]
    prompts_g = [t for t in texts for _ in range(4)]
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts_g, completions)):
            ids = torch.tensor([rm_tokenizer.encode(p + c) + [rm_tokenizer.eos_token_id]])
            assert float(batch["rewards"][i]) == pytest.approx(float(model(ids)[0]), rel=1e-5, abs=1e-6)
    fit(run)


def reward_export_tokenizer(tokenizer):
    from minift.train.preference_tasks import reward_export_tokenizer as choose

    return choose(tokenizer)


@pytest.mark.parametrize("setting,expected", [
    ("task.reward_model=x", "needs exactly one of task.reward_model"),
    ("task.reward_function=nocolon", "expected \"module:function\""),
    ("task.group_size=1", "needs at least 2"),
    ("task.num_iterations=0", "task.num_iterations"),
])
def test_bad_rl_option_is_refused_before_any_model_loads(tmp_path, capsys, setting, expected):
    sets = ["model.source=no/such/model", "data.train=no.jsonl", "task.kind=grpo",
            "task.reward_function=tests.test_align_engine:good_words", setting]
    if setting.startswith("task.reward_function"):
        sets = sets[:3] + [setting]
    assert finetune(*sets) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minift: error:") and expected in err and "\n" not in err


# ----------------------------------------------------------------------------------------------------
# The four configs (configs/{reward,dpo,ppo,grpo}_tweets.toml) and `minift pairs`, made tiny with --set
# ----------------------------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TINY = ["train.max_steps=2", "train.batch_size=4", "train.eval_every=2", "train.save_every=1", "data.max_examples=16",
        "data.max_eval_examples=4", "data.max_length=24", "train.progress_bar=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def tweet_reward(files, tmp_path_factory):
    """configs/reward_tweets.toml on the tiny decoder: the reward model the other configs read."""
    out = tmp_path_factory.mktemp("reward") / "run"
    code = main(["finetune", str(CONFIG_DIR / "reward_tweets.toml"),
                 *[x for s in [f"model.source={files['model']}", f"train.output_dir={out}", *TINY] for x in ("--set", s)]])
    assert code == 0
    return out


def test_reward_tweets_config(tweet_reward):
    metrics = read_metrics(tweet_reward)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2] and any("eval_accuracy" in r for r in metrics)
    config = json.loads((tweet_reward / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]


def test_minift_pairs_then_dpo_tweets_config(files, tweet_reward, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--policy", str(files["model"]), "--reward", str(tweet_reward / "final"), "--prompts",
                 "tweet-prompts", "--max-prompts", "12", "--samples", "3", "--max-new-tokens", "4", "--out",
                 str(pairs)]) == 0
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(records) >= 8 and all(r["chosen_reward"] > r["rejected_reward"] for r in records)
    out = tmp_path / "dpo"
    sets = [f"model.source={files['model']}", f"train.output_dir={out}", f"data.train={pairs}",
            "data.validation_fraction=0.25", *TINY]
    assert main(["finetune", str(CONFIG_DIR / "dpo_tweets.toml"), *[x for s in sets for x in ("--set", s)]]) == 0
    assert "task preference" in capsys.readouterr().out
    assert all("rewards/margins" in r for r in read_metrics(out) if "loss" in r)
    assert (out / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_rl_tweets_configs(files, tweet_reward, tmp_path, name):
    out = tmp_path / name
    sets = [f"model.source={files['model']}", f"train.output_dir={out}",
            f"task.reward_model={tweet_reward / 'final'}", "task.max_new_tokens=4", "data.max_length=8", *TINY]
    assert main(["finetune", str(CONFIG_DIR / f"{name}_tweets.toml"), *[x for s in sets for x in ("--set", s)]]) == 0
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]
    assert all("reward" in r and "kl" in r for r in metrics if "loss" in r)
    assert any("eval_reward" in r for r in metrics) and (out / "final" / "adapter_config.json").is_file()


def test_policy_logprobs_keep_the_final_soft_cap():
    """A Gemma-2-style decoder caps its final logits; the RL log-probs must come from the capped logits too."""
    from minift.train.rl_tasks import policy_outputs
    from tests.train_helpers import tiny_decoder

    backbone = tiny_decoder(40, seed=3)
    backbone.config.final_softcap = 0.5  # small enough to change every log-prob
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 7))
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    attention_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), completion_mask], dim=1)
    batch = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": torch.arange(7).expand(2, 7),
             "completion_mask": completion_mask, "prompt_length": 3}
    with torch.no_grad():
        ours = policy_outputs(backbone, batch, temperature=0.7)["logps"]
        expected = plain_token_logps(backbone, batch, temperature=0.7)
        backbone.config.final_softcap = None
        uncapped = policy_outputs(backbone, batch, temperature=0.7)["logps"]
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours - uncapped).abs().max() > 1e-2  # the cap matters here


@pytest.mark.parametrize("softcap, bias", [(None, False), (0.5, False), (0.5, True)])
def test_fused_policy_logprobs_and_gradients_equal_the_full_logits(softcap, bias):
    """train.fused_loss: GRPO/PPO log-probs through linear_token_logprobs (temperature folded into rows, bias and cap)
    equal log_softmax(cap(logits) / T) from the full logits, values and gradients; PPO's entropy metric too."""
    from minift.train.rl_tasks import policy_outputs
    from tests.train_helpers import tiny_decoder

    backbone = tiny_decoder(40, seed=4)
    backbone.config.final_softcap = softcap
    if bias:  # an untied head with a bias: the bias must be divided by T as well
        backbone.lm_head = torch.nn.Linear(32, 40, bias=True)
    torch.manual_seed(1)
    ids = torch.randint(0, 40, (3, 8))
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    attention_mask = torch.cat([torch.ones(3, 3, dtype=torch.long), completion_mask], dim=1)
    batch = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": torch.arange(8).expand(3, 8),
             "completion_mask": completion_mask, "prompt_length": 3}
    weights = torch.randn(3, 5)
    results = []
    for fused in (False, True):
        backbone.zero_grad()
        out = policy_outputs(backbone, batch, temperature=0.7, entropy=True, fused=fused)
        (out["logps"] * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}
        results.append((out["logps"].detach(), out["entropy"], grads))
    (plain, plain_entropy, plain_grads), (ours, our_entropy, our_grads) = results
    assert torch.allclose(ours, plain, atol=1e-6, rtol=0) and torch.allclose(our_entropy, plain_entropy, atol=1e-6)
    assert plain_grads.keys() == our_grads.keys() and ("lm_head.bias" in our_grads) == bias
    for name, grad in plain_grads.items():
        assert (our_grads[name] - grad).abs().max() <= 2e-6 * grad.abs().max(), name  # float32, normwise
    with torch.no_grad():
        expected = plain_token_logps(backbone, batch, temperature=0.7)
        assert torch.allclose(ours, expected, atol=1e-5)
        backbone.logits = None  # the fused path never makes the (M, V) logits (entropy, a metric, does, in chunks)
        policy_outputs(backbone, batch, temperature=0.7, fused=True)


def test_rl_policy_loss_growing_from_zero_is_not_called_divergence(files, prompts, tmp_path):
    """A GRPO/PPO policy loss starts near 0 (zero-mean advantages; GRPO's first step is beta x KL = 0) and grows
    with the KL term while training goes well, so the divergence guard's loss-ratio rules do not apply to it
    (found on SmolLM2: GRPO stopped at step 12 with "the loss diverged" after rising from 1e-5). The tightest
    allowed factor, 1.01, would stop any other task whose running loss rises like this one's."""
    run = rl_run(files, prompts, tmp_path / "run", "grpo", "task.beta=1.0", "method.name=lora",
                 "train.divergence_factor=1.01", "train.max_steps=12", "train.save_checkpoints=false")
    fit(run)  # raised DivergenceError before the task model declared loss_has_scale = False
    assert run.state.step == 12
    start = run.state.start_loss
    assert start is not None and 0 < start and run.state.loss_ema > 1.01 * start  # the rule would have fired
