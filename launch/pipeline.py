"""The speedrun's stages in order, the command of each and whether it is already done. `speedrun.sh` asks this module
for its plan once at the start and runs it; a dry run prints it with the preset's derived numbers.

    python -m launch.pipeline plan       # tab-separated lines: action, stage, command or reason (for speedrun.sh)
    python -m launch.pipeline dry-run    # the same for a reader, with the numbers; runs nothing

Done, by stage:
- data: never skipped here (the downloads skip the shards already present, the demo says it is built).
- tokenizer: tokenizer.json is there with the preset's vocab size. Its eval: its report section is newer than it.
- a training stage: its latest complete checkpoint (checkpoints/<stage>/d<depth>/<step>/) has "final": true in its
  meta; a complete checkpoint without it is an interrupted run, continued with --resume.
- an evaluation: its report section exists, is newer than the checkpoint it evaluates, and that stage is not about to
  train again.
- a stage whose command is not in this checkout (launch/mid.py, ...) is skipped with a line saying so.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from launch import presets

ROOT = Path(__file__).resolve().parent.parent
# nanojax.report holds the section names (STAGE_SECTIONS, CHAT_EVAL_SECTIONS); imported lazily (it needs the venv).
CHAT_STAGES = ("mid", "sft", "rl")


def base_dir() -> Path:
    return Path(os.environ.get("NANOJAX_BASE_DIR") or Path.home() / ".cache" / "nanojax").expanduser()


def latest_checkpoint(stage: str, depth: int) -> Path | None:
    """The newest complete save (Orbax renames a save to its bare step number only when every item is written)."""
    d = base_dir() / "checkpoints" / stage / f"d{depth}"
    steps = sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []
    return d / str(steps[-1]) if steps else None


def training_state(stage: str, depth: int) -> str:
    """"final", "interrupted" or "none"."""
    step = latest_checkpoint(stage, depth)
    if step is None:
        return "none"
    try:
        meta = json.loads((step / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return "interrupted"  # unreadable meta: let --resume say what is wrong with it
    return "final" if meta.get("final") else "interrupted"


def section_path(section: str) -> Path:
    from nanojax.report import slug
    return base_dir() / "report" / f"{slug(section)}.md"


def newer(a: Path, b: Path | None) -> bool:
    return a.exists() and (b is None or a.stat().st_mtime > b.stat().st_mtime)


def tokenizer_vocab() -> int | None:
    path = base_dir() / "tokenizer" / "tokenizer.json"
    try:
        state = json.loads(path.read_text())
        return len(state["ranks"]) + len(state["special_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def xla_memory_plan(d: dict, python: str = sys.executable):
    """plan(batch) -> GiB per device by XLA's own plan of the train step compiled for these GPUs
    (`python -m nanojax.bench memory`), for presets.fit_device_batch."""
    p = presets.PRESETS[d["preset"]]

    def plan(batch: int) -> float:
        cmd = [python, "-m", "nanojax.bench", "memory", "--depth", str(p.depth), "--vocab-size", str(p.vocab_size),
               "--max-seq-len", str(p.max_seq_len), "--mesh", str(d["mesh"]), "--device-batch-size", str(batch),
               "--dtype", "bfloat16"]
        print(f"[speedrun] memory plan: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        try:
            gib = json.loads(out.stdout.strip().splitlines()[-1])["total_per_device_gib"]
        except (IndexError, ValueError, KeyError):
            print(f"[speedrun] memory plan failed; keeping the estimate: {out.stderr.strip()[-300:]}", file=sys.stderr)
            return 0.0
        print(f"[speedrun] device batch {batch}: {gib} GiB per device of {d['gpu_memory_gib']}", file=sys.stderr)
        return gib
    return plan


def check_memory(d: dict) -> dict:
    """On real GPUs, before base training: the device batch the XLA plan fits (halved from the estimate's choice
    while it does not); the chat stages' batches follow it."""
    p = presets.PRESETS[d["preset"]]
    batch = presets.fit_device_batch(p, d["mesh"], d["gpu_memory_gib"], wanted=d["device_batch_size"],
                                     plan=xla_memory_plan(d))
    if batch != d["device_batch_size"]:
        d = {**d, "device_batch_size": batch, "grad_accum": p.total_batch_size // (batch * p.max_seq_len * d["mesh"]),
             "chat_batch": {**d["chat_batch"], "mid": min(d["chat_batch"].get("mid", batch), batch)}}
    return d


def plan(d: dict, *, rl: bool = True, python: str = "python") -> list[tuple[str, str, str]]:
    """[(action, stage, text)]: action run (text: the command), bg (run in the background), wait, skip (text: why),
    say (text: a line for the user at the end)."""
    from nanojax.report import CHAT_EVAL_SECTIONS, STAGE_SECTIONS

    p = presets.PRESETS[d["preset"]]
    py = lambda *args: shlex.join([python, "-m", *map(str, args)])  # noqa: E731
    gpu = d["preset"] != "cpu"
    mesh = ["--mesh", d["mesh"]] if gpu else ["--mesh", 1]
    steps = []
    fresh = training_state("base", p.depth) == "none"
    steps.append(("run", "report reset", py("nanojax.report", "reset")) if fresh else
                 ("skip", "report reset", "report kept: continuing the run in this base directory (its header stays)"))
    # Data and tokenizer.
    if gpu:
        steps.append(("run", "data", py("nanojax.dataset", "--source", p.source, "-n", d["tokenizer_shards"])))
        steps.append(("bg", "data", py("nanojax.dataset", "--source", p.source, "-n", d["shards"])))
    else:
        steps.append(("run", "data", py("nanojax.dataset", "--source", p.source)))
    tok_json = base_dir() / "tokenizer" / "tokenizer.json"
    if tokenizer_vocab() == p.vocab_size:
        steps.append(("skip", "tokenizer", f"tokenizer done: vocab {p.vocab_size:,} in {tok_json.parent}"))
    else:
        steps.append(("run", "tokenizer", py("tokenizer.train", "--source", p.source, "--vocab-size", p.vocab_size,
                                             "--max-chars", p.tokenizer_max_chars)))
    if tokenizer_vocab() == p.vocab_size and newer(section_path("Tokenizer evaluation"), tok_json):
        steps.append(("skip", "tokenizer eval", "tokenizer eval done: its report section is newer than the tokenizer"))
    else:
        steps.append(("run", "tokenizer eval", py("tokenizer.eval", "--source", p.source)))
    if gpu:
        steps.append(("wait", "data", f"waiting for the download of {d['shards']} shards"))
    # Training stages, each followed by its evaluation.
    for stage in ("base",) + CHAT_STAGES:
        if stage == "rl" and not rl:
            steps.append(("skip", stage, "RL skipped: NANOJAX_RL=0"))
            continue
        if not (ROOT / "launch" / f"{stage}.py").exists():
            steps.append(("skip", stage, f"{stage}: no launch/{stage}.py in this checkout yet"))
            continue
        state = training_state(stage, p.depth)
        if stage == "base":
            args = ["launch.base", "--source", p.source, "--depth", p.depth, *mesh,
                    "--device-batch-size", d["device_batch_size"], "--max-seq-len", p.max_seq_len,
                    "--total-batch-size", p.total_batch_size, *(["--num-iterations", p.num_iterations]
                                                                if p.num_iterations > 0 else []),
                    *(["--packing", p.packing] if p.packing != "bestfit" else []), *p.base_flags]
        else:
            args = [f"launch.{stage}", *mesh]
            if gpu and stage in d["chat_batch"]:
                args += ["--device-batch-size", d["chat_batch"][stage]]
        trains = state != "final"
        if state == "final":
            steps.append(("skip", stage, f"{STAGE_SECTIONS[stage]} done: {latest_checkpoint(stage, p.depth)} is final"))
        else:
            steps.append(("run", stage, py(*args, *(["--resume"] if state == "interrupted" else []))))
        ckpt = latest_checkpoint(stage, p.depth)
        if stage == "base":
            section, cmd = "Base model evaluation", py("evals.base", *p.eval_flags, *(mesh if gpu else []))
        else:
            section = CHAT_EVAL_SECTIONS[stage]
            cmd = py("evals.chat", "-i", stage, *(["-a", "GSM8K"] if stage == "rl" else []), *p.chat_eval_flags)
        if not trains and newer(section_path(section), ckpt):
            steps.append(("skip", f"{stage} eval", f"{section} done: its report section is newer than the checkpoint"))
        else:
            steps.append(("run", f"{stage} eval", cmd))
    steps.append(("run", "report", py("nanojax.report", "generate")))
    chat = [s for s in ("sft", "rl") if (ROOT / "launch" / f"{s}.py").exists() and (s != "rl" or rl)]
    if (ROOT / "serve" / "app.py").exists() and chat:
        for s in chat:
            steps.append(("say", "chat", f"chat with the {s} model in the browser: python -m serve.app -i {s}"))
    else:
        last = chat[-1] if chat else "base"
        steps.append(("say", "chat", f"chat in the terminal: python -m serve.cli -i {last}"))
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["plan", "dry-run"],
                        help="plan: tab-separated lines for speedrun.sh; dry-run: the plan and numbers for a reader")
    parser.add_argument("--preset", default=None,
                        help="cpu, d20, d26 or d32 (default: $NANOJAX_PRESET, else chosen from the hardware)")
    parser.add_argument("--python", default="python", help="the interpreter in the commands (default: python)")
    args = parser.parse_args(argv)
    hw = presets.detect_gpus()
    name = args.preset or os.environ.get("NANOJAX_PRESET") or presets.choose(hw)
    d = presets.derive(name, hw)
    rl = os.environ.get("NANOJAX_RL", "1") != "0"
    if args.command == "plan" and hw.gpus and name != "cpu" and \
            training_state("base", presets.PRESETS[name].depth) != "final":
        d = check_memory(d)
    steps = plan(d, rl=rl, python=args.python)
    if args.command == "plan":
        for action, stage, text in steps:
            print(f"{action}\t{stage}\t{text}")
        return
    print(presets.describe(d))
    print(f"base directory: {base_dir()}")
    print("stages (dry run: nothing runs):")
    for action, stage, text in steps:
        label = {"run": "run", "bg": "run in the background", "wait": "wait", "skip": "skip", "say": "then"}[action]
        print(f"  {stage:<15} {label}: {text}")


if __name__ == "__main__":
    main(sys.argv[1:])
