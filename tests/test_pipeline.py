"""The speedrun's plan: a finished stage is skipped, an interrupted one resumes, an evaluation newer than its checkpoint
is skipped, a stage not in this checkout is skipped with a line, and the dry run prints nanochat's numbers."""
import json
import os
import subprocess
import sys
import time

from launch import pipeline, presets
from nanojax import report

CPU = presets.derive("cpu", presets.Hardware())


def save(stage, step, final, depth=4):
    """A complete save as the loop leaves it (only what the plan reads: meta/metadata)."""
    meta = pipeline.base_dir() / "checkpoints" / stage / f"d{depth}" / str(step) / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"step": step, "final": final}))


def by_stage(steps):
    return {stage: (action, text) for action, stage, text in steps if action in ("run", "skip")}


def test_fresh_run_then_resume_then_skip():
    steps = by_stage(pipeline.plan(CPU))
    assert steps["report reset"][1] == "python -m nanojax.report reset"  # nothing trained: a new report
    assert steps["base"][0] == "run" and "--resume" not in steps["base"][1]
    assert steps["base"][1].startswith("python -m launch.base --source demo --depth 4 --mesh 1 --device-batch-size 8")
    save("base", 200, final=False)  # killed during training: a complete save without "final"
    steps = by_stage(pipeline.plan(CPU))
    assert steps["base"][1].endswith("--resume") and steps["report reset"][0] == "skip"
    save("base", 600, final=True)
    steps = by_stage(pipeline.plan(CPU))
    assert steps["base"] == ("skip", f"Base model training done: {pipeline.base_dir()}/checkpoints/base/d4/600 is final")
    assert steps["base eval"] == ("run", "python -m evals.base --max-per-task 16 --split-tokens 65536")
    time.sleep(0.01)
    report.log("Base model evaluation", {"score": 0.1})
    assert by_stage(pipeline.plan(CPU))["base eval"][0] == "skip"


def test_chat_stages_when_present_and_rl_switch(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    (root / "launch").mkdir(parents=True)
    for stage in ("base", "mid", "sft"):
        (root / "launch" / f"{stage}.py").write_text("")
    monkeypatch.setattr(pipeline, "ROOT", root)
    save("base", 600, final=True)
    save("mid", 50, final=True)
    report.log(report.CHAT_EVAL_SECTIONS["mid"], {"ARC-Easy": 0.3})
    save("sft", 10, final=False)
    steps = pipeline.plan(CPU)
    got = by_stage(steps)
    assert got["mid"][0] == "skip" and got["mid eval"][0] == "skip"
    assert got["sft"] == ("run", "python -m launch.sft --mesh 1 --resume")
    assert got["sft eval"] == ("run", "python -m evals.chat -i sft --max-problems 16 --max-new-tokens 64")
    assert got["rl"] == ("skip", "rl: no launch/rl.py in this checkout yet")
    (root / "launch" / "rl.py").write_text("")
    got = by_stage(pipeline.plan(CPU))
    assert got["rl"] == ("run", "python -m launch.rl --mesh 1")
    assert got["rl eval"] == ("run", "python -m evals.chat -i rl -a GSM8K --max-problems 16 --max-new-tokens 64")
    assert by_stage(pipeline.plan(CPU, rl=False))["rl"] == ("skip", "RL skipped: NANOJAX_RL=0")
    (root / "serve").mkdir()
    (root / "serve" / "app.py").write_text("")
    says = [text for action, _, text in pipeline.plan(CPU) if action == "say"]
    assert says == ["chat with the sft model in the browser: python -m serve.app -i sft",
                    "chat with the rl model in the browser: python -m serve.app -i rl"]
    # on GPUs the chat stages get the preset's device batch and the mesh
    d20 = presets.derive("d20", presets.Hardware(8, "H100", 80.0))
    save("base", 21400, final=True, depth=20)
    got = by_stage(pipeline.plan(d20))
    assert got["mid"] == ("run", "python -m launch.mid --mesh 8 --device-batch-size 32")
    assert got["sft"] == ("run", "python -m launch.sft --mesh 8 --device-batch-size 4")


def test_dry_run_prints_d20_without_gpus(base_dir):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "NANOJAX_PRESET": "d20",
           "NANOJAX_DRY_RUN": "1"}
    r = subprocess.run(["bash", "speedrun.sh"], cwd=pipeline.ROOT, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for expected in ("560,988,160 parameters", "21,400 iterations x 524,288 tokens/step", "(11.2B)",
                     "365 fineweb-edu shards", "python -m launch.base --source fineweb-edu --depth 20 --mesh 8"):
        assert expected in r.stdout
    assert not (base_dir / "checkpoints").exists() and not (base_dir / "report").exists()  # nothing ran


def test_memory_check_halves_the_batch_by_the_xla_plan(monkeypatch):
    d = presets.derive("d20", presets.Hardware(8, "H100", 80.0))
    asked = []

    def fake_plan(d):
        def plan(batch):
            asked.append(batch)
            return 10 + 3 * batch  # GiB: 32 -> 106 does not fit 80 x 0.85 = 68; 16 -> 58 does
        return plan
    monkeypatch.setattr(pipeline, "xla_memory_plan", fake_plan)
    checked = pipeline.check_memory(d)
    assert asked == [32, 16] and checked["device_batch_size"] == 16 and checked["grad_accum"] == 2
    assert checked["device_batch_size"] * 2048 * 8 * checked["grad_accum"] == 524_288
    assert checked["chat_batch"]["mid"] == checked["device_batch_size"]
    assert "--device-batch-size " + str(checked["device_batch_size"]) in by_stage(pipeline.plan(checked))["base"][1]
