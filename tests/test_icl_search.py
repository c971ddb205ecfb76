"""Prompt search: the one-pass label-word search equals evaluating every combination separately."""

import pytest

from minift.icl.classify import ICLClassifier, classification_report
from minift.icl.search import search_prompts, search_verbalizers, verbalizer_combinations
from minift.icl.selectors import RandomSelector
from minift.icl.templates import Template
from tests.test_icl_support import ByteTokenizer, tiny_decoder

DEV = [("good day", "pos"), ("bad day", "neg"), ("fine", "pos"), ("awful", "neg"), ("nice", "pos"), ("ugh", "neg")]
OPTIONS = {"neg": ["bad", "no", "sad"], "pos": ["good", "yes"]}


def test_combinations():
    combos = verbalizer_combinations(OPTIONS)
    assert len(combos) == 6 and combos[0] == {"neg": ["bad"], "pos": ["good"]}
    assert len(verbalizer_combinations(OPTIONS, limit=4)) == 4


@pytest.mark.parametrize("calibrate", [False, True])
def test_verbalizer_search_equals_separate_evaluations(calibrate):
    model, tok = tiny_decoder(seed=7), ByteTokenizer()
    base = Template(example_format="Text: {text}\nLabel: {label}", verbalizers={"neg": ["bad"], "pos": ["good"]})
    texts, labels = [t for t, _ in DEV], [y for _, y in DEV]
    result = search_verbalizers(model, tok, base, OPTIONS, texts, labels, calibrate=calibrate)
    assert len(result.entries) == 6
    by_name = {e.template.name: e.accuracy for e in result.entries}
    for words in verbalizer_combinations(OPTIONS):
        clf = ICLClassifier(model, tok, base.with_verbalizers(words), calibrate=calibrate)
        accuracy = classification_report(labels, clf.predict(texts).predictions, base.labels).accuracy
        assert by_name[f"{words['neg'][0]}/{words['pos'][0]}"] == pytest.approx(accuracy)
    accuracies = [e.accuracy for e in result.entries]
    assert accuracies == sorted(accuracies, reverse=True) and result.best is result.entries[0].template
    assert "accuracy" in result.table(top=3)


def test_prompt_search_ranks_templates_k_shot():
    model, tok = tiny_decoder(seed=1), ByteTokenizer()
    words = {"neg": ["bad"], "pos": ["good"]}
    templates = [Template(example_format="{text} => {label}", verbalizers=words, name="arrow"),
                 Template(example_format="Text: {text}\nLabel: {label}", verbalizers=words, name="fields"),
                 Template(example_format="Text: {text}\nLabel: {label}", verbalizers=words, chat=True, name="chat")]
    texts, labels = [t for t, _ in DEV], [y for _, y in DEV]
    result = search_prompts(model, tok, templates, texts, labels, pool_texts=texts, pool_labels=labels,
                            make_selector=lambda: RandomSelector(seed=0), shots=2)
    assert sorted(e.template.name for e in result.entries) == ["arrow", "chat", "fields"]
    for entry in result.entries:
        clf = ICLClassifier(model, tok, entry.template, selector=RandomSelector(seed=0), shots=2).fit(texts, labels)
        assert entry.accuracy == classification_report(labels, clf.predict(texts).predictions, ["neg", "pos"]).accuracy
    with pytest.raises(ValueError, match="make_selector"):
        search_prompts(model, tok, templates, texts, labels, shots=2)
    with pytest.raises(ValueError, match="differ"):
        search_verbalizers(model, tok, templates[0], {"neg": ["bad"]}, texts, labels)
