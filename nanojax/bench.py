"""Performance figures, each printed as JSON on the last line (what a speed goal is measured with, not a test).

    python -m nanojax.bench train --depth 4 --mesh 1 --device-batch-size 8 --max-seq-len 256 --vocab-size 8192
    python -m nanojax.bench memory --depth 20 --mesh 8 --device-batch-size 32     # fits an 80 GB H100?
    python -m nanojax.bench decode --depth 4 --batch 1 --prompt-len 32 --new-tokens 256
    python -m nanojax.bench data        # dataloader tokens/s on the demo corpus (Grain threads, kept fraction)
    python -m nanojax.bench tokenizer   # BPE training and encoding MB/s
    python -m nanojax.bench serve       # the chat server on loopback: 32 streaming clients vs decode --batch 32, ...

Every figure is labelled with the backend and device it was measured on: a CPU number is not a GPU number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from nanojax.common import ArgumentParser, UserError, check_args, cli
from nanojax.config import PACKINGS

MAX_SIMULATED_DEVICES = 1024  # `bench memory` on a CPU: XLA compiles per device, so more would take hours


def _device_label() -> dict:
    import jax
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": d.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__}


def _model(args):
    from nanojax.config import GPTConfig
    return GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, n_kv_head=args.n_kv_head,
                                max_seq_len=args.max_seq_len)


def _dtype(name):
    import jax.numpy as jnp
    from nanojax.common import compute_dtype
    return compute_dtype() if name is None else {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _train_parts(args, mesh, dtype, for_accelerator=False):
    """The real train step of nanojax.train for this config, and its sharded abstract arguments."""
    import jax
    from nanojax.config import TrainConfig
    from nanojax.train import build_step, stacked_batch_sharding

    cfg = _model(args)
    parts = build_step(cfg, TrainConfig(remat=args.remat), mesh, dtype, for_accelerator)
    rows = args.device_batch_size * mesh.devices.size
    batch = jax.ShapeDtypeStruct((1, rows, args.max_seq_len), "int32", sharding=stacked_batch_sharding(mesh))
    with_sh = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)
    abstract_args = (with_sh(parts.abstract, parts.param_sh), with_sh(parts.opt_abstract, parts.opt_sh),
                     {"inputs": batch, "targets": batch}, jax.ShapeDtypeStruct((), "float32"))
    return cfg, parts.tx, parts.step, parts.param_sh, parts.opt_sh, abstract_args


def bench_train(args) -> dict:
    import jax
    import numpy as np
    from nanojax import gpt
    from nanojax import mesh as meshlib
    from nanojax.common import peak_flops
    from nanojax.train import stacked_batch_sharding

    mesh = meshlib.make_mesh(args.mesh)
    dtype = _dtype(args.dtype)
    cfg, tx, step, param_sh, opt_sh, _ = _train_parts(args, mesh, dtype)
    params = jax.jit(lambda: gpt.init_params(cfg, seed=0), out_shardings=param_sh)()
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rows = args.device_batch_size * mesh.devices.size
    rng = np.random.default_rng(0)
    data = rng.integers(0, cfg.vocab_size, size=(1, rows, args.max_seq_len + 1), dtype=np.int32)
    sh = stacked_batch_sharding(mesh)
    batch = {"inputs": jax.device_put(data[..., :-1], sh), "targets": jax.device_put(data[..., 1:], sh)}
    lr = np.float32(1.0)
    t0 = time.time()
    params, opt_state, loss = step(params, opt_state, batch, lr)
    float(loss)
    compile_s = time.time() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.time()
        params, opt_state, loss = step(params, opt_state, batch, lr)
        float(loss)
        times.append(time.time() - t0)
    dt = statistics.median(times)
    tokens = rows * args.max_seq_len
    peak = peak_flops(jax.devices()[0])
    flops = gpt.flops_per_token(cfg) * tokens / dt
    return {"bench": "train", **_device_label(), "depth": cfg.depth, "model_dim": cfg.model_dim,
            "vocab_size": cfg.vocab_size, "mesh": args.mesh, "dtype": jax.numpy.dtype(dtype).name, "remat": args.remat,
            "tokens_per_step": tokens, "step_ms": round(1000 * dt, 2), "tok_per_s": round(tokens / dt, 1),
            "mfu": round(flops / (peak * mesh.devices.size), 4) if peak else None, "compile_s": round(compile_s, 2),
            "num_params": gpt.num_params(cfg), "steps_timed": args.steps}


def bench_memory(args) -> dict:
    """Compile the real train step ahead of time (no parameters allocated) and read XLA's per-device memory plan."""
    import jax
    from nanojax import mesh as meshlib

    mesh = meshlib.make_mesh(args.mesh)
    dtype = _dtype(args.dtype)
    cfg, _, step, _, _, abstract_args = _train_parts(args, mesh, dtype, for_accelerator=True)  # a GPU's program
    t0 = time.time()
    compiled = step.lower(*abstract_args).compile()
    mem = compiled.memory_analysis()
    gib = lambda b: round(b / 2**30, 2)
    args_b, out_b, temp_b = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    total = args_b + out_b - alias_b + temp_b
    result = {"bench": "memory", **_device_label(), "depth": cfg.depth, "mesh": args.mesh,
              "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
              "dtype": jax.numpy.dtype(dtype).name, "compile_s": round(time.time() - t0, 2),
              "arguments_gib": gib(args_b), "outputs_gib": gib(out_b), "aliased_gib": gib(alias_b),
              "temp_gib": gib(temp_b), "total_per_device_gib": gib(total)}
    if jax.default_backend() == "cpu":
        # XLA's CPU attention keeps whole T x T score matrices; cuDNN flash attention on GPUs never does. With the
        # layer rematerialised, about three such fp32 tensors (scores, probabilities, their gradient) live at once.
        scores = 3 * args.device_batch_size * cfg.n_head * args.max_seq_len ** 2 * 4
        result["cpu_attention_scores_gib"] = gib(scores)
        result["gpu_estimate_per_device_gib"] = gib(total - scores)
        result["note"] = ("planned on simulated CPU devices; gpu_estimate subtracts the T x T attention scores "
                          "that only the CPU path materialises (an estimate, not a GPU measurement)")
    return result


def _simulated_devices(spec: str) -> int:
    from nanojax.mesh import parse_mesh  # imports jax

    n = math.prod(parse_mesh(spec).values())
    if n > MAX_SIMULATED_DEVICES:
        raise UserError(f"--mesh {spec!r} needs {n} devices; a memory plan simulates at most {MAX_SIMULATED_DEVICES} "
                        f"on the CPU")
    return n


def _loader_rate(make, seconds: float) -> dict:
    """Rows/s of a loader after its first batch (worker start-up and the buffer's first fill left out)."""
    loader = make()
    try:
        loader.next_batch()
        t0, n = time.time(), 0
        while time.time() - t0 < seconds:
            n += loader.next_batch().size
        result = {"tok_per_s": round(n / (time.time() - t0), 1)}
        if hasattr(loader, "kept_fraction"):
            result["kept_fraction"] = round(loader.kept_fraction(), 4)
        return result
    finally:
        loader.close()


# FineWeb-Edu's sample-10BT holds 9.67M documents for 10B GPT-2 tokens (1,034 tokens each on average); document
# lengths are heavy-tailed, taken here as log-normal with sigma 1 and that mean (median ~630 tokens).
FINEWEB_MEAN_TOKENS, FINEWEB_SIGMA = 1034, 1.0


def fineweb_like_kept_fraction(seq_len: int, buffer_size: int = 1000, docs: int = 40_000, seed: int = 0) -> float:
    """Best-fit's kept fraction on synthetic documents of FineWeb-like lengths: the packer alone, fed token arrays
    (it only looks at lengths), measured while the buffer is full (the drained tail of a finite input left out)."""
    import grain
    import numpy as np

    from nanojax.dataloader import LoaderState, _BestFitIterator

    rng = np.random.default_rng(seed)
    median = FINEWEB_MEAN_TOKENS / math.exp(FINEWEB_SIGMA ** 2 / 2)
    lengths = np.clip(rng.lognormal(math.log(median), FINEWEB_SIGMA, docs).astype(int), 2, 100_000)
    zeros = np.zeros(int(lengths.max()), np.int32)
    groups = [(0, g, [zeros[:n] for n in lengths[g * 1024:(g + 1) * 1024]]) for g in range(-(-docs // 1024))]
    parent = grain.MapDataset.source(groups).to_iter_dataset().__iter__()
    packer = _BestFitIterator(parent, None, None, seq_len + 1, LoaderState(), buffer_size)
    stop = 0.8 * lengths.sum()
    while packer.tokens_read < stop:
        next(packer)
    return packer.kept_fraction()


def bench_data(args) -> dict:
    """The Grain loader with 1, 2 and the default number of worker threads (the hand-written loader it replaced was
    timed beside it in the same invocation until the figures were in docs/performance.md)."""
    from nanojax.dataloader import DEFAULT_WORKERS, PretrainLoader
    from tokenizer import get_tokenizer

    tok = get_tokenizer()
    results = {f"grain, {w} thread{'s' * (w > 1)}": _loader_rate(
        lambda: PretrainLoader(tok, args.source, "train", args.rows, args.max_seq_len, packing=args.packing,
                               workers=w), args.seconds) for w in sorted({1, 2, DEFAULT_WORKERS})}
    return {"bench": "data", "source": args.source, "rows": args.rows, "seq_len": args.max_seq_len,
            "packing": args.packing, "cpus": os.cpu_count(), "default_workers": DEFAULT_WORKERS, "loaders": results,
            "fineweb_like_kept_fraction": round(fineweb_like_kept_fraction(args.max_seq_len), 4)}


def bench_tokenizer(args) -> dict:
    from tokenizer.train import benchmark
    return {"bench": "tokenizer", "cpus": os.cpu_count(), **benchmark(text_mb=args.text_mb, vocab_size=args.vocab_size)}


def bench_decode(args) -> dict:
    from nanojax.bench_decode import benchmark_decode
    return {"bench": "decode", **_device_label(),
            **benchmark_decode(depth=args.depth, vocab_size=args.vocab_size, batch=args.batch,
                               prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=_dtype(args.dtype),
                               repeats=args.repeats, n_kv_head=args.n_kv_head, max_seq_len=args.max_seq_len)}


def bench_serve(args) -> dict:
    from nanojax.bench_serve import benchmark_serve
    return {"bench": "serve", **_device_label(),
            **benchmark_serve(depth=args.depth, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len,
                              clients=args.clients, new_tokens=args.new_tokens, sequential=args.requests,
                              disconnects=args.disconnects, rounds=args.rounds, dtype=_dtype(args.dtype))}


def main(argv=None):
    parser = ArgumentParser(prog="python -m nanojax.bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, depth, vocab, seq, training=True):
        p.add_argument("--depth", type=int, default=depth, help="model depth (the one dial)")
        p.add_argument("--vocab-size", type=int, default=vocab, help="vocabulary size")
        p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads (default: as many as heads)")
        p.add_argument("--max-seq-len", type=int, default=seq, help="sequence length")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                       help="compute dtype (default: bfloat16 on GPUs, float32 on CPU; NANOJAX_DTYPE)")
        if training:
            p.add_argument("--remat", default="auto", help="auto (on accelerators, not on CPU), full, none, or a policy")

    p = sub.add_parser("train", help="training tokens/s, MFU and step time")
    model_args(p, 4, 8192, 256)
    p.add_argument("--mesh", default="1", help="device mesh spec, as launch.base")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per device")
    p.add_argument("--steps", type=int, default=10, help="timed steps after the compile")
    p = sub.add_parser("memory", help="per-device memory of the real train step, compiled ahead of time")
    model_args(p, 20, 65536, 2048)
    p.add_argument("--mesh", default="8", help="device mesh spec; simulated on a CPU")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per device")
    p = sub.add_parser("decode", help="time to first token and decode tokens/s")
    model_args(p, 4, 8192, 2048, training=False)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the best one counts")
    p = sub.add_parser("serve", help="the chat server on loopback under load, against decode in the same run")
    p.add_argument("--depth", type=int, default=4, help="model depth (the one dial)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
    p.add_argument("--max-seq-len", type=int, default=2048, help="the served model's context")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPUs)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (and decode's batch)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens each client asks for")
    p.add_argument("--requests", type=int, default=500, help="sequential requests for the memory figure")
    p.add_argument("--disconnects", type=int, default=10, help="clients that hang up mid-stream")
    p.add_argument("--rounds", type=int, default=9,
                   help="server rounds, each beside a bench decode run of the same load (the median ratio counts)")
    p = sub.add_parser("data", help="dataloader tokens/s")
    p.add_argument("--source", default="demo", help="data source, as launch.base")
    p.add_argument("--rows", type=int, default=32, help="rows per batch")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loader")
    p.add_argument("--packing", choices=PACKINGS, default="bestfit", help="how documents become rows")
    p = sub.add_parser("tokenizer", help="BPE training and encoding MB/s")
    p.add_argument("--text-mb", type=float, default=20, help="megabytes of text to train on")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size to train")
    args = parser.parse_args(argv)

    # The memory plan of an N-device mesh can be made on one CPU: simulate the devices before jax's backend starts
    # (the flag multiplies only the CPU platform; on GPUs the plan is made on the real devices).
    if args.command == "memory":
        jax_started = "jax" in sys.modules  # (importing jax reads no flags; its first backend does)
        n = cli(_simulated_devices)(args.mesh)
        if not jax_started:
            flag = f"--xla_force_host_platform_device_count={n}"
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

    numbers = ("depth", "vocab_size", "n_kv_head", "max_seq_len", "device_batch_size", "steps", "batch", "prompt_len",
               "new_tokens", "repeats", "rows", "seconds", "text_mb", "clients", "requests", "disconnects", "rounds")
    cli(check_args)(args, positive=[n for n in numbers if hasattr(args, n)])
    result = cli(globals()[f"bench_{args.command}"])(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
