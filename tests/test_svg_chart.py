"""minift/svg_chart.py: the dependency-free bar chart the demo writes, and the line chart of a training run."""

import json
import math
import re
from xml.etree import ElementTree

import pytest

from minift.svg_chart import (MARKER_LIMIT, LinePanel, Panel, Series, bar_chart_svg, line_chart_svg, nice_max,
                              nice_ticks, training_panels, write_bar_chart, write_line_chart, write_training_chart)

SVG = "{http://www.w3.org/2000/svg}"


def bars_of(svg_text: str) -> list[ElementTree.Element]:
    root = ElementTree.fromstring(svg_text)
    return [e for e in root.iter(SVG + "rect") if e.get("width") != "100%"]  # minus the white background


@pytest.mark.parametrize("value, expected", [(0.93, 1.0), (1.0, 1.0), (1.2, 2.0), (2.2, 2.5), (3, 5), (7, 10),
                                             (19.5, 20), (0.042, 0.05), (0, 1.0)])
def test_nice_max_is_the_next_round_number(value, expected):
    assert nice_max(value) == pytest.approx(expected)


def test_bars_are_proportional_and_missing_values_have_no_bar():
    panel = Panel("accuracy", [("a", 0.25), ("b", 0.5), ("skipped <GPU> & co", None), ("c", 1.0)], axis_max=1.0)
    text = bar_chart_svg([panel])
    widths = [float(bar.get("width")) for bar in bars_of(text)]
    assert len(widths) == 3 and widths[1] == pytest.approx(2 * widths[0]) and widths[2] == pytest.approx(4 * widths[0])
    labels = [e.text for e in ElementTree.fromstring(text).iter(SVG + "text")]
    assert "skipped <GPU> & co" in labels and "—" in labels  # escaped in the file, intact when parsed
    assert "0.500" in labels


def test_panels_stack_and_values_beyond_the_axis_are_clipped():
    panels = [Panel("one", [("x", 0.5)], axis_max=1.0), Panel("two", [("y", 3.0), ("z", 9.0)], axis_max=6.0,
                                                                 reference=("base", 2.0))]
    bars = bars_of(bar_chart_svg(panels))
    assert len(bars) == 3
    assert float(bars[0].get("y")) < float(bars[1].get("y")) < float(bars[2].get("y"))
    assert float(bars[2].get("width")) == pytest.approx(2 * float(bars[1].get("width")))  # 9 clipped to 6


def test_write_bar_chart_checks_the_suffix_and_leaves_no_temporary(tmp_path):
    panel = Panel("p", [("a", 1.0)])
    with pytest.raises(ValueError, match=r"chart\.png.*\.svg"):
        write_bar_chart([panel], tmp_path / "chart.png")
    path = write_bar_chart([panel], tmp_path / "chart.svg")
    assert ElementTree.parse(path).getroot().tag == SVG + "svg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.svg"]
    with pytest.raises(ValueError, match="at least one panel"):
        bar_chart_svg([])


# ----------------------------------------------------------------------------------------------------
# Line charts
# ----------------------------------------------------------------------------------------------------


def drawn_series(svg_text: str) -> dict[str, dict]:
    """Per series (by its <title>): the path's vertices as (x, y) pixels, its stretches, its dots."""
    root = ElementTree.fromstring(svg_text)  # also proves the file is well-formed XML
    found = {}
    for group in root.iter(SVG + "g"):
        if group.get("class") != "series":
            continue
        path = group.find(SVG + "path")
        commands = re.findall(r"([ML])([-\d.]+) ([-\d.]+)", path.get("d")) if path is not None else []
        found[group.find(SVG + "title").text] = {
            "points": [(float(x), float(y)) for _, x, y in commands],
            "stretches": sum(command == "M" for command, _, _ in commands),
            "dots": len(group.findall(SVG + "circle")),
        }
    return found


def texts(svg_text: str) -> list[str]:
    return [e.text for e in ElementTree.fromstring(svg_text).iter(SVG + "text")]


@pytest.mark.parametrize("low, high, integer, expected", [
    (1, 30, True, [0, 10, 20, 30]), (0.3, 0.7, False, [0.3, 0.4, 0.5, 0.6, 0.7]),
    (0, 0.001, False, [0, 0.00025, 0.0005, 0.00075, 0.001]), (1, 3, True, [1, 2, 3]),
    (2.5, 2.5, False, [1, 2, 3, 4]),  # a constant: a band around the value
    (0, 0, False, [-1, -0.5, 0, 0.5, 1]), (1, 1, True, [0, 1, 2]),  # a single step
])
def test_nice_ticks_cover_the_range_with_round_steps(low, high, integer, expected):
    ticks = nice_ticks(low, high, count=6 if integer else 5, integer=integer)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= low and ticks[-1] >= high


def test_every_finite_point_is_drawn_and_missing_values_leave_gaps():
    loss = [(1, 3.0), (2, 2.5), (3, None), (4, 2.0), (5, math.nan), (6, 1.8), (7, 1.7), (8, math.inf), (9, 1.5)]
    panel = LinePanel("loss <train> & eval", [Series("train", loss), Series("eval", [(5, 2.2), (9, 1.9)])])
    text = line_chart_svg([panel])
    series = drawn_series(text)
    assert len(series["train"]["points"]) == 6 and series["train"]["stretches"] == 4  # 1-2 | 4 | 6-7 | 9
    assert len(series["eval"]["points"]) == 2 and series["eval"]["stretches"] == 1
    assert series["train"]["dots"] == 6  # few points: a dot on each
    xs = [x for x, _ in series["train"]["points"]]
    assert xs == sorted(xs) and len(set(xs)) == 6
    ys = dict(zip([1, 2, 4, 6, 7, 9], [y for _, y in series["train"]["points"]]))
    assert ys[1] < ys[2] < ys[4] < ys[6] < ys[7] < ys[9]  # a higher value is higher up (smaller y pixel)
    assert "loss <train> & eval" in texts(text) and "train 1.5" in texts(text) and "eval 1.9" in texts(text)


def test_long_series_dot_only_lone_points():
    points = [(step, 1.0 / step) for step in range(1, 2 * MARKER_LIMIT)] + [(2 * MARKER_LIMIT, None),
                                                                             (2 * MARKER_LIMIT + 1, 0.01)]
    series = drawn_series(line_chart_svg([LinePanel("loss", [Series("train", points)])]))["train"]
    assert len(series["points"]) == 2 * MARKER_LIMIT and series["stretches"] == 2 and series["dots"] == 1


def test_a_single_point_and_a_constant_series_are_drawn_inside_the_plot():
    one = LinePanel("one evaluation", [Series("eval", [(7, 0.5)])])
    flat = LinePanel("learning rate", [Series("lr", [(step, 3e-3) for step in range(1, 8)])], include_zero=True)
    empty = LinePanel("nothing yet", [Series("accuracy", [(1, None)])])
    text = line_chart_svg([one, flat, empty])
    series = drawn_series(text)
    assert len(series["eval"]["points"]) == 1 and series["eval"]["dots"] == 1
    (x, y), = series["eval"]["points"]
    heights = {y for _, y in series["lr"]["points"]}
    assert len(heights) == 1  # flat
    root = ElementTree.fromstring(text)
    width, height = float(root.get("width")), float(root.get("height"))
    assert all(0 < px < width and 0 < py < height for px, py in series["lr"]["points"] + [(x, y)])
    assert "no values" in texts(text) and "accuracy (none)" in texts(text)
    assert "0" in texts(text)  # include_zero: the rate's axis starts at 0


def test_panels_share_one_step_axis():
    early = LinePanel("loss", [Series("train", [(1, 2.0), (10, 1.0)])])
    late = LinePanel("eval", [Series("eval", [(10, 5.0), (40, 4.0)])])
    series = drawn_series(line_chart_svg([early, late]))
    assert series["train"]["points"][1][0] == pytest.approx(series["eval"]["points"][0][0])  # step 10, both


def test_line_charts_are_deterministic_bytes(tmp_path):
    def panels():
        return [LinePanel("loss", [Series("train", [(s, 1 / s) for s in range(1, 60)] + [(60, None)])]),
                LinePanel("lr", [Series("lr", [(s, 1e-3 * min(1.0, s / 7)) for s in range(1, 61)])],
                          include_zero=True)]
    first = write_line_chart(panels(), tmp_path / "a.svg").read_bytes()
    second = write_line_chart(panels(), tmp_path / "b.svg").read_bytes()
    assert first == second and first.decode() == line_chart_svg(panels())
    with pytest.raises(ValueError, match=r"chart\.png.*\.svg"):
        write_line_chart(panels(), tmp_path / "chart.png")
    with pytest.raises(ValueError, match="at least one panel"):
        line_chart_svg([])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg", "b.svg"]


# ----------------------------------------------------------------------------------------------------
# The chart of a training run
# ----------------------------------------------------------------------------------------------------

RECORDS = ([{"step": s, "epoch": s / 4, "loss": None if s == 3 else 4.0 - 0.3 * s, "lr": 1e-3 * min(1, s / 2),
             "grad_norm": 1.0, "targets": 0 if s == 3 else 9, "tokens_per_s": 100.0} for s in range(1, 9)]
           + [{"step": 4, "eval_loss": 3.0, "eval_perplexity": math.exp(3.0)},
              {"step": 8, "eval_loss": 2.5, "eval_perplexity": math.exp(2.5)}])


def test_training_panels_draw_loss_eval_and_learning_rate_from_metrics_records():
    panels = training_panels(RECORDS)
    assert [p.title for p in panels] == ["loss", "eval perplexity", "learning rate (top layer group)"]
    assert [s.name for s in panels[0].series] == ["train", "eval"]
    series = drawn_series(line_chart_svg(panels))
    assert len(series["train"]["points"]) == 7 and series["train"]["stretches"] == 2  # step 3: nothing masked
    assert len(series["eval"]["points"]) == 2 and len(series["lr"]["points"]) == 8
    accuracy = training_panels(RECORDS[:8] + [{"step": 8, "eval_loss": 0.4, "eval_accuracy": 0.75}])
    assert [p.title for p in accuracy][1] == "eval accuracy"
    no_eval = training_panels(RECORDS[:8])
    assert [p.title for p in no_eval] == ["loss", "learning rate (top layer group)"]


def test_write_training_chart_writes_the_whole_file_and_warns_instead_of_failing(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    chart = write_training_chart(metrics, tmp_path / "training.svg")
    assert chart == tmp_path / "training.svg" and capsys.readouterr().err == ""
    assert chart.read_text() == line_chart_svg(training_panels(RECORDS))

    metrics.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.\n')  # cut off mid-line
    assert write_training_chart(metrics, tmp_path / "broken.svg") is None
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "warning" in warning and "broken.svg" in warning
    assert "JSONDecodeError" in warning
    assert write_training_chart(tmp_path / "missing.jsonl", tmp_path / "none.svg") is None
    assert "FileNotFoundError" in capsys.readouterr().err
    assert not (tmp_path / "broken.svg").exists() and not (tmp_path / "none.svg").exists()
