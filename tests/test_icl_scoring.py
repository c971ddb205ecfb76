"""Label scoring: the prefix-cached scorer equals scoring the full prompts without a cache.

Tiny random models (Llama-style with GQA + RoPE, GPT-2-style with learned positions) over a byte
tokenizer; answers of different lengths so the batched multi-token path and its padding are exercised.
"""

import pytest
import torch

from minift.icl.generation import AnswerGenerator, parse_answer
from minift.icl.scoring import LabelScorer, PrefixCache, PromptEncoder, score_cached, score_full
from minift.icl.templates import Template
from tests.test_icl_support import BosByteTokenizer, ByteTokenizer, tiny_decoder, tiny_encoder, tiny_gpt2

WORDS = {"negative": ["negative", "bad"], "neutral": ["meh"], "positive": ["positive", "great!"]}
DEMOS = [("I hate delays", "negative"), ("landed on time", "neutral"), ("best crew ever", "positive")]
QUERIES = ["lost my bag again", "flight 12 boarding now", "thanks for the upgrade", "N/A", ""]


@pytest.mark.parametrize("make_model", [tiny_decoder, tiny_gpt2])
@pytest.mark.parametrize("chat", [False, True])
def test_cached_scores_equal_full_prompt_scores(make_model, chat):
    model = make_model()
    template = Template(instruction="Classify the tweets.", example_format="Tweet: {text}\nSentiment: {label}",
                        verbalizers=WORDS, chat=chat)
    cached = LabelScorer(model, ByteTokenizer(), template, use_cache=True)
    naive = LabelScorer(model, ByteTokenizer(), template, use_cache=False)
    assert len(set(len(ids) for ids in cached.candidate_ids)) > 1  # answers of different lengths
    prompts = [template.build(DEMOS, q) for q in QUERIES]  # one shared prefix: computed once
    prompts += [template.build(DEMOS[:1], q) for q in QUERIES[:2]]  # a different prefix
    prompts += [template.build([], QUERIES[0])]  # zero-shot
    a, b = cached.score(prompts), naive.score(prompts)
    torch.testing.assert_close(a.candidate_logprobs, b.candidate_logprobs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.label_scores, b.label_scores, atol=1e-4, rtol=1e-5)
    assert cached.prefix_cache.hits >= len(QUERIES) - 1 and cached.prefix_cache.misses <= 3


def test_score_functions_agree_on_edge_cases():
    model = tiny_decoder(seed=3)
    enc = PromptEncoder(ByteTokenizer())
    prefix, query = enc.encode("some shared prefix text"), enc.encode(" and a query")
    single = [[40], [41], [42]]  # one-token answers: read straight off the query's last position
    multi = [enc.encode(" yes"), enc.encode(" no"), enc.encode(" maybe so")]
    for answers in (single, multi):
        full = score_full(model, prefix + query, answers)
        torch.testing.assert_close(score_cached(model, prefix, query, answers), full, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(score_cached(model, [], prefix + query, answers), full, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(score_cached(model, prefix + query, [], answers), full, atol=1e-4, rtol=1e-5)
    # A reused prefix cache that must grow for a longer query still gives the right answer.
    cache = PrefixCache()
    score_cached(model, prefix, query, multi, cache)
    long_query = enc.encode(" and a much, much longer query" * 4)
    torch.testing.assert_close(score_cached(model, prefix, long_query, multi, cache),
                               score_full(model, prefix + long_query, multi), atol=1e-4, rtol=1e-5)
    assert cache.hits == 1 and cache.misses == 1
    with pytest.raises(ValueError, match="empty prompt"):
        score_cached(model, [], [], multi)
    with pytest.raises(ValueError, match="causal language model"):
        score_full(tiny_encoder(), prefix, multi)


def test_full_score_is_the_sum_of_token_log_probabilities():
    model = tiny_decoder(seed=5)
    context, answer = [10, 11, 12, 13], [20, 21, 22]
    ids = torch.tensor([context + answer])
    with torch.no_grad():
        logprobs = model(ids)[0].log_softmax(-1)  # (T, V)
    by_hand = sum(float(logprobs[len(context) - 1 + j, answer[j]]) for j in range(3))
    assert float(score_full(model, context, [answer])[0]) == pytest.approx(by_hand, abs=1e-4)


def test_bos_is_found_and_prepended_once():
    enc = PromptEncoder(BosByteTokenizer())
    assert enc.leading == [BosByteTokenizer.bos_token_id]
    template = Template(example_format="{text} -> {label}", verbalizers={"a": ["x"]})
    prefix, query = enc.prompt_ids(template.build([("u", "a")], "v"))
    assert prefix[0] == BosByteTokenizer.bos_token_id and BosByteTokenizer.bos_token_id not in prefix[1:] + query
    assert PromptEncoder(ByteTokenizer()).leading == []


def test_normalisation_and_aggregation():
    model = tiny_decoder()
    template = Template(example_format="{text} = {label}", verbalizers={"a": ["x", "yy"], "b": ["zzz"]})
    prompts = [template.build([], "q1"), template.build([], "q2")]
    summed = LabelScorer(model, ByteTokenizer(), template, normalize="sum").score(prompts)
    lp = summed.candidate_logprobs  # (2, 3): " x" (2 tokens), " yy" (3), " zzz" (4)
    torch.testing.assert_close(summed.label_scores[:, 0], torch.logaddexp(lp[:, 0], lp[:, 1]))
    torch.testing.assert_close(summed.label_scores[:, 1], lp[:, 2])
    mean = LabelScorer(model, ByteTokenizer(), template, normalize="mean", aggregate="max").score(prompts)
    lengths = torch.tensor([2.0, 3.0, 4.0])
    torch.testing.assert_close(mean.label_scores[:, 0], torch.maximum(lp[:, 0] / 2, lp[:, 1] / 3))
    torch.testing.assert_close(mean.label_scores[:, 1], lp[:, 2] / lengths[2])
    torch.testing.assert_close(summed.probabilities.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="normalize"):
        LabelScorer(model, ByteTokenizer(), template, normalize="max")


def test_parse_answer():
    t = Template(example_format="{text}: {label}", verbalizers={"neg": ["negative", "bad"], "pos": ["positive"]})
    assert parse_answer(" Positive\n\nTweet: bad", t) == "pos"  # first line only, any case
    assert parse_answer("\n  it is bad, not positive", t) == "neg"  # earliest word wins
    assert parse_answer("nonnegative", t) is None  # whole words only
    assert parse_answer("positive<|im_end|>", t) == "pos"
    assert parse_answer("", t) is None and parse_answer("mixed feelings", t) is None


def test_answer_generator_decodes_greedy_continuations():
    model, tok = tiny_decoder(seed=2), ByteTokenizer()
    t = Template(example_format="{text}: {label}", verbalizers={"neg": ["negative"], "pos": ["positive"]})
    prompts = [t.build([], "short"), t.build([("a much longer example", "neg")], "q")]
    answers = AnswerGenerator(model, tok, t, max_new_tokens=4, batch_size=2).generate(prompts)
    for prompt, text in zip(prompts, answers.texts):  # batched (left-padded) = one by one
        ids = torch.tensor([tok.encode(prompt.text)])
        alone = model.generate(ids, max_new_tokens=4, eos_token_id=tok.eos_token_id)[0, ids.size(1):].tolist()
        alone = alone[: alone.index(tok.eos_token_id)] if tok.eos_token_id in alone else alone
        assert text == tok.decode(alone)
    assert answers.labels == [parse_answer(x, t) for x in answers.texts]
    assert 0.0 <= answers.parse_rate <= 1.0
