"""Non-LoRA strategies (minift/peft: adapters, prompt_tuning, freezing) and the features method, through the trainer.

What must hold, each checked on tiny random models built here:
- bottleneck adapters start as the base model, sit where Houlsby et al. put them (before the residual add
  and, in BERT, before the layer norm), and survive save/load;
- prompt tuning equals the base model reading the prompt tokens in front (positions shifted by n, masks
  extended, packed rows, KV-cache generation), keeps virtual tokens out of the loss, and matches PEFT;
- every strategy trains exactly the parameters it names: the trainable set is asserted exactly, frozen
  tensors are bit-identical after optimizer steps, the loss goes down, and a checkpoint holds only the
  strategy's tensors (plus the task head);
- feature-based classification ([method] name = "features", through the trainer) learns a separable toy
  task with the backbone frozen and its features fixed (dropout off).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import minift
from minift.train import checkpoint as ckpt
from minift.losses import token_loss_sum
from minift.train.methods import METHODS, prepare_method
from minift.model import KVCache
from minift.peft import disabled_adapters, load_adapter, save_adapter
from minift.peft.bottleneck import AdapterConfig, add_adapters, adapter_modules, remove_adapters
from minift.peft.freezing import freeze_bottom, train_output_only, trainable_report
from minift.peft.prompt_tuning import add_prompt_tuning, extend_labels, remove_prompt_tuning
from minift.train.tasks import build_task_model
from minift.train import fit, read_metrics, setup
from tests.train_helpers import (SENTENCES, SENTIMENT, run_config, save_tiny_encoder,
                                 single_thread, tiny_decoder, tiny_encoder, word_tokenizer, write_jsonl)

V = 40


def confident_decoder(vocab_size: int = V) -> minift.Transformer:
    """A tiny random decoder whose final norm is scaled up, so its logits span a few nats like a trained
    model's (at std 0.02 everything is near-uniform and a frozen output layer can express almost nothing)."""
    model = tiny_decoder(vocab_size)
    with torch.no_grad():
        model.norm.weight.fill_(5.0)
    return model


def skewed_batches(count: int = 2) -> list[torch.Tensor]:
    """Rows drawn from 6 of the V tokens: learnable even by a method that only shifts the output distribution."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 8, (4, 12), generator=g) for _ in range(count)]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_steps(model, batches, lr=1e-2, steps=8):
    """AdamW on the trainable parameters over `batches` of ids (B, T) with a next-token loss; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_only_these_moved(before, model, trainable: set[str]):
    after = snapshot(model)
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(value, after[name]), f"{name} should have trained"
        else:
            assert torch.equal(value, after[name]), f"{name} is frozen but moved"


# ----------------------------------------------------------------------------------------------------
# Bottleneck adapters
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_decoder, tiny_encoder])
def test_adapters_start_as_the_base_model_and_name_their_modules(build):
    model = build(V).eval()
    ids = torch.randint(0, V, (2, 9))
    base = model(ids)
    report = add_adapters(model, AdapterConfig(bottleneck=4))
    assert torch.equal(model(ids), base)  # W_up = 0: exactly the base model
    assert sorted(adapter_modules(model)) == [f"blocks.{i}.{s}_adapter" for i in range(2) for s in ("attn", "mlp")]
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    adapters = {n for n, _ in model.named_parameters() if "_adapter." in n}
    assert set(report.names) == adapters | norms and len(adapters) == 16  # 4 adapters x (down, up) x (w, b)
    assert report.trainable == 4 * (2 * 4 * 32 + 4 + 32) + sum(p.numel() for n, p in model.named_parameters()
                                                                if n in norms)

    pfeiffer = build(V)
    report = add_adapters(pfeiffer, AdapterConfig(bottleneck=4, placement="pfeiffer", train_norms=False))
    assert sorted(adapter_modules(pfeiffer)) == ["blocks.0.mlp_adapter", "blocks.1.mlp_adapter"]
    assert all("mlp_adapter." in n for n in report.names) and len(report.names) == 8


@pytest.mark.parametrize("build", [tiny_decoder, tiny_encoder])
def test_adapter_sits_on_the_branch_before_the_residual_add_and_norm(build):
    """Recompute one block by hand with Houlsby's placement, for pre-norm and post-norm blocks."""
    model = build(V).eval()
    add_adapters(model, AdapterConfig(bottleneck=4))
    for adapter in adapter_modules(model).values():
        torch.nn.init.normal_(adapter.up.weight, std=0.5)
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    rope = model.rope(torch.arange(5).expand(2, 5), x.dtype) if model.config.positions == "rope" else None

    def attn(h):
        return block.attn.__class__.forward(block.attn, h, rope, mask, False, None, 0)  # no hooks: the bare branch

    if model.config.post_norm:  # BERT: norm(x + A(attn(x))), as in Houlsby et al. Fig. 2
        h = block.attn_norm(x + block.attn_adapter(attn(x)))
        expected = block.mlp_norm(h + block.mlp_adapter(block.mlp.__class__.forward(block.mlp, h)))
    else:  # pre-norm: x + A(attn(norm(x)))
        h = x + block.attn_adapter(attn(block.attn_norm(x)))
        expected = h + block.mlp_adapter(block.mlp.__class__.forward(block.mlp, block.mlp_norm(h)))
    torch.testing.assert_close(block(x, rope, mask, False), expected)


def test_adapters_train_only_themselves_and_round_trip_through_files(tmp_path):
    model = confident_decoder()
    report = add_adapters(model, AdapterConfig(bottleneck=8, train_norms=False))
    ids = skewed_batches()
    before = snapshot(model)
    losses = train_steps(model, ids, lr=1e-2, steps=10)
    assert losses[-1] < 0.85 * losses[0]
    assert_only_these_moved(before, model, set(report.names))

    copied = copy.deepcopy(model)  # hooks are bound methods: the copy calls its own adapters
    torch.nn.init.zeros_(copied.blocks[0].attn_adapter.up.weight)
    assert not torch.equal(copied(ids[0]), model(ids[0]))

    save_adapter(model, tmp_path / "adapters")
    fresh = confident_decoder()
    base = fresh(ids[0])
    load_adapter(fresh, tmp_path / "adapters")
    torch.testing.assert_close(fresh(ids[0]), model(ids[0]), rtol=0, atol=0)
    with disabled_adapters(fresh):
        assert torch.equal(fresh(ids[0]), base)
    remove_adapters(fresh)
    assert not adapter_modules(fresh) and torch.equal(fresh(ids[0]), base)
    with pytest.raises(FileNotFoundError, match="nowhere: not a directory"):
        load_adapter(fresh, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="middle")


# ----------------------------------------------------------------------------------------------------
# Soft prompt tuning
# ----------------------------------------------------------------------------------------------------

PROMPT = [7, 3, 11]  # "text" init with these ids makes the soft prompt equal to reading these tokens


def prompted_and_base(build):
    base = build().eval()
    prompted = copy.deepcopy(base)
    report = add_prompt_tuning(prompted, len(PROMPT), init="text", token_ids=PROMPT)
    assert report.names == ["soft_prompt.weight"] and report.trainable == 3 * 32
    return prompted, base


def with_prompt(ids):
    return torch.cat([torch.tensor([PROMPT] * ids.size(0)), ids], dim=1)


@pytest.mark.parametrize("build", [confident_decoder, lambda: tiny_encoder(V)])
def test_prompt_equals_reading_the_prompt_tokens_with_shifted_positions_and_masks(build):
    prompted, base = prompted_and_base(build)
    n, ids = len(PROMPT), torch.randint(0, V, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    extended = torch.cat([torch.ones(2, n, dtype=torch.long), mask], dim=1)
    out = prompted(ids, attention_mask=mask)
    assert out.shape[:2] == (2, 6)  # the virtual positions are cut off again
    torch.testing.assert_close(out, base(with_prompt(ids), attention_mask=extended)[:, n:])
    # explicit position ids (e.g. left padding) shift by n; virtual tokens take 0..n-1
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    full_positions = torch.cat([torch.arange(n).expand(2, n), positions + n], dim=1)
    torch.testing.assert_close(prompted(ids, attention_mask=mask, position_ids=positions),
                               base(with_prompt(ids), attention_mask=extended, position_ids=full_positions)[:, n:])
    if not base.config.causal:  # token types get 0 for the virtual tokens
        types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
        full_types = torch.cat([torch.zeros(2, n, dtype=torch.long), types], dim=1)
        torch.testing.assert_close(prompted(ids, token_type_ids=types),
                                   base(with_prompt(ids), token_type_ids=full_types)[:, n:])
    remove_prompt_tuning(prompted)
    assert not hasattr(prompted, "soft_prompt") and torch.equal(prompted(ids), base(ids))


def test_prompt_on_packed_rows_and_in_cached_generation():
    prompted, base = prompted_and_base(confident_decoder)
    n = len(PROMPT)
    # a packed row of two examples (4 + 3 tokens): block-diagonal causal mask, positions restart
    ids = torch.randint(0, V, (1, 7))
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    packed = ((seq[:, None] == seq[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril())[None, None]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    out = prompted(ids, attention_mask=packed, position_ids=positions)
    # reference: each example alone, after the prompt
    first = base(with_prompt(ids[:, :4]))[:, n:]
    second = base(with_prompt(ids[:, 4:]))[:, n:]
    torch.testing.assert_close(out, torch.cat([first, second], dim=1))

    prompt_ids = torch.tensor([[5, 9, 2, 8], [0, 0, 4, 6]])  # second row left-padded
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1]])
    # one cached decoding step by hand: a cache sized for the caller's 5 tokens grows by n, positions shift by n
    cache = KVCache(prompted.config, 2, 5, torch.float32, "cpu")
    prompted(prompt_ids, attention_mask=mask, position_ids=positions, cache=cache)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = prompted(torch.tensor([[3], [1]]), attention_mask=step_mask, position_ids=positions[:, -1:] + 1,
                    cache=cache)
    assert cache.length == n + 5
    full_ids = with_prompt(torch.cat([prompt_ids, torch.tensor([[3], [1]])], dim=1))
    full_positions = torch.cat([torch.arange(n).expand(2, n), positions + n, positions[:, -1:] + 1 + n], dim=1)
    reference = base(full_ids, attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long), step_mask], dim=1),
                     position_ids=full_positions)
    torch.testing.assert_close(step[:, -1], reference[:, -1])

    expected = [base.generate(with_prompt(prompt_ids[i:i + 1, 4 - int(mask[i].sum()):]), max_new_tokens=6)[0, n:]
                for i in range(2)]
    for use_cache in (True, False):
        generated = prompted.generate(prompt_ids, max_new_tokens=6, attention_mask=mask, use_cache=use_cache)
        for i in range(2):
            assert generated[i, 4 - int(mask[i].sum()):].tolist() == expected[i].tolist(), (use_cache, i)


def test_prompt_keeps_virtual_tokens_out_of_the_loss_and_trains_alone():
    prompted, base = prompted_and_base(confident_decoder)
    n = len(PROMPT)
    ids = torch.randint(0, V, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt part without loss
    labels[1, 6:] = -100
    out = build_task_model(prompted, "causal_lm")({"input_ids": ids, "labels": labels})
    expected_sum, expected_n = token_loss_sum(base(with_prompt(ids)), extend_labels(labels, n))
    assert out.n_targets == expected_n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss_sum, expected_sum)
    assert extend_labels(labels, n)[:, :n].eq(-100).all()

    kept = copy.deepcopy(prompted)
    kept.soft_prompt.keep_virtual_outputs = True
    full = kept(ids)
    assert full.shape[1] == n + 8
    torch.testing.assert_close(token_loss_sum(full, extend_labels(labels, n))[0], expected_sum)

    before = snapshot(prompted)
    losses = train_steps(prompted, skewed_batches(), lr=0.1, steps=10)
    assert losses[-1] < 0.95 * losses[0]
    assert_only_these_moved(before, prompted, {"soft_prompt.weight"})


def test_prompt_matches_peft_prompt_tuning(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours, _ = minift.load(tmp_path)
    theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    add_prompt_tuning(ours, 4, init="random")
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.soft_prompt.weight)
    ids, mask = torch.randint(0, V, (2, 7)), torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = ids.masked_fill(mask == 0, -100)
    result = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours(ids, attention_mask=mask), result.logits[:, 4:], rtol=1e-4, atol=1e-5)
    ours.soft_prompt.keep_virtual_outputs = True  # PEFT scores the first real token from the last virtual one
    loss_sum, count = token_loss_sum(ours(ids, attention_mask=mask), extend_labels(labels, 4))
    torch.testing.assert_close(loss_sum / count, result.loss, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        ours.soft_prompt.weight.mul_(3.0)
    save_adapter(ours, tmp_path / "prompt")
    fresh, _ = minift.load(tmp_path)
    load_adapter(fresh, tmp_path / "prompt")
    assert torch.equal(fresh(ids), ours(ids))


# ----------------------------------------------------------------------------------------------------
# Freezing: partial, output only
# ----------------------------------------------------------------------------------------------------


def untied_decoder():
    torch.manual_seed(0)
    return minift.Transformer(minift.ModelConfig(vocab_size=V, dim=32, n_layers=3, n_heads=4, hidden_dim=64))


def test_partial_freezes_embeddings_and_the_bottom_blocks_exactly():
    model = untied_decoder()
    report = freeze_bottom(model, frozen_blocks=2)
    assert report.groups == ["blocks.2", "norm", "lm_head"]
    assert set(report.names) == {n for n, _ in model.named_parameters() if n.startswith(("blocks.2.", "norm.",
                                                                                         "lm_head."))}
    before = snapshot(model)
    losses = train_steps(model, skewed_batches(), lr=1e-2, steps=8)
    assert losses[-1] < 0.9 * losses[0]
    assert_only_these_moved(before, model, set(report.names))

    assert freeze_bottom(untied_decoder(), 0, freeze_embeddings=False).trainable == trainable_report(
        untied_decoder()).total
    tied = tiny_decoder(V)
    assert "lm_head" not in freeze_bottom(tied, 1).groups  # the tied head *is* the frozen embedding
    with pytest.raises(ValueError, match="0..3"):
        freeze_bottom(untied_decoder(), 4)


def test_output_only_unties_a_tied_head_or_trains_the_shared_matrix():
    model = tiny_decoder(V)
    ids = torch.randint(0, V, (2, 8))
    base = model(ids)
    report = train_output_only(model)  # tied = "untie"
    assert report.names == ["lm_head.weight"] and report.groups == ["lm_head"]
    assert model.lm_head.weight is not model.embed.weight and not model.config.tie_embeddings
    assert torch.equal(model(ids), base)  # the copy starts equal
    before = snapshot(model)
    losses = train_steps(model, skewed_batches(), lr=2e-2, steps=8)
    assert losses[-1] < 0.9 * losses[0]
    assert_only_these_moved(before, model, {"lm_head.weight"})

    shared = tiny_decoder(V)
    report = train_output_only(shared, tied="shared")
    assert report.names == ["embed.weight"] and report.groups == ["embed", "lm_head"]  # honest: inputs move too
    with pytest.raises(ValueError, match="tied"):
        train_output_only(tiny_decoder(V), tied="maybe")


# ----------------------------------------------------------------------------------------------------
# Feature-based
# ----------------------------------------------------------------------------------------------------

GOOD, BAD = ("great", "lovely", "superb", "fine"), ("awful", "poor", "dreadful", "bad")
FILLER = ("the", "a", "film", "book", "was", "really", "so", "this", "meal", "song")


def toy_texts(seed: int, count: int) -> tuple[list[str], list[str]]:
    """Texts made of 3 sentiment words + 3 filler words in random order: trivially separable by the words."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(count):
        label, words = ("positive", GOOD) if i % 2 == 0 else ("negative", BAD)
        chosen = [words[j] for j in torch.randint(4, (3,), generator=g)]
        chosen += [FILLER[j] for j in torch.randint(len(FILLER), (3,), generator=g)]
        texts.append(" ".join(chosen[j] for j in torch.randperm(6, generator=g)))
        labels.append(label)
    return texts, labels


def test_feature_based_classification_goes_through_the_trainer(tmp_path):
    """[method] name = "features": the frozen encoder's pooled states feed a new linear head, trained by fit().

    The toy task is separable by its words, so a linear probe on frozen random features learns it; the
    backbone does not move, and with dropout off it maps a text to the same features on every pass.
    """
    texts, labels = toy_texts(0, 80)
    test_texts, test_labels = toy_texts(1, 40)
    tokenizer = word_tokenizer(texts + test_texts, encoder=True)
    model_dir = tmp_path / "model"
    minift.save(tiny_encoder(tokenizer.vocab_size), tokenizer, model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": t, "label": y} for t, y in zip(test_texts, test_labels)])
    run = setup(run_config(model_dir, train, tmp_path / "run", "method.name=features", "task.kind=classification",
                           "model.dropout=0.1", "train.epochs=4", "train.batch_size=8", "train.lr=3e-2",
                           f"data.validation={test}"))
    backbone = run.model.backbone
    assert run.checkpoint_names == ["head.linear.weight", "head.linear.bias"]
    assert not any(p.requires_grad for p in backbone.parameters())
    batch = next(run.train_stream.in_order())
    torch.testing.assert_close(run.model.hidden_states(batch), run.model.hidden_states(batch), atol=0, rtol=0)
    before = snapshot(backbone)
    last = fit(run)
    assert last["eval_accuracy"] >= 0.95
    assert_only_these_moved(before, backbone, set())


# ----------------------------------------------------------------------------------------------------
# Through the trainer: [method] name = ... in the run config
# ----------------------------------------------------------------------------------------------------

DECODER_CASES = {
    "adapters": (["method.bottleneck=8", "method.train_norms=false"], lambda n: "_adapter." in n),
    "prompt_tuning": (["method.n_tokens=4"], lambda n: n == "soft_prompt.weight"),
    "partial": (["method.frozen_blocks=1"], lambda n: n.startswith(("blocks.1.", "norm."))),
    "output_only": ([], lambda n: n == "lm_head.weight"),
}


@pytest.mark.parametrize("method", sorted(DECODER_CASES))
def test_each_method_trains_through_the_config_and_checkpoints_only_its_tensors(tmp_path, method):
    options, is_trained = DECODER_CASES[method]
    tokenizer = word_tokenizer(SENTENCES)
    model_dir = tmp_path / "model"
    minift.save(confident_decoder(tokenizer.vocab_size), tokenizer, model_dir)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    config = run_config(model_dir, data, tmp_path / "run", f"method.name={method}", *options, "train.max_steps=12",
                        "train.batch_size=4", "train.lr=1e-1" if method == "prompt_tuning" else "train.lr=1e-2")
    run = setup(config)
    backbone = run.model.backbone
    expected = sorted(n for n, _ in backbone.named_parameters() if is_trained(n))
    assert sorted(n for n, p in backbone.named_parameters() if p.requires_grad) == expected
    assert sorted(run.checkpoint_names) == [f"backbone.{n}" for n in expected]
    before = snapshot(backbone)
    fit(run)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) < 0.95 * sum(losses[:3])
    assert_only_these_moved(before, backbone, set(expected))
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert sorted(saved.weights) == [f"backbone.{n}" for n in expected]


def test_a_toml_method_table_selects_the_strategy_and_its_options(tmp_path):
    from minift.train.run_config import load_run_config

    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain = "tweet-sentiment"\n'
                    '[method]\nname = "adapters"\nbottleneck = 4\nplacement = "pfeiffer"\ntrain_norms = false\n')
    config = load_run_config(path)
    model = tiny_decoder(V)
    plan = prepare_method(config.method.name, model, config.method.options)
    assert sorted(adapter_modules(model)) == ["blocks.0.mlp_adapter", "blocks.1.mlp_adapter"]
    assert sorted(plan.checkpoint_names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "m=4 (pfeiffer)" in plan.description


def test_method_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown field method\.rank"):
        prepare_method("adapters", tiny_decoder(V), {"bottleneck": 8, "rank": 4})
    with pytest.raises(ValueError, match="frozen_blocks"):
        prepare_method("partial", tiny_decoder(V), {})
    with pytest.raises(ValueError, match="init_token_ids"):
        prepare_method("prompt_tuning", tiny_decoder(V), {"init": "text"})
    with pytest.raises(ValueError, match="features"):
        prepare_method("output_only", tiny_encoder(V), {})
    assert {"full", "adapters", "prompt_tuning", "partial", "output_only", "features"} <= set(METHODS)


def test_features_method_trains_only_the_classification_head(tmp_path):
    model_dir = save_tiny_encoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT)
    run = setup(run_config(model_dir, data, tmp_path / "run", "method.name=features", "task.kind=classification",
                           "train.max_steps=25", "train.batch_size=8", "train.lr=3e-2", f"data.validation={data}"))
    assert run.checkpoint_names == ["head.linear.weight", "head.linear.bias"]
    before = snapshot(run.model.backbone)
    last = fit(run)
    assert last["eval_accuracy"] == 1.0
    assert_only_these_moved(before, run.model.backbone, set())
