"""Monitoring, charts: small inline SVG drawn on the server (no script, no CDN; colours as presentation
attributes, which the dashboard's Content-Security-Policy allows where inline styles are refused)."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 360, 150, 34, 34, 18
REFERENCE, RECENT, WARN = "#9aa5b1", "#2563eb", "#dc2626"
PALETTE = ("#2563eb", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2")


def _frame(title: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    keys = "".join(f'<rect x="{WIDTH - 110}" y="{4 + 12 * i}" width="8" height="8" fill="{c}"/>'
                   f'<text x="{WIDTH - 98}" y="{11 + 12 * i}" font-size="9">{escape(n[:18])}</text>'
                   for i, (n, c) in enumerate(legend))
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f'<text x="2" y="11" font-size="10" font-weight="bold">{escape(title[:48])}</text>'
            f'<line x1="{PAD_LEFT}" y1="{HEIGHT - PAD_BOTTOM}" x2="{WIDTH - 4}" y2="{HEIGHT - PAD_BOTTOM}" '
            f'stroke="#555"/><line x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{PAD_LEFT}" y2="{HEIGHT - PAD_BOTTOM}" '
            f'stroke="#555"/>{"".join(body)}{keys}</svg>')


def _y(value: float, lo: float, hi: float) -> float:
    span = HEIGHT - PAD_BOTTOM - PAD_TOP
    return HEIGHT - PAD_BOTTOM - ((value - lo) / (hi - lo) if hi > lo else 0.0) * span


def _axis(lo: float, hi: float, percent: bool) -> list[str]:
    fmt = (lambda v: f"{v * 100:.0f}%") if percent else (lambda v: f"{v:.4g}")
    return [f'<text x="{PAD_LEFT - 3}" y="{_y(v, lo, hi) + 3:.1f}" font-size="8" text-anchor="end">{fmt(v)}</text>'
            for v in (lo, (lo + hi) / 2, hi)]


def _xlabels(labels: list[str], xs: list[float]) -> list[str]:
    step = max(1, len(labels) // 8)
    return [f'<text x="{x:.1f}" y="{HEIGHT - PAD_BOTTOM + 10 + 8 * (i // step % 2)}" font-size="8" '
            f'text-anchor="middle">{escape(label[:12])}</text>'
            for i, (label, x) in enumerate(zip(labels, xs, strict=True)) if i % step == 0]


def bars(title: str, labels: list[str], reference: list[float], recent: list[float], warning: bool = False) -> str:
    """Side-by-side bars of two distributions' shares per bin (reference grey, recent blue, red on a warning)."""
    n = max(len(labels), 1)
    slot = (WIDTH - PAD_LEFT - 8) / n
    top = max([*reference, *recent, 0.01])
    body = _axis(0.0, top, True)
    colour = WARN if warning else RECENT
    for i in range(len(labels)):
        x = PAD_LEFT + 4 + i * slot
        for j, (values, fill) in enumerate(((reference, REFERENCE), (recent, colour))):
            if i < len(values):
                y = _y(values[i], 0.0, top)
                body.append(f'<rect x="{x + j * slot * 0.42:.1f}" y="{y:.1f}" width="{slot * 0.4:.1f}" '
                            f'height="{HEIGHT - PAD_BOTTOM - y:.1f}" fill="{fill}"/>')
    body += _xlabels(labels, [PAD_LEFT + 4 + (i + 0.42) * slot for i in range(len(labels))])
    return _frame(title, body, [("reference", REFERENCE), ("last window", colour)])


def lines(title: str, labels: list[str], series: dict[str, list[float | None]], percent: bool = False) -> str:
    """One line per named series over the labels (weeks); a None leaves a gap. The axis starts at 0 unless a
    value is negative; percentages run from 0 to 100 %."""
    values = [v for vs in series.values() for v in vs if v is not None] or [0.0]
    lo, hi = (0.0, 1.0) if percent else (min(0.0, min(values) * 1.1), max(0.0, max(values) * 1.1))
    if hi <= lo:
        hi = lo + 1.0
    n = len(labels)
    xs = [PAD_LEFT + 24 + (i * (WIDTH - PAD_LEFT - 56) / (n - 1) if n > 1 else (WIDTH - PAD_LEFT) / 2)
          for i in range(n)]
    body = _axis(lo, hi, percent)
    legend = []
    for k, (name, vs) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        legend.append((name, colour))
        points = [(x, _y(v, lo, hi)) for x, v in zip(xs, vs, strict=True) if v is not None]
        if len(points) > 1:
            body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
    body += _xlabels(labels, xs)
    return _frame(title, body, legend[:6])
