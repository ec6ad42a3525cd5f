"""The report: sections written atomically by each stage, joined by `generate` with nanochat's summary table."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

from nanojax import report


def test_sections_and_summary_keep_labels(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.reset()
    report.log("Base model evaluation", [{"label": "partial CORE (14/22 tasks, offline)", "score": 0.0123,
                                          "max per task": 16}, "| table |"])
    report.log("Chat evaluation sft", {"max problems": "all", "ARC-Easy": 0.4, "GSM8K": 0.05, "ChatCORE": 0.1,
                                       "big": 123456})
    text = report.generate()
    assert text.startswith("# nanojax report card") and "## Header" in text and "### Bloat" in text
    assert "| partial CORE (14/22 tasks, offline) | 0.0123 | - | - | - |" in text
    assert "| ARC-Easy | - | - | 0.4000 | - |" in text and "| ChatCORE | - | - | 0.1000 | - |" in text
    assert "| CORE |" not in text  # a partial CORE is never called CORE
    assert "on 16 examples per task" in text and "Total wall clock time:" in text
    assert "- big: 123,456" in text  # ints >= 10,000 get separators, floats 4 decimals
    assert (tmp_path / "report.md").read_text() == text == (base_dir / "report" / "report.md").read_text()
    assert not [p for p in (base_dir / "report").iterdir() if p.name.startswith(".")]  # no temp files left


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
