"""End to end on the bundled SmolLM2-135M-Instruct with its real tokenizer (a few examples only).

The cached scorer must equal the naive one on the real model too (byte-level BPE, ChatML specials), and
a 3-shot plain prompt must get two unambiguous tweets right, by label scoring and by free generation.
(The 135M model's free answers in the ChatML style are less reliable: it called both tweets positive.)
"""

import pytest
import torch

import minift
from minift.icl import AnswerGenerator, FixedSelector, ICLClassifier, LabelScorer, Template
from minift.io.bundled import resolve_bundled

DEMOS = [("I love this airline, best flight of my life!", "positive"),
         ("Worst service ever, my bag is lost and nobody helps.", "negative"),
         ("Flight 123 to Boston departs at 5pm from gate B4.", "neutral")]
QUERIES = [("Thank you so much, amazing crew and great food!", "positive"),
           ("Delayed three hours again, terrible customer service.", "negative")]


@pytest.fixture(scope="module")
def smollm2():
    try:
        resolve_bundled("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return minift.load("smollm2-135m")


def template(chat=False, words=None):
    return Template(instruction="Classify the sentiment of each tweet as negative, neutral or positive.",
                    example_format="Tweet: {text}\nSentiment: {label}", chat=chat,
                    verbalizers=words or {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]})


@pytest.mark.slow
def test_cached_equals_naive_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    # ChatML specials in the prompt, and answers of one and of two tokens.
    for t in [template(chat=True, words={"negative": ["negative", "bad news"], "neutral": ["no opinion"],
                                         "positive": ["positive"]})]:
        prompts = [t.build(DEMOS, q) for q, _ in QUERIES]
        cached = LabelScorer(model, tokenizer, t, use_cache=True)
        naive = LabelScorer(model, tokenizer, t, use_cache=False)
        a, b = cached.score(prompts), naive.score(prompts)
        torch.testing.assert_close(a.candidate_logprobs, b.candidate_logprobs, atol=2e-4, rtol=1e-5)
        assert cached.prefix_cache.hits == 1  # the second query reused the demonstrations' keys and values


@pytest.mark.slow
def test_three_shot_gets_clear_tweets_right(smollm2):
    model, tokenizer = smollm2
    texts, labels = [t for t, _ in DEMOS], [y for _, y in DEMOS]
    clf = ICLClassifier(model, tokenizer, template(), selector=FixedSelector([0, 1, 2]), shots=3, order="given")
    result = clf.fit(texts, labels).predict([q for q, _ in QUERIES])
    assert result.predictions == [y for _, y in QUERIES], result.raw_probabilities
    prompts = [f.prompt for f in result.prompts]
    answers = AnswerGenerator(model, tokenizer, template(), max_new_tokens=4).generate(
        [template().build(DEMOS, q) for q, _ in QUERIES])
    print("generated:", answers.texts)
    assert answers.labels == [y for _, y in QUERIES] and prompts[0].prefix == prompts[1].prefix
