"""Evaluate a base checkpoint: CORE (or a partial CORE, labelled as such, when only the offline bundle is available),
train/val bits per byte, and a few samples. Writes the report sections "Base model loss" and "Base model evaluation".

    python -m evals.base                              # latest base checkpoint, every CORE example
    python -m evals.base --max-per-task 16 --split-tokens 65536    # a quick look
"""
from __future__ import annotations

import argparse

from nanojax.common import ArgumentParser, check_args, cli, parse_count, print0


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m evals.base", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-g", "--tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest depth)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--mesh", default="1", help="device mesh spec (as launch.base)")
    p.add_argument("--max-per-task", type=int, default=None, help="CORE examples per task (default: all)")
    p.add_argument("--split-tokens", type=parse_count, default=20 * 524_288,
                   help="tokens per split for bits per byte, read as one token stream and capped by the split's size "
                        "(e.g. 65536 or 1e6; default 10,485,760)")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per device for bits per byte")
    p.add_argument("--source", default=None, help="data source for bits per byte (default: the one trained on)")
    p.add_argument("--offline", action="store_true", help="never download the eval bundle; build it offline")
    p.add_argument("--skip-core", action="store_true", help="only bits per byte and samples")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args, positive=("max_per_task", "split_tokens", "device_batch_size"))
    from nanojax import models, report
    from nanojax import mesh as meshlib
    from nanojax.common import compute_dtype
    from nanojax.train import SAMPLE_PROMPTS

    meshlib.init_distributed()
    mesh = meshlib.make_mesh(args.mesh)
    model = models.load("base", args.tag, args.step, mesh=mesh)
    cfg, tok = model.config, model.tokenizer
    print0(f"evaluating base {model.tag} step {model.step}: {model.num_params():,} params")
    source = args.source or model.meta.get("run_config", {}).get("source", "demo")

    import jax

    from evals.loss import make_bpb_eval, split_batches
    from nanojax import gpt

    dtype = compute_dtype()
    param_sh = meshlib.shardings(gpt.param_axes(cfg), mesh, gpt.abstract_params(cfg))
    bpb = make_bpb_eval(cfg, tok.token_bytes(), mesh, param_sh, dtype)
    rows = args.device_batch_size * mesh.devices.size // jax.process_count()
    losses = {}
    for split in ("train", "val"):
        batches = split_batches(tok, source, split, rows, cfg.max_seq_len, args.split_tokens,
                                rank=jax.process_index(), world=jax.process_count(), flag="--split-tokens")
        losses[f"{split} bpb"] = bpb(model.params, batches())
        print0(f"{split} bpb: {losses[f'{split} bpb']:.4f}")
    samples = [prompt + model.generate(prompt, max_tokens=24, temperature=0.0) for prompt in SAMPLE_PROMPTS]
    for s in samples:
        print0(f"  sample: {s!r}")
    report.log("Base model loss", [{"checkpoint": f"base/{model.tag}/{model.step}", "source": source, **losses},
                                   "### Samples", "\n".join(f"- {s!r}" for s in samples)])
    if args.skip_core:
        return
    from evals.core import evaluate_core
    result = evaluate_core(model.params, cfg, tok, max_per_task=args.max_per_task, mesh=mesh, dtype=dtype,
                           offline=True if args.offline else None)
    lines = [f"| {name} | {r['accuracy']:.4f} | {r['centered']:.4f} | {r['n']} |"
             for name, r in result["tasks"].items()]
    table = "\n".join(["| task | accuracy | centered | examples |", "|---|---|---|---|", *lines])
    print0(table)
    print0(f"{result['label']}: {result['core']:.4f}")
    report.log("Base model evaluation", [
        {"checkpoint": f"base/{model.tag}/{model.step}", "label": result["label"], "score": result["core"],
         "tasks": result["num_tasks"], "max per task": args.max_per_task or "all",
         "missing tasks": ", ".join(result["missing"]) or "none"}, table])


if __name__ == "__main__":
    main()
