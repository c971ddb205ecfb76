"""Templates render exactly the documented text, plain and ChatML, and reject malformed input."""

import pytest

from minift.icl.templates import Template, default_template, sentiment_templates

WORDS = {"negative": ["negative", "bad"], "positive": ["positive"]}


def test_plain_prompt_text_and_candidates():
    t = Template(instruction="Classify.", example_format="Tweet: {text}\nSentiment: {label}", verbalizers=WORDS)
    p = t.build([("awful", "negative"), ("great", "positive")], "fine day")
    assert p.prefix == "Classify.\n\nTweet: awful\nSentiment: negative\n\nTweet: great\nSentiment: positive"
    assert p.query == "\n\nTweet: fine day\nSentiment:"
    assert p.text == p.prefix + p.query
    # The space before {label} belongs to the answer; every word of every label is a candidate.
    assert t.candidates() == [("negative", " negative"), ("negative", " bad"), ("positive", " positive")]


def test_zero_shot_without_instruction_has_empty_prefix():
    t = Template(example_format="{text}\nAnswer: {label}.", verbalizers=WORDS)
    p = t.build([], "meh")
    assert (p.prefix, p.query) == ("", "meh\nAnswer:")
    assert t.demonstration("so bad", "negative") == "so bad\nAnswer: negative."  # text after {label} is kept


def test_chat_prompt_uses_chatml_turns():
    t = Template(instruction="Classify.", example_format="Tweet: {text}\nSentiment: {label}", verbalizers=WORDS,
                 chat=True)
    p = t.build([("awful", "negative")], "fine day")
    assert p.prefix == ("<|im_start|>system\nClassify.<|im_end|>\n"
                        "<|im_start|>user\nTweet: awful\nSentiment:<|im_end|>\n"
                        "<|im_start|>assistant\nnegative<|im_end|>\n")
    assert p.query == "<|im_start|>user\nTweet: fine day\nSentiment:<|im_end|>\n<|im_start|>assistant\n"
    assert t.candidates()[0] == ("negative", "negative")  # no leading space in a chat answer


def test_template_validation():
    with pytest.raises(ValueError, match=r"\{label\} exactly once"):
        Template(example_format="Tweet: {text}", verbalizers=WORDS)
    with pytest.raises(ValueError, match=r"\{text\} exactly once"):
        Template(example_format="{text} {text} {label}", verbalizers=WORDS)
    with pytest.raises(ValueError, match="before"):
        Template(example_format="{label}: {text}", verbalizers=WORDS)
    with pytest.raises(ValueError, match="empty"):
        Template(example_format="{text} {label}", verbalizers={})
    with pytest.raises(ValueError, match="two labels"):
        Template(example_format="{text} {label}", verbalizers={"a": ["yes"], "b": ["Yes"]})
    with pytest.raises(ValueError, match="non-empty"):
        Template(example_format="{text} {label}", verbalizers={"a": [" "]})
    t = Template(example_format="{text} {label}", verbalizers={"a": "alpha"})  # a single word is accepted
    assert t.verbalizers == {"a": ["alpha"]}
    with pytest.raises(ValueError, match="not in the template"):
        t.build([("x", "zzz")], "q")


def test_default_and_preset_templates():
    t = default_template(["neg", "pos"])
    assert t.labels == ["neg", "pos"] and "neg, pos" in t.instruction
    grid = sentiment_templates()
    assert len(grid) == 18 and len({g.name for g in grid}) == 18
    assert all(g.labels == ["negative", "neutral", "positive"] for g in grid)
