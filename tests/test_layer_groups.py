"""ULMFiT layer groups through the real trainer: the rate AdamW applies to every parameter, and what moves.

Howard & Ruder 2018 §3.2 (discriminative fine-tuning: lr of group l-1 = lr of group l / 2.6) and §3.3
(gradual unfreezing: stage s trains the top s + 1 groups), with fastai's cuts: the task head alone on top,
a tied embedding matrix with the head. Both models have 6 blocks, like MiniLM-L6, and run with the default
train.layer_groups = 5. The expected depth of every parameter (0 = the top group) is written out by hand
below from the rule in minift/schedules.py — U units, k = min(5 - 1, U) body groups of U // k units, the
top U % k groups one more — not computed by the library:

    encoder classifier   U = 7 (embeddings, blocks 0-5)   embeddings | 0-1 | 2-3 | 4-5 | classifier
    encoder masked LM    the same, but the word embedding is the MLM decoder's weight: it goes to the head
    tied decoder LM      U = 6 (the embedding is the lm_head, so it is in the head)
                                                          0 | 1 | 2-3 | 4-5 | final norm + lm_head (= embedding)
"""

from __future__ import annotations

import pytest
import torch

import minift
from minift.schedules import slanted_triangular
from minift.train import fit, read_metrics, setup
from tests.train_helpers import (SENTENCES, SENTIMENT, run_config, tiny_decoder, tiny_encoder, word_tokenizer,
                                 write_jsonl)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

LR, FACTOR, DECAY, STEPS = 3e-3, 2.6, 0.1, 8

ENCODER_CLASSIFIER = {"head.": 0, "backbone.blocks.5.": 1, "backbone.blocks.4.": 1, "backbone.blocks.3.": 2,
                      "backbone.blocks.2.": 2, "backbone.blocks.1.": 3, "backbone.blocks.0.": 3,
                      "backbone.embed.": 4, "backbone.pos_embed.": 4, "backbone.type_embed.": 4,
                      "backbone.embed_norm.": 4}
ENCODER_MLM = {**ENCODER_CLASSIFIER, "backbone.embed.": 0}  # tied to head.decoder.weight
TIED_DECODER = {"backbone.norm.": 0, "backbone.embed.": 0, "backbone.blocks.5.": 1, "backbone.blocks.4.": 1,
                "backbone.blocks.3.": 2, "backbone.blocks.2.": 2, "backbone.blocks.1.": 3, "backbone.blocks.0.": 4}
# LoRA on the tied decoder: the head (norm + lm_head) is frozen, so it is no group; blocks 4-5 are the top.
LORA_DECODER = {"backbone.blocks.5.": 0, "backbone.blocks.4.": 0, "backbone.blocks.3.": 1, "backbone.blocks.2.": 1,
                "backbone.blocks.1.": 2, "backbone.blocks.0.": 3}


def depth_of(name: str, table: dict[str, int]) -> int:
    matches = [depth for prefix, depth in table.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"{name}: matches {len(matches)} prefixes of the expected table"
    return matches[0]


def make_run(tmp_path, case: str, *overrides: str):
    """A real run of the trainer on a 6-block model: 'classifier' / 'mlm' (BERT-like) or 'decoder' (tied Llama)."""
    if case == "decoder":
        tokenizer = word_tokenizer(SENTENCES)
        model, data, task = tiny_decoder(tokenizer.vocab_size, layers=6), [{"text": s} for s in SENTENCES], []
    else:
        tokenizer = word_tokenizer([r["text"] for r in SENTIMENT] + SENTENCES, encoder=True)
        model = tiny_encoder(tokenizer.vocab_size, layers=6)
        data = SENTIMENT if case == "classifier" else [{"text": s} for s in SENTENCES]
        task = ["task.kind=classification"] if case == "classifier" else ["task.kind=masked_lm",
                                                                         "task.mlm_probability=0.5"]
    minift.save(model, tokenizer, tmp_path / "model")
    train_file = write_jsonl(tmp_path / "train.jsonl", data)
    return setup(run_config(tmp_path / "model", train_file, tmp_path / "run", *task, f"train.lr={LR}",
                            f"train.discriminative_factor={FACTOR}", f"train.weight_decay={DECAY}",
                            f"train.max_steps={STEPS}", "train.export=false", "train.save_checkpoints=false",
                            *overrides))


def applied(run) -> dict[str, dict]:
    """name -> the optimizer param group that holds it; each trainable parameter exactly once, nothing else."""
    names = {id(p): n for n, p in run.model.named_parameters()}
    holder = {}
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in holder, f"{names[id(p)]} is in two param groups"
            holder[names[id(p)]] = group
    assert set(holder) == {n for n, p in run.model.named_parameters() if p.requires_grad}
    return holder


CASES = [("classifier", ENCODER_CLASSIFIER), ("mlm", ENCODER_MLM), ("decoder", TIED_DECODER)]


@pytest.mark.parametrize("case, table", CASES)
def test_every_parameter_gets_lr_over_2_6_to_its_depth_at_every_step(tmp_path, case, table):
    run = make_run(tmp_path, case, "train.schedule=slanted_triangular", "train.cut_frac=0.25", "train.stlr_ratio=4")
    holder = applied(run)
    assert len(holder) == len(list(run.model.parameters()))  # full fine-tuning: every tensor is in the optimizer
    assert sorted({g["layer_group"] for g in run.optimizer.param_groups}) == [0, 1, 2, 3, 4]
    for name, group in holder.items():
        parameter = dict(run.model.named_parameters())[name]
        assert group["weight_decay"] == (DECAY if parameter.dim() >= 2 else 0.0), name  # the split kept the rate
    for step in range(STEPS):
        top = slanted_triangular(step, STEPS, LR, cut_frac=0.25, ratio=4)
        for name, group in holder.items():
            assert group["lr"] == pytest.approx(top / FACTOR ** depth_of(name, table), rel=1e-12), (name, step)
        run.scheduler.step()


@pytest.mark.parametrize("case, table", CASES)
def test_unfreezing_stage_s_moves_exactly_the_top_s_plus_1_groups(tmp_path, case, table):
    run = make_run(tmp_path, case, "train.gradual_unfreezing=1", "train.max_steps=6")  # one more group per step
    params = dict(run.model.named_parameters())
    snapshots = [{n: p.detach().clone() for n, p in params.items()}]
    run.optimizer.register_step_post_hook(
        lambda *_: snapshots.append({n: p.detach().clone() for n, p in params.items()}))
    fit(run)
    assert len(snapshots) == 7
    for stage in range(6):
        before, after = snapshots[stage], snapshots[stage + 1]
        moved = {n for n in params if not torch.equal(before[n], after[n])}
        assert moved == {n for n in params if depth_of(n, table) <= stage}, f"stage {stage}"
    # fit logs the top group's rate: with the default constant schedule, train.lr itself
    assert [m["lr"] for m in read_metrics(run.run_dir) if "loss" in m] == [LR] * 6


def test_lora_groups_hold_only_adapters_and_unfreezing_never_thaws_the_base(tmp_path):
    run = make_run(tmp_path, "decoder", "method.name=lora", "method.r=2", "method.dropout=0.0",
                   'method.targets=["q_proj", "v_proj"]', "train.gradual_unfreezing=1", "train.max_steps=5")
    params = dict(run.model.named_parameters())
    adapters = {n for n in params if "lora_" in n}
    holder = applied(run)
    assert set(holder) == adapters and adapters  # frozen base weights carry no rate at all
    for name, group in holder.items():
        assert group["lr"] == pytest.approx(LR / FACTOR ** depth_of(name, LORA_DECODER), rel=1e-12), name
    snapshots = [{n: p.detach().clone() for n, p in params.items()}]
    trainable = []
    run.optimizer.register_step_post_hook(lambda *_: (
        snapshots.append({n: p.detach().clone() for n, p in params.items()}),
        trainable.append({n for n, p in params.items() if p.requires_grad})))
    fit(run)
    for stage in range(5):
        thawed = {n for n in adapters if depth_of(n, LORA_DECODER) <= stage}
        assert trainable[stage] == thawed, f"stage {stage}"  # never a base weight, whatever the stage
        moved = {n for n in params if not torch.equal(snapshots[stage][n], snapshots[stage + 1][n])}
        # B starts at 0, so a freshly thawed A has a zero gradient; weight decay still moves it: all thawed move
        assert moved == thawed, f"stage {stage}"


def test_layer_groups_setting(tmp_path):
    run = make_run(tmp_path, "classifier", "train.layer_groups=2")  # head | everything else
    rates = {n: g["lr"] for n, g in applied(run).items()}
    assert {n for n, r in rates.items() if r == LR} == {n for n in rates if n.startswith("head.")}
    assert all(r == pytest.approx(LR / FACTOR) for n, r in rates.items() if not n.startswith("head."))
    with pytest.raises(ValueError, match=r"train\.layer_groups = 0; must be >= 1"):
        make_run(tmp_path / "bad", "classifier", "train.layer_groups=0")
