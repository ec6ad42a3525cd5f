"""Checkpoints: exact resume after kill -9 and SIGTERM (real subprocesses), kill -9 in the middle of a save, and clear
errors for everything that can be missing or damaged when saving or resuming. (Loading for use: test_models.py.)"""
import asyncio
import gc
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax import checkpoint, gpt, models
from nanojax import mesh as meshlib
from nanojax.checkpoint import StageCheckpoints
from nanojax.common import UserError
from nanojax.config import GPTConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ITERS, SAVE_EVERY = 10, 3
# 8 devices x 1 row x 64 tokens = 512 tokens per pass: two accumulated micro-batches per step.
TRAIN_ARGS = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "1", "--total-batch-size", "1024",
              "--num-iterations", str(ITERS), "--eval-every", "4", "--eval-tokens", "2048", "--sample-every", "-1",
              "--save-every", str(SAVE_EVERY), "--keep", "5"]


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: a small .jsonl corpus, a 300-token tokenizer, a compile cache the training subprocesses share.

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    root = tmp_path_factory.mktemp("corpus")
    for name, ndocs in (("a.jsonl", 3000), ("b.jsonl", 300)):  # the last file is the validation split
        with open(root / name, "w") as f:
            for i in range(ndocs):
                text = f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.choice([3, 10, 40, 150])))
                f.write(json.dumps({"text": text}) + "\n")
    return root


@pytest.fixture(scope="module")
def trained_tokenizer(corpus, tmp_path_factory):
    from nanojax import dataset
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train(dataset.iter_documents(str(corpus), "train"), 300).save(path)
    return path


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _new_base(path: Path, trained_tokenizer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained_tokenizer, path / "tokenizer", dirs_exist_ok=True)
    return path


@pytest.fixture
def base(base_dir, trained_tokenizer):
    return _new_base(base_dir, trained_tokenizer)


def _env(base: Path, cache: Path, devices: int = 8) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOJAX_", "XLA_", "JAX_"))}
    env.update(NANOJAX_BASE_DIR=str(base), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", NANOJAX_PROGRESS="0", PYTHONPATH=str(ROOT),
               # The train step compiles once per test session instead of once per subprocess.
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _train_cmd(corpus, run, *extra, mesh="8"):
    return [sys.executable, "-m", "launch.base", *TRAIN_ARGS, "--source", str(corpus), "--run", run,
            "--mesh", mesh, *extra]


def _train(base, cache, corpus, run, *extra, mesh="8", devices=8):
    r = subprocess.run(_train_cmd(corpus, run, *extra, mesh=mesh), capture_output=True, text=True, cwd=ROOT,
                       env=_env(base, cache, devices), timeout=300)
    return r


class _Child:
    """A training subprocess whose output is read line by line, so a test can act at a chosen step."""

    def __init__(self, base, cache, corpus, run, *extra):
        self.proc = subprocess.Popen(_train_cmd(corpus, run, *extra), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env(base, cache))
        self.lines = []
        self._timer = threading.Timer(300, self.proc.kill)  # never hang the suite
        self._timer.start()

    def wait_for(self, predicate) -> str:
        for line in self.proc.stdout:
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError("training ended before the expected line:\n" + "".join(self.lines))

    def finish(self) -> int:
        out, _ = self.proc.communicate()
        self.lines.append(out)
        self._timer.cancel()
        return self.proc.returncode

    @property
    def output(self):
        return "".join(self.lines)


def _records(base: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (base / "runs" / run / "metrics.jsonl").read_text().splitlines()]


def _losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _ckpt_dir(base: Path) -> Path:
    return base / "checkpoints" / "base" / "d2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trained_tokenizer, compile_cache, corpus):
    """One uninterrupted run: its metrics and checkpoints (steps 3, 6, 9, 10) are what the other runs must match."""
    base = _new_base(tmp_path_factory.mktemp("reference"), trained_tokenizer)
    r = _train(base, compile_cache, corpus, "ref")
    assert r.returncode == 0, r.stdout + r.stderr
    assert checkpoint.complete_steps(_ckpt_dir(base)) == [3, 6, 9, 10]
    assert (base / "runs" / "ref" / "loss.svg").read_text().startswith("<svg")  # the run's loss curve
    return base, _records(base, "ref")


# ----------------------------------------------------------------------------------------------------------------------
# Exact resume, in real processes.

def test_kill9_mid_training_then_resume_matches_uninterrupted_run(reference, base, compile_cache, corpus, capsys):
    ref_base, ref_records = reference
    kill_at = random.Random(time.time_ns()).randint(SAVE_EVERY + 1, 2 * SAVE_EVERY + 2)  # after the first save
    child = _Child(base, compile_cache, corpus, "killed")
    # Saves are asynchronous: wait for the chosen step and for the first save to be complete on disk.
    child.wait_for(lambda line: line.startswith("step ") and f"/{ITERS} |" in line and int(line[5:10]) >= kill_at
                   and checkpoint.complete_steps(_ckpt_dir(base)))
    child.proc.send_signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    saved = checkpoint.complete_steps(_ckpt_dir(base))
    assert saved and saved[-1] < ITERS, (kill_at, saved)
    last_save = saved[-1]

    r = _train(base, compile_cache, corpus, "killed", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {_ckpt_dir(base)}/{last_save}" in r.stdout
    records = _records(base, "killed")
    # The resumed log reads as one run (the killed run's steps after its last save are dropped), and every loss and
    # val bpb equals the uninterrupted run's exactly: same data, optimizer step count and eval cadence.
    assert records == [{**x, "dt": y["dt"], "tok_per_s": y["tok_per_s"]} if "dt" in x else x
                       for x, y in zip(ref_records, records)], f"killed at step {kill_at}, resumed from {last_save}"
    assert [r["step"] for r in records if "loss" in r] == list(range(1, ITERS + 1))
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 4, 8, 10]  # step 0 too, as nanochat
    meta = checkpoint.read_meta(_ckpt_dir(base) / str(ITERS))
    ref_meta = checkpoint.read_meta(_ckpt_dir(ref_base) / str(ITERS))
    assert meta["final"] and meta["metrics"]["min_val_bpb"] == ref_meta["metrics"]["min_val_bpb"]
    assert meta["history"]["timed_steps"] == ITERS - 2  # the first step of each of the two runs is compile time

    # Asking again (in-process: it stops before compiling): the run is complete; nothing is trained or saved.
    from launch import base as launch_base
    before = {p.name: p.stat().st_mtime_ns for p in _ckpt_dir(base).iterdir()}
    assert launch_base.main(_train_cmd(corpus, "killed", "--resume")[3:]) is None
    out = capsys.readouterr().out
    assert "already complete" in out and "step 0" not in out
    assert {p.name: p.stat().st_mtime_ns for p in _ckpt_dir(base).iterdir()} == before


def test_sigterm_saves_exits_0_and_resume_continues(reference, base, compile_cache, corpus):
    _, ref_records = reference
    child = _Child(base, compile_cache, corpus, "term")
    child.wait_for(lambda line: line.startswith("step 00005/"))
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    stopped = int(child.output.split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert "--resume" in child.output and SAVE_EVERY < stopped < ITERS
    assert checkpoint.complete_steps(_ckpt_dir(base))[-1] == stopped
    assert not checkpoint.read_meta(_ckpt_dir(base) / str(stopped))["final"]

    r = _train(base, compile_cache, corpus, "term", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _losses(_records(base, "term")) == _losses(ref_records)
    val = {x["step"]: x["val_bpb"] for x in _records(base, "term") if "val_bpb" in x}
    assert val == {x["step"]: x["val_bpb"] for x in ref_records if "val_bpb" in x}


@pytest.mark.slow
@pytest.mark.parametrize("mesh, devices, batch", [("4", 4, "2"), ("1", 8, "4")])
def test_resume_on_another_mesh_keeps_the_global_batch(reference, base, compile_cache, corpus, mesh, devices, batch):
    """Saved on 8 devices at step 6, resumed on 4 (or 1): same rows per step, so the same losses up to float noise."""
    ref_base, ref_records = reference
    shutil.copytree(_ckpt_dir(ref_base) / "6", _ckpt_dir(base) / "6")
    r = _train(base, compile_cache, corpus, "moved", "--resume", "--device-batch-size", batch, mesh=mesh,
               devices=devices)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restored onto the new layout" in r.stdout
    got, want = _losses(_records(base, "moved")), _losses(ref_records)
    assert sorted(got) == list(range(7, ITERS + 1))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-5)


@pytest.fixture(scope="module")
def big_val_corpus(corpus, tmp_path_factory):
    """Two processes need a validation file of at least two row groups (1024 lines each): one per process."""
    root = tmp_path_factory.mktemp("corpus2")
    shutil.copy(corpus / "a.jsonl", root / "a.jsonl")
    lines = (corpus / "b.jsonl").read_text().splitlines(keepends=True)
    (root / "b.jsonl").write_text("".join(lines * 8))
    return root


def _two_processes(base, cache, corpus, run, *extra, on_step=None):
    """launch.base as 2 processes x 4 devices forming one 8-device mesh; `on_step(step, procs)` sees process 0's
    step lines. Returns both processes' return codes and output."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = _env(base, cache, devices=4)
        env.update(NANOJAX_COORDINATOR=f"127.0.0.1:{port}", NANOJAX_NUM_PROCESSES="2", NANOJAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(_train_cmd(corpus, run, "--num-iterations", "8", *extra), cwd=ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    timers = [threading.Timer(240, p.kill) for p in procs]  # a dead peer makes the other wait on a barrier
    for t in timers:
        t.start()
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        if on_step and line.startswith("step ") and "/8 |" in line:
            on_step(int(line[5:10]), procs)
    rest = [p.communicate()[0] for p in procs]
    for t in timers:
        t.cancel()
    return [p.returncode for p in procs], "".join(lines) + rest[0], rest[1]


def _saved_state(step_path: Path):
    """A checkpoint's params and optimizer state (restored here, on 8 devices, as numpy) and its data state."""
    from nanojax.config import TrainConfig
    from nanojax.train import build_step
    parts = build_step(CFG, TrainConfig(depth=2, max_seq_len=64), meshlib.make_mesh("8"), jnp.float32)
    trees = [checkpoint._restore_tree(step_path, item, checkpoint._targets(abstract, sh))
             for item, abstract, sh in (("params", parts.abstract, parts.param_sh),
                                        ("opt_state", parts.opt_abstract, parts.opt_sh))]
    return jax.tree.map(np.asarray, trees), checkpoint._read_json_item(step_path, "data_state")


@pytest.mark.slow
def test_two_processes_keep_their_own_data_position(tmp_path, trained_tokenizer, compile_cache, big_val_corpus):
    """Each process's loader state is saved and restored as its own; a SIGTERM that reaches only one process still
    stops both at the same step with one checkpoint; the resumed run equals an uninterrupted one.
    Two runs of two processes, not three (each pays a compilation: only process 0 writes the compile cache): the
    uninterrupted run saves every step, so the checkpoint the SIGTERM leaves is compared with the uninterrupted run's
    at the same step, params, optimizer state and both loader states, instead of resuming from it once more."""
    ref_base = _new_base(tmp_path / "ref", trained_tokenizer)
    codes, out, out1 = _two_processes(ref_base, compile_cache, big_val_corpus, "ref", "--save-every", "1",
                                      "--keep", "10")
    assert codes == [0, 0], out + out1
    assert checkpoint.complete_steps(_ckpt_dir(ref_base)) == list(range(1, 9))
    data = checkpoint._read_json_item(_ckpt_dir(ref_base) / "6", "data_state")
    assert data["num_processes"] == 2 and data["processes"][0] != data["processes"][1]
    assert {s["group"] % 2 for s in data["processes"]} == {0, 1}  # each on its own slice of row groups

    # Resumed from the uninterrupted run's step 3 (both loader states restored), SIGTERM to process 1 only.
    base = _new_base(tmp_path / "stopped", trained_tokenizer)
    shutil.copytree(_ckpt_dir(ref_base) / "3", _ckpt_dir(base) / "3")
    term = lambda step, procs: step == 5 and procs[1].send_signal(signal.SIGTERM)  # noqa: E731
    codes, out, out1 = _two_processes(base, compile_cache, big_val_corpus, "run", "--resume", on_step=term)
    assert codes == [0, 0], out + out1
    stopped = checkpoint.complete_steps(_ckpt_dir(base))[-1]
    assert 5 <= stopped < 8 and "stopped by a signal to another process" in out
    ref_losses = _losses(_records(ref_base, "ref"))
    assert _losses(_records(base, "run")) == {s: v for s, v in ref_losses.items() if 3 < s <= stopped}
    # What a resume from the SIGTERM's checkpoint starts from is exactly what the uninterrupted run had at that step.
    (params, opt_state), data = _saved_state(_ckpt_dir(base) / str(stopped))
    (ref_params, ref_opt_state), ref_data = _saved_state(_ckpt_dir(ref_base) / str(stopped))
    assert data == ref_data and data["num_processes"] == 2
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    jax.tree.map(np.testing.assert_array_equal, opt_state, ref_opt_state)
    assert not checkpoint.read_meta(_ckpt_dir(base) / str(stopped))["final"]


# ----------------------------------------------------------------------------------------------------------------------
# kill -9 while Orbax is writing.

SAVER = r"""
import sys
import jax, jax.numpy as jnp
from nanojax.checkpoint import StageCheckpoints
ck = StageCheckpoints("base", "d2", keep=5)
small = {"w": jnp.ones((4, 4))}
ck.save(1, small, None, {"step": 1}, {"pos": 1})
ck.wait()
big = {f"w{i}": jnp.full((1024, 1024), float(i)) for i in range(int(sys.argv[1]))}
jax.block_until_ready(big)
ck.save(2, big, None, {"step": 2}, {"pos": 2})
print("saving 2", flush=True)  # the save is in flight: arrays copied to host, files being written
ck.wait()
print("saved 2", flush=True)
"""


def test_kill9_during_a_save_leaves_the_previous_checkpoint(base, compile_cache):
    d = _ckpt_dir(base)
    landed, arrays = False, 48  # 4 MB each
    for attempt in range(4):
        shutil.rmtree(d, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(arrays)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env=_env(base, compile_cache, devices=1))
        for line in proc.stdout:
            if line.startswith("saving 2"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        if checkpoint.complete_steps(d) == [1] and checkpoint.interrupted_saves(d):
            landed = True
            break
        arrays *= 2  # the save finished before the kill: make it longer
    assert landed, f"no kill landed inside a save after {attempt + 1} tries: {sorted(os.listdir(d))}"

    # The interrupted save is ignored, reported by ls, and the previous step loads and can be continued from.
    assert [r["problem"] for r in models.list_checkpoints("base")] == [None, "interrupted save (ignored)"]
    ck = StageCheckpoints("base", "d2", keep=5)
    assert ck.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=meshlib.replicated(meshlib.make_mesh("1")))}
    params, _, meta, data_state = ck.restore(1, target)
    assert meta == {"step": 1} and data_state["processes"] == [{"pos": 1}]
    np.testing.assert_array_equal(params["w"], np.ones((4, 4)))
    ck.save(2, {"w": params["w"] * 2}, None, {"step": 2}, {"pos": 2})
    ck.close()
    assert checkpoint.complete_steps(d) == [1, 2] and not checkpoint.interrupted_saves(d)


# ----------------------------------------------------------------------------------------------------------------------
# A full or read-only disk: one line naming the cause, at once, and the checkpoints before it intact. The base directory
# is a small tmpfs mounted in a private mount namespace (`unshare`), which needs unprivileged user namespaces.

def _in_small_tmpfs(base: Path, size: str, script: str, cache, options="") -> subprocess.CompletedProcess:
    shell = f"mount -t tmpfs -o size={size}{options} tmpfs {base} && {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell], capture_output=True,
                          text=True, cwd=ROOT, env=_env(base, cache), timeout=300)


def _can_mount_tmpfs(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    return _in_small_tmpfs(probe, "1m", "true", tmp_path).returncode == 0


@pytest.fixture
def tmpfs_base(tmp_path):
    if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private namespace here (unshare)")
    base = tmp_path / "small_base"
    base.mkdir()
    return base


@pytest.mark.slow  # trains 6 steps in a subprocess
def test_disk_full_at_a_save_stops_at_once_with_one_line(tmpfs_base, trained_tokenizer, compile_cache, corpus):
    """A checkpoint takes ~3.3 MB; a 5 MB disk holds the step-3 one, not the step-6 one."""
    python, base = sys.executable, tmpfs_base
    train = " ".join(_train_cmd(corpus, "run")).replace(sys.executable, python)
    r = _in_small_tmpfs(base, "5m", f"cp -r {trained_tokenizer} {base}/tokenizer && {{ {train}; echo exit $?; }} && "
                                    f"{python} -m nanojax.checkpoint ls", compile_cache)
    ckpt = base / "checkpoints" / "base" / "d2"
    assert r.stderr.startswith(f"error: cannot save checkpoint {ckpt}/6: no space left on the device (it has ")
    assert r.stderr.count("\n") == 1 and r.stderr.endswith(
        f"); the latest complete checkpoint, {ckpt}/3, is intact: continue from it with --resume once {ckpt} is "
        f"writable and has room\n"), r.stderr
    assert "exit 2\n" in r.stdout and "step 00006/10" in r.stdout and "step 00007/10" not in r.stdout
    listing = r.stdout.split("exit 2\n", 1)[1]
    assert " 3, " not in listing and "damaged" not in listing and "interrupted" not in listing  # step 3 alone, whole
    assert listing.splitlines()[1].split()[:4] == ["base", "d2", "3", "3"]


DISK_FILLER = r"""
import time
import jax
from nanojax.checkpoint import StageCheckpoints
from nanojax.common import cli

def main():
    ck = StageCheckpoints("base", "d2", keep=5)
    small = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
    ck.save(1, small, None, {"step": 1}, {"pos": 1})
    ck.save(2, small, None, {"step": 2}, {"pos": 2})  # waits for step 1 first
    big = {f"w{i}": jax.random.normal(jax.random.key(i), (256, 1024)) for i in range(8)}  # 8 MB, incompressible
    ck.save(3, big, None, {"step": 3}, {"pos": 3})  # room for one more small one: this one starts, then fails
    print("save 3 started", flush=True)
    try:
        for _ in range(600):  # what the training loop does after every step
            ck.poll()
            time.sleep(0.05)
        print("30 s of polls passed", flush=True)
        ck.save(4, small, None, {"step": 4}, {"pos": 4})
    finally:
        ck.close()

cli(main)()
"""


def test_a_save_that_fails_while_writing_is_one_line_at_once(tmpfs_base, compile_cache):
    python, base = sys.executable, tmpfs_base
    r = _in_small_tmpfs(base, "2m", f"{{ {python} -c '{DISK_FILLER}'; echo exit $?; }} && find {base} -maxdepth 4 "
                                    f"&& {python} -m nanojax.checkpoint ls", compile_cache)
    ckpt = base / "checkpoints" / "base" / "d2"
    assert r.stderr == (f"error: cannot save checkpoint {ckpt}/3: No space left on device; the latest complete "
                        f"checkpoint, {ckpt}/2, is intact: continue from it with --resume once {ckpt} is writable and "
                        f"has room\n")
    assert "save 3 started\nexit 2\n" in r.stdout  # a poll, not the next save, stopped it
    # The failed save's leftovers are removed (Orbax's threads may still write a little after the error: then ls
    # shows those as an interrupted save, and the next run's manager removes them).
    assert f"{ckpt}/3\n" not in r.stdout and "damaged" not in r.stdout and "base   d2     1, 2" in r.stdout


def test_a_read_only_base_directory_is_one_line(tmpfs_base, trained_tokenizer, compile_cache, corpus):
    python, base = sys.executable, tmpfs_base
    train = " ".join(_train_cmd(corpus, "run")).replace(sys.executable, python)
    script = (f"cp -r {trained_tokenizer} {base}/tokenizer && mkdir -p {base}/runs/run {base}/checkpoints/base/d2 && "
              f"mount -o remount,ro {base} && {{ {train}; echo exit $?; }}"
              f" && {python} -m launch.base --help > /dev/null && ls -A {base}")
    r = _in_small_tmpfs(base, "5m", script, compile_cache)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Read-only file system" in r.stderr, \
        r.stderr
    assert str(base) in r.stderr and "NANOJAX_BASE_DIR" in r.stderr
    assert r.stdout.endswith("exit 2\ncheckpoints\nruns\ntokenizer\n")  # nothing written


# ----------------------------------------------------------------------------------------------------------------------
# In-process: a checkpoint saved on 8 devices (test_models.py loads it anywhere).

CFG = GPTConfig.from_depth(2, vocab_size=300, max_seq_len=64)  # what launch.base makes of --depth 2


def _random_params(seed=0):
    """Init plus noise, so the zero-initialised projections and head make the logits depend on every weight."""
    params = gpt.init_params(CFG, seed=seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)


def _save(step=5, final=True, stage="base", params=None, tokenizer=None, cfg=CFG):
    mesh = meshlib.make_mesh("8")
    params = params if params is not None else _random_params()
    sh = meshlib.shardings(gpt.param_axes(cfg), mesh, gpt.abstract_params(cfg))
    params = jax.device_put(params, sh)
    tok = tokenizer or Tokenizer.load(checkpoint.base_dir() / "tokenizer")
    meta = {"step": step, "stage": stage, "final": final, "model_config": cfg.to_dict(),
            "tokenizer": tok.fingerprint(), "run_config": {"mesh": "8", "total_batch_size": 1024, "seed": 0},
            "num_iterations": step, "metrics": {"loss": 2.5, "val_bpb": 1.25, "min_val_bpb": 1.2, "train_time": 3.0}}
    ck = StageCheckpoints(stage, f"d{cfg.depth}")
    ck.save(step, params, {"count": jnp.int32(step)}, meta, {"epoch": 0, "group": 0, "doc": 3, "buffer": []})
    ck.close()
    return params


@pytest.fixture
def saved(base):
    return _save()


def _logits(params, mesh_spec):
    mesh = meshlib.make_mesh(mesh_spec)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 64)), jnp.int32)
    tokens = jax.device_put(tokens, meshlib.batch_sharding(mesh))
    return np.asarray(jax.jit(lambda p, t: gpt.forward(p, t, CFG))(params, tokens))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming what was found.

def test_no_checkpoints_at_all_names_the_command():
    with pytest.raises(UserError, match=r"no base checkpoints under .*; train that stage first "
                                        r"\(python -m launch.base\); there are no checkpoints at all yet"):
        checkpoint.find("base")


def test_one_training_run_per_stage_and_tag(base):
    held = checkpoint.StageCheckpoints("base", "d2")
    held.claim()
    code = ("from nanojax import checkpoint as c; from nanojax.common import cli; "
            "cli(c.StageCheckpoints('base', 'd2').claim)()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: another run is training base/d2 now"), r.stderr
    assert subprocess.run([sys.executable, "-c", code.replace("'d2'", "'d4'")], env=env).returncode == 0
    held.close()
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def _abandon_failed_task(coro):
    """Runs `coro` to its failure on a loop that then closes without anyone reading the exception, as Orbax's loop does
    with sibling reads after the first fails; asyncio logs the task when it is collected."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert task.done()
    del task
    gc.collect()


def test_abandoned_orbax_reads_are_not_logged_but_saves_and_other_tasks_are(caplog, monkeypatch):
    from orbax.checkpoint._src.serialization import serialization

    async def ours():
        raise ValueError("not an Orbax read")

    checkpoint._quiet_abandoned_reads()
    checkpoint._quiet_abandoned_reads()  # idempotent: one hook, one filter
    assert getattr(sys.unraisablehook, "nanojax_quiets_abandoned_reads", False)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # replaced by someone else, as pytest does
    checkpoint._quiet_abandoned_reads()  # a new hook, still one filter
    assert getattr(sys.unraisablehook, "nanojax_quiets_abandoned_reads", False)
    assert len([f for f in logging.getLogger("asyncio").filters if isinstance(f, checkpoint._AbandonedReadFilter)]) == 1
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _abandon_failed_task(serialization.async_deserialize(None, {}))  # fails at once: no sharding
        assert not caplog.records
        _abandon_failed_task(serialization.async_serialize(None, {}))  # a save: still logged
        _abandon_failed_task(ours())
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Task exception was never retrieved"] * 2
    assert "async_serialize()" in caplog.records[0].getMessage()


def test_resume_checks_model_and_tokenizer(saved, base):
    tok = Tokenizer.load(base / "tokenizer")
    with pytest.raises(UserError, match=r"no complete checkpoint under .*/d4; base has checkpoints under tag\(s\) d2"):
        StageCheckpoints("base", "d4").resume_point(GPTConfig.from_depth(4, vocab_size=300), tok)
    other_vocab = GPTConfig.from_depth(2, vocab_size=512, max_seq_len=64)
    with pytest.raises(UserError, match=r"different model: vocab_size 300 \(saved\) vs 512 \(now\)"):
        StageCheckpoints("base", "d2").resume_point(other_vocab, tok)
    other_tok = Tokenizer.train(iter(["hello world, the quick brown fox " * 50] * 20), 270)
    with pytest.raises(UserError, match="another tokenizer"):
        StageCheckpoints("base", "d2").resume_point(CFG, other_tok)
    assert StageCheckpoints("base", "d2").resume_point(CFG, tok)[0] == 5


def test_fresh_run_over_old_checkpoints_needs_resume_or_overwrite(saved):
    ck = StageCheckpoints("base", "d2")
    with pytest.raises(UserError, match=r"d2 already has checkpoints \(steps 5\); pass --resume .* or --overwrite"):
        ck.start_fresh()
    ck.start_fresh(overwrite=True)
    assert ck.steps() == [] and checkpoint.tags("base") == []
    ck.start_fresh()  # nothing left to protect


def test_launch_refuses_a_silent_fresh_start_and_bad_resume(saved, corpus, capsys):
    """Through the real CLI (in-process): these fail before anything is compiled."""
    from launch import base as launch_base
    args = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "1", "--total-batch-size", "512",
            "--source", str(corpus), "--mesh", "8", "--num-iterations", "5"]
    for extra, message in ([[], "already has checkpoints (steps 5); pass --resume"],
                           [["--resume", "--depth", "4"], "no complete checkpoint under"],
                           [["--resume", "--overwrite"], "contradict"]):
        with pytest.raises(SystemExit) as e:
            launch_base.main(args + extra)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    launch_base.main(args + ["--resume"])  # saved at step 5 of 5: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert checkpoint.complete_steps(checkpoint.tag_dir("base", "d2")) == [5]


def test_loader_state_for_another_process_count(monkeypatch):
    states = [{"epoch": 1, "group": 6, "doc": 10, "buffer": [[6, 1]]}, {"epoch": 1, "group": 3, "doc": 2, "buffer": []},
              {"epoch": 0, "group": 9, "doc": 0, "buffer": []}]
    data_state = {"num_processes": 3, "processes": states}
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert checkpoint.own_loader_state(data_state) == states[1]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert checkpoint.own_loader_state(data_state) == {"epoch": 1, "group": 7, "doc": 0, "buffer": []}
    assert checkpoint.own_loader_state(None) is None

def test_a_damaged_checkpoint_cannot_be_resumed_from(saved, base):
    step_dir = checkpoint.tag_dir("base", "d2") / "5"
    shutil.rmtree(step_dir / "params")
    ck = StageCheckpoints("base", "d2")
    with pytest.raises(UserError, match="missing params"):
        ck.resume_point(CFG, Tokenizer.load(checkpoint.base_dir() / "tokenizer"))
    (step_dir / "meta" / "metadata").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        checkpoint.read_meta(step_dir)
