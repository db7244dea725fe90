"""Metrics: one JSON line per logged step, TensorBoard when installed, and a loss plot at the end.

The plot is a small hand-written SVG (no matplotlib dependency for one line chart).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text

PLOT_W, PLOT_H, MARGIN = 640, 360, 48  # SVG size and axis margin, pixels


class MetricsLog:
    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the steps logged up to the checkpoint we resume from (an end-of-run
            # "final" record is not kept: the run's end is still to come and will log it once)
            kept = [line for line in self.path.read_text().splitlines()
                    if (r := _parse(line)) is not None and r.get("step", 0) <= resume_step and not r.get("final")]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # a Ctrl-C here loses nothing
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run logs the steps after its checkpoint again: TensorBoard hides the earlier
                # run's events from there on (purge_step), instead of showing those steps twice
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step > 0 else None)
            except Exception:  # tensorboard is not installed
                self.tb = None

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def records(self) -> list[dict]:
        return [r for line in self.path.read_text().splitlines() if (r := _parse(line)) is not None]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse(line: str) -> dict | None:
    """A logged record, or None for a blank line or one cut short by a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


LOSS_PLOT, VAL_PLOT = "loss.svg", "val.svg"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def plot_metrics(records: list[dict], output_dir: Path) -> None:
    """loss.svg: the training loss with the validation loss beside it (one axis: the same scale);
    val.svg: the validation scores of generated answers (val_wer, val_contains, ...), when there are any,
    one chart each (a WER in percent and an accuracy in 0-1 would flatten each other on one axis)."""
    steps = [r for r in records if not r.get("final")]
    plot_series(steps, Path(output_dir) / LOSS_PLOT, ["loss", "val_loss"])
    scores = sorted({k for r in steps for k in r if k.startswith("val_") and k != "val_loss"
                     and isinstance(r[k], (int, float))})
    if scores:
        plot_series(steps, Path(output_dir) / VAL_PLOT, [[k] for k in scores])


def plot_series(records: list[dict], path: Path, keys: list) -> None:
    """Write an SVG line chart against step: ``keys`` (names) share one y axis; given as a list of lists,
    each inner list is a chart of its own, stacked top to bottom. A series with one point is a dot."""
    groups = keys if keys and isinstance(keys[0], list) else [keys]
    charts, top = [], 0
    for n, group in enumerate(groups):
        chart = _chart(records, group, top, colour=n)
        if chart:
            charts.append(chart[0])
            top += chart[1]
    if not charts:
        return
    body = "\n".join(charts)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{top}" font-family="sans-serif" '
           f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')
    atomic_write_text(path, svg)


def _chart(records: list[dict], keys: list[str], top: int, colour: int = 0) -> tuple[str, int] | None:
    """One chart of ``keys`` on one y axis, drawn ``top`` pixels down, its colours from COLOURS[colour]
    on: (SVG group, its height); None when no key has a value."""
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
              for k in keys}
    series = {k: pts for k, pts in series.items() if pts}
    if not series:
        return None
    points = [p for pts in series.values() for p in pts]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    sx = (PLOT_W - 2 * MARGIN) / max(1e-9, x1 - x0)
    sy = (PLOT_H - 2 * MARGIN) / max(1e-9, y1 - y0)

    def xy(x: float, y: float) -> tuple[str, str]:
        return f"{MARGIN + (x - x0) * sx:.1f}", f"{PLOT_H - MARGIN - (y - y0) * sy:.1f}"

    lines = []
    for i, (key, pts) in enumerate(series.items()):
        stroke = COLOURS[(colour + i) % len(COLOURS)]
        lines.append(f'<polyline fill="none" stroke="{stroke}" stroke-width="2" '
                     f'points="{" ".join(",".join(xy(*p)) for p in pts)}"/>')
        if len(pts) <= 50:  # sparse series (validations) get a dot per point
            lines += [f'<circle cx="{xy(*p)[0]}" cy="{xy(*p)[1]}" r="3" fill="{stroke}"/>' for p in pts]
        last = pts[-1][1]
        lines.append(f'<text x="{PLOT_W - MARGIN}" y="{MARGIN - 8 - 14 * i}" text-anchor="end" fill="{stroke}">'
                     f"{key} (last {last:.4g})</text>")
    body = "\n".join(lines)
    shift = 14 * (len(series) - 1)  # room for the legend lines above the chart
    group = f"""<g transform="translate(0,{top + shift})">
<line x1="{MARGIN}" y1="{PLOT_H - MARGIN}" x2="{PLOT_W - MARGIN}" y2="{PLOT_H - MARGIN}" stroke="black"/>
<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{PLOT_H - MARGIN}" stroke="black"/>
{body}
<text x="{MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end">{y1:.3g}</text>
<text x="{MARGIN - 4}" y="{PLOT_H - MARGIN}" text-anchor="end">{y0:.3g}</text>
<text x="{MARGIN}" y="{PLOT_H - MARGIN + 16}">step {x0}</text>
<text x="{PLOT_W - MARGIN}" y="{PLOT_H - MARGIN + 16}" text-anchor="end">step {x1}</text>
</g>"""
    return group, PLOT_H + shift
