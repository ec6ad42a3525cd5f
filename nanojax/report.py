"""The report card. Each stage calls `log(section, data)` to write its section file under $NANOJAX_BASE_DIR/report/;
`python -m nanojax.report generate` assembles report.md at the end of a run."""
from __future__ import annotations

import datetime
import os
import re
import shutil
from pathlib import Path

from nanojax.common import REPO_ROOT, ArgumentParser, atomic_write, cli, git, is_main_process, subdir
from nanojax.plots import plot_metrics, report_plots  # noqa: F401  (plot_metrics: train.py draws its run's curve)


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

# The one home of the section names. Training stages log STAGE_SECTIONS[stage] (keys: nanojax.checkpoint.STAGES),
# `evals.chat -i STAGE` logs CHAT_EVAL_SECTIONS[stage]; the report shows them in SECTION_ORDER, unknown ones after.
STAGE_SECTIONS = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}
CHAT_EVAL_SECTIONS = {stage: f"Chat evaluation {stage}" for stage in STAGE_SECTIONS}
SECTION_ORDER = ["Header", "Tokenizer training", "Tokenizer evaluation", STAGE_SECTIONS["base"], "Base model loss",
                 "Base model evaluation", CHAT_EVAL_SECTIONS["base"]]
for _stage in ("mid", "sft", "rl"):
    SECTION_ORDER += [STAGE_SECTIONS[_stage], CHAT_EVAL_SECTIONS[_stage]]
PLOTS_DIR = "report-plots"  # beside report.md, in both places it is written; links to it are relative


BLOAT_SUFFIXES = (".py", ".md", ".html", ".toml", ".sh", ".rs")  # the text a user would hand an LLM


def _bloat() -> dict:
    """Size of the codebase as `git ls-files` lists it: characters, lines, files, ~tokens (nanochat's measure)."""
    files = [REPO_ROOT / f for f in git("ls-files").splitlines() if f.endswith(BLOAT_SUFFIXES)]
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
    shutil.rmtree(d / PLOTS_DIR, ignore_errors=True)
    with atomic_write(d / "header.md", "w") as f:
        f.write(header())
    print(f"report reset: {d}")


SUMMARY_ROWS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE", "SpellingBee"]
SUMMARY_STAGES = ["base", "mid", "sft", "rl"]
# A chat task's data is an offline copy when its source (the "data" column evals.chat writes) says so.
OFFLINE_MARKS = ("registry package", "vendored", "offline", "embedded", "generated", "PyPI")


def _fields(text: str) -> dict:
    """The `- key: value` lines of a section file."""
    return dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- ") and ": " in line)


def _table_rows(text: str) -> dict:
    """{first cell: [cells]} of the markdown table rows in a section."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _read_section(d: Path, name: str) -> str:
    p = d / f"{slug(name)}.md"
    return p.read_text() if p.exists() else ""


def _core_cell(base: dict) -> str:
    """The base model's CORE; a partial or subsampled one says so in the cell."""
    if "score" not in base:
        return "-"
    notes = [base["label"]] if base.get("label", "CORE") != "CORE" else []
    if base.get("max per task", "all") != "all":
        notes.append(f"{base['max per task']} examples per task")
    return base["score"] + (f" ({', '.join(notes)})" if notes else "")


def _chat_cells(text: str) -> dict:
    """{row name: cell} of one chat evaluation section, each cell labelled with its subset and offline data."""
    fields, table = _fields(text), _table_rows(text)
    subset = fields.get("max problems", "all") != "all"
    offline_tasks = [name for name, cells in table.items() if len(cells) >= 4
                     and any(mark.lower() in cells[3].lower() for mark in OFFLINE_MARKS)]
    cells = {}
    for name in SUMMARY_ROWS[1:]:
        if name not in fields:
            continue
        if name == "ChatCORE":  # the mean over the tasks: labelled by theirs
            tasks = [t for t in table if t in SUMMARY_ROWS]
            offline = ("offline data" if tasks and set(tasks) <= set(offline_tasks) else
                       "some tasks offline" if offline_tasks else "")
        else:
            offline = "offline data" if name in offline_tasks else ""
        notes = [f"{fields['max problems']} problems{' each' if name == 'ChatCORE' else ''}"] if subset else []
        notes += [offline] if offline else []
        cells[name] = fields[name] + (f" ({', '.join(notes)})" if notes else "")
    return cells


def _timestamps(d: Path) -> list:
    prefix = "timestamp: "
    return [datetime.datetime.strptime(line[len(prefix):], "%Y-%m-%d %H:%M:%S")
            for p in d.glob("*.md") if p.name != "report.md"
            for line in p.read_text().splitlines() if line.startswith(prefix)]


def summary(d) -> str:
    """nanochat's summary table (BASE | MID | SFT | RL), "-" where a stage did not measure a row; every cell computed
    on a subset or on offline data says so. Then the bloat, the wall clock time and the estimated cost."""
    d = Path(d)
    columns = {stage: _chat_cells(_read_section(d, CHAT_EVAL_SECTIONS[stage])) for stage in SUMMARY_STAGES}
    columns["base"]["CORE"] = _core_cell(_fields(_read_section(d, "Base model evaluation")))
    lines = ["## Summary", ""]
    bloat = _fields(_read_section(d, "Header"))
    lines += [f"- {k}: {bloat[k]}" for k in ("characters", "lines", "files", "tokens (~chars/4)",
                                             "dependencies (requirements.lock lines)") if k in bloat]
    lines += ["", "| metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(columns[stage].get(name, "-") for stage in SUMMARY_STAGES) + " |"
              for name in SUMMARY_ROWS]
    lines += ["", "A cell with a note in brackets is not the full benchmark: a partial CORE (tasks missing from the "
              "bundle), N examples or problems per task, or offline data (a registry-package or vendored copy of the "
              "task instead of the Hugging Face dataset; each section's table names its source)."]
    stamps = _timestamps(d)
    if len(stamps) > 1:
        seconds = (max(stamps) - min(stamps)).total_seconds()
        lines += ["", f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m"]
        rate = _fields(_read_section(d, "Header")).get("GPU hourly rate (USD, estimate)")
        if rate:
            cost = float(rate) * seconds / 3600
            lines += [f"Estimated cost: ${cost:.2f} (wall clock x ${rate}/hour for the node)"]
        else:
            lines += ["Estimated cost: none to estimate (no GPU: a CPU run has no rental rate here)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Plots (nanojax.plots), from the runs' metrics, into report-plots/ beside report.md.

def stage_runs() -> list[tuple[str, Path]]:
    """[(run, metrics.jsonl)] in stage order: runs are named "<stage>-d<depth>" unless --run said otherwise (those
    come last, by name)."""
    runs = sorted(p for p in subdir("runs").glob("*/metrics.jsonl"))
    order = lambda p: (next((i for i, s in enumerate(STAGE_SECTIONS) if p.parent.name.startswith(s + "-")),  # noqa
                            len(STAGE_SECTIONS)), p.parent.name)
    return [(p.parent.name, p) for p in sorted(runs, key=order)]


def plots_section(d: Path) -> str:
    plots = report_plots(stage_runs(), d / PLOTS_DIR)
    if not plots:
        return ""
    return "\n".join(["## Plots", ""] + [f"![{title}]({PLOTS_DIR}/{name})" for title, name in plots]) + "\n"


ABSOLUTE_IMAGE = re.compile(r"^!\[[^\]]*\]\(/[^)]*\)\s*$", re.MULTILINE)


def generate(out_dir=".") -> str:
    """report.md from the sections in SECTION_ORDER (others after), the plots and the summary; written under
    report/ and into out_dir (default: the current directory), each with its report-plots/ folder beside it."""
    d = subdir("report")
    for old in (d / PLOTS_DIR).glob("*.svg"):
        old.unlink()
    parts = ["# nanojax report card\n"]
    names = [f"{slug(name)}.md" for name in SECTION_ORDER]
    names += sorted(p.name for p in d.glob("*.md") if p.name not in set(names) | {"report.md"})
    for name in names:
        if (d / name).exists():  # absolute image links (older runs) do not survive a copy: the Plots section has them
            parts.append(ABSOLUTE_IMAGE.sub("", (d / name).read_text()))
    parts += [plots_section(d), summary(d)]
    text = "\n".join(p for p in parts if p)
    with atomic_write(d / "report.md", "w") as f:
        f.write(text)
    out = Path(out_dir)
    if out.resolve() != d.resolve():
        if (d / PLOTS_DIR).is_dir():
            shutil.rmtree(out / PLOTS_DIR, ignore_errors=True)
            shutil.copytree(d / PLOTS_DIR, out / PLOTS_DIR)
        with atomic_write(out / "report.md", "w") as f:
            f.write(text)
    print(f"report written: {d / 'report.md'} (and {out / 'report.md'}, plots in {PLOTS_DIR}/ beside each)")
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
