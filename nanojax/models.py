"""Checkpoints as models to use: the REPL's `nanojax.load`, listing, export, and the checkpoint command line.

    import nanojax
    m = nanojax.load("sft")          # m.config, m.params, m.tokenizer, m.meta, m.generate("..."), m.chat("...")
    nanojax.list_checkpoints()       # one row per step, damaged ones flagged

    python -m nanojax.checkpoint ls
    python -m nanojax.checkpoint show base [--tag d20] [--step 2000]
    python -m nanojax.checkpoint export sft --out exported/      # safetensors + config.json + tokenizer/, no JAX needed

Where checkpoints live and how they are saved and resumed is nanojax/checkpoint.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from nanojax.checkpoint import (STAGES, check_items, complete_steps, damaged_file, dir_size, find, interrupted_saves,
                                missing_items, read_meta, restore_params, stage_dir, steps_text, tag_dir, tag_order)
from nanojax.common import ArgumentParser, UserError, base_dir, cli, format_duration

EXPORT_FORMAT = "nanojax-export-1"


# ----------------------------------------------------------------------------------------------------------------------
# Sizes, for listings.

def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


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
                                f"{steps_text(complete_steps(tag_dir(stage, found_tag)))}") from None


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
    mesh = mesh if mesh is not None and mesh.size > 1 else None  # one device: no mesh (restore_params)
    params = restore_params(path, cfg, mesh)
    return Model(stage=stage, tag=tag, step=step, path=path, config=cfg, params=params, tokenizer=tokenizer,
                 meta=meta, mesh=mesh)


def list_checkpoints(stage: str | None = None) -> list[dict]:
    """One row per checkpoint step: stage, tag, step, path, bytes, problem (None if intact), metrics."""
    rows = []
    for s in ([stage] if stage else STAGES):
        d = stage_dir(s)
        for t in sorted((p.name for p in d.iterdir() if p.is_dir()), key=tag_order) if d.is_dir() else []:
            for step in complete_steps(d / t):
                path = d / t / str(step)
                missing = missing_items(path)  # opt_state / data_state are only needed to resume
                problems = [f"missing {', '.join(missing)}"] if missing else []
                meta = {}
                if "meta" not in missing:
                    try:
                        meta = read_meta(path)
                    except UserError as e:
                        problems.append(str(e).split(": ", 1)[-1])
                problems += [damaged_file(path)] if damaged_file(path) else []  # a stat per file, no reading
                with contextlib.suppress(FileNotFoundError):
                    row = {"stage": s, "tag": t, "step": step, "path": str(path), "bytes": dir_size(path),
                           "problem": f"damaged: {'; '.join(problems)}" if problems else None,
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
        steps = steps_text([r["step"] for r in good]) or "-"
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
    problem = next((r["problem"] for r in rows if r["step"] == step), None)
    if problem:
        print(f"WARNING: {problem}")
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