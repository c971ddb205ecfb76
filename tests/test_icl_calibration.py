"""Contextual calibration: the math on a fixed probability table, and the classifier applying it."""

import pytest
import torch

from minift.icl.calibration import calibrate, calibrated_predictions, content_free_distribution
from minift.icl.classify import ICLClassifier
from minift.icl.selectors import RandomSelector
from minift.icl.templates import Template
from tests.test_icl_support import ByteTokenizer, tiny_decoder

P = torch.tensor([[0.6, 0.3, 0.1],
                  [0.5, 0.4, 0.1],
                  [0.2, 0.2, 0.6]], dtype=torch.float64)
P_CF = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def test_calibration_on_a_fixed_table():
    q = calibrate(P, P_CF)
    # Row 0 by hand: W p = (0.6/0.5, 0.3/0.3, 0.1/0.2) = (1.2, 1.0, 0.5), sum 2.7.
    assert q[0].tolist() == pytest.approx([1.2 / 2.7, 1.0 / 2.7, 0.5 / 2.7])
    # Row 1: (1.0, 4/3, 0.5): the prediction flips from label 0 to label 1.
    assert q[1].tolist() == pytest.approx([1.0 / (17 / 6), (4 / 3) / (17 / 6), 0.5 / (17 / 6)])
    assert P[1].argmax() == 0 and calibrated_predictions(P, P_CF).tolist() == [0, 1, 2]
    assert torch.allclose(q.sum(-1), torch.ones(3, dtype=torch.float64))


def test_calibrating_the_content_free_distribution_gives_uniform():
    assert calibrate(P_CF, P_CF).tolist() == pytest.approx([1 / 3] * 3)
    # A uniform p_cf changes nothing; unnormalised inputs are normalised first.
    torch.testing.assert_close(calibrate(P, torch.full((3,), 1 / 3, dtype=torch.float64)), P)
    torch.testing.assert_close(calibrate(P * 7, P_CF), calibrate(P, P_CF))
    # Per-row content-free distributions (one per set of demonstrations).
    per_row = torch.stack([P_CF, torch.full((3,), 1 / 3, dtype=torch.float64), P_CF])
    q = calibrate(P, per_row)
    assert q[1].tolist() == pytest.approx(P[1].tolist()) and q[0].tolist() == pytest.approx(calibrate(P[0], P_CF).tolist())


def test_content_free_distribution_averages_raw_probabilities():
    # Two content-free inputs with label log-scores; raw probabilities are averaged, then normalised.
    raw = torch.tensor([[0.2, 0.1, 0.1], [0.1, 0.3, 0.2]], dtype=torch.float64)
    mean = raw.mean(0)
    assert content_free_distribution(raw.log()).tolist() == pytest.approx((mean / mean.sum()).tolist())
    # Tiny likelihoods (long multi-token answers) do not underflow.
    assert content_free_distribution(raw.log() - 2000).tolist() == pytest.approx((mean / mean.sum()).tolist())


def test_calibration_errors():
    with pytest.raises(ValueError, match="3 labels"):
        calibrate(P, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="strictly positive"):
        calibrate(P, torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        content_free_distribution(torch.zeros(0, 3))


def test_classifier_applies_calibration_with_the_same_demonstrations():
    model, tok = tiny_decoder(), ByteTokenizer()
    template = Template(example_format="T: {text}\nL: {label}", verbalizers={"a": ["yes"], "b": ["no", "nope"]})
    texts, labels = ["one", "two", "three", "four"], ["a", "b", "a", "b"]
    clf = ICLClassifier(model, tok, template, selector=RandomSelector(seed=0), shots=2, calibrate=True)
    result = clf.fit(texts, labels).predict(["five", "six"])
    plain = ICLClassifier(model, tok, template, selector=RandomSelector(seed=0), shots=2).fit(texts, labels)
    raw = plain.predict(["five", "six"]).probabilities
    torch.testing.assert_close(result.raw_probabilities, raw)
    # p_cf by hand: the same two demonstrations, queries "N/A", "" and "[MASK]".
    demos = [(texts[s.index], labels[s.index]) for s in result.prompts[0].kept]
    cf_scores = plain.scorer.score([template.build(demos, x) for x in ("N/A", "", "[MASK]")]).label_scores
    expected = calibrate(raw, content_free_distribution(cf_scores))
    torch.testing.assert_close(result.probabilities, expected)
    assert result.predictions == [template.labels[i] for i in expected.argmax(-1).tolist()]
