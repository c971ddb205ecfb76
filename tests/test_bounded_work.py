"""Bounded work on long records: prompt fitting tokenizes a long query a fixed number of times.

`minift icl` with a 50 MB query line used to print nothing for minutes: fit_to_budget truncated the query
by binary search over [0, len(query)], and every probe tokenized the whole text again (and probed at
len(query) / 2, / 4, ...). These tests count what goes through the tokenizer, and check that prompts of
normal size come out exactly as the search before the change made them.
"""

import random
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers, decoders

from minift.icl.arrange import FittedPrompt, fit_to_budget, order_demonstrations
from minift.icl.bm25 import BM25Index
from minift.icl.scoring import PromptEncoder
from minift.icl.selectors import Selection
from minift.icl.templates import Template
from tests.test_icl_support import ByteTokenizer

TEMPLATE = Template(instruction="Classify.", example_format="Text: {text}\nLabel: {label}",
                    verbalizers={"a": ["alpha"], "b": ["beta"]})
CHAT = Template(example_format="Text: {text}\nLabel: {label}", verbalizers={"a": ["alpha"], "b": ["beta"]},
                chat=True)
NO_INSTRUCTION = Template(example_format="{text} => {label}", verbalizers={"a": ["alpha"], "b": ["beta"]})


class CountingTokenizer:
    """Wraps a tokenizer; counts encode calls and the characters they were given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = self.characters = 0

    def encode(self, text, add_special_tokens=False):
        self.calls += 1
        self.characters += len(text)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        return self.inner.decode(ids)

    def reset(self) -> None:
        self.calls = self.characters = 0


class BPEWrapper:
    """A small byte-level BPE trained in the test (the tokenizers library), with the encode/decode we use."""

    def __init__(self, corpus: list[str], vocab_size: int = 300) -> None:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        self.tok = tok

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tok.decode(list(ids))


def words(rng: random.Random, n: int) -> str:
    vocabulary = ["flight", "delayed", "again", "the", "crew", "was", "great", "lost", "bag", "é", "日本", "!!"]
    out, size = [], 0
    while size < n:
        out.append(rng.choice(vocabulary))
        size += len(out[-1]) + 1
    return " ".join(out)[:n]


def old_fit_to_budget(template, count_tokens, selections, pool_texts, pool_labels, query, max_tokens,
                      answer_tokens=0, order="similarity", seed=0, truncate_query=None) -> FittedPrompt:
    """The search as it was before the change (bisection over [0, len(query)]), kept as the reference."""

    def render(kept, text):
        arranged = order_demonstrations(kept, pool_labels, order, seed=seed, key=query)
        prompt = template.build([(pool_texts[s.index], pool_labels[s.index]) for s in arranged], text)
        return prompt, arranged, count_tokens(prompt) + answer_tokens

    ranked = list(selections)
    for keep in range(len(ranked), -1, -1):
        prompt, arranged, n = render(ranked[:keep], query)
        if n <= max_tokens:
            return FittedPrompt(prompt, arranged, len(ranked) - keep, False, n)
    empty_prompt, _, empty_n = render([], "")
    if empty_n > max_tokens or truncate_query is None:
        raise ValueError("does not fit")
    low, high, best = 0, len(query), None
    while low <= high:
        mid = (low + high) // 2
        candidate, _, n_mid = render([], truncate_query(query, mid))
        if n_mid <= max_tokens:
            best, low = (candidate, n_mid), mid + 1
        else:
            high = mid - 1
    prompt, n = best if best is not None else (empty_prompt, empty_n)
    return FittedPrompt(prompt, [], len(ranked), True, n)


def fit_long(tokenizer, template, query, budget=200, shots=4):
    rng = random.Random(1)
    pool = [words(rng, rng.randint(5, 40)) for _ in range(10)]
    labels = [rng.choice("ab") for _ in pool]
    chosen = [Selection(i, 1.0 - i / 10) for i in range(shots)]
    encoder = PromptEncoder(tokenizer)
    tokenizer.reset()
    fitted = fit_to_budget(template, encoder.count, chosen, pool, labels, query, budget, answer_tokens=2,
                           order="random", truncate_query=encoder.truncate)
    return fitted, encoder


@pytest.mark.parametrize("template", [TEMPLATE, CHAT, NO_INSTRUCTION], ids=["plain", "chat", "no-instruction"])
def test_tokenizer_calls_do_not_grow_with_the_query(template):
    tokenizer = CountingTokenizer(ByteTokenizer())
    rng = random.Random(0)
    seen = {}
    for length in (30_000, 300_000):
        query = words(rng, length)
        fitted, encoder = fit_long(tokenizer, template, query)
        assert fitted.query_truncated and fitted.num_tokens <= 200
        assert fitted.num_tokens == encoder.count(fitted.prompt) + 2
        seen[length] = (tokenizer.calls, tokenizer.characters)
    (calls_short, chars_short), (calls_long, chars_long) = seen[30_000], seen[300_000]
    assert calls_long == calls_short <= 40  # a fixed number: the search depends on the budget, not the text
    # Linear: the whole query goes through the tokenizer at most three times (in the prompt after the
    # demonstrations, in the zero-shot prompt -- the same text unless there is no instruction -- and bare,
    # to be cut by token ids); every other call holds about one budget's worth of text.
    whole = 2 if template.instruction or template.chat else 3
    assert chars_long <= whole * 300_000 + 40 * 400
    assert chars_long - chars_short <= whole * (300_000 - 30_000) + 200


def test_long_record_with_a_real_bpe_is_fast_and_exact_at_the_cut():
    rng = random.Random(2)
    bpe = BPEWrapper([words(rng, 200) for _ in range(200)])
    tokenizer = CountingTokenizer(bpe)
    query = words(rng, 400_000)
    start = time.perf_counter()
    fitted, encoder = fit_long(tokenizer, TEMPLATE, query, budget=300)
    elapsed = time.perf_counter() - start
    assert fitted.query_truncated and fitted.num_tokens <= 300 and tokenizer.calls <= 40
    assert tokenizer.characters <= 2 * len(query) + 40 * 2000
    # Maximal: the kept text is the decoded first n tokens, and n + 1 tokens would overflow the budget.
    kept = fitted.prompt.query[len(TEMPLATE.separator) + len("Text: "): -len("\nLabel:")]
    ids = bpe.encode(query)
    n = next(i for i in range(len(ids) + 1) if bpe.decode(ids[:i]) == kept)
    longer = TEMPLATE.build([], bpe.decode(ids[: n + 1]))
    assert encoder.count(longer) + 2 > 300
    assert elapsed < 10.0, f"fitting a 400k-character query took {elapsed:.1f} s"


@pytest.mark.parametrize("make_tokenizer", ["bytes", "bpe"])
@pytest.mark.parametrize("template", [TEMPLATE, CHAT, NO_INSTRUCTION], ids=["plain", "chat", "no-instruction"])
def test_normal_sized_prompts_are_identical_to_the_previous_search(template, make_tokenizer):
    rng = random.Random(3)
    tokenizer = ByteTokenizer() if make_tokenizer == "bytes" else BPEWrapper([words(rng, 200) for _ in range(100)])
    pool = [words(rng, rng.randint(1, 80)) for _ in range(30)]
    labels = [rng.choice("ab") for _ in pool]
    outcomes = set()
    for trial in range(80):
        chosen = [Selection(i, 1.0 - j / 10) for j, i in enumerate(rng.sample(range(30), rng.randint(0, 8)))]
        query = words(rng, rng.randint(1, 400))
        budget = rng.randint(25, 150 if trial % 2 else 700)
        order = rng.choice(["similarity", "random", "balanced", "given"])
        results = []
        for fit in (fit_to_budget, old_fit_to_budget):
            encoder = PromptEncoder(tokenizer)
            try:
                results.append(fit(template, encoder.count, chosen, pool, labels, query, budget, answer_tokens=3,
                                   order=order, seed=trial, truncate_query=encoder.truncate))
            except ValueError:
                results.append("error")
        assert results[0] == results[1], (trial, budget, query)
        outcome = results[0]
        outcomes.add("error" if outcome == "error" else "truncated" if outcome.query_truncated else "fits")
    assert outcomes >= {"truncated", "fits"} and ("error" in outcomes or template is NO_INSTRUCTION)


def test_prompt_encoder_remembers_a_few_texts_and_returns_the_tokenizer_ids():
    tokenizer = CountingTokenizer(ByteTokenizer())
    encoder = PromptEncoder(tokenizer, remember=2)
    tokenizer.reset()
    assert encoder.encode("héllo") == ByteTokenizer().encode("héllo") and tokenizer.calls == 1
    assert encoder.encode("héllo") == ByteTokenizer().encode("héllo") and tokenizer.calls == 1  # remembered
    assert encoder.truncate("héllo", 2) == "h\ufffd" and encoder.truncate("héllo", 0) == "" and tokenizer.calls == 1
    encoder.encode("one"), encoder.encode("two")  # "héllo" is now the least recently used: forgotten
    encoder.encode("héllo")
    assert tokenizer.calls == 4 and len(encoder._memo) == 2
    assert encoder.encode("") == [] and encoder.token_count("") == 0


def test_bm25_long_query_scores_as_the_sum_over_occurrences():
    index = BM25Index(["the cat sat", "the dog barked at the cat", "birds"])
    one = index.scores("cat dog")
    long_query = " ".join(["cat dog"] * 100_000)
    start = time.perf_counter()
    scores = index.scores(long_query)
    assert time.perf_counter() - start < 2.0
    assert scores.tolist() == pytest.approx((100_000 * one).tolist())


def test_icl_cli_long_query_line_and_progress_bars(tmp_path, monkeypatch, capsys):
    import json

    import minift.io
    from minift.icl.cli import main_icl
    from tests.test_icl_support import tiny_decoder

    monkeypatch.setattr(minift.io, "load", lambda source, dtype=None, device=None: (tiny_decoder(), ByteTokenizer()))
    rng = random.Random(4)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": words(rng, 30), "label": y}) + "\n" for y in "ababab"))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": words(rng, 200_000), "label": "a"}) + "\n"
                    + json.dumps({"text": "short", "label": "b"}) + "\n")
    common = ["--model", "tiny", "--train", str(train), "--test", str(test), "--shots", "2", "--selector", "bm25",
              "--max-tokens", "256"]
    start = time.perf_counter()
    assert main_icl(common) == 0
    assert time.perf_counter() - start < 10.0
    captured = capsys.readouterr()
    assert "/2)" in captured.out and captured.err == ""  # no bar when stderr is not a terminal
    assert main_icl(common + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert "icl prompts" in err and "2/2" in err
