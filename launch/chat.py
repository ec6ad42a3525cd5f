"""What the chat stages (mid, SFT, RL) share: their flags, the parent checkpoint they start from, and the settings
they inherit from it. Each stage's own file says what differs."""
from __future__ import annotations

import argparse
import dataclasses

from nanojax.common import ArgumentParser, UserError, print0

# The run flags every chat stage offers (the rest of TrainConfig keeps the stage's defaults).
RUN_FLAGS = ("mesh", "device_batch_size", "max_seq_len", "num_iterations", "embedding_lr", "unembedding_lr",
             "matrix_lr", "init_lr_frac", "eval_every", "sample_every", "save_every", "keep", "run", "seed", "dtype",
             "resume", "overwrite")
# Settings a chat stage takes from its parent's checkpoint unless the command line gives them.
INHERITED = ("depth", "n_kv_head", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens", "source")
HELPS = {
    "mesh": "device mesh: 1, 8, data:2,fsdp:4, ... (as launch.base)",
    "device_batch_size": "rows per device per micro-batch (default: the parent run's)",
    "max_seq_len": "tokens per row (default: the parent model's context)",
    "num_iterations": "optimizer steps; -1: one pass over the stage's data",
    "init_lr_frac": "every learning rate times this",
    "eval_every": "evaluate every N steps (and at step 0 and the end); -1: only at the end",
    "sample_every": "print a few greedy replies every N steps; -1: never",
    "save_every": "checkpoint every N steps; -1: only at the end (and on Ctrl-C/SIGTERM)",
    "keep": "checkpoints kept for this stage and depth",
    "run": "run directory under runs/ (default: <stage>-d<depth>)",
    "dtype": "compute dtype (default: bfloat16 on GPUs, float32 on CPU)",
    "resume": "continue the latest checkpoint of this stage exactly",
    "overwrite": "delete this stage's checkpoints for this depth and start over",
    "total_batch_size": "tokens per optimizer step (default: the parent run's)",
    "eval_tokens": "val tokens per evaluation (default: the parent run's, capped by the val set)",
}
# Chat prompts whose greedy replies show a chat stage's progress in the training log.
CHAT_SAMPLE_PROMPTS = ("Hello!", "Who are you?", "What is 23 * 17?", "Why is the sky blue?")


def parser(prog: str, doc: str, parents: tuple[str, ...]) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", dest="parent", default=parents[0], choices=parents,
                   help=f"the stage to start from (default: {parents[0]})")
    p.add_argument("-g", "--model-tag", default=None, help="the parent's tag, e.g. d20 (default: the largest depth)")
    p.add_argument("-s", "--model-step", type=int, default=None, help="the parent's step (default: its latest)")
    return p


def add_run_flags(p, defaults: dict, extra: tuple = ()):
    """RUN_FLAGS and the stage's `extra` TrainConfig fields as flags; inherited ones default to None ("not given")."""
    from nanojax.config import TrainConfig, add_dataclass_args

    add_dataclass_args(p, TrainConfig, {name: None for name in INHERITED} | defaults, only=RUN_FLAGS + extra,
                       helps=HELPS)


def parent_checkpoint(stage: str, tag: str | None, step: int | None):
    """(path, meta, GPTConfig) of the checkpoint a stage starts from; a missing one names the stage to run first."""
    from nanojax import checkpoint
    from nanojax.config import GPTConfig

    tag, step = checkpoint.find(stage, tag, step)
    path = checkpoint.tag_dir(stage, tag) / str(step)
    checkpoint.check_items(path)
    meta = checkpoint.read_meta(path)
    if "model_config" not in meta:
        raise UserError(f"checkpoint {path} is damaged: its meta has no model_config")
    return path, meta, GPTConfig.from_dict(meta["model_config"])


def run_config(args, stage_defaults: dict, parent_meta: dict, model_cfg):
    """TrainConfig from the flags given, else the parent's settings (INHERITED), else the stage's defaults."""
    from nanojax.config import TrainConfig

    saved = parent_meta.get("run_config", {})
    inherited = {name: saved.get(name) for name in INHERITED if saved.get(name) is not None}
    inherited.update(depth=model_cfg.depth, n_kv_head=model_cfg.n_kv_head)
    values = {**stage_defaults, **inherited}
    for field in dataclasses.fields(TrainConfig):
        if getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    if values.get("max_seq_len", model_cfg.max_seq_len) > model_cfg.max_seq_len:
        raise UserError(f"--max-seq-len {values['max_seq_len']}: the parent model was trained with a context of "
                        f"{model_cfg.max_seq_len} tokens; use at most that")
    return TrainConfig(**values)


def parent_params(path, mesh_spec: str):
    """init_params for train.Stage: the parent's weights, laid out on the run's mesh (fresh optimizers, as
    nanochat: every stage after base starts its optimizer state from zero)."""
    from nanojax import checkpoint

    return lambda model_cfg: checkpoint.restore_params(path, model_cfg, mesh_spec)


def describe_mixture(name: str, mixture) -> dict:
    """The mixture's entries as kept in the checkpoint meta and printed: where each came from, substitutes named."""
    rows = mixture.describe()
    for r in rows:
        print0(f"  {name}: {r['task']} {r.get('split', '')} x{r['rows']:,} from {r.get('source')}")
    subs = ", ".join(f"{r['task']} for {r['substitute_for']}" for r in rows if r.get("substitute_for"))
    return {"rows": len(mixture), "entries": rows, "substitutes": subs or "none"}
