"""Bar charts and line charts as SVG files, with no plotting library.

Lesson
------
minift's demo, tutorials and training runs must draw a figure on a fresh machine that has only torch and a
few small packages, so matplotlib is not a dependency. An SVG file is plain text that every browser and
editor displays, and a chart needs only a few kinds of element:

    <text>  a label or a value    <rect>  one bar    <line>  an axis or a grid line    <path>  a curve

Both kinds of chart are a column of panels, one per quantity, stacked top to bottom.

Bar chart (the demo's figure): each panel is a list of (label, value) bars sharing one scale from zero.

    accuracy on held-out tweets
    zero-shot ICL     |#########              0.39
    4-shot ICL (kNN)  |##############         0.56
                      0        0.5        1.0

    bar width = value / axis_max * plot_width       axis_max = a round number >= the largest value

Line chart (training.svg in every run directory): each panel holds one or more series of (x, y) points;
all panels share one x axis (the optimizer step), so a bump in the loss lines up with the learning rate
and the evaluation that caused it. Each axis ends on round ticks (1, 2, 2.5 or 5 x 10^k apart):

    loss  — train 2.31  — eval 2.45        px = left + (x - x_low) / (x_high - x_low) * plot_width
    3 |'.                                  py = bottom - (y - y_low) / (y_high - y_low) * plot_height
    2 |  '-.__o____.__o
      +--------------------
      0     10     20    step

A series is one <path>: "M x y" starts a stretch, "L x y" continues it. A missing value (None, NaN or
infinite: say a masked-LM step where nothing was masked) is skipped and ends the stretch, so the gap shows
instead of a line drawn across it. Series with few points, and lone points between gaps, also get a dot
per point, so a single evaluation is visible. A constant series gets a band around its value.

The training chart: write_training_chart, called once at the end of every fit(), reads the run's
metrics.jsonl and writes training.svg beside it. It draws the whole file, so a resumed run's chart also
covers the steps before the resume, and an early-stopped run's chart ends where it stopped.

    loss                      train loss per logged step, eval loss per evaluation (one unit, one scale)
    eval perplexity | eval accuracy     per evaluation, when the run has validation data
    learning rate             per logged step, the top layer group's rate, linear axis from 0

The learning rate is drawn on a linear axis, not a log one: warmup starts at 0 and cosine decay ends at 0,
which a log axis cannot show, and the schedules' shapes (the slanted triangle of Howard & Ruder 2018,
Fig. 2; warmup-cosine) are defined and pictured linearly. Lower layer groups follow the same curve,
divided by the discriminative factor once per group.

Values that are None in a bar chart (a method that did not run) are drawn as a label with "—" and no
bar. Text is escaped, so a label holding "<" or "&" cannot break the file. The output is a pure function
of the input (fixed number formats, no clock, no randomness): the same data gives the same bytes.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
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
    return svg_document(width, height, elements)


def write_bar_chart(panels: list[Panel], path: str | Path) -> Path:
    """Write the chart to `path` (.svg) through a temporary file, so a crash never leaves half an image."""
    return write_svg(bar_chart_svg(panels), path, "write_bar_chart")


def write_svg(text: str, path: str | Path, writer: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".svg":
        raise ValueError(f"{path}: {writer} writes SVG; give a path ending in .svg")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return path


def svg_document(width: int, height: int, elements: list[str]) -> str:
    """The <svg> root around `elements`, on a white background."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(elements) + "\n</svg>\n")


# ----------------------------------------------------------------------------------------------------
# Line charts
# ----------------------------------------------------------------------------------------------------

AXIS_LEFT = 72  # px for the y tick labels left of a line plot
LINE_PLOT_WIDTH = 560
LINE_PLOT_HEIGHT = 140
AXIS_RIGHT = 24
PLOT_TOP_GAP = 8  # px between a panel's title row and its plot
MARKER_LIMIT = 40  # a series with at most this many points gets a dot on each one


@dataclass
class Series:
    """One curve: a name for the legend and its (x, y) points; y None, NaN or infinite is a gap."""

    name: str
    points: list[tuple[float, float | None]]
    colour: str | None = None  # None: the panel's next colour


@dataclass
class LinePanel:
    """One quantity over x: a title, its series, how values are printed, whether the y axis starts at 0."""

    title: str
    series: list[Series]
    value_format: str = ".4g"  # the last value of each series, printed in the legend
    include_zero: bool = False  # True: the y axis reaches 0 (a learning rate that warms up from 0)
    colours: tuple[str, ...] = COLOURS


def finite(value) -> bool:
    """A number to draw: int, float, numpy scalar; not None, NaN, infinite, a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def drawn_points(series: Series) -> list[tuple[float, float]]:
    """The points that get drawn: both coordinates finite numbers."""
    return [(x, y) for x, y in series.points if finite(x) and finite(y)]


def nice_step(raw: float, integer: bool = False) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= raw; with integer=True, a whole number >= 1."""
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        step = multiple * power
        if integer and (step < 1 or step != int(step)):
            continue
        if step >= raw * (1 - 1e-12):
            return float(step)
    return 10.0 * power


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About `count` round tick values, evenly spaced, from at or below `low` to at or above `high`.

    A zero-width range (a constant series, a single point) is widened to a band around its value first.
    The first and last ticks are the ends of the axis.
    """
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) / 2 or 1.0
        low, high = low - pad, high + pad
    step = nice_step((high - low) / (count - 1), integer)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [float(f"{k * step:.12g}") + 0.0 for k in range(first, last + 1)]  # 0.3, not 0.30000000000000004; no -0


def tick_label(value: float) -> str:
    if value == int(value) and abs(value) < 1e7:
        return str(int(value))
    return f"{value:.4g}"


def series_elements(series: Series, colour: str, to_px) -> list[str]:
    """A series as one <g> (its <title> is the hover tooltip): a path of stretches, and dots where needed."""
    stretches, current = [], []
    for x, y in series.points:
        if finite(x) and finite(y):
            current.append(to_px(x, y))
        elif current:
            stretches.append(current)
            current = []
    if current:
        stretches.append(current)
    commands = []
    for stretch in stretches:
        commands += [f"M{stretch[0][0]:.2f} {stretch[0][1]:.2f}"]
        commands += [f"L{px:.2f} {py:.2f}" for px, py in stretch[1:]]
    everywhere = sum(len(stretch) for stretch in stretches) <= MARKER_LIMIT
    dots = [point for stretch in stretches if everywhere or len(stretch) == 1 for point in stretch]
    out = [f'<g class="series" stroke="{colour}" fill="{colour}"><title>{escape(series.name)}</title>']
    if commands:
        out.append(f'<path d="{" ".join(commands)}" fill="none" stroke-width="1.6" stroke-linejoin="round"/>')
    out += [f'<circle cx="{px:.2f}" cy="{py:.2f}" r="2.5" stroke="none"/>' for px, py in dots]
    return out + ["</g>"]


def line_panel_height() -> int:
    return TITLE_HEIGHT + PLOT_TOP_GAP + LINE_PLOT_HEIGHT + AXIS_HEIGHT


def draw_line_panel(panel: LinePanel, top: int, x_ticks: list[float]) -> list[str]:
    """The SVG elements of one line panel whose title starts `top` pixels from the top of the image."""
    values = [y for series in panel.series for _, y in drawn_points(series)]
    if panel.include_zero:
        values.append(0.0)
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, bottom = AXIS_LEFT, top + TITLE_HEIGHT + PLOT_TOP_GAP + LINE_PLOT_HEIGHT

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * LINE_PLOT_WIDTH,
                bottom - (y - y_low) / (y_high - y_low) * LINE_PLOT_HEIGHT)

    out = [f'<text x="4" y="{top + 18}" font-weight="bold">{escape(panel.title)}</text>']
    legend_x = 4 + 8 * len(panel.title) + 16  # about 8 px per bold character
    colours = []
    for i, series in enumerate(panel.series):
        colour = series.colour or panel.colours[i % len(panel.colours)]
        colours.append(colour)
        points = drawn_points(series)
        text = f"{series.name} {format(points[-1][1], panel.value_format)}" if points else f"{series.name} (none)"
        out.append(f'<line x1="{legend_x}" y1="{top + 13}" x2="{legend_x + 16}" y2="{top + 13}" '
                   f'stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{legend_x + 21}" y="{top + 18}">{escape(text)}</text>')
        legend_x += 21 + 7 * len(text) + 18  # about 7 px per character
    for value in y_ticks:  # horizontal grid lines with their values at the left
        _, y = to_px(x_low, value)
        out.append(f'<line x1="{left}" y1="{y:.2f}" x2="{left + LINE_PLOT_WIDTH}" y2="{y:.2f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.2f}" text-anchor="end" fill="#333">{tick_label(value)}</text>')
    for value in x_ticks:  # ticks under the x axis with their values
        x, _ = to_px(value, y_low)
        out.append(f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.2f}" y="{bottom + 17}" text-anchor="middle" fill="#333">{tick_label(value)}</text>')
    out.append(f'<line x1="{left}" y1="{bottom - LINE_PLOT_HEIGHT}" x2="{left}" y2="{bottom}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{left + LINE_PLOT_WIDTH}" y2="{bottom}" stroke="#333"/>')
    if not any(drawn_points(series) for series in panel.series):
        out.append(f'<text x="{left + LINE_PLOT_WIDTH / 2:.0f}" y="{bottom - LINE_PLOT_HEIGHT / 2:.0f}" '
                   f'text-anchor="middle" fill="#777">no values</text>')
    for series, colour in zip(panel.series, colours):
        out += series_elements(series, colour, to_px)
    return out


def line_chart_svg(panels: list[LinePanel], x_label: str = "step") -> str:
    """The whole image: line panels stacked top to bottom, all on one x axis, `x_label` under the last."""
    if not panels:
        raise ValueError("line_chart_svg: give at least one panel")
    xs = [x for panel in panels for series in panel.series for x, _ in drawn_points(series)]
    integer = all(float(x).is_integer() for x in xs)  # steps: no tick at 2.5
    x_ticks = nice_ticks(min(xs, default=0.0), max(xs, default=1.0), count=7, integer=integer)
    width = AXIS_LEFT + LINE_PLOT_WIDTH + AXIS_RIGHT
    height = len(panels) * line_panel_height() + 28
    elements, top = [], 4
    for panel in panels:
        elements += draw_line_panel(panel, top, x_ticks)
        top += line_panel_height()
    elements.append(f'<text x="{AXIS_LEFT + LINE_PLOT_WIDTH / 2:.0f}" y="{top + 8}" text-anchor="middle" '
                    f'fill="#333">{escape(x_label)}</text>')
    return svg_document(width, height, elements)


def write_line_chart(panels: list[LinePanel], path: str | Path, x_label: str = "step") -> Path:
    """Write the line chart to `path` (.svg) through a temporary file, like write_bar_chart."""
    return write_svg(line_chart_svg(panels, x_label), path, "write_line_chart")


# ----------------------------------------------------------------------------------------------------
# The chart of a training run
# ----------------------------------------------------------------------------------------------------


EVAL_METRICS = ("eval_perplexity", "eval_accuracy")  # each gets a panel; eval_loss joins the training loss


def training_panels(records: list[dict]) -> list[LinePanel]:
    """metrics.jsonl records -> panels: loss (train and eval), each other eval metric, the learning rate.

    Training records carry "loss" (None on a masked-LM step where nothing was masked) and "lr"; evaluation
    records carry "eval_loss" and "eval_perplexity" or "eval_accuracy" (and "eval_targets", a count that is
    not drawn). Both carry "step".
    """
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(key.startswith("eval_") for key in r)]
    loss = LinePanel("loss", [Series("train", [(r.get("step"), r.get("loss")) for r in train])])
    if evals:
        loss.series.append(Series("eval", [(r.get("step"), r.get("eval_loss")) for r in evals]))
    others = [key for key in EVAL_METRICS if any(key in r for r in evals)]
    metric_panels = [LinePanel(key.replace("_", " "), [Series("eval", [(r.get("step"), r.get(key)) for r in evals],
                                                              colour=COLOURS[1])])
                     for key in others]
    rate = LinePanel("learning rate (top layer group)", [Series("lr", [(r.get("step"), r.get("lr")) for r in train],
                                                                colour=COLOURS[2])],
                     value_format=".3g", include_zero=True)
    return [loss, *metric_panels, rate]


def write_training_chart(metrics_path: str | Path, chart_path: str | Path) -> Path | None:
    """Draw a run's metrics.jsonl as a line chart at `chart_path` (training.svg); returns the path.

    Called at the end of every fit(). A chart must never fail a run, so any error is caught; but it is
    not hidden either: one warning line on stderr names the file and the error. Returns None then.
    """
    try:
        lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return write_line_chart(training_panels(records), chart_path)
    except Exception as error:  # noqa: BLE001 (any failure: warn and go on, see the docstring)
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the message holds
        print(f"minift: warning: could not write {chart_path} ({reason})", file=sys.stderr)
        return None
