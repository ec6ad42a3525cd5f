"""Bits per byte: the tokenizer-independent loss. Sum of nats over target tokens / (ln 2 x their UTF-8 bytes), with
special tokens (0 bytes) and ignored targets (-1) left out of both sums. Sharded over the mesh's batch axes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nanojax import gpt
from nanojax import mesh as meshlib
from nanojax.common import progress


def _summing(fn, mesh, desc: str):
    """-> evaluate(params, batches) -> the elementwise sum of fn's outputs over process-local (inputs, targets)."""
    def evaluate(params, batches) -> list[float]:
        totals = None
        total = len(batches) if hasattr(batches, "__len__") else None
        for inputs, targets in progress(batches, total=total, desc=desc, unit="batch", leave=False):
            shape = (inputs.shape[0] * jax.process_count(), inputs.shape[1])
            out = fn(params, meshlib.global_batch(mesh, inputs, shape), meshlib.global_batch(mesh, targets, shape))
            totals = [float(x) for x in out] if totals is None else [t + float(x) for t, x in zip(totals, out)]
        return totals or [0.0, 0.0]

    return evaluate


def make_bpb_eval(model_cfg, token_bytes: np.ndarray, mesh, param_sh, dtype):
    """-> evaluate(params, batches) -> bits per byte, where batches yields process-local (inputs, targets) arrays."""
    table = jnp.asarray(token_bytes, dtype=jnp.int32)
    constrain = meshlib.constrain_fn(mesh)

    def sums(params, inputs, targets):
        nats = gpt.token_losses(params, inputs, targets, model_cfg, dtype=dtype, constrain=constrain)
        nbytes = jnp.where(targets >= 0, table[jnp.maximum(targets, 0)], 0)
        return jnp.sum(jnp.where(nbytes > 0, nats, 0.0)), jnp.sum(nbytes)

    fn = jax.jit(sums, in_shardings=(param_sh, meshlib.batch_sharding(mesh), meshlib.batch_sharding(mesh)))
    summed = _summing(fn, mesh, "bits per byte")

    def evaluate(params, batches) -> float:
        total_nats, total_bytes = summed(params, batches)
        return total_nats / (math.log(2) * max(total_bytes, 1))

    return evaluate


def make_loss_eval(model_cfg, mesh, param_sh, dtype):
    """-> evaluate(params, batches) -> mean nats per target token (targets -1 left out): SFT's val loss."""
    constrain = meshlib.constrain_fn(mesh)

    def sums(params, inputs, targets):
        nats = gpt.token_losses(params, inputs, targets, model_cfg, dtype=dtype, constrain=constrain)
        return jnp.sum(nats), jnp.sum(targets >= 0)

    fn = jax.jit(sums, in_shardings=(param_sh, meshlib.batch_sharding(mesh), meshlib.batch_sharding(mesh)))
    summed = _summing(fn, mesh, "val loss")

    def evaluate(params, batches) -> float:
        total_nats, count = summed(params, batches)
        return total_nats / max(count, 1)

    return evaluate


def split_batches(tokenizer, source: str, split: str, rows: int, seq_len: int, tokens: int, *, rank=0, world=1,
                  flag="--eval-tokens"):
    """The first `tokens` targets of a split as one token stream, as nanochat measures (capped by the split's size,
    which is then said once): a callable giving the same batches of (inputs, targets) at every call."""
    from nanojax.dataloader import StreamBatches, split_documents

    batches = StreamBatches(split_documents(tokenizer, source, split), rows, seq_len, tokens, rank=rank, world=world,
                            label=f"the {split} split of {source}", flag=flag)
    return lambda: batches
