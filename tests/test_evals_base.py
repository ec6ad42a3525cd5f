"""python -m evals.base on a real (tiny) base checkpoint: bpb, samples, a partial CORE labelled as such, report."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from evals import base as evals_base
from nanojax.train import SAMPLE_PROMPTS
from test_cli import WORDS, save_checkpoint, tok  # noqa: F401  (tok is a fixture)
from test_core import write_bundle


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "corpus"
    root.mkdir()
    for name, n in (("train.jsonl", 60), ("val.jsonl", 20)):
        (root / name).write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 40))}) + "\n" for _ in range(n)))
    return str(root)


def test_base_eval_reports_bpb_samples_and_a_labelled_partial_core(base_dir, tok, corpus, capsys):  # noqa: F811
    save_checkpoint(base_dir, tok, "base")
    write_bundle(base_dir / "eval_bundle")
    evals_base.main(["--source", corpus, "--split-tokens", "1024", "--device-batch-size", "2", "--max-per-task", "8"])
    out = capsys.readouterr().out
    bpb = {split: float(out.split(f"{split} bpb: ")[1].split()[0]) for split in ("train", "val")}
    assert all(math.isfinite(v) and 0 < v < 20 for v in bpb.values())
    assert out.count("sample: ") == len(SAMPLE_PROMPTS)
    assert "partial CORE (3/22 tasks" in out and "\nCORE:" not in out
    section = (base_dir / "report" / "base-model-evaluation.md").read_text()
    assert "partial CORE (3/22 tasks" in section and "| mc4 |" in section
    assert "val bpb" in (base_dir / "report" / "base-model-loss.md").read_text()


def test_no_base_checkpoint_is_a_one_line_error(base_dir):
    env = {"NANOJAX_BASE_DIR": str(base_dir), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "evals.base"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "no base checkpoints" in r.stderr and "Traceback" not in r.stderr, r.stderr
