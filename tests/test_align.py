"""minift.align against TRL 1.16 and against written-out references.

Parity with TRL calls TRL's own code: DPOTrainer's loss (its `_compute_loss`, where TRL 1.16 keeps the DPO
losses), its per-sequence log-probs (`compute_ref_log_probs`), its dataset tokenization and collator;
RewardTrainer's `compute_loss`; GRPO's `nanstd` helper. The trainers are built once, on a tiny
random Llama and a word-level tokenizer made here, and minift loads the very same directory. GAE, GRPO, the KL
estimators and PPO's losses are also checked against plain loops written below. Everything is float32 on the CPU.
"""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import minift
from minift.align import (
    RewardModel,
    bradley_terry_loss,
    collate_preferences,
    dpo_batch_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k3,
    ppo_policy_loss,
    ppo_value_loss,
    read_preferences,
    reference_logprobs,
    reward_loss,
    reward_metrics,
    sequence_logprobs,
    sequence_logprobs_from_logits,
    tokenize_preference,
    whiten,
)
from minift.io.hf import rename
from minift.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the cat sat on a mat dog ran weather today is lovely awful very it was good bad sad day happy "
         "user assistant system hi hello go away").split()
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT_RECORDS = [
    {"prompt": "the weather today is", "chosen": " lovely", "rejected": " very very awful"},
    {"prompt": "the cat sat on a", "chosen": " mat", "rejected": " dog"},
    {"prompt": "it was a very", "chosen": " good happy day", "rejected": " bad day"},
]


def word_tokenizer():
    """A tokenizers.Tokenizer: whole words, special tokens split out first (so "awful</s>" is two tokens)."""
    from tokenizers import Tokenizer as Inner
    from tokenizers import models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    inner = Inner(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.add_special_tokens(SPECIALS)
    return inner


def minift_tokenizer(eos="</s>"):
    inner = word_tokenizer()
    return Tokenizer(inner, bos_token_id=inner.token_to_id("<s>"), eos_token_id=inner.token_to_id(eos),
                     pad_token_id=inner.token_to_id("<pad>"), chat_template=CHATML)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Preference records and tokenization
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a", "rejected": " b"}, "missing field 'chosen'"),
    ({"prompt": "a", "chosen": " b"}, "missing field 'rejected'"),
    ({"chosen": " b", "rejected": " c"}, "missing field 'prompt'"),
    ({"prompt": "a", "chosen": "   ", "rejected": " c"}, "field 'chosen' is an empty completion"),
    ({"prompt": "a", "chosen": " b", "rejected": ""}, "field 'rejected' is an empty completion"),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "chosen and rejected are identical"),
    ({"prompt": "a", "chosen": " b", "rejected": 3}, "must both be strings or both be lists"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
      "rejected": [{"role": "assistant", "content": "hello"}]}, "chosen and rejected are identical"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "go away"}]}, "field 'chosen' is an empty completion"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "hello"}],
      "rejected": [{"role": "assistant", "content": "go away"}]}, "chosen must start with an assistant message"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [TEXT_RECORDS[0], line])
    with pytest.raises(ValueError) as error:
        read_preferences(path)
    text = str(error.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_malformed_json_line_comes_from_the_shared_reader(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [TEXT_RECORDS[0], '{"prompt": "a", "chosen": '])
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: malformed JSON"):
        read_preferences(path)


def test_text_pair_tokens_masks_and_eos(tmp_path):
    tokenizer = minift_tokenizer()
    record = read_preferences(write_jsonl(tmp_path / "p.jsonl", TEXT_RECORDS))[0]
    example = tokenize_preference(record, tokenizer, add_bos=True)
    ids = tokenizer.encode
    assert example["prompt_ids"] == [tokenizer.bos_token_id] + ids("the weather today is")
    assert example["chosen_ids"] == ids("lovely") + [tokenizer.eos_token_id]
    assert example["rejected_ids"] == ids("very very awful") + [tokenizer.eos_token_id]
    assert example["chosen_mask"] == [1, 1] and example["rejected_mask"] == [1, 1, 1, 1]
    batch = collate_preferences([example], pad_id=tokenizer.pad_token_id)
    n_prompt = len(example["prompt_ids"])
    assert batch["input_ids"].shape == (2, n_prompt + 4)
    assert batch["completion_mask"].tolist() == [[0] * n_prompt + [1, 1, 0, 0], [0] * n_prompt + [1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * (n_prompt + 2) + [0, 0], [1] * (n_prompt + 4)]


def test_truncation_cuts_the_prompt_start_first_then_completions():
    tokenizer = minift_tokenizer()
    record = {"prompt": "the cat sat on a mat the dog ran", "chosen": " good", "rejected": " very bad day"}
    full = tokenize_preference(record, tokenizer, add_bos=True)
    assert len(full["prompt_ids"]) == 10 and len(full["rejected_ids"]) == 4
    cut = tokenize_preference(record, tokenizer, max_length=10, add_bos=True)  # room for 6 prompt tokens + BOS
    assert cut["prompt_ids"] == [tokenizer.bos_token_id] + full["prompt_ids"][-5:]
    assert cut["chosen_ids"] == full["chosen_ids"] and cut["rejected_ids"] == full["rejected_ids"]
    assert cut["n_truncated"] == 4
    # the prompt keeps keep_prompt_tokens; then the completions lose their end (EOS too)
    cut = tokenize_preference(record, tokenizer, max_length=6, keep_prompt_tokens=3, add_bos=False)
    assert cut["prompt_ids"] == full["prompt_ids"][-3:]
    assert cut["rejected_ids"] == full["rejected_ids"][:3] and cut["chosen_ids"] == full["chosen_ids"]
    assert cut["n_truncated"] == 6 + 1


def test_chat_pairs_score_only_the_final_assistant_turn():
    tokenizer = minift_tokenizer(eos="<|im_end|>")
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "go away"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "very sad"}],
              "rejected": [{"role": "assistant", "content": "bad"}]}
    example = tokenize_preference(record, tokenizer)
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    assert example["prompt_ids"] == tokenizer.encode(rendered)
    assert example["chosen_ids"] == tokenizer.encode("very sad<|im_end|>")
    assert example["rejected_ids"] == tokenizer.encode("bad<|im_end|>")
    assert all(example["chosen_mask"]) and all(example["rejected_mask"])
    # the implicit-prompt form (whole conversations) gives the same tokens
    implicit = {"chosen": prompt + record["chosen"], "rejected": prompt + record["rejected"]}
    assert tokenize_preference(implicit, tokenizer) == example


# ----------------------------------------------------------------------------------------------------
# GAE, whitening, GRPO, KL estimators, PPO losses: plain loops
# ----------------------------------------------------------------------------------------------------


def gae_loop(rewards, values, lengths, gamma, lam):
    """Schulman et al. 2016, Eq. 16, one row and one step at a time; nothing past each row's length."""
    advantages = torch.zeros_like(values)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_equals_a_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g,
                                                                                       dtype=torch.float64)
    lengths = [7, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma, lam)  # padded steps hold random numbers: ignored
    expected_advantages = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, (expected_advantages + values) * mask, rtol=0, atol=1e-12)
    # TRL's PPO loop (no mask: zeros past the end do the masking) agrees on zero-padded tensors
    r, v = rewards * mask, values * mask
    last, reversed_advantages = 0.0, []
    for t in reversed(range(7)):
        next_values = v[:, t + 1] if t < 6 else 0.0
        last = r[:, t] + gamma * next_values - v[:, t] + gamma * lam * last
        reversed_advantages.append(last)
    torch.testing.assert_close(advantages, torch.stack(reversed_advantages[::-1], dim=1) * mask, rtol=0, atol=1e-12)


def test_whiten_matches_formula_and_trl():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 6, generator=g) * 3 + 1
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    real = values[mask]
    expected = (values - real.mean()) / torch.sqrt(real.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(whiten(values, mask)[mask], expected[mask])
    torch.testing.assert_close(whiten(values, mask, shift_mean=False)[mask], (expected + real.mean())[mask])
    # TRL 1.16 ships no PPO trainer (its masked_whiten left with it), so the unbiased formula above is the reference


def test_grpo_advantages_equal_a_loop_and_trl_formula():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0, 3.0, 0.0, 7.0, 7.0, 7.0, 7.0])
    G = 4
    expected = []
    for start in range(0, len(rewards), G):
        group = rewards[start : start + G].tolist()
        mean = sum(group) / G
        std = (sum((r - mean) ** 2 for r in group) / (G - 1)) ** 0.5
        expected += [(r - mean) / (std + 1e-4) for r in group]
    ours = grpo_advantages(rewards, G)
    torch.testing.assert_close(ours, torch.tensor(expected), rtol=0, atol=1e-6)
    assert ours[8:].abs().max() == 0  # a group whose samples all score the same teaches nothing
    torch.testing.assert_close(grpo_advantages(rewards, G, scale="none"),
                               rewards - rewards.view(-1, G).mean(1).repeat_interleave(G))
    trl_utils = pytest.importorskip("trl.trainer.utils")
    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
    torch.testing.assert_close(ours, (rewards - mean) / (trl_utils.nanstd(grouped, dim=1).repeat_interleave(G) + 1e-4),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(grpo_advantages(rewards, G, scale="batch"),
                               (rewards - mean) / (trl_utils.nanstd(rewards) + 1e-4), rtol=0, atol=1e-6)


def test_kl_estimators():
    g = torch.Generator().manual_seed(2)
    logps, reference = -torch.rand(5, 9, generator=g) * 4, -torch.rand(5, 9, generator=g) * 4
    k3 = kl_k3(logps, reference)
    expected = [[math.exp(r - p) - (r - p) - 1 for p, r in zip(row_p, row_r)]
                for row_p, row_r in zip(logps.tolist(), reference.tolist())]
    torch.testing.assert_close(k3, torch.tensor(expected))
    assert (k3 >= 0).all() and kl_k3(logps, logps).abs().max() == 0
    torch.testing.assert_close(kl_k1(logps, reference), logps - reference)
    # both estimate KL(pi || pi_ref): on samples from pi their means approach the exact value
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum()
    for estimator in (kl_k1, kl_k3):
        assert abs(estimator(p.log()[samples], q.log()[samples]).mean() - exact) < 0.01


def test_ppo_losses_equal_plain_formulas():
    g = torch.Generator().manual_seed(3)
    logps, old_logps = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    advantages, mask = torch.randn(3, 5, generator=g), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 1 + [0] * 4])
    loss, metrics = ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=0.2)
    terms, clipped = [], []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                ratio = float(torch.exp(logps[b, t] - old_logps[b, t]))
                a = float(advantages[b, t])
                terms.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
                clipped.append(-a * min(max(ratio, 0.8), 1.2) > -a * ratio)
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-6
    assert abs(metrics["clip_fraction"] - sum(clipped) / len(clipped)) < 1e-6
    values, old_values, returns = (torch.randn(3, 5, generator=g) for _ in range(3))
    loss, _ = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    terms = [0.5 * max((float(values[b, t]) - float(returns[b, t])) ** 2,
                       (min(max(float(values[b, t]), float(old_values[b, t]) - 0.2), float(old_values[b, t]) + 0.2)
                        - float(returns[b, t])) ** 2)
             for b in range(3) for t in range(5) if mask[b, t]]
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-6


# ----------------------------------------------------------------------------------------------------
# DPO on minift alone: the two log-prob paths, the reference with adapters off
# ----------------------------------------------------------------------------------------------------


def tiny_minift_model(seed=0):
    from minift.config import ModelConfig

    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=len(SPECIALS) + len(WORDS), dim=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, hidden_dim=48, max_seq_len=64)
    return minift.Transformer(config).eval()


def tiny_batch():
    tokenizer = minift_tokenizer()
    examples = [tokenize_preference(record, tokenizer) for record in TEXT_RECORDS]
    return collate_preferences(examples, tokenizer.pad_token_id)


def test_sequence_logprobs_hidden_path_equals_full_logits():
    model, batch = tiny_minift_model(), tiny_batch()
    with torch.no_grad():
        ours = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        full = sequence_logprobs_from_logits(model(batch["input_ids"], attention_mask=batch["attention_mask"]),
                                             batch["input_ids"], batch["completion_mask"])
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).log_softmax(-1)
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)
    # by hand: sum over completion tokens t of log p(x_t | x_<t), read at position t - 1
    for row in range(batch["input_ids"].size(0)):
        expected = sum(logits[row, t - 1, batch["input_ids"][row, t]].item()
                       for t in range(1, batch["input_ids"].size(1)) if batch["completion_mask"][row, t])
        assert abs(ours[row].item() - expected) < 1e-5


def test_lora_reference_is_the_base_model_with_adapters_off():
    from minift.peft import LoRAConfig, add_lora

    model, base, batch = tiny_minift_model(), tiny_minift_model(), tiny_batch()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    loss, metrics = dpo_batch_loss(model, batch, beta=0.1)  # B = 0: policy = reference
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert metrics["rewards/margins"] == 0 and metrics["rewards/accuracies"] == 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
        policy = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        expected = sequence_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    reference = reference_logprobs(model, batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert (policy - reference).abs().max() > 1e-3
    loss, _ = dpo_batch_loss(model, batch, beta=0.1)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="DPO needs a reference model"):
        reference_logprobs(base, batch)


def test_dpo_loss_rejects_bad_options():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type 'hinge'"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="must all be"):
        dpo_loss(x, x, x, torch.zeros(3))


# ----------------------------------------------------------------------------------------------------
# Parity with TRL 1.16
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """A tiny random Llama saved twice (reference; policy = reference + noise) with a tokenizer, loaded by
    transformers, by TRL's DPOTrainer and RewardTrainer, and by minift."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("align")
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), bos_token="<s>",
                                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    reference.save_pretrained(root / "reference")
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    reference.save_pretrained(root / "policy")
    for name in ("reference", "policy"):
        hf_tokenizer.save_pretrained(root / name)
    load = transformers.AutoModelForCausalLM.from_pretrained
    hf_policy, hf_reference = load(root / "policy").eval(), load(root / "reference").eval()
    dataset = datasets.Dataset.from_list(TEXT_RECORDS)
    common = dict(report_to="none", use_cpu=True, bf16=False, save_strategy="no", per_device_train_batch_size=3)
    dpo = trl.DPOTrainer(model=hf_policy, ref_model=hf_reference,
                         args=trl.DPOConfig(output_dir=str(root / "dpo"), beta=0.1, max_length=None, **common),
                         train_dataset=dataset, processing_class=hf_tokenizer)
    torch.manual_seed(1)
    hf_scorer = transformers.AutoModelForSequenceClassification.from_pretrained(root / "policy", num_labels=1).eval()
    rewarder = trl.RewardTrainer(model=hf_scorer, args=trl.RewardConfig(output_dir=str(root / "reward"), **common),
                                 train_dataset=dataset, processing_class=hf_tokenizer)
    policy, tokenizer = minift.load(root / "policy")
    reference_model, _ = minift.load(root / "reference")
    return SimpleNamespace(root=root, dpo=dpo, rewarder=rewarder, hf_policy=hf_policy, hf_scorer=hf_scorer,
                           policy=policy.eval(), reference=reference_model.eval(), tokenizer=tokenizer)


def trl_dpo_batch(setup):
    rows = [setup.dpo.train_dataset[i] for i in range(len(TEXT_RECORDS))]
    return setup.dpo.data_collator(rows)


def test_tokenization_and_batches_equal_trl(trl_setup):
    ours = [tokenize_preference(record, trl_setup.tokenizer, add_bos=False) for record in TEXT_RECORDS]
    for example, theirs in zip(ours, (trl_setup.dpo.train_dataset[i] for i in range(len(TEXT_RECORDS)))):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert example[key] == theirs[key], key
    batch, theirs = collate_preferences(ours, trl_setup.tokenizer.pad_token_id), trl_dpo_batch(trl_setup)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], theirs[key]), key
    reward_rows = [trl_setup.rewarder.train_dataset[i] for i in range(len(TEXT_RECORDS))]
    reward_batch = trl_setup.rewarder.data_collator(reward_rows)
    assert torch.equal(batch["input_ids"], reward_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], reward_batch["attention_mask"])


def test_sequence_logprobs_equal_trl(trl_setup):
    batch = trl_dpo_batch(trl_setup)
    theirs = torch.cat(trl_setup.dpo.compute_ref_log_probs(trl_setup.hf_policy, batch))
    with torch.no_grad():
        ours = sequence_logprobs(trl_setup.policy, batch["input_ids"], batch["attention_mask"],
                                 batch["completion_mask"])
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=2e-5)


def set_trl_loss(monkeypatch, trainer, loss_type, beta, label_smoothing=0.0):
    monkeypatch.setattr(trainer, "loss_types", [loss_type])
    monkeypatch.setattr(trainer, "loss_weights", [1.0])
    monkeypatch.setattr(trainer, "beta", beta)
    monkeypatch.setattr(trainer, "label_smoothing", label_smoothing)


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.0),
                                                              ("ipo", 0.1, 0.0), ("robust", 0.5, 0.2)])
def test_dpo_loss_and_gradients_equal_trl_on_the_same_weights(trl_setup, monkeypatch, loss_type, beta,
                                                              label_smoothing):
    set_trl_loss(monkeypatch, trl_setup.dpo, loss_type, beta, label_smoothing)
    batch = trl_dpo_batch(trl_setup)
    trl_setup.hf_policy.zero_grad()
    theirs = trl_setup.dpo._compute_loss(trl_setup.hf_policy, batch, return_outputs=False)
    theirs.backward()
    trl_setup.policy.zero_grad()
    ours, metrics = dpo_batch_loss(trl_setup.policy, batch, beta, loss_type, label_smoothing,
                                   reference_model=trl_setup.reference)
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5 * max(1.0, abs(theirs.item()))
    hf_parameters = dict(trl_setup.hf_policy.named_parameters())
    for name, parameter in trl_setup.policy.named_parameters():
        their_grad = hf_parameters[rename(name, "llama", to_hf=True)].grad
        torch.testing.assert_close(parameter.grad, their_grad, rtol=1e-4, atol=1e-6, msg=name)
    logged = {key: values[-1] for key, values in trl_setup.dpo._metrics["train" if trl_setup.hf_policy.training
                                                                         else "eval"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(metrics[key] - logged[key]) < 1e-5, key


class FixedLogProbs(torch.nn.Module):
    """A "model" for TRL 1.16's fused head: its per-token log-probs are a fixed leaf tensor (rows permuted if asked),
    so gradients land on one tensor. The other per-token outputs only feed TRL's logging."""

    def __init__(self, token_logps, order=None):
        super().__init__()
        self.token_logps, self.order = token_logps, order

    def forward(self, **_):
        logps = self.token_logps if self.order is None else self.token_logps[self.order]
        zeros = torch.zeros_like(logps.detach())
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def fixed_case(seed=4, B=3, T=9):
    """Per-token log-probs (2B, T-1), zero off the (shifted) completion, and reference sums far from them."""
    g = torch.Generator().manual_seed(seed)
    completion_mask, attention_mask = torch.zeros(2 * B, T, dtype=torch.long), torch.zeros(2 * B, T, dtype=torch.long)
    for row, (n_prompt, n_completion) in enumerate([(2, 3), (4, 5), (1, 1), (3, 6), (2, 2), (5, 4)]):
        attention_mask[row, : n_prompt + n_completion] = 1
        completion_mask[row, n_prompt : n_prompt + n_completion] = 1
    token_logps = -torch.rand(2 * B, T - 1, generator=g) * 6 * completion_mask[:, 1:]
    reference = -torch.rand(2 * B, generator=g) * 30
    return token_logps, {"input_ids": torch.randint(0, 50, (2 * B, T), generator=g), "attention_mask": attention_mask,
                         "completion_mask": completion_mask,
                         "ref_chosen_logps": reference[:B], "ref_rejected_logps": reference[B:]}


def minift_fixed_loss(token_logps, batch, beta, loss_type, label_smoothing=0.0):
    leaf = token_logps.clone().requires_grad_(True)
    logps = (leaf * batch["completion_mask"][:, 1:]).sum(1)  # what sequence_logprobs sums
    lengths = batch["completion_mask"].sum(1).float() if loss_type == "ipo" else None
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *logps.chunk(2), batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta, loss_type, label_smoothing,
        *(lengths.chunk(2) if lengths is not None else (None, None)))
    losses.mean().backward()
    return losses.mean(), leaf.grad, chosen_rewards, rejected_rewards


def swap_halves(batch):
    B = batch["ref_chosen_logps"].numel()
    order = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    swapped = {key: batch[key][order] for key in ("input_ids", "attention_mask", "completion_mask")}
    return order, {**swapped, "ref_chosen_logps": batch["ref_rejected_logps"],
                   "ref_rejected_logps": batch["ref_chosen_logps"]}


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 5.0, 0.0),
                                                              ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0),
                                                              ("sigmoid", 0.1, 0.1), ("sigmoid", 2.0, 0.3),
                                                              ("robust", 0.3, 0.1)])
def test_dpo_loss_and_gradients_equal_trl_on_fixed_tensors(trl_setup, monkeypatch, loss_type, beta,
                                                           label_smoothing):
    """From per-token log-probs to loss, TRL's code vs minift's, on fixed tensors with large log-ratios.

    cDPO (sigmoid with label smoothing eps) is TRL's sigmoid loss on the pairs as labelled, weighted 1 - eps,
    plus TRL's sigmoid loss on the same pairs with chosen and rejected swapped, weighted eps: TRL 1.16 has no
    single loss type for it (its label_smoothing applies to robust, exo_pair and aot)."""
    monkeypatch.setattr(trl_setup.dpo, "precompute_ref_logps", True)
    token_logps, batch = fixed_case()
    ours, our_grad, chosen_rewards, rejected_rewards = minift_fixed_loss(token_logps, batch, beta, loss_type,
                                                                        label_smoothing)
    leaf = token_logps.clone().requires_grad_(True)
    if loss_type == "sigmoid" and label_smoothing:
        set_trl_loss(monkeypatch, trl_setup.dpo, "sigmoid", beta)
        order, swapped = swap_halves(batch)
        agree = trl_setup.dpo._compute_loss(FixedLogProbs(leaf), dict(batch), return_outputs=False)
        logged = {key: values[-1] for key, values in trl_setup.dpo._metrics["eval"].items()}
        flipped = trl_setup.dpo._compute_loss(FixedLogProbs(leaf, order), swapped, return_outputs=False)
        theirs = (1 - label_smoothing) * agree + label_smoothing * flipped
    else:
        set_trl_loss(monkeypatch, trl_setup.dpo, loss_type, beta, label_smoothing)
        theirs = trl_setup.dpo._compute_loss(FixedLogProbs(leaf), dict(batch), return_outputs=False)
        logged = {key: values[-1] for key, values in trl_setup.dpo._metrics["eval"].items()}
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5 * max(1.0, abs(theirs.item()))
    # TRL sums every position of the per-token tensor (its fused head leaves zeros, and no gradient, off the
    # completion); the gradients that reach a model are those on the completion tokens
    scored = batch["completion_mask"][:, 1:].bool()
    assert our_grad[~scored].abs().max() == 0
    torch.testing.assert_close(our_grad[scored], leaf.grad[scored], rtol=1e-4, atol=1e-7)
    assert abs(chosen_rewards.mean().item() - logged["rewards/chosen"]) < 1e-5


def test_reward_model_loss_equals_trl(trl_setup, monkeypatch):
    trainer, hf_scorer = trl_setup.rewarder, trl_setup.hf_scorer
    rows = [trainer.train_dataset[i] for i in range(len(TEXT_RECORDS))]
    model = RewardModel(trl_setup.policy)
    with torch.no_grad():
        model.score.weight.copy_(hf_scorer.score.weight)
    margin = torch.tensor([0.5, -1.0, 2.0])
    for coefficient, with_margin in ((None, False), (0.01, True)):
        monkeypatch.setattr(trainer.args, "center_rewards_coefficient", coefficient)
        inputs = trainer.data_collator(rows)
        if with_margin:
            inputs["margin"] = margin
        hf_scorer.zero_grad()
        theirs = trainer.compute_loss(hf_scorer, dict(inputs))
        theirs.backward()
        model.zero_grad()
        rewards = model(inputs["input_ids"], inputs["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        ours = reward_loss(chosen, rejected, margin if with_margin else None, coefficient)
        ours.backward()
        with torch.no_grad():
            hf_rewards = hf_scorer(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(rewards, hf_rewards.squeeze(-1), rtol=0, atol=1e-5)
        assert abs(ours.item() - theirs.item()) < 1e-6
        torch.testing.assert_close(model.score.weight.grad, hf_scorer.score.weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(model.backbone.embed.weight.grad, hf_scorer.model.embed_tokens.weight.grad,
                                   rtol=1e-4, atol=1e-7)
        metrics = reward_metrics(chosen, rejected)
        logged = {key: values[-1] for key, values in trainer._metrics["eval"].items()}
        assert abs(metrics["accuracy"] - logged["accuracy"]) < 1e-6
        assert abs(metrics["margin"] - logged["margin"]) < 1e-5
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), -torch.nn.functional.logsigmoid(chosen - rejected))


# ----------------------------------------------------------------------------------------------------
# Reward model export: a Hugging Face sequence-classification directory
# ----------------------------------------------------------------------------------------------------


def tiny_hf_backbone(arch, directory, tied):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    V = len(SPECIALS) + len(WORDS)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=tied)
    else:
        config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         tie_word_embeddings=tied)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    model, _ = minift.load(directory)
    return model


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("gpt2", True)])
def test_reward_model_exports_as_a_sequence_classifier(tmp_path, arch, tied):
    transformers = pytest.importorskip("transformers")
    from minift.align import load_reward_model, save_reward_model

    tokenizer = minift_tokenizer()
    model = RewardModel(tiny_hf_backbone(arch, tmp_path / "base", tied), init_std=0.5).eval()
    batch = tiny_batch()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
    save_reward_model(model, tokenizer, tmp_path / "reward")
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").eval()
    assert theirs_model.config.num_labels == 1
    with torch.no_grad():
        theirs = theirs_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert ours.abs().max() > 1e-2  # the rewards are not all ~0, so equal scores mean something
    torch.testing.assert_close(ours, theirs.squeeze(-1), rtol=0, atol=1e-5)
    again, again_tokenizer = load_reward_model(tmp_path / "reward")
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]), ours, rtol=0, atol=1e-6)
    assert again_tokenizer.pad_token_id == tokenizer.pad_token_id


def test_reward_model_export_refuses_pad_equal_to_eos(tmp_path):
    from minift.align import save_reward_model

    tokenizer = minift_tokenizer()
    tokenizer.pad_token_id = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="pad token .* is the EOS token"):
        save_reward_model(RewardModel(tiny_minift_model()), tokenizer, tmp_path / "reward")


def test_trl_reward_model_directory_loads_in_minift(trl_setup, tmp_path):
    from minift.align import load_reward_model

    trl_setup.hf_scorer.save_pretrained(tmp_path / "trl_reward")
    model, _ = load_reward_model(tmp_path / "trl_reward")
    batch = tiny_batch()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
        theirs = trl_setup.hf_scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs.squeeze(-1), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# DPO training on minift: precomputed reference log-probs, a few LoRA steps
# ----------------------------------------------------------------------------------------------------


def test_precomputed_reference_logprobs_give_the_same_loss_and_lora_dpo_learns():
    from minift.align import precompute_reference_logprobs
    from minift.peft import LoRAConfig, add_lora

    tokenizer = minift_tokenizer()
    examples = [tokenize_preference(record, tokenizer) for record in TEXT_RECORDS]
    model = tiny_minift_model()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    scored = precompute_reference_logprobs(model, examples, tokenizer.pad_token_id, batch_size=2)
    batch, precomputed = collate_preferences(examples, tokenizer.pad_token_id), collate_preferences(
        scored, tokenizer.pad_token_id)
    assert precomputed["reference_logps"].shape == (6,)
    with torch.no_grad():
        torch.testing.assert_close(precomputed["reference_logps"], reference_logprobs(model, batch), rtol=0,
                                   atol=1e-6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    history = []
    for _ in range(15):
        loss, metrics = dpo_batch_loss(model, precomputed, beta=0.5)
        with torch.no_grad():
            on_the_fly, _ = dpo_batch_loss(model, batch, beta=0.5)
        assert abs(loss.item() - on_the_fly.item()) < 1e-5
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), metrics))
    assert history[-1][0] < history[0][0] - 0.2  # starts at log 2 = 0.693
    assert history[-1][1]["rewards/margins"] > 0.4 and history[-1][1]["rewards/accuracies"] == 1.0
