r"""Stage 2: pretrain a base model from the depth dial.

    python -m launch.base --depth 20 --mesh 8 --device-batch-size 32          # 8xH100
    python -m launch.base --depth 2 --mesh 8 --device-batch-size 2 --max-seq-len 256 --total-batch-size 4096 \
        --num-iterations 50                                                    # 8 simulated CPU devices
"""
from __future__ import annotations

import argparse

from nanojax.common import ArgumentParser, cli


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

    from evals.loss import split_batches
    from nanojax.dataloader import PretrainLoader
    from nanojax import dataset, mesh as meshlib, train
    from tokenizer import get_tokenizer

    meshlib.init_distributed()  # before any other jax call
    mesh = meshlib.make_mesh(cfg.mesh)  # validates the spec before touching data
    tok = get_tokenizer()
    model_cfg = GPTConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, n_kv_head=cfg.n_kv_head,
                                     max_seq_len=cfg.max_seq_len)
    world, rank = jax.process_count(), jax.process_index()
    num_devices = mesh.devices.size
    rows = cfg.device_batch_size * num_devices // world
    accum = cfg.grad_accum_steps(num_devices)  # the batch arithmetic must work out before data or compilation
    dataset.resolve(cfg.source)
    stage = train.Stage(
        name="base", report_section="Base model training",
        train_batches=lambda state: PretrainLoader(tok, cfg.source, "train", rows, cfg.max_seq_len, accum=accum,
                                                   rank=rank, world=world, packing=cfg.packing, state=state),
        val_batches=split_batches(tok, cfg.source, "val", rows, cfg.max_seq_len, cfg.eval_tokens, rank=rank,
                                  world=world),
    )
    train.run(stage, model_cfg, cfg, tok)


if __name__ == "__main__":
    main()
