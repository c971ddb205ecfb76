"""A horizontal bar chart as an SVG file, with no plotting library.

Lesson
------
minift's demo and tutorials must draw a figure on a fresh machine that has only torch and a few small
packages, so matplotlib is not a dependency. An SVG file is plain text that every browser and editor
displays, and a bar chart needs only three kinds of element:

    <text>  a label or a value          <rect>  one bar          <line>  an axis or a grid line

A chart is a column of panels, one per quantity (say accuracy, then perplexity), each a list of
(label, value) bars sharing one scale that starts at zero:

    accuracy on held-out tweets
    zero-shot ICL     |#########              0.39
    4-shot ICL (kNN)  |##############         0.56
                      0        0.5        1.0

    bar width = value / axis_max * plot_width       axis_max = a round number >= the largest value

Values that are None (a method that did not run) are drawn as a label with "—" and no bar. Text is
escaped, so a label holding "<" or "&" cannot break the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

LABEL_WIDTH = 190  # px for the bar labels on the left
PLOT_WIDTH = 360  # px for the longest possible bar
VALUE_WIDTH = 70  # px for the printed value at the right of a bar
BAR_HEIGHT = 18
BAR_GAP = 6
TITLE_HEIGHT = 28
AXIS_HEIGHT = 26
COLOURS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377")


@dataclass
class Panel:
    """One quantity: a title, its bars (label, value or None) and how values are printed."""

    title: str
    bars: list[tuple[str, float | None]]
    value_format: str = ".3f"
    axis_max: float | None = None  # None: a round number just above the largest value
    reference: tuple[str, float] | None = None  # a dashed vertical line, e.g. ("chance", 0.333)
    colours: tuple[str, ...] = COLOURS


def nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= value (an axis end a reader can take in at a glance)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10 * power


def panel_height(panel: Panel) -> int:
    return TITLE_HEIGHT + len(panel.bars) * (BAR_HEIGHT + BAR_GAP) + AXIS_HEIGHT


def draw_panel(panel: Panel, top: int) -> list[str]:
    """The SVG elements of one panel whose title starts `top` pixels from the top of the image."""
    values = [v for _, v in panel.bars if v is not None]
    axis_max = panel.axis_max or nice_max(max(values, default=1.0))
    x0 = LABEL_WIDTH  # where bars start
    out = [f'<text x="4" y="{top + 18}" font-weight="bold">{escape(panel.title)}</text>']
    y = top + TITLE_HEIGHT
    for i, (label, value) in enumerate(panel.bars):
        text_y = y + BAR_HEIGHT - 4
        out.append(f'<text x="{x0 - 8}" y="{text_y}" text-anchor="end">{escape(label)}</text>')
        if value is None:
            out.append(f'<text x="{x0 + 6}" y="{text_y}" fill="#777">—</text>')
        else:
            width = max(0.0, min(value, axis_max)) / axis_max * PLOT_WIDTH
            colour = panel.colours[i % len(panel.colours)]
            out.append(f'<rect x="{x0}" y="{y}" width="{width:.1f}" height="{BAR_HEIGHT}" fill="{colour}"/>')
            out.append(f'<text x="{x0 + width + 6:.1f}" y="{text_y}">{format(value, panel.value_format)}</text>')
        y += BAR_HEIGHT + BAR_GAP
    # the axis: a line, three ticks (0, half, max) with their values
    out.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + PLOT_WIDTH}" y2="{y}" stroke="#333"/>')
    for fraction in (0.0, 0.5, 1.0):
        x = x0 + fraction * PLOT_WIDTH
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 17}" text-anchor="middle" fill="#333">{fraction * axis_max:g}</text>')
    if panel.reference is not None:
        name, value = panel.reference
        x = x0 + min(value, axis_max) / axis_max * PLOT_WIDTH
        out.append(f'<line x1="{x:.1f}" y1="{top + TITLE_HEIGHT - 4}" x2="{x:.1f}" y2="{y}" stroke="#555" '
                   f'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x + 3:.1f}" y="{top + TITLE_HEIGHT - 6}" fill="#555" font-size="11">'
                   f'{escape(name)}</text>')
    return out


def bar_chart_svg(panels: list[Panel]) -> str:
    """The whole image: panels stacked top to bottom."""
    if not panels:
        raise ValueError("bar_chart_svg: give at least one panel")
    width = LABEL_WIDTH + PLOT_WIDTH + VALUE_WIDTH
    height = sum(panel_height(p) for p in panels) + 8
    elements, top = [], 4
    for panel in panels:
        elements += draw_panel(panel, top)
        top += panel_height(panel)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(elements) + "\n</svg>\n")


def write_bar_chart(panels: list[Panel], path: str | Path) -> Path:
    """Write the chart to `path` (.svg) through a temporary file, so a crash never leaves half an image."""
    path = Path(path)
    if path.suffix.lower() != ".svg":
        raise ValueError(f"{path}: write_bar_chart writes SVG; give a path ending in .svg")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(bar_chart_svg(panels))
    temporary.replace(path)
    return path
