"""The report's plots as SVG line charts, written with no plotting dependency: a run's train loss and val bpb, MFU across
runs, RL reward and pass@k. Input: runs/<run>/metrics.jsonl (one JSON object a line, "step" plus whatever was logged;
missing keys are fine)."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from nanojax.common import atomic_write

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, L, R, T, B = 640, 320, 60, 60, 30, 40  # size and margins


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def series(records: list[dict], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(r["step"], r[key] * scale) for r in records if isinstance(r.get(key), (int, float))]


def _frame(title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
            f'font-size="11"><rect width="{W}" height="{H}" fill="white"/>',
            f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
            f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
            f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">step</text>']


def _x_axis(points, parts):
    steps = [s for s, _ in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    for i in range(5):
        s = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{L + i / 4 * (W - L - R):.1f}" y="{H - B + 14}" text-anchor="middle">{s:.0f}</text>')
    return lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)


def _y_axis(points, parts, colour, side, label):
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    hi = hi if hi > lo else lo + 1
    y = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
    ax = L if side == "left" else W - R
    anchor, dx = ("end", -4) if side == "left" else ("start", 4)
    parts.append(f'<line x1="{ax}" y1="{T}" x2="{ax}" y2="{H - B}" stroke="{colour}"/>')
    for v in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{ax + dx}" y="{y(v) + 4:.1f}" text-anchor="{anchor}" fill="{colour}">{v:.3f}</text>')
    if label:
        parts.append(f'<text x="{ax}" y="{T - 6}" text-anchor="middle" fill="{colour}">{html.escape(label)}</text>')
    return y


def _line(points, x, y, colour, parts):
    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
    if len(points) == 1:  # a lone point draws no line
        parts.append(f'<circle cx="{x(points[0][0]):.1f}" cy="{y(points[0][1]):.1f}" r="3" fill="{colour}"/>')


def _write(parts, out_path):
    parts.append("</svg>")
    with atomic_write(Path(out_path), "w") as f:
        f.write("\n".join(parts) + "\n")


def plot_metrics(metrics_path, out_path, title: str) -> bool:
    """Train loss (left axis) and val bpb (right axis) against step; False when there is nothing to plot."""
    records = read_metrics(metrics_path)
    loss, bpb = series(records, "loss"), series(records, "val_bpb")
    if not loss:
        return False
    parts = _frame(title)
    x = _x_axis(loss + bpb, parts)
    for points, colour, side, label in ((loss, COLOURS[0], "left", "train loss"), (bpb, COLOURS[1], "right", "val bpb")):
        if points:
            _line(points, x, _y_axis(points, parts, colour, side, label), colour, parts)
    _write(parts, out_path)
    return True


def line_chart(named: dict[str, list], out_path, title: str, ylabel: str) -> bool:
    """Several series on one axis, with a legend; False (nothing written) when every series is empty."""
    named = {k: v for k, v in named.items() if v}
    if not named:
        return False
    parts = _frame(title)
    everything = [p for points in named.values() for p in points]
    x = _x_axis(everything, parts)
    y = _y_axis(everything, parts, "black", "left", ylabel)
    for i, (name, points) in enumerate(named.items()):
        colour = COLOURS[i % len(COLOURS)]
        _line(points, x, y, colour, parts)
        parts.append(f'<text x="{L + 8}" y="{T + 14 + 13 * i}" fill="{colour}">{html.escape(name)}</text>')
    _write(parts, out_path)
    return True


def _pass_keys(records) -> list[str]:
    keys = {k for r in records for k in r if re.fullmatch(r"pass@\d+", k)}
    return sorted(keys, key=lambda k: int(k[5:]))


def report_plots(runs: list[tuple[str, Path]], out_dir) -> list[tuple[str, str]]:
    """Every plot the report shows, from [(run name, its metrics.jsonl)] in stage order: one loss chart per run, MFU
    of all runs, RL reward and pass@k. Returns [(title, file name inside out_dir)] of the charts written."""
    out_dir = Path(out_dir)
    written, mfu, rl = [], {}, {}
    for run, path in runs:
        records = read_metrics(path)
        name = f"loss-{run}.svg"
        if plot_metrics(path, out_dir / name, f"{run}: train loss and val bpb"):
            written.append((f"{run}: train loss and val bpb", name))
        mfu[run] = series(records, "mfu", 100.0)
        for key in ["reward"] + _pass_keys(records):
            rl[f"{run} {key}"] = series(records, key)
    if line_chart(mfu, out_dir / "mfu.svg", "MFU (% of the devices' peak bf16 FLOPs)", "MFU %"):
        written.append(("MFU", "mfu.svg"))
    if line_chart(rl, out_dir / "rl.svg", "RL: mean reward and pass@k", "reward / pass@k"):
        written.append(("RL reward and pass@k", "rl.svg"))
    return written
