"""A line chart drawn with braille characters (2 x 4 dots per cell): several series in their own colours, a
legend on the first row, y tick labels on the left and x tick labels along the bottom axis.

`plot_lines(series, width, height)` draws into a list of Strips (a plain function, testable without an
app); `LinePlot` shows it at its own size, redrawn only when the size or the series change. Points that are
NaN or infinite are skipped; series may have different lengths and x values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

BRAILLE = 0x2800
# The bit of each dot in a braille cell, by [dot row][dot column].
DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
PALETTE = ("#4ea1ff", "#ffa34d", "#3fcf7f", "#e36ee0", "#f2d64b", "#4fd6d6", "#ff6161", "#b8b8b8")
AXIS = Style(color="grey50")
# The bits of dot rows a..b of one dot column in a cell, by [dot column][a][b].
CHARS = [" "] + [chr(BRAILLE + bits) for bits in range(1, 256)]  # a cell with no dot is a space
SPANS = [[[sum(DOT_BITS[r][col] for r in range(a, b + 1)) for b in range(4)] for a in range(4)] for col in range(2)]


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]  # (x, y)
    color: str | None = None  # None: the palette's colour for its place


def plot_lines(series: Sequence[Series], width: int, height: int) -> list[Strip]:
    """The chart as `height` strips of `width` cells: legend, plot rows with y labels, x axis."""
    if width <= 0 or height <= 0:
        return []
    colors = [Style(color=s.color or PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
    strips = _legend(series, colors, width, max(1, (height - 3) // 4))
    rows = height - len(strips) - 1  # below the legend, above the x axis
    # x - x == 0 only for a finite x (inf - inf and NaN are NaN), and costs less than math.isfinite.
    finite = [[(x, y) for x, y in s.points if x - x == 0 and y - y == 0] for s in series]
    xs, ys = [x for pts in finite for x, _ in pts], [y for pts in finite for _, y in pts]
    if rows < 1 or not xs:
        message = "no data" if rows >= 1 else ""
        strips += [Strip([Segment(message.center(width)[:width], AXIS)])] + [Strip.blank(width)] * rows
        return [s.adjust_cell_length(width) for s in strips[:height]]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(ys), max(ys))
    y_labels = _y_labels(y0, y1, rows)
    gutter = max(len(label) for label in y_labels.values()) + 1
    cols = width - gutter
    if cols < 2:
        return [s.adjust_cell_length(width) for s in strips + [Strip.blank(width)] * (rows + 1)]
    cells = _draw(finite, x0, x1, y0, y1, cols, rows)
    for row in range(rows):
        label = y_labels.get(row)
        gutter_text = (label.rjust(gutter - 1) + "┤") if label is not None else " " * (gutter - 1) + "│"
        strips.append(Strip([Segment(gutter_text, AXIS), *_row_segments(cells, row, cols, colors)]))
    strips.append(Strip([Segment(" " * (gutter - 1) + "└", AXIS), Segment(_x_axis(x0, x1, cols, xs), AXIS)]))
    return [s.adjust_cell_length(width) for s in strips]


def _span(low: float, high: float) -> tuple[float, float]:
    """A range that is never empty: a single value gets room on both sides."""
    if high > low:
        return low, high
    pad = abs(low) * 0.1 or 1.0
    return low - pad, high + pad


def _draw(finite, x0, x1, y0, y1, cols, rows) -> tuple[list[int], list[int]]:
    """Each series as a line through its points in a grid of dots: (dot bits, series) per cell, a later
    series drawn over an earlier one where they share a cell. Drawn as one vertical run of dots per dot
    column (the points there and the line's way in and out), so 1000 points cost about what 240 columns do."""
    bits, owner = [0] * (cols * rows), [-1] * (cols * rows)
    sx, sy = (cols * 2 - 1) / (x1 - x0), (rows * 4 - 1) / (y1 - y0)

    def fill(column: int, low: int, high: int, index: int) -> None:
        dot_col, cell_x = column & 1, column >> 1
        for cell_row in range(low >> 2, (high >> 2) + 1):
            top = cell_row * 4
            cell = cell_row * cols + cell_x
            bits[cell] |= SPANS[dot_col][low - top if low > top else 0][high - top if high < top + 3 else 3]
            owner[cell] = index

    for index, pts in enumerate(finite):
        runs = []  # [dot column, first y, lowest, highest, last y] of consecutive points in one dot column
        for x, y in pts:
            px, py = int((x - x0) * sx + 0.5), int((y1 - y) * sy + 0.5)  # both >= 0: int() rounds
            if runs and runs[-1][0] == px:
                run = runs[-1]
                if py < run[2]:
                    run[2] = py
                elif py > run[3]:
                    run[3] = py
                run[4] = py
            else:
                runs.append([px, py, py, py, py])
        for a, b in zip(runs, runs[1:]):  # the straight line from a's last point to b's first
            (ax, ay), (bx, by) = (a[0], a[4]), (b[0], b[1])
            slope, way = (by - ay) / (bx - ax), (1 if bx > ax else -1)
            for run, y in ((a, ay + slope * 0.5 * way), (b, by - slope * 0.5 * way)):  # half a column each
                dot = int(y + 0.5)
                if dot < run[2]:
                    run[2] = dot
                elif dot > run[3]:
                    run[3] = dot
            for column in range(ax + way, bx, way):  # the columns between them, if any
                ya, yb = ay + slope * (column - ax - 0.5), ay + slope * (column - ax + 0.5)
                fill(column, int(min(ya, yb) + 0.5), int(max(ya, yb) + 0.5), index)
        for px, _, low, high, _ in runs:
            fill(px, low, high, index)
    return bits, owner


def _row_segments(cells, row: int, cols: int, colors: list[Style]) -> list[Segment]:
    """One plot row as segments, neighbouring cells of the same series joined into one."""
    bits, owner = cells
    start = row * cols
    row_bits, row_owner = bits[start:start + cols], owner[start:start + cols]
    out, first = [], 0
    for cell in range(1, cols + 1):
        if cell == cols or row_owner[cell] != row_owner[first]:
            who = row_owner[first]
            text = "".join(map(CHARS.__getitem__, row_bits[first:cell]))
            out.append(Segment(text, colors[who] if who >= 0 else None))
            first = cell
    return out


def _legend(series: Sequence[Series], colors: list[Style], width: int, most_rows: int) -> list[Strip]:
    """One entry per series ("━━ name"), wrapped onto up to `most_rows` rows (the last one cut)."""
    rows: list[list[Segment]] = [[]]
    used = 0
    for s, style in zip(series, colors):
        entry = [Segment("━━ ", style), Segment(s.name + "   ")]
        size = len(s.name) + 6
        if used and used + size - 3 > width and len(rows) < most_rows:
            rows.append([])
            used = 0
        rows[-1] += entry
        used += size
    return [Strip(row).crop(0, width) for row in rows]


def nice_ticks(low: float, high: float, most: int, whole: bool = False) -> list[tuple[float, str]]:
    """About `most` round values (multiples of 1, 2, 2.5 or 5 x 10^k) in [low, high], with their labels;
    the two ends when no two round values fit. `whole`: integer steps only."""
    raw = (high - low) / max(most - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    step = max(step, 1) if whole else step
    first = math.ceil(low / step - 1e-9) * step
    values = [v for i in range(int((high - first) / step + 1e-9) + 1) if (v := first + i * step) <= high]
    if not values:
        return [(v, _label(v, high - low)) for v in (low, high)]
    decimals = next((d for d in range(7) if abs(round(step, d) - step) < step * 1e-6), 6)
    return [(v, _label(v, step, decimals)) for v in values]


def _label(value: float, step: float, decimals: int | None = None) -> str:
    if abs(value) >= 1e6 or (value and abs(value) < 1e-4):
        return f"{value:.3g}"
    if decimals is None:  # an end of the range: as many decimals as its span needs
        decimals = max(0, min(4, 1 - math.floor(math.log10(step))))
    return f"{round(value, decimals) + 0.0:.{decimals}f}"  # + 0.0: never "-0.00"


def _y_labels(y0: float, y1: float, rows: int) -> dict[int, str]:
    """Labels of round values on the rows whose dots they fall on, about one per 3 rows (at most 5)."""
    out: dict[int, str] = {}
    for value, text in nice_ticks(y0, y1, max(2, min(5, rows // 3 + 1))):
        dot = int((y1 - value) / (y1 - y0) * (rows * 4 - 1) + 0.5)  # as _draw places a point
        out.setdefault(dot >> 2, text)
    return out


def _x_axis(x0: float, x1: float, cols: int, xs: list[float]) -> str:
    """The x axis line with round values written on it where they fall, about one per 12 columns."""
    line = ["─"] * cols
    whole = all(map(float.is_integer, map(float, xs)))
    taken_until = -1
    for value, text in nice_ticks(x0, x1, max(2, min(8, cols // 12)), whole):
        centre = int((value - x0) / (x1 - x0) * (cols * 2 - 1) + 0.5) >> 1  # the cell of its dot column
        start = min(max(centre - len(text) // 2, 0), cols - len(text))
        if start <= taken_until or start < 0:
            continue  # no room: it would touch the previous label
        line[start:start + len(text)] = text
        taken_until = start + len(text)
    return "".join(line)


class LinePlot(Widget):
    """A braille line chart of `series`, drawn at the widget's size (set_series to change what it shows)."""

    DEFAULT_CSS = "LinePlot { height: 1fr; min-height: 4; }"

    def __init__(self, series: Sequence[Series] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self._series = list(series)
        self._drawn: tuple[tuple[int, int], list[Strip]] | None = None

    @property
    def series(self) -> list[Series]:
        return list(self._series)

    def set_series(self, series: Sequence[Series]) -> None:
        if list(series) == self._series:  # the same curves (a rescan that found nothing new): no redraw
            return
        self._series = list(series)
        self._drawn = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._drawn is None or self._drawn[0] != size:  # a resize redraws from the new size
            base = self.visual_style.rich_style
            self._drawn = (size, [s.apply_style(base) for s in plot_lines(self._series, *size)])
        lines = self._drawn[1]
        return lines[y] if y < len(lines) else Strip.blank(size[0], self.visual_style.rich_style)
