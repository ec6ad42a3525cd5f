"""Stage checkpoints on Orbax: where they are, saving, resuming, and the checks that find a damaged one.

    $NANOJAX_BASE_DIR/checkpoints/<stage>/<tag>/<step>/
        params/      Orbax pytree: the fp32 master weights, restorable onto any mesh
        opt_state/   Orbax pytree: optimizer moments and its step count (the schedules' clock)
        data_state/  JSON: every process's data-loader position (see below)
        meta/        JSON: step, model config, run flags, tokenizer fingerprint, git commit, history, final metrics

A save is asynchronous (training goes on while bytes are written) and is waited on before the next save and before
exit. Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every item is written, so a
directory named by a bare number is complete, and a crash (even kill -9) mid-save leaves the previous one as the
latest. A numbered directory that has lost an item or a file afterwards is reported as damaged, never skipped.

Data-loader state is per process (each process packs its own rows). Before a save, the processes' states are
gathered (a small all-gather of JSON bytes) and written as one JSON item by process 0, inside the same atomic Orbax
save, so there is no window in which a checkpoint exists without its data position. On restore each process takes
its own entry; with a different process count the exact position cannot carry over, and every process continues
from the first row group none of the old processes had reached (said so in the log). All of it lives in the
"data state" section below.

RNG: the training loop draws no random numbers after initialisation; the seed is in meta's run flags, and anything
stochastic later derives its key from (seed, step), so there is no generator state to save.

Using a checkpoint (nanojax.load, listing, export, `python -m nanojax.checkpoint ls|show|export`) is nanojax/models.py.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from filelock import FileLock, Timeout

from nanojax.common import UserError, base_dir, git, print0

STAGES = ("base", "mid", "sft", "rl")
ITEMS = ("params", "opt_state", "data_state", "meta")
REQUIRED = ("params", "meta")  # enough to load a model
RESUMABLE = ("params", "opt_state", "meta")  # and data_state (older checkpoints kept the loader state in meta)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
FILES = "nanojax-files.json"  # every file of a finished save and its size, written once the save is complete


class CheckpointWriteError(UserError):
    """A save could not be written (disk full, read-only, no permission): the training loop stops on this one line,
    and the checkpoints saved before it are intact."""

# ----------------------------------------------------------------------------------------------------------------------
# Where checkpoints are, and which of them are complete.

def stage_dir(stage: str) -> Path:
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    return base_dir() / "checkpoints" / stage


def tag_dir(stage: str, tag: str) -> Path:
    return stage_dir(stage) / tag


def complete_steps(directory: Path) -> list[int]:
    """Steps with a finished save: Orbax renames a save to its bare step number only once every item is written;
    `<step>.orbax-checkpoint-tmp` (an interrupted save) does not count."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def interrupted_saves(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TMP_SUFFIX in p.name) if directory.is_dir() else []


def tags(stage: str) -> list[str]:
    """Tags with at least one complete step, smallest depth first (nanochat picks the largest)."""
    d = stage_dir(stage)
    found = [p.name for p in d.iterdir() if p.is_dir() and complete_steps(p)] if d.is_dir() else []
    return sorted(found, key=tag_order)


def tag_order(tag: str):
    return (int(tag[1:]) if tag[:1] == "d" and tag[1:].isdigit() else -1, tag)


def _describe_all() -> str:
    found = [f"{s}/{t} (steps {steps_text(complete_steps(tag_dir(s, t)))})" for s in STAGES for t in tags(s)]
    return "; found: " + ", ".join(found) if found else "; there are no checkpoints at all yet"


def steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)})"


def find(stage: str, tag: str | None = None, step: int | None = None) -> tuple[str, int]:
    """(tag, step) of a checkpoint: by default the largest depth tag and its latest step, as nanochat picks."""
    available = tags(stage)
    if not available:
        how = (f"train that stage first (python -m launch.{stage})" if importlib.util.find_spec(f"launch.{stage}")
               else f"nanojax cannot train the {stage} stage yet")
        raise UserError(f"no {stage} checkpoints under {stage_dir(stage)}; {how}{_describe_all()}")
    tag = tag or available[-1]
    if tag not in available:
        raise UserError(f"no {stage} checkpoint with tag {tag!r}; found tags: {', '.join(available)}")
    steps = complete_steps(tag_dir(stage, tag))
    step = steps[-1] if step is None else step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise UserError(f"step must be an integer (one of {steps_text(steps)}), got {step!r}")
    if step not in steps:
        raise UserError(f"{stage}/{tag} has no step {step}; found steps: {steps_text(steps)}")
    return tag, step


def trained_with(fingerprint: str) -> list[str]:
    """"stage/tag/step" of every complete checkpoint whose meta names this tokenizer fingerprint."""
    found = []
    for stage in STAGES:
        for tag in tags(stage):
            for step in complete_steps(tag_dir(stage, tag)):
                try:
                    meta = json.loads((tag_dir(stage, tag) / str(step) / "meta" / "metadata").read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(meta, dict) and meta.get("tokenizer") == fingerprint:
                    found.append(f"{stage}/{tag}/{step}")
    return found


def missing_items(step_path: Path, needed=REQUIRED) -> list[str]:
    return [name for name in needed if not (step_path / name).is_dir()]


def check_items(step_path: Path, needed=REQUIRED):
    missing = missing_items(step_path, needed)
    if missing:
        found = sorted(p.name for p in step_path.iterdir()) if step_path.is_dir() else []
        raise UserError(f"checkpoint {step_path} is damaged: missing {', '.join(missing)} (found: "
                        f"{', '.join(found) or 'nothing'}); delete that directory to use an earlier step")


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def record_files(step_path: Path):
    """Write FILES: the size of every file of a complete save, so that a truncated or missing one is found by a stat."""
    sizes = {str(f.relative_to(step_path)): f.stat().st_size for f in sorted(step_path.rglob("*"))
             if f.is_file() and f.name != FILES}
    tmp = step_path / f".{FILES}.tmp"
    tmp.write_text(json.dumps(sizes))
    tmp.replace(step_path / FILES)


def damaged_file(step_path: Path, items=ITEMS) -> str | None:
    """The first file of `items` that is missing or has another size than when it was saved (None: all as saved, or
    a save from before FILES was written, which cannot be checked this way)."""
    try:
        sizes = json.loads((step_path / FILES).read_text())
    except (OSError, ValueError):
        return None
    for name, size in sizes.items():
        if name.split("/", 1)[0] not in items:
            continue
        try:
            now = (step_path / name).stat().st_size
        except FileNotFoundError:
            return f"its file {name} is missing"
        if now != size:
            return f"its file {name} is truncated ({now:,} of {size:,} bytes)" if now < size else \
                f"its file {name} has {now:,} bytes, {size:,} when saved"
    return None


def read_meta(step_path: Path) -> dict:
    return _read_json_item(step_path, "meta")


def _read_json_item(step_path: Path, item: str) -> dict:
    path = step_path / item / "metadata"  # where Orbax's JsonSave puts it
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        check_items(step_path, (item,))
        raise UserError(f"checkpoint {step_path} is damaged: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {step_path} is damaged: {path} is not valid JSON ({e})") from None



def git_commit() -> str | None:
    """The commit of the code that trained a checkpoint ("+dirty" if it had local changes), when run from a checkout."""
    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return None
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ----------------------------------------------------------------------------------------------------------------------
# Data state: every process's loader position, gathered into one JSON item before a save (data_state_item), read
# back (read_data_state) and one entry taken by each process (own_loader_state).

def data_state_item(loader_state):
    """The data_state item of a save: every process's state, in process order. Every process must call it."""
    return ocp.args.JsonSave({"num_processes": jax.process_count(), "processes": gather_process_states(loader_state)})


def read_data_state(path: Path, meta: dict, needed: bool) -> dict | None:
    """A checkpoint's data_state ({"num_processes", "processes"}); None if absent and not `needed` (to resume)."""
    if (path / "data_state").is_dir():
        return _read_json_item(path, "data_state")
    if "loader_state" in meta:  # written before data_state was its own item: one process
        return {"num_processes": 1, "processes": [meta["loader_state"]]}
    if needed:
        raise UserError(f"checkpoint {path} is damaged: missing data_state, so the data position is unknown; "
                        f"delete that directory to resume from an earlier step")
    return None


def gather_process_states(state) -> list:
    """Every process's JSON-able state, in process order, on every process."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, :sizes[i]]).decode()) for i in range(len(sizes))]


def own_loader_state(data_state: dict | None):
    """This process's loader state from a checkpoint's data_state item (None: start the data from the top)."""
    if not data_state:
        return None
    states = data_state.get("processes") or []
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if not states or not all(isinstance(s, dict) and "group" in s for s in states):
        print0(f"note: the checkpoint's data position was saved by {len(states)} process(es) and is not a packed-"
               f"loader state; the data restarts from the beginning")
        return None
    # Another process count slices the row groups differently: skip to the first group nobody had reached yet.
    epoch = max(s["epoch"] for s in states)
    group = max(s["group"] for s in states if s["epoch"] == epoch) + 1
    print0(f"note: the checkpoint was saved by {len(states)} process(es), this run has {jax.process_count()}: the "
           f"data position cannot carry over exactly; continuing from row group {group} of epoch {epoch}")
    return {"epoch": epoch, "group": group, "doc": 0, "buffer": []}


# ----------------------------------------------------------------------------------------------------------------------
# Restoring arrays onto a mesh.

def _targets(abstract, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's own read tasks: when one read of a damaged
    checkpoint fails, its siblings may fail after Orbax's loop has stopped, and asyncio logs each one at collection.
    Only reads (`async_deserialize` coroutines): an abandoned save would still be logged."""

    def filter(self, record):
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "/orbax/checkpoint/" in message
                    and "deserialize() " in message)


class _FailedSaveLogFilter(logging.Filter):
    """Drops Orbax's own error logs of a failed background save (one traceback per thread and item, hundreds of
    lines): the same error reaches the training loop from wait_until_finished, as one line (CheckpointWriteError)."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and "/orbax/checkpoint/" in record.pathname)


def _quiet_failed_saves():
    absl_log = logging.getLogger("absl")
    if not any(isinstance(f, _FailedSaveLogFilter) for f in absl_log.filters):
        absl_log.addFilter(_FailedSaveLogFilter())
    _quiet_abandoned_reads()  # the unraisable "Event loop is closed" comes after failed writes as well


def _write_cause(e: BaseException) -> str:
    """The operating system's reason inside an Orbax/tensorstore error ("No space left on device"), else its first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"os_error_code='(\d+)'", str(e))
    if match:
        return os.strerror(int(match.group(1)))
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {first[:300]}"


def _quiet_abandoned_reads():
    """After a failed restore, reads still in flight report through two channels under the one-line error: callbacks
    into Orbax's closed loop raise "Event loop is closed" (unraisable), and sibling read tasks that failed too are
    logged by asyncio. Drop exactly those; installed once, before restoring, since they can come before the error
    reaches us and long after it. Each is checked on its own: another hook (pytest's, per test) may replace ours."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "nanojax_quiets_abandoned_reads", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.nanojax_quiets_abandoned_reads = True
    sys.unraisablehook = hook


def _restore_tree(step_path: Path, item: str, target):
    """One Orbax pytree item onto the shardings carried by `target`'s ShapeDtypeStructs (any mesh)."""
    check_items(step_path, (item,))
    bad = damaged_file(step_path, (item,))
    if bad:
        raise UserError(f"checkpoint {step_path} is damaged: {bad}; delete that directory to use an earlier step")
    _quiet_abandoned_reads()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(step_path / item, target)
    except Exception as e:  # Orbax/tensorstore raise many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"checkpoint {step_path} is damaged: cannot read its {item} ({type(e).__name__}: "
                        f"{first[:300]}); delete that directory to use an earlier step") from e


def restore_params(step_path: Path, model_cfg, mesh=None):
    """The params of a checkpoint, laid out for `mesh` (a Mesh or a --mesh spec; default: one device, without a mesh,
    as arrays made on that device are: jit then compiles one program for both)."""
    from nanojax import gpt
    from nanojax import mesh as meshlib

    abstract = gpt.abstract_params(model_cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return _restore_tree(step_path, "params", _targets(abstract, jax.tree.map(lambda _: device, abstract)))
    if isinstance(mesh, (str, int)):
        mesh = meshlib.make_mesh(str(mesh))
    shardings = meshlib.shardings(gpt.param_axes(model_cfg), mesh, abstract)
    return _restore_tree(step_path, "params", _targets(abstract, shardings))


# ----------------------------------------------------------------------------------------------------------------------
# The writer and resumer used by the training loop.

class StageCheckpoints:
    """Checkpoints of one stage and tag: async saves, keep-last-K, and the checks around starting or resuming."""

    def __init__(self, stage: str, tag: str, keep: int = 2):
        if keep < 1:
            raise UserError(f"--keep {keep}: keep at least 1 checkpoint")
        self.stage, self.tag, self.keep = stage, tag, keep
        self.directory = tag_dir(stage, tag)
        self._manager = None
        self._lock = None
        self._in_flight = None  # the step of the save in flight
        self._failed = None  # the step of a save that failed

    def claim(self):
        """One training run per stage and tag at a time: a second would save the same steps and rotate the first's
        checkpoints away. The lock sits beside the tag's folder (--overwrite deletes the folder); the OS drops it when
        the process ends, kill -9 included."""
        if jax.process_index() != 0 or self._lock is not None:
            return
        lock = FileLock(str(self.directory.parent / f".{self.tag}.lock"))
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
        except Timeout:  # (an OSError too: first)
            raise UserError(f"another run is training {self.stage}/{self.tag} now (it holds {lock.lock_file}); wait "
                            f"for it to finish or stop it first") from None
        except OSError as e:  # a read-only or full disk, no permission: nothing can be saved there
            raise UserError(f"cannot write checkpoints under {self.directory.parent} ({e.strerror or e}); set "
                            f"NANOJAX_BASE_DIR to a writable directory with room") from None
        self._lock = lock

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:  # made on first use, after start_fresh() had its say about old checkpoints
            self._manager = ocp.CheckpointManager(
                self.directory.absolute(), item_names=ITEMS,
                options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, cleanup_tmp_directories=True))
        return self._manager

    def steps(self) -> list[int]:
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    # -- starting ------------------------------------------------------------------------------------------------------

    def start_fresh(self, overwrite: bool = False):
        """A fresh run never writes over old work silently: refuse, or with overwrite remove this tag's checkpoints."""
        steps = self.steps()
        if not steps:
            return
        if not overwrite:
            raise UserError(f"{self.directory} already has checkpoints (steps {steps_text(steps)}); pass --resume to "
                            f"continue from step {steps[-1]}, or --overwrite to delete them and start over")
        if jax.process_index() == 0:
            shutil.rmtree(self.directory)
        _barrier("nanojax-overwrite")
        print0(f"--overwrite: removed {len(steps)} old checkpoint(s) from {self.directory}")

    def resume_point(self, model_cfg, tokenizer) -> tuple[int, dict]:
        """(step, meta) of the latest complete checkpoint, checked to be intact and of this model and tokenizer."""
        steps = self.steps()
        if not steps:
            others = [t for t in tags(self.stage) if t != self.tag]
            found = (f"; {self.stage} has checkpoints under tag(s) {', '.join(others)} (another --depth?)" if others
                     else "")
            leftovers = interrupted_saves(self.directory)
            if leftovers:
                found += f"; only interrupted saves: {', '.join(leftovers)}"
            raise UserError(f"--resume: no complete checkpoint under {self.directory}{found}; drop --resume to start "
                            f"fresh")
        step = steps[-1]
        path = self.step_path(step)
        check_items(path, RESUMABLE)
        meta = read_meta(path)
        saved = meta.get("model_config", {})
        mine = model_cfg.to_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            text = ", ".join(f"{k} {a} (saved) vs {b} (now)" for k, (a, b) in diff.items())
            raise UserError(f"--resume: checkpoint {path} is a different model: {text}")
        if meta.get("tokenizer") and meta["tokenizer"] != tokenizer.fingerprint():
            raise UserError(f"--resume: checkpoint {path} was trained with another tokenizer (fingerprint "
                            f"{meta['tokenizer']}, the current one is {tokenizer.fingerprint()})")
        return step, meta

    def restore(self, step: int, params_target, opt_target=None) -> tuple:
        """(params, opt_state or None, meta, data_state or None), onto the shardings the targets carry."""
        path = self.step_path(step)
        params = _restore_tree(path, "params", params_target)
        opt_state = _restore_tree(path, "opt_state", opt_target) if opt_target is not None else None
        meta = read_meta(path)
        return params, opt_state, meta, read_data_state(path, meta, needed=opt_target is not None)

    def restore_for_resume(self, step: int, abstract_params, param_sh, opt_abstract, opt_sh) -> tuple:
        return self.restore(step, _targets(abstract_params, param_sh), _targets(opt_abstract, opt_sh))

    # -- saving --------------------------------------------------------------------------------------------------------

    def save(self, step: int, params, opt_state, meta: dict, loader_state=None):
        """Start an async save (after the previous one finished). Every process must call this at the same step.
        A save that cannot be written raises CheckpointWriteError: here when the disk has no room for it, else at the
        next save, wait() or close()."""
        self._settle()  # one save in flight at a time
        self._check_space(step, [params, opt_state])
        items = {"params": ocp.args.StandardSave(params), "data_state": data_state_item(loader_state),
                 "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        _quiet_failed_saves()
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._write_error(step, e) from None
        self._in_flight = step

    def _check_space(self, step: int, trees):
        """Refuse before writing when the file system has less room than a save takes: the size of the latest
        checkpoint on disk, else the arrays' bytes (an upper bound: Orbax compresses). Every process checks, so on
        shared storage all of them stop together."""
        latest = self.latest_step()
        try:
            need = dir_size(self.step_path(latest)) if latest is not None else \
                sum(x.nbytes for x in jax.tree.leaves(trees) if hasattr(x, "nbytes"))
        except FileNotFoundError:  # rotated away meanwhile
            return
        where = next(p for p in (self.directory, *self.directory.parents) if p.exists())
        free = shutil.disk_usage(where).free
        if free < need:
            raise self._write_error(step, None, f"no space left on the device (it has {_bytes(free)} free, a "
                                                f"checkpoint takes about {_bytes(need)})")

    def _write_error(self, step: int, e: BaseException | None, cause: str | None = None) -> CheckpointWriteError:
        cause = cause or _write_cause(e)
        self._failed = step
        self._remove_failed()
        latest = self.latest_step()
        kept = (f"the latest complete checkpoint, {self.step_path(latest)}, is intact: continue from it with "
                f"--resume" if latest is not None and latest != step else "no earlier checkpoint of this run exists")
        return CheckpointWriteError(f"cannot save checkpoint {self.directory}/{step}: {cause}; {kept} once "
                                    f"{self.directory} is writable and has room")

    def _remove_failed(self):
        """What a failed save left (again at close: Orbax's threads may still be writing into it the first time)."""
        if self._failed is not None and jax.process_index() == 0:
            shutil.rmtree(self.directory / f"{self._failed}{TMP_SUFFIX}", ignore_errors=True)

    def _settle(self):
        """Wait for the save in flight; record its files' sizes, or turn its failure into one line."""
        step, self._in_flight = self._in_flight, None
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from None
        if step is not None and jax.process_index() == 0 and self.step_path(step).is_dir():
            try:
                record_files(self.step_path(step))
            except OSError:
                pass  # the save itself is complete; only its size check is lost

    def poll(self):
        """Cheap, for every step: once the save in flight has ended, settle it, so a save that failed in the background
        stops the run now rather than at the next save. One process only (settling may be collective on several)."""
        if self._in_flight is not None and jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self._settle()

    def wait(self):
        self._settle()

    def close(self):
        try:
            self._settle()
        finally:
            if self._manager is not None:
                with contextlib.suppress(Exception):  # after a failed save, Orbax may raise again here
                    self._manager.close()
                self._manager = None
            self._remove_failed()
            if self._lock is not None:  # (an early error skips this: the lock goes with the object, or the process)
                self._lock.release()
                self._lock = None


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)



if __name__ == "__main__":  # the documented command; the CLI lives with the code it shows
    from nanojax.models import main
    main(sys.argv[1:])
