"""The report card. Each stage calls `log(section, data)` to write its section file under $NANOJAX_BASE_DIR/report/;
`python -m nanojax.report generate` assembles report.md at the end of a run."""
from __future__ import annotations

import datetime
import html
import json
import os
import re

from pathlib import Path

from nanojax.common import REPO_ROOT, ArgumentParser, atomic_write, cli, git, is_main_process, subdir


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _format_value(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def render_section(section: str, data) -> str:
    """`data` is a dict (key: value lines), a string (verbatim markdown) or a list of those."""
    lines = [f"## {section}", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", ""]
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, dict):
            lines += [f"- {k}: {_format_value(v)}" for k, v in item.items()]
        else:
            lines.append(str(item))
        lines.append("")
    return "\n".join(lines)


def log(section: str, data) -> None:
    """Write (replace) this stage's section file; process 0 only."""
    if not is_main_process():
        return
    with atomic_write(subdir("report") / f"{slug(section)}.md", "w") as f:
        f.write(render_section(section, data))


# ----------------------------------------------------------------------------------------------------------------------
# The report card: `reset` at the start of a run writes the header, `generate` joins the sections into report.md.

SECTION_ORDER = ["Header", "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                 "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
                 "Chat RL", "Chat evaluation rl"]


def _bloat() -> dict:
    """Size of the codebase as a user would package it for an LLM: characters, lines, files, ~tokens."""
    files = [REPO_ROOT / f for f in git("ls-files").splitlines()
             if Path(f).suffix in {".py", ".md", ".html", ".toml", ".sh"}]
    text = "".join(f.read_text(errors="replace") for f in files if f.is_file())
    lock = REPO_ROOT / "requirements.lock"
    return {"characters": len(text), "lines": text.count("\n"), "files": len(files),
            "tokens (~chars/4)": len(text) // 4,
            "dependencies (requirements.lock lines)": len(lock.read_text().splitlines()) if lock.exists() else 0}


GPU_HOURLY_USD = {"H100": 3.00, "A100": 1.79, "V100": 0.55}  # per GPU-hour, rental-style rates for the estimate
DEFAULT_GPU_HOURLY_USD = 2.00


def gpu_hourly_rate(device_kinds: list[str]) -> float:
    """An estimate of what the node rents for per hour: a rate per GPU by model name, summed."""
    return sum(next((rate for name, rate in GPU_HOURLY_USD.items() if name in kind.upper()), DEFAULT_GPU_HOURLY_USD)
               for kind in device_kinds)


def _ram_gib():
    try:
        return f'{os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:.1f}'  # a string: no .4f
    except (ValueError, OSError, AttributeError):
        return "unknown"


def header() -> str:
    import platform
    import sys
    info = {"git branch": git("rev-parse", "--abbrev-ref", "HEAD"), "git commit": git("rev-parse", "--short", "HEAD"),
            "git dirty": bool(git("status", "--porcelain")), "platform": platform.platform(),
            "CPUs": os.cpu_count(), "RAM (GiB)": _ram_gib(), "python": sys.version.split()[0]}
    try:
        import jax
        devices = jax.devices()
        info.update({"jax": jax.__version__, "backend": jax.default_backend(), "devices": len(devices),
                     "device kind": devices[0].device_kind})
        if jax.default_backend() == "gpu":
            info["GPU hourly rate (USD, estimate)"] = f"{gpu_hourly_rate([d.device_kind for d in devices]):.2f}"
    except Exception as e:  # a report must not fail for lack of an accelerator
        info["jax"] = f"unavailable ({e})"
    return render_section("Header", [info, "### Bloat", _bloat()])


def reset() -> None:
    if not is_main_process():
        return
    d = subdir("report")
    for p in d.glob("*.md"):
        p.unlink()
    with atomic_write(d / "header.md", "w") as f:
        f.write(header())
    print(f"report reset: {d}")


SUMMARY_ROWS = ["ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE"]
SUMMARY_STAGES = ["base", "mid", "sft", "rl"]


def _fields(text: str) -> dict:
    """The `- key: value` lines of a section file."""
    return dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- ") and ": " in line)


def summary(d) -> str:
    """nanochat's summary table: CORE for the base model, the chat tasks per stage; a partial CORE keeps its label.
    Plus the wall clock time from the header to the last section."""
    read = lambda name: (d / f"{slug(name)}.md").read_text() if (d / f"{slug(name)}.md").exists() else ""  # noqa
    columns = {stage: _fields(read(f"Chat evaluation {stage}")) for stage in SUMMARY_STAGES}
    base = _fields(read("Base model evaluation"))
    rows = []
    if base:
        rows.append([base.get("label", "CORE"), base.get("score", "-")] + ["-"] * 3)
    for name in SUMMARY_ROWS:
        cells = [columns[stage].get(name, "-") for stage in SUMMARY_STAGES]
        if any(c != "-" for c in cells):
            rows.append([name] + cells)
    lines = ["## Summary", "", "| metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    subsets = [f"{stage.upper()} chat tasks on {f['max problems']} problems each" for stage, f in columns.items()
               if f.get("max problems", "all") != "all"]
    if base.get("max per task", "all") != "all":
        subsets.insert(0, f"{base.get('label', 'CORE')} on {base['max per task']} examples per task")
    if subsets:
        lines += ["", "Subsets, not the full benchmarks: " + "; ".join(subsets) + "."]
    prefix = "timestamp: "
    stamps = [datetime.datetime.strptime(line[len(prefix):], "%Y-%m-%d %H:%M:%S")
              for p in d.glob("*.md") if p.name != "report.md"
              for line in p.read_text().splitlines() if line.startswith(prefix)]
    if len(stamps) > 1:
        seconds = (max(stamps) - min(stamps)).total_seconds()
        lines += ["", f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m"]
        rate = _fields(read("Header")).get("GPU hourly rate (USD, estimate)")
        if rate:
            cost = float(rate) * seconds / 3600
            lines += [f"Estimated cost: ${cost:.2f} (wall clock x ${rate}/hour for the node)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Plots: a training run's metrics.jsonl as an SVG line chart (no plotting dependency).

def plot_metrics(metrics_path, out_path, title: str) -> bool:
    """Train loss (left axis) and val bpb (right axis) against step; False when there is nothing to plot."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    series = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key in ("loss", "val_bpb")}
    if not series["loss"]:
        return False
    W, H, L, R, T, B = 640, 320, 60, 60, 30, 40  # size and margins
    steps = [s for points in series.values() for s, _ in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    x = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="11"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">step</text>']
    for i in range(5):
        s = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{x(s):.1f}" y="{H - B + 14}" text-anchor="middle">{s:.0f}</text>')
    for (key, colour, side) in (("loss", "#1f77b4", "left"), ("val_bpb", "#d62728", "right")):
        points = series[key]
        if not points:
            continue
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        hi = hi if hi > lo else lo + 1
        y = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
        ax = L if side == "left" else W - R
        anchor, dx = ("end", -4) if side == "left" else ("start", 4)
        parts.append(f'<line x1="{ax}" y1="{T}" x2="{ax}" y2="{H - B}" stroke="{colour}"/>')
        for v in (lo, (lo + hi) / 2, hi):
            parts.append(f'<text x="{ax + dx}" y="{y(v) + 4:.1f}" text-anchor="{anchor}" '
                         f'fill="{colour}">{v:.3f}</text>')
        label = "train loss" if key == "loss" else "val bpb"
        parts.append(f'<text x="{ax}" y="{T - 6}" text-anchor="middle" fill="{colour}">{label}</text>')
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        if len(points) == 1:  # a lone point draws no line
            parts.append(f'<circle cx="{x(points[0][0]):.1f}" cy="{y(points[0][1]):.1f}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    with atomic_write(Path(out_path), "w") as f:
        f.write("\n".join(parts) + "\n")
    return True


def generate() -> str:
    d = subdir("report")
    parts = ["# nanojax report card\n"]
    seen = set()
    for name in SECTION_ORDER:
        p = d / f"{slug(name)}.md"
        if p.exists():
            parts.append(p.read_text())
            seen.add(p.name)
    parts += [p.read_text() for p in sorted(d.glob("*.md")) if p.name not in seen | {"report.md"}]
    parts.append(summary(d))
    text = "\n".join(parts)
    with atomic_write(d / "report.md", "w") as f:
        f.write(text)
    with atomic_write(Path("report.md"), "w") as f:
        f.write(text)
    print(f"report written: {d / 'report.md'} (and ./report.md)")
    return text


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m nanojax.report",
                       description="The report card of a run: the header, one section per stage, a summary.")
    p.add_argument("command", choices=["reset", "generate"],
                   help="reset: start a new report (removes every section under report/, writes the header); "
                        "generate: join the sections into report.md")
    {"reset": reset, "generate": generate}[p.parse_args(argv).command]()


if __name__ == "__main__":
    main()
