r"""Stage 4: supervised fine-tuning. One conversation per row, loss only on what the assistant writes (its text, its
tool calls and <|assistant_end|>; never BOS, user turns, <|assistant_start|>, tool outputs or padding), on nanochat's
SFT mixture; LR from --init-lr-frac (0.02) linearly to 0; val loss every --eval-every steps, MMLU and ARC-Easy
accuracy every --eval-metrics-every.

    python -m launch.sft                                   # after launch.mid (demo-sized mixture on CPU)
    python -m launch.sft --source base                     # skip mid-training
    python -m launch.sft --mesh 8                          # 8xH100: 4 rows x 8 devices = 32 conversations a step

Model size, context and device batch size come from the parent checkpoint unless given here.
"""
from __future__ import annotations

from launch import chat
from nanojax.common import UserError, cli, print0

DEFAULTS = {"device_batch_size": 4, "init_lr_frac": 0.02, "eval_every": 100, "sample_every": 100, "grad_clip": 0.0,
            "momentum_warmup": 0}


def parse_args(argv=None):
    p = chat.parser("python -m launch.sft", __doc__, ("mid", "base"))
    p.add_argument("--identity", default=None, metavar="FILE.jsonl",
                   help="identity conversations (as launch.mid; default: the built-in set)")
    p.add_argument("--scale", choices=("demo", "full"), default=None,
                   help="mixture size (default: demo on CPU, full on accelerators)")
    p.add_argument("--target-examples-per-step", type=int, default=32,
                   help="conversations per optimizer step, all devices together (default: 32)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture when --num-iterations is -1")
    p.add_argument("--eval-steps", type=int, default=100, help="val-loss batches per evaluation (default: 100)")
    p.add_argument("--eval-metrics-every", type=int, default=200,
                   help="MMLU and ARC-Easy accuracy every N steps and at the end; -1: only at the end (default: 200)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=None,
                   help="problems per task for those (default: 1024; 64 on CPU)")
    chat.add_run_flags(p, {**DEFAULTS, "device_batch_size": None})
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    for name in ("target_examples_per_step", "num_epochs", "eval_steps"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive number")
    import jax

    from evals.chat import evaluate_categorical, make_last_logits_fn
    from evals.loss import make_loss_eval
    from evals.tasks import get_task
    from evals.tasks.mixtures import build_mixture
    from nanojax import mesh as meshlib, train
    from nanojax.chatloader import SFTLoader, sft_val_batches
    from nanojax.common import compute_dtype
    from tokenizer import get_tokenizer

    on_cpu = jax.default_backend() == "cpu"
    scale = args.scale or ("demo" if on_cpu else "full")
    train_mix = build_mixture("sft-train", scale=scale, identity=args.identity)  # bad names fail before any work
    val_mix = build_mixture("sft-val", scale=scale, identity=args.identity)
    path, meta, model_cfg = chat.parent_checkpoint(args.parent, args.model_tag, args.model_step)
    # The device batch is SFT's own (4, as nanochat), not the parent's: rows here are whole conversations.
    cfg = chat.run_config(args, {**DEFAULTS, "device_batch_size": args.device_batch_size or 4}, meta, model_cfg)

    meshlib.init_distributed()
    mesh = meshlib.make_mesh(cfg.mesh)
    tok = get_tokenizer()
    world, rank = jax.process_count(), jax.process_index()
    rows = cfg.device_batch_size * mesh.devices.size // world
    per_pass = cfg.device_batch_size * mesh.devices.size
    if args.target_examples_per_step % per_pass:
        raise UserError(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of "
                        f"--device-batch-size {cfg.device_batch_size} x {mesh.devices.size} devices = {per_pass}")
    grad_accum = args.target_examples_per_step // per_pass
    num_iterations = (cfg.num_iterations if cfg.num_iterations > 0
                      else len(train_mix) * args.num_epochs // args.target_examples_per_step)
    if num_iterations < 1:
        raise UserError(f"the SFT mixture has {len(train_mix)} conversations, fewer than one step of "
                        f"{args.target_examples_per_step}; lower --target-examples-per-step")
    dtype = compute_dtype(cfg.dtype or None)
    render = tok.render_conversation
    pad = tok.encode_special("<|assistant_end|>")
    print0(f"SFT from {path}: {len(train_mix):,} conversations ({scale} scale), {num_iterations} steps of "
           f"{args.target_examples_per_step} (grad accum {grad_accum})")
    mixtures = {"train": chat.describe_mixture("sft-train", train_mix), "val": chat.describe_mixture("sft-val", val_mix)}
    val = sft_val_batches(val_mix.dataset, render, rows, cfg.max_seq_len, pad, args.eval_steps, rank=rank,
                          world=world)
    param_sh = train.param_shardings(model_cfg, mesh)
    val_loss = make_loss_eval(model_cfg, mesh, param_sh, dtype)
    max_problems = args.eval_metrics_max_problems or (64 if on_cpu else 1024)
    metric_tasks = [get_task(name) for name in ("MMLU", "ARC-Easy")]
    metrics_every = args.eval_metrics_every

    def evaluate(params, step):
        results = {"val_loss": val_loss(params, val)}
        last = step == num_iterations
        if last or (metrics_every > 0 and step > 0 and step % metrics_every == 0):
            logits_fn = make_last_logits_fn(params, model_cfg, dtype)
            for task in metric_tasks:
                key = task.name.lower().replace("-", "_") + "_acc"
                results[key] = evaluate_categorical(task, task.rows[:max_problems], tok, logits_fn)
        return results

    stage = train.Stage(
        name="sft",
        train_batches=lambda state: SFTLoader(train_mix.dataset, render, rows, cfg.max_seq_len, pad,
                                              accum=grad_accum, rank=rank, world=world, state=state),
        lr_schedule=lambda step, progress: 1.0 - step / num_iterations,
        num_iterations=num_iterations,
        evaluate=evaluate,
        sample=train.make_sampler(model_cfg, tok, chat.CHAT_SAMPLE_PROMPTS, chat=True, max_tokens=32, dtype=dtype),
        init_params=chat.parent_params(path, cfg.mesh),
        extra_meta={"parent": str(path), "mixture": mixtures, "scale": scale,
                    "sft": {k: getattr(args, k) for k in ("target_examples_per_step", "num_epochs", "eval_steps",
                                                          "eval_metrics_every")} | {"metrics_max_problems": max_problems}},
        summary={"parent checkpoint": str(path), "training rows": len(train_mix), "mixture scale": scale,
                 "examples per step": args.target_examples_per_step, "grad accumulation": grad_accum,
                 "MMLU / ARC-Easy problems": max_problems,
                 "offline substitutes": mixtures["train"]["substitutes"]},
    )
    train.run(stage, model_cfg, cfg, tok)


if __name__ == "__main__":
    main()
