"""minift/svg_chart.py: the dependency-free bar chart the demo writes."""

from xml.etree import ElementTree

import pytest

from minift.svg_chart import Panel, bar_chart_svg, nice_max, write_bar_chart

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
