r"""Stage 3: mid-training. The base model learns the chat format, its special tokens, tool calls, multiple choice and
spelling from nanochat's mid mixture, as one pass over a token stream of rendered conversations (every token is a
target, as nanochat trains it). LR flat, then linear to 0 over the last 20% of the data; Muon momentum warm-up; no
clipping; val bits per byte on the val mixture.

    python -m launch.mid                                  # after launch.base (demo-sized mixture on CPU)
    python -m launch.mid --mesh 8 --device-batch-size 32  # 8xH100: nanochat's ~850K-conversation mixture
    python -m launch.mid --identity my_identity.jsonl     # your own identity conversations (mixed in twice)

Model size, context, batch sizes and eval tokens come from the base checkpoint unless given here.
"""
from __future__ import annotations

from launch import chat
from nanojax.common import cli, print0

DEFAULTS = {"eval_every": 150, "sample_every": 150, "grad_clip": 0.0, "momentum_warmup": 300, "init_lr_frac": 1.0}


def lr_multiplier(step: int, progress: float) -> float:
    """nanochat's mid schedule, driven by the share of the mixture consumed: flat, then linear to 0 from 80%."""
    return 1.0 if progress < 0.8 else max(0.0, (1.0 - progress) / 0.2)


def parse_args(argv=None):
    p = chat.parser("python -m launch.mid", __doc__, ("base",))
    p.add_argument("--identity", default=None, metavar="FILE.jsonl",
                   help="identity conversations: nanochat's format (a JSON array of messages per line) or "
                        "{\"messages\": [...]} per line (default: the built-in set)")
    p.add_argument("--scale", choices=("demo", "full"), default=None,
                   help="mixture size: full (nanochat's) or demo (a few thousand rows) (default: demo on CPU, "
                        "full on accelerators)")
    chat.add_run_flags(p, DEFAULTS, extra=("total_batch_size", "eval_tokens"))
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    import jax

    from evals.loss import make_bpb_eval
    from evals.tasks.mixtures import build_mixture
    from nanojax import mesh as meshlib, train
    from nanojax.chatloader import MidLoader, mid_val_batches
    from nanojax.common import compute_dtype
    from tokenizer import get_tokenizer

    scale = args.scale or ("demo" if jax.default_backend() == "cpu" else "full")
    train_mix = build_mixture("mid-train", scale=scale, identity=args.identity)  # bad names fail before any work
    val_mix = build_mixture("mid-val", scale=scale, identity=args.identity)
    path, meta, model_cfg = chat.parent_checkpoint(args.parent, args.model_tag, args.model_step)
    cfg = chat.run_config(args, DEFAULTS, meta, model_cfg)

    meshlib.init_distributed()
    mesh = meshlib.make_mesh(cfg.mesh)
    tok = get_tokenizer()
    world, rank = jax.process_count(), jax.process_index()
    num_devices = mesh.devices.size
    rows = cfg.device_batch_size * num_devices // world
    grad_accum = cfg.grad_accum_steps(num_devices)
    dtype = compute_dtype(cfg.dtype or None)
    render = tok.render_conversation
    print0(f"mid-training from {path}: mixture of {len(train_mix):,} conversations ({scale} scale)")
    mixtures = {"train": chat.describe_mixture("mid-train", train_mix), "val": chat.describe_mixture("mid-val", val_mix)}
    val = mid_val_batches(val_mix.dataset, render, rows, cfg.max_seq_len, cfg.eval_tokens, rank=rank, world=world)
    bpb = make_bpb_eval(model_cfg, tok.token_bytes(), mesh, train.param_shardings(model_cfg, mesh), dtype)
    stage = train.Stage(
        name="mid",
        train_batches=lambda state: MidLoader(train_mix.dataset, render, rows, cfg.max_seq_len, accum=grad_accum,
                                              rank=rank, world=world, state=state),
        lr_schedule=lr_multiplier,
        num_iterations=cfg.num_iterations if cfg.num_iterations > 0 else None,
        evaluate=lambda params, step: {"val_bpb": bpb(params, val)},
        sample=train.make_sampler(model_cfg, tok, chat.CHAT_SAMPLE_PROMPTS, chat=True, max_tokens=32, dtype=dtype),
        init_params=chat.parent_params(path, cfg.mesh),
        extra_meta={"parent": str(path), "mixture": mixtures, "scale": scale},
        summary={"parent checkpoint": str(path), "training conversations": len(train_mix), "mixture scale": scale,
                 "grad accumulation": grad_accum,
                 "offline substitutes": mixtures["train"]["substitutes"]},
    )
    train.run(stage, model_cfg, cfg, tok)


if __name__ == "__main__":
    main()
