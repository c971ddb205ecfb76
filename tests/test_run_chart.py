"""training.svg: every fit() leaves a chart of its metrics.jsonl in the run directory (minift/svg_chart.py).

The chart is checked against the file it is drawn from: one vertex per finite training loss, per learning
rate and per evaluation. It must be there without an export, after early stopping and after a resume (then
covering the steps before the resume too), and a chart that cannot be written costs a warning, not the run.
"""

import math
import re
from xml.etree import ElementTree

import pytest

import minift.svg_chart
import minift.train.loop as loop
from minift.train import fit, read_metrics, setup
from tests.train_helpers import ALPACA, SENTENCES, run_config, save_tiny_decoder, save_tiny_encoder, write_jsonl
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

SVG = "{http://www.w3.org/2000/svg}"


def chart_series(path) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(panel title, series name) -> the vertices of that series' path, in pixels."""
    root = ElementTree.parse(path).getroot()
    elements = list(root)
    found, panel = {}, None
    for element in elements:
        if element.tag == SVG + "text" and element.get("font-weight") == "bold":
            panel = element.text  # a panel's title comes before its series
        elif element.tag == SVG + "g" and element.get("class") == "series":
            d = element.find(SVG + "path").get("d") if element.find(SVG + "path") is not None else ""
            points = [(float(x), float(y)) for x, y in re.findall(r"[ML]([-\d.]+) ([-\d.]+)", d)]
            found[(panel, element.find(SVG + "title").text)] = points
    return found


def expected_counts(run_dir) -> dict[tuple[str, str], int]:
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    counts = {("loss", "train"): sum(r["loss"] is not None and math.isfinite(r["loss"]) for r in train),
              ("learning rate (top layer group)", "lr"): len(train)}
    if evals:
        counts[("loss", "eval")] = len(evals)
        metric = "eval_perplexity" if "eval_perplexity" in evals[0] else "eval_accuracy"
        counts[(metric.replace("_", " "), "eval")] = len(evals)
    return counts


def assert_chart_matches_metrics(run_dir) -> dict:
    series = chart_series(run_dir / "training.svg")
    assert {key: len(points) for key, points in series.items()} == expected_counts(run_dir)
    return series


@pytest.fixture
def decoder_run(tmp_path):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    return lambda out, *overrides: run_config(model_dir, data, tmp_path / out, *overrides)


def test_a_run_without_export_writes_loss_eval_and_lr_series_matching_metrics(decoder_run, tmp_path, capsys):
    config = decoder_run("run", "train.max_steps=6", "train.eval_every=2", "data.validation_fraction=0.25",
                         "train.export=false", "train.save_checkpoints=false", "train.schedule=warmup_cosine",
                         "train.warmup_steps=2")
    fit(setup(config))
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists() and "warning" not in capsys.readouterr().err
    series = assert_chart_matches_metrics(run_dir)
    assert len(series[("loss", "train")]) == 6 and len(series[("loss", "eval")]) == 3  # steps 2, 4, 6
    assert len(series[("eval perplexity", "eval")]) == 3
    steps_px = [x for x, _ in series[("learning rate (top layer group)", "lr")]]
    assert steps_px == sorted(steps_px) and series[("loss", "eval")][-1][0] == pytest.approx(steps_px[-1])


def test_an_early_stopped_run_is_charted_up_to_where_it_stopped(decoder_run, tmp_path, monkeypatch):
    values = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {"eval_loss": next(values), "eval_perplexity": 9.0})
    run = setup(decoder_run("run", "train.max_steps=10", "train.eval_every=1", "train.early_stopping_patience=2",
                            "data.validation_fraction=0.2", "train.save_checkpoints=false"))
    fit(run)
    assert run.state.stopped_early and run.state.step == 4
    series = assert_chart_matches_metrics(tmp_path / "run")
    assert len(series[("loss", "eval")]) == 4


def test_a_resumed_run_is_charted_from_its_first_step(tmp_path, monkeypatch):
    model_dir = save_tiny_decoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)
    config = run_config(model_dir, data, tmp_path / "run", "data.format=alpaca", "train.max_steps=8",
                        "train.save_every=3", "train.eval_every=4", "data.validation_fraction=0.25",
                        "train.export=false")
    real = loop.accumulate_gradients

    def dying(model, micro_batches, precision="fp32", scaler=None, step=0):
        if step == 5:
            raise KeyboardInterrupt  # like Ctrl-C during step 5, after the checkpoint at step 3
        return real(model, micro_batches, precision, scaler, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "accumulate_gradients", dying)
        with pytest.raises(KeyboardInterrupt):
            fit(setup(config))
    resumed = setup(config, resume=True)
    assert resumed.state.step == 3
    fit(resumed)
    series = assert_chart_matches_metrics(tmp_path / "run")
    assert len(series[("learning rate (top layer group)", "lr")]) == 8  # steps 1-3 from before the resume
    assert len(series[("loss", "eval")]) == 2  # steps 4 and 8


def test_a_masked_lm_run_skips_steps_with_nothing_masked(tmp_path):
    model_dir = save_tiny_encoder(tmp_path / "model")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    fit(setup(run_config(model_dir, data, tmp_path / "mlm", "task.kind=masked_lm", "task.mlm_probability=0.05",
                         "train.max_steps=12", "train.batch_size=1", "train.export=false",
                         "train.save_checkpoints=false")))
    assert_chart_matches_metrics(tmp_path / "mlm")  # None losses: no vertex, one per finite loss


def test_a_chart_that_cannot_be_written_warns_once_and_the_run_goes_on(decoder_run, tmp_path, monkeypatch, capsys):
    def broken(records):
        raise RuntimeError("no panels\ntoday")

    monkeypatch.setattr(minift.svg_chart, "training_panels", broken)
    last = fit(setup(decoder_run("run", "train.max_steps=2", "train.save_checkpoints=false")))
    assert last["step"] == 2 and (tmp_path / "run" / "final").is_dir()  # the export still ran
    assert not (tmp_path / "run" / "training.svg").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"minift: warning: could not write {tmp_path / 'run' / 'training.svg'} "
                        f"(RuntimeError: no panels today)"]
