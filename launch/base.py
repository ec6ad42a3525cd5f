r"""Stage 2: pretrain a base model from the depth dial.

    python -m launch.base --depth 20 --mesh 8 --device-batch-size 32          # 8xH100
    python -m launch.base --depth 2 --mesh 8 --device-batch-size 2 --max-seq-len 256 --total-batch-size 4096 \
        --num-iterations 50                                                    # 8 simulated CPU devices
"""
from __future__ import annotations

import argparse

from nanojax.common import ArgumentParser, cli, print0


def parse_args(argv=None, defaults=None):
    from nanojax.config import TrainConfig, add_dataclass_args

    parser = ArgumentParser(prog="python -m launch.base", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig, defaults)
    return parser.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    from nanojax.config import GPTConfig, TrainConfig, from_args

    cfg = from_args(TrainConfig, args)
    import jax

    from evals.loss import make_bpb_eval, split_batches
    from nanojax import dataset, gpt, optim, mesh as meshlib, train
    from nanojax.common import compute_dtype
    from nanojax.dataloader import PretrainLoader
    from tokenizer import get_tokenizer

    meshlib.init_distributed()  # before any other jax call
    mesh = meshlib.make_mesh(cfg.mesh)  # validates the spec before touching data
    tok = get_tokenizer()
    model_cfg = GPTConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, n_kv_head=cfg.n_kv_head,
                                     max_seq_len=cfg.max_seq_len)
    world, rank = jax.process_count(), jax.process_index()
    num_devices = mesh.devices.size
    rows = cfg.device_batch_size * num_devices // world
    grad_accum = cfg.grad_accum_steps(num_devices)  # the batch arithmetic must work out before data or compilation
    num_iterations = cfg.iterations(gpt.num_params(model_cfg), gpt.flops_per_token(model_cfg))
    dataset.resolve(cfg.source)
    dtype = compute_dtype(cfg.dtype or None)
    val_batches = split_batches(tok, cfg.source, "val", rows, cfg.max_seq_len, cfg.eval_tokens, rank=rank, world=world)
    bpb = make_bpb_eval(model_cfg, tok.token_bytes(), mesh, train.param_shardings(model_cfg, mesh), dtype)
    lr_multiplier = optim.schedule(num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    print0(f"{num_iterations:,} steps x {cfg.total_batch_size:,} tokens (grad accum {grad_accum})")
    stage = train.Stage(
        name="base",
        train_batches=lambda state: PretrainLoader(tok, cfg.source, "train", rows, cfg.max_seq_len,
                                                   accum=grad_accum, rank=rank, world=world, packing=cfg.packing,
                                                   state=state),
        lr_schedule=lambda step, progress: lr_multiplier(step),
        num_iterations=num_iterations,
        evaluate=lambda params, step: {"val_bpb": bpb(params, val_batches())},
        sample=train.make_sampler(model_cfg, tok, train.SAMPLE_PROMPTS, dtype=dtype),
        summary={"training tokens": num_iterations * cfg.total_batch_size,
                 "tokens : params ratio": round(num_iterations * cfg.total_batch_size / gpt.num_params(model_cfg), 2),
                 "total training FLOPs": f"{gpt.flops_per_token(model_cfg) * cfg.total_batch_size * num_iterations:e}",
                 "grad accumulation": grad_accum},
    )
    train.run(stage, model_cfg, cfg, tok)


if __name__ == "__main__":
    main()
