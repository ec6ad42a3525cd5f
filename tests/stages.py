"""Tiny chat-stage runs for the stage tests: a parent checkpoint saved in-process (random weights: the stage's
mechanics are under test, not its quality) and `python -m launch.<stage>` as a real subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. How many letters are in a word? Let me count them: one, two, "
        "three. What is 12 * 7? It is 84. Who are you? I am a small language model. ") * 20


def make_tokenizer(base: Path):
    from tokenizer import Tokenizer
    Tokenizer.train(iter([TEXT]), 300).save(base / "tokenizer")


def make_parent(base: Path, stage: str, depth: int = 2, seq_len: int = 64, step: int = 5):
    """A complete checkpoint of `stage` as a finished run of that stage would leave it (meta and params)."""
    import jax

    from nanojax import checkpoint, gpt
    from nanojax.config import GPTConfig, TrainConfig
    from tokenizer import get_tokenizer

    tok = get_tokenizer()
    cfg = GPTConfig.from_depth(depth, vocab_size=tok.vocab_size, max_seq_len=seq_len)
    params = gpt.init_params(cfg, seed=0)
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
    run_config = TrainConfig(depth=depth, max_seq_len=seq_len, device_batch_size=1, total_batch_size=1024,
                             eval_tokens=1024)
    meta = {"step": step, "stage": stage, "final": True, "model_config": cfg.to_dict(),
            "run_config": vars(run_config), "tokenizer": tok.fingerprint()}
    ckpt = checkpoint.StageCheckpoints(stage, f"d{depth}")
    ckpt.save(step, params, None, meta)
    ckpt.close()


def env(base: Path, cache: Path, devices: int = 8) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("NANOJAX_", "XLA_", "JAX_"))}
    out.update(NANOJAX_BASE_DIR=str(base), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", NANOJAX_PROGRESS="0", NANOJAX_OFFLINE="1", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return out


def command(stage: str, *args) -> list[str]:
    return [sys.executable, "-m", f"launch.{stage}", *args]


def run(stage: str, base: Path, cache: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(stage, *args), capture_output=True, text=True, cwd=ROOT, env=env(base, cache),
                          timeout=timeout)


def records(base: Path, run_name: str) -> list[dict]:
    path = base / "runs" / run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(base: Path, run_name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(base, run_name) if "loss" in r}


def kill_after(stage: str, base: Path, cache: Path, step: int, *args) -> str:
    """Run the stage, kill -9 it at the first step line from `step` on when a checkpoint is complete (saves are
    asynchronous); its output so far."""
    from nanojax import checkpoint

    proc = subprocess.Popen(command(stage, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env(base, cache))
    timer = threading.Timer(300, proc.kill)  # never hang the suite
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if (line.startswith("step ") and "/" in line[:12] and int(line[5:10]) >= step
                    and checkpoint.complete_steps(checkpoint.tag_dir(stage, "d2"))):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        timer.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    return "".join(lines)
