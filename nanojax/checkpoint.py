"""Stage checkpoints on Orbax, and the REPL's window onto them.

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
from the first row group none of the old processes had reached (said so in the log).

RNG: the training loop draws no random numbers after initialisation; the seed is in meta's run flags, and anything
stochastic later derives its key from (seed, step), so there is no generator state to save.

    python -m nanojax.checkpoint ls
    python -m nanojax.checkpoint show base [--tag d20] [--step 2000]
    python -m nanojax.checkpoint export sft --out exported/      # safetensors + config.json + tokenizer/, no JAX needed
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from filelock import FileLock, Timeout

from nanojax.common import ArgumentParser, UserError, base_dir, cli, format_duration, git, print0

STAGES = ("base", "mid", "sft", "rl")
ITEMS = ("params", "opt_state", "data_state", "meta")
REQUIRED = ("params", "meta")  # enough to load a model
RESUMABLE = ("params", "opt_state", "meta")  # and data_state (older checkpoints kept the loader state in meta)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
EXPORT_FORMAT = "nanojax-export-1"


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
    return sorted(found, key=_tag_order)


def _tag_order(tag: str):
    return (int(tag[1:]) if tag[:1] == "d" and tag[1:].isdigit() else -1, tag)


def _describe_all() -> str:
    found = [f"{s}/{t} (steps {_steps_text(complete_steps(tag_dir(s, t)))})" for s in STAGES for t in tags(s)]
    return "; found: " + ", ".join(found) if found else "; there are no checkpoints at all yet"


def _steps_text(steps: list[int]) -> str:
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
        raise UserError(f"step must be an integer (one of {_steps_text(steps)}), got {step!r}")
    if step not in steps:
        raise UserError(f"{stage}/{tag} has no step {step}; found steps: {_steps_text(steps)}")
    return tag, step


def missing_items(step_path: Path, needed=REQUIRED) -> list[str]:
    return [name for name in needed if not (step_path / name).is_dir()]


def check_items(step_path: Path, needed=REQUIRED):
    missing = missing_items(step_path, needed)
    if missing:
        found = sorted(p.name for p in step_path.iterdir()) if step_path.is_dir() else []
        raise UserError(f"checkpoint {step_path} is damaged: missing {', '.join(missing)} (found: "
                        f"{', '.join(found) or 'nothing'}); delete that directory to use an earlier step")


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


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def git_commit() -> str | None:
    """The commit of the code that trained a checkpoint ("+dirty" if it had local changes), when run from a checkout."""
    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return None
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ----------------------------------------------------------------------------------------------------------------------
# Per-process data state: gathered into one JSON item before a save, one entry taken back on restore.

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
    _quiet_abandoned_reads()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(step_path / item, target)
    except Exception as e:  # Orbax/tensorstore raise many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"checkpoint {step_path} is damaged: cannot read its {item} ({type(e).__name__}: "
                        f"{first[:300]}); delete that directory to use an earlier step") from e


def restore_params(step_path: Path, model_cfg, mesh=None):
    """The params of a checkpoint, laid out for `mesh` (a Mesh or a --mesh spec; default: one device)."""
    from nanojax import gpt
    from nanojax import mesh as meshlib

    if mesh is None or isinstance(mesh, (str, int)):
        mesh = meshlib.make_mesh(str(mesh or "1"))
    abstract = gpt.abstract_params(model_cfg)
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

    def claim(self):
        """One training run per stage and tag at a time: a second would save the same steps and rotate the first's
        checkpoints away. The lock sits beside the tag's folder (--overwrite deletes the folder); the OS drops it when
        the process ends, kill -9 included."""
        if jax.process_index() != 0 or self._lock is not None:
            return
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.directory.parent / f".{self.tag}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"another run is training {self.stage}/{self.tag} now (it holds {lock.lock_file}); wait "
                            f"for it to finish or stop it first") from None
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
            raise UserError(f"{self.directory} already has checkpoints (steps {_steps_text(steps)}); pass --resume to "
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
        if (path / "data_state").is_dir():
            data_state = _read_json_item(path, "data_state")
        elif "loader_state" in meta:  # written before data_state was its own item: one process
            data_state = {"num_processes": 1, "processes": [meta["loader_state"]]}
        elif opt_target is not None:
            raise UserError(f"checkpoint {path} is damaged: missing data_state, so the data position is unknown; "
                            f"delete that directory to resume from an earlier step")
        else:
            data_state = None
        return params, opt_state, meta, data_state

    def restore_for_resume(self, step: int, abstract_params, param_sh, opt_abstract, opt_sh) -> tuple:
        return self.restore(step, _targets(abstract_params, param_sh), _targets(opt_abstract, opt_sh))

    # -- saving --------------------------------------------------------------------------------------------------------

    def save(self, step: int, params, opt_state, meta: dict, loader_state=None):
        """Start an async save (after the previous one finished). Every process must call this at the same step."""
        self.manager.wait_until_finished()  # one save in flight at a time
        data_state = {"num_processes": jax.process_count(), "processes": gather_process_states(loader_state)}
        items = {"params": ocp.args.StandardSave(params), "data_state": ocp.args.JsonSave(data_state),
                 "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self):
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self):
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
        if self._lock is not None:  # (an early error skips this: the lock goes with the object, or the process)
            self._lock.release()
            self._lock = None


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------------------------------
# The REPL: nanojax.load(stage) -> Model.

@dataclasses.dataclass(repr=False)
class Model:
    """A checkpoint loaded for use: `.params` is a nested dict by name (m.params["blocks"]["attn_q"])."""
    stage: str
    tag: str
    step: int
    path: Path
    config: object  # GPTConfig
    params: dict
    tokenizer: object
    meta: dict
    mesh: object = None  # the Mesh the params are laid out on; None: one device
    _engine: object = None

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

    def __repr__(self):
        c = self.config
        lines = [f"nanojax.Model {self.stage}/{self.tag} step {self.step}"
                 f"{' (final)' if self.meta.get('final') else ''}  [{self.path}]",
                 f"  params:  {self.num_params():,}  " + "  ".join(
                     f"{name} {tuple(x.shape)}" for name, x in _named_leaves(self.params)),
                 f"  config:  depth {c.depth}, model_dim {c.model_dim}, heads {c.n_head} (kv {c.n_kv_head}) x "
                 f"{c.head_dim}, vocab {c.vocab_size:,}, max_seq_len {c.max_seq_len}",
                 f"  metrics: {_metrics_text(self.meta) or 'none recorded'}"]
        return "\n".join(lines)

    @property
    def engine(self):
        """nanojax.engine.Engine over these params, made on first use."""
        if self._engine is None:
            try:
                from nanojax.engine import Engine
            except ImportError as e:
                raise UserError(f"generation needs nanojax.engine, which could not be imported ({e})") from None
            kwargs = {"mesh": self.mesh} if self.mesh is not None else {}
            self._engine = Engine(self.params, self.config, self.tokenizer, **kwargs)
        return self._engine

    def _complete(self, prompt_ids: list[int], max_tokens: int, **sampling) -> list[int]:
        sequences, _ = self.engine.generate_batch(prompt_ids, num_samples=1, max_tokens=max_tokens, **sampling)
        out = [int(t) for t in sequences[0]]
        return out[len(prompt_ids):] if out[:len(prompt_ids)] == list(prompt_ids) else out

    def generate(self, prompt, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0, top_k=None,
                 top_p=None) -> str:
        """Continue `prompt` (text, or token ids) and return the new text."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, prepend=self.tokenizer.bos_id)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = list(prompt)
        else:
            raise UserError(f"prompt must be text or a list of token ids, got {prompt!r}")
        return self.tokenizer.decode(self._complete(ids, max_tokens, temperature=temperature, top_k=top_k,
                                                    top_p=top_p, seed=seed))

    def chat(self, messages, max_tokens: int = 256, temperature: float = 0.6, seed: int = 0, top_k=50,
             top_p=None) -> str:
        """The assistant's reply to a conversation: a list of {"role", "content"} dicts, or a string (one user turn)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self.tokenizer.render_for_completion(messages)
        out = self._complete(ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stops = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.bos_id}
        end = next((i for i, t in enumerate(out) if t in stops), len(out))
        return self.tokenizer.decode(out[:end])


def _named_leaves(tree, prefix=""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _named_leaves(value, name + ".")
        else:
            yield name, value


def _metrics_text(meta: dict) -> str:
    m = meta.get("metrics") or {}
    parts = [f"loss {m['loss']:.4f}" if m.get("loss") is not None else None,
             f"val bpb {m['val_bpb']:.4f}" if m.get("val_bpb") is not None else None,
             f"min val bpb {m['min_val_bpb']:.4f}" if m.get("min_val_bpb") is not None else None,
             f"train time {format_duration(m['train_time'])}" if m.get("train_time") else None]
    return ", ".join(p for p in parts if p)


def _tokenizer_for(meta: dict, path: Path):
    from tokenizer import get_tokenizer

    tok = get_tokenizer()
    saved = meta.get("tokenizer")
    if saved and saved != tok.fingerprint():
        raise UserError(f"checkpoint {path} was trained with tokenizer {saved}, but the tokenizer under "
                        f"{base_dir() / 'tokenizer'} is {tok.fingerprint()} (retrained since?)")
    return tok


def load(stage: str = "sft", tag: str | None = None, step: int | None = None, *, mesh=None) -> Model:
    """Load a stage's checkpoint for use: by default the largest depth tag and its latest step. `mesh`: a Mesh or a
    --mesh spec to lay the params out on (default: one device)."""
    for attempt in range(3):
        found_tag, found_step = find(stage, tag, step)
        try:
            return _load_step(stage, found_tag, found_step, mesh)
        except UserError:
            # A run training this stage keeps only its last --keep steps: the one being read may have been deleted
            # under us (it is not damaged). Take the newest again, or say so.
            if not _superseded(stage, found_tag, found_step):
                raise
            if step is not None or attempt == 2:
                raise UserError(f"{stage}/{found_tag} step {found_step} was deleted while it was read: a running job "
                                f"keeps only its latest checkpoints; steps now: "
                                f"{_steps_text(complete_steps(tag_dir(stage, found_tag)))}") from None


def _superseded(stage: str, tag: str, step: int) -> bool:
    """The step is gone, or a newer complete one exists (a running job saved it and may be rotating this one out)."""
    steps = complete_steps(tag_dir(stage, tag))
    return step not in steps or steps[-1] > step


def _load_step(stage: str, tag: str, step: int, mesh) -> Model:
    from nanojax.config import GPTConfig

    path = tag_dir(stage, tag) / str(step)
    check_items(path)
    meta = read_meta(path)
    if "model_config" not in meta:
        raise UserError(f"checkpoint {path} is damaged: its meta has no model_config (keys: {sorted(meta)})")
    cfg = GPTConfig.from_dict(meta["model_config"])
    tokenizer = _tokenizer_for(meta, path)
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        from nanojax import mesh as meshlib
        mesh = meshlib.make_mesh(str(mesh))
    params = restore_params(path, cfg, mesh)
    return Model(stage=stage, tag=tag, step=step, path=path, config=cfg, params=params, tokenizer=tokenizer,
                 meta=meta, mesh=mesh if mesh is not None and mesh.size > 1 else None)


def list_checkpoints(stage: str | None = None) -> list[dict]:
    """One row per checkpoint step: stage, tag, step, path, bytes, problem (None if intact), metrics."""
    rows = []
    for s in ([stage] if stage else STAGES):
        d = stage_dir(s)
        for t in sorted((p.name for p in d.iterdir() if p.is_dir()), key=_tag_order) if d.is_dir() else []:
            for step in complete_steps(d / t):
                path = d / t / str(step)
                missing = missing_items(path)  # opt_state / data_state are only needed to resume
                meta = {}
                if "meta" not in missing:
                    try:
                        meta = read_meta(path)
                    except UserError as e:
                        missing.append(str(e).split(": ", 1)[-1])
                with contextlib.suppress(FileNotFoundError):
                    row = {"stage": s, "tag": t, "step": step, "path": str(path), "bytes": dir_size(path),
                           "problem": f"damaged: missing {', '.join(missing)}" if missing else None,
                           "final": bool(meta.get("final")), "metrics": meta.get("metrics") or {}}
                    if path.is_dir():  # not deleted meanwhile by a running job's keep-last-K rotation
                        rows.append(row)
            for name in interrupted_saves(d / t):
                with contextlib.suppress(FileNotFoundError):  # a save in progress that finished meanwhile
                    rows.append({"stage": s, "tag": t, "step": None, "path": str(d / t / name),
                                 "bytes": dir_size(d / t / name), "problem": "interrupted save (ignored)",
                                 "final": False, "metrics": {}})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Export: plain files other tools read without JAX.

def export(stage: str, out, tag: str | None = None, step: int | None = None) -> Path:
    """Write model.safetensors (fp32, names like "blocks.attn_q", layers stacked on axis 0, weights laid out (in, out)
    so y = x @ W), config.json and tokenizer/ into `out`, atomically: all of it or nothing."""
    from safetensors.numpy import save_file

    from nanojax import gpt

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pick a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; pick a new directory or remove it")
    model = load(stage, tag, step)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create a directory there ({e.strerror or e})") from None
        tensors = {name: np.ascontiguousarray(np.asarray(x)) for name, x in _named_leaves(model.params)}
        axes = dict(_named_leaves(gpt.param_axes(model.config)))
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": EXPORT_FORMAT, "stage": stage, "tag": model.tag, "step": str(model.step)})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors writes 0600; the other files are plain 0644
        config = {
            "format": EXPORT_FORMAT,
            "model_config": model.config.to_dict(),
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype), "axes": list(axes[name])}
                        for name, t in tensors.items()},
            "layout": "layers stacked on axis 0 of blocks.*; weights are (in, out), applied as x @ W; untied wte and "
                      "lm_head; logits soft-capped softcap * tanh(logits / softcap)",
            "stage": stage, "tag": model.tag, "step": model.step, "tokenizer": model.tokenizer.fingerprint(),
            "metrics": model.meta.get("metrics") or {}, "git_commit": model.meta.get("git_commit"),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.tokenizer.save(tmp / "tokenizer")
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# CLI

def _print_ls(rows):
    if not rows:
        print(f"no checkpoints under {base_dir() / 'checkpoints'}")
        return
    groups = {}
    for r in rows:
        groups.setdefault((r["stage"], r["tag"]), []).append(r)
    print(f"{'stage':6} {'tag':6} {'steps':24} {'latest':>7} {'size':>9}  final metrics")
    for (stage, tag), rs in groups.items():
        good = [r for r in rs if r["step"] is not None]
        latest = good[-1] if good else None
        steps = _steps_text([r["step"] for r in good]) or "-"
        size = format_bytes(latest["bytes"]) if latest else "-"
        metrics = _metrics_text({"metrics": latest["metrics"]}) if latest else ""
        print(f"{stage:6} {tag:6} {steps:24} {latest['step'] if latest else '-':>7} {size:>9}  "
              f"{'(final) ' if latest and latest['final'] else ''}{metrics}")
        for r in rs:
            if r["problem"]:
                print(f"{'':14}{Path(r['path']).name}: {r['problem']}")


def _print_show(stage: str, tag: str | None, step: int | None):
    tag, step = find(stage, tag, step)
    path = tag_dir(stage, tag) / str(step)
    rows = [r for r in list_checkpoints(stage) if r["tag"] == tag]
    check_items(path)
    meta = read_meta(path)
    run = meta.get("run_config", {})
    print(f"{stage}/{tag} step {step}{' (final)' if meta.get('final') else ''}: {path}")
    def one(r):
        if r["step"] is None:
            return f"{Path(r['path']).name} ({r['problem']})"
        return f"{r['step']} ({format_bytes(r['bytes'])}{', ' + r['problem'] if r['problem'] else ''})"

    print("steps:   " + ", ".join(map(one, rows)))
    print("model:   " + ", ".join(f"{k} {v}" for k, v in meta.get("model_config", {}).items()))
    if meta.get("num_params"):
        print(f"params:  {meta['num_params']:,}")
    if meta.get("num_iterations"):
        print(f"run:     step {meta.get('step')} of {meta['num_iterations']}, mesh {run.get('mesh')}, "
              f"{run.get('total_batch_size', 0):,} tokens/step, device batch {run.get('device_batch_size')}, "
              f"seed {run.get('seed')}")
    if run:
        print("flags:   " + " ".join(_flag(k, v) for k, v in run.items() if v is not None and v is not False))
    print(f"metrics: {_metrics_text(meta) or 'none recorded'}")
    print(f"tokenizer {meta.get('tokenizer')}, git {meta.get('git_commit')}, saved {meta.get('saved_at')}")


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


@cli
def main(argv=None):
    parser = ArgumentParser(prog="python -m nanojax.checkpoint", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list every stage's checkpoints")
    for name in ("show", "export"):
        p = sub.add_parser(name, help="describe one checkpoint" if name == "show" else "write safetensors + config")
        p.add_argument("stage", choices=STAGES, help="the stage: " + ", ".join(STAGES))
        p.add_argument("--tag", default=None, help="default: the largest depth tag")
        p.add_argument("--step", type=int, default=None, help="default: the latest step")
        if name == "export":
            p.add_argument("--out", required=True, help="a new directory")
    args = parser.parse_args(argv)
    if args.command == "ls":
        _print_ls(list_checkpoints())
    elif args.command == "show":
        _print_show(args.stage, args.tag, args.step)
    else:
        out = export(args.stage, args.out, args.tag, args.step)
        print(f"exported {args.stage} to {out}: model.safetensors, config.json, tokenizer/")


if __name__ == "__main__":
    main(sys.argv[1:])
