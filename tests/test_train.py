"""The training loop (minift/train/loop.py): accumulation, EOS learning, loss going down, precision, bad input.

Tiny random models (2 layers, width 32) and word-level tokenizers built here keep each test well under a
second or two; one test fine-tunes the bundled SmolLM2-135M for a few steps.
"""

import math

import pytest
import torch

import minift
from minift.data import collate, tokenize_records
from minift.losses import token_loss_sum
from minift.train.tasks import build_task_model, text_windows
from minift.train import NonFiniteLossError, accumulate_gradients, fit, read_metrics, setup
from tests.train_helpers import (SENTENCES, SENTIMENT, run_config, save_tiny_decoder, save_tiny_encoder,
                                 tiny_decoder, word_tokenizer, write_jsonl)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

# Eight Alpaca records whose responses have 1 to 7 words: every micro-batch has a different target count.
REPEAT = [{"instruction": "Repeat the word go.", "input": "", "output": " ".join(["go"] * k)}
          for k in (1, 5, 2, 7, 3, 1, 6, 4)]


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model", extra_texts=["Repeat the word go ."])
    data = write_jsonl(tmp_path / "repeat.jsonl", REPEAT)
    small = setup(run_config(model_dir, data, tmp_path / "a", "data.format=alpaca", "train.batch_size=2",
                             "train.grad_accum_steps=4"))
    big = setup(run_config(model_dir, data, tmp_path / "b", "data.format=alpaca", "train.batch_size=8"))
    micro_batches = small.train_stream.take(0, 4)
    (batch,) = big.train_stream.take(0, 1)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches]
    assert len(set(counts)) > 1 and sum(counts) == int((batch["labels"][:, 1:] != -100).sum())

    stats_small = accumulate_gradients(small.model, micro_batches)
    stats_big = accumulate_gradients(big.model, [batch])
    assert stats_small["targets"] == stats_big["targets"]
    assert stats_small["loss"] == pytest.approx(stats_big["loss"], rel=1e-6)
    expected = gradients(big.model)
    for name, grad in gradients(small.model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)

    # The common bug (average per micro-batch, then divide by k) gives a visibly different gradient.
    wrong = setup(run_config(model_dir, data, tmp_path / "c", "data.format=alpaca", "train.batch_size=2"))
    for b in micro_batches:
        out = wrong.model(b)
        (out.loss_sum / out.n_targets / len(micro_batches)).backward()
    worst = max(float((g - expected[n]).abs().max() / expected[n].abs().max())
                for n, g in gradients(wrong.model).items())
    assert worst > 1e-2


def test_only_target_rows_meet_the_vocabulary_and_the_loss_is_unchanged():
    tokenizer = word_tokenizer(SENTENCES)
    model = tiny_decoder(tokenizer.vocab_size)
    records = [{"prompt": s.rsplit(" ", 2)[0], "completion": " " + " ".join(s.split()[-2:])} for s in SENTENCES[:5]]
    examples, _ = tokenize_records(records, tokenizer, "prompt_completion")
    batch = collate(examples, tokenizer.pad_token_id)
    out = build_task_model(model, "causal_lm")(batch)
    expected_sum, expected_n = token_loss_sum(model(batch["input_ids"], attention_mask=batch["attention_mask"]),
                                              batch["labels"])
    assert out.n_targets == expected_n
    torch.testing.assert_close(out.loss_sum, expected_sum, rtol=1e-6, atol=1e-6)


def test_eos_is_learned_when_pad_equals_eos(tmp_path):
    """Greedy generation stops with EOS right after the learned completion, although pad == eos."""
    records = [{"prompt": "the big cat", "completion": " sat"},
               {"prompt": "the small dog", "completion": " sat on the green mat"},
               {"prompt": "the red cat", "completion": " sat on the mat"},
               {"prompt": "the big dog", "completion": " sat on the blue mat"}]
    model_dir = save_tiny_decoder(tmp_path / "model")
    tokenizer = minift.load(model_dir)[1]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    data = write_jsonl(tmp_path / "pc.jsonl", records)
    run = setup(run_config(model_dir, data, tmp_path / "run", "data.format=prompt_completion", "train.batch_size=4",
                           "train.max_steps=60", "train.lr=1e-2", "train.save_every=0"))
    fit(run)
    model = run.model.backbone.eval()
    eos = tokenizer.eos_token_id
    for record in records:
        prompt = tokenizer.encode(record["prompt"])
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=eos)[0, len(prompt):].tolist()
        assert out == tokenizer.encode(record["completion"]) + [eos], (record, tokenizer.decode(out))


def test_loss_goes_down_on_a_tiny_model(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=12", "train.batch_size=4",
                           "train.lr=1e-2",
                           "train.schedule=warmup_cosine", "train.warmup_steps=2", "train.weight_decay=0.1"))
    fit(run)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_classification_and_masked_lm_train_on_an_encoder(tmp_path):
    model_dir = save_tiny_encoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT)
    run = setup(run_config(model_dir, data, tmp_path / "cls", "task.kind=classification", "train.max_steps=25",
                           "train.batch_size=8", "train.lr=1e-2", "train.eval_every=25",
                           f"data.validation={data}"))
    last = fit(run)
    assert run.labels == ["negative", "positive"] and last["eval_accuracy"] == 1.0
    assert run.model.head.pooling == "mean"

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run = setup(run_config(model_dir, data, tmp_path / "mlm", "task.kind=masked_lm", "task.mlm_probability=0.3",
                           "train.max_steps=15", "train.batch_size=6", "train.lr=1e-2"))
    assert run.model.head.decoder.weight is run.model.backbone.embed.weight  # tied to the input embedding
    fit(run)
    losses = [r["loss"] for r in read_metrics(tmp_path / "mlm") if "loss" in r]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_decoder_classification_pools_the_last_real_token(tmp_path):
    records = [{"text": " ".join(r["text"].split()[: 3 + i % 3]), "label": r["label"]} for i, r in enumerate(SENTIMENT)]
    model_dir = save_tiny_decoder(tmp_path / "model", extra_texts=[r["text"] for r in SENTIMENT])
    data = write_jsonl(tmp_path / "sentiment.jsonl", records)  # 3 to 5 words: "i love this", "i hate this a"
    run = setup(run_config(model_dir, data, tmp_path / "cls", "task.kind=classification", "train.max_steps=20",
                           "train.batch_size=8", "train.lr=1e-2", "train.eval_every=20", f"data.validation={data}"))
    assert run.model.head.pooling == "last"
    (batch,) = run.train_stream.take(0, 1)
    assert (batch["attention_mask"] == 0).any()  # right padding: the last column is not every row's last token
    last = fit(run)
    assert last["eval_accuracy"] == 1.0


def test_bf16_autocast_and_gradient_checkpointing_on_cpu(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    plain = setup(run_config(model_dir, data, tmp_path / "a"))
    checkpointed = setup(run_config(model_dir, data, tmp_path / "b", "train.gradient_checkpointing=true"))
    batches = plain.train_stream.take(0, 1)
    fp32_stats = accumulate_gradients(plain.model, batches)
    accumulate_gradients(checkpointed.model, batches)
    expected = gradients(plain.model)
    for name, grad in gradients(checkpointed.model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)

    bf16 = setup(run_config(model_dir, data, tmp_path / "c", "train.precision=bf16"))
    bf16_stats = accumulate_gradients(bf16.model, batches, precision="bf16")
    assert bf16_stats["loss"] != fp32_stats["loss"]  # autocast really ran the matmuls in bf16 ...
    assert bf16_stats["loss"] == pytest.approx(fp32_stats["loss"], rel=0.02)  # ... and the loss is close
    for name, grad in gradients(bf16.model).items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name


def test_gradual_unfreezing_keeps_lower_groups_still_and_discriminative_rates(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=2", "train.gradual_unfreezing=2",
                           "train.discriminative_factor=2.6", "train.weight_decay=0.1"))
    rates = sorted({g["lr"] for g in run.optimizer.param_groups}, reverse=True)
    assert rates == pytest.approx([3e-3, 3e-3 / 2.6, 3e-3 / 2.6**2])  # head (norm + lm_head), block 1, block 0
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    fit(run)
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    # stage 0 trains the head alone: the final norm and the tied lm_head, which is the embedding matrix
    assert moved == {"backbone.norm.weight", "backbone.embed.weight"}


def test_early_stopping_stops_after_patience_evaluations(tmp_path, monkeypatch):
    import minift.train.loop as train

    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    values = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {"eval_loss": next(values)})
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=10", "train.eval_every=1",
                           "train.early_stopping_patience=2", "data.validation_fraction=0.2"))
    fit(run)
    assert run.state.step == 4 and run.state.stopped_early
    assert run.state.best_metric == 2.0 and run.state.best_step == 2
    assert (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()


def test_sliding_windows_score_every_token_once():
    for n, max_length, stride in [(2, 2, 1), (10, 6, 4), (37, 8, 3), (5, 16, 8)]:
        windows = text_windows(list(range(n)), max_length, stride)
        scored = [w["input_ids"][i] for w in windows for i, label in enumerate(w["labels"]) if label != -100]
        assert scored == list(range(1, n))
        assert all(len(w["input_ids"]) <= max_length for w in windows)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\n{"text": "the dog"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        setup(run_config(model_dir, data, tmp_path / "run"))


def test_missing_field_and_empty_dataset(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "input": ""}])
    with pytest.raises(ValueError, match=r"alpaca\.jsonl:1: missing field 'output'"):
        setup(run_config(model_dir, data, tmp_path / "run", "data.format=alpaca"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty dataset"):
        setup(run_config(model_dir, empty, tmp_path / "run2"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        setup(run_config(model_dir, tmp_path / "missing.jsonl", tmp_path / "run3"))


def test_non_finite_loss_names_the_step(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run = setup(run_config(model_dir, data, tmp_path / "run", "train.max_steps=5"))
    real_forward = type(run.model).forward
    calls = []

    def poisoned(self, batch):
        calls.append(1)
        out = real_forward(self, batch)
        if len(calls) == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    type(run.model).forward = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan"):
            fit(run)
    finally:
        type(run.model).forward = real_forward


def test_bad_train_settings_are_clear_errors(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        setup(run_config(model_dir, data, tmp_path / "a", "train.precision=fp16"))
    with pytest.raises(ValueError, match="train.schedule = 'linear'"):
        setup(run_config(model_dir, data, tmp_path / "b", "train.schedule=linear"))
    with pytest.raises(ValueError, match="not a known method"):
        setup(run_config(model_dir, data, tmp_path / "c", "method.name=magic"))
    with pytest.raises(ValueError, match="task masked_lm needs a bidirectional encoder"):
        setup(run_config(model_dir, data, tmp_path / "d", "task.kind=masked_lm"))


# ----------------------------------------------------------------------------------------------------
# The bundled model
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_goes_down_on_bundled_smollm2(tmp_path):
    from minift.io.bundled import resolve_bundled

    try:
        resolve_bundled("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tokenizer = minift.load("smollm2-135m")
    records = [{"prompt": f"Opposite of {a}:", "completion": f" {b}"}
               for a, b in [("hot", "cold"), ("up", "down"), ("early", "late"), ("full", "empty")]]
    data = write_jsonl(tmp_path / "opposites.jsonl", records)
    config = run_config("smollm2-135m", data, tmp_path / "run", "data.format=prompt_completion", "train.batch_size=4",
                        "train.max_steps=3", "train.lr=1e-4",
                        "train.save_checkpoints=false", "train.export=false")  # no 2 GB of files
    run = setup(config, model=model, tokenizer=tokenizer)
    fit(run)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
