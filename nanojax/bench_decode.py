"""`python -m nanojax.bench decode`: time to first token and decode tokens/s of the engine on a random-init model.
(nanojax.bench holds the command line; this module the measurement, which needs jax.)"""
from __future__ import annotations

import math
import statistics
import time

import jax
import numpy as np

from nanojax import gpt
from nanojax.common import UserError, peak_bandwidth
from nanojax.config import GPTConfig
from nanojax.engine import Engine

class _RandomTokens:
    """Just enough tokenizer for a benchmark on random weights: no special tokens, so no stops and no tools."""

    special_tokens: list = []

    def encode_special(self, name):
        raise UserError(f"no special token {name!r} in the benchmark tokenizer")


class DecodeBench:
    """The engine on a random-init model, compiled for each batch it meets: `run(batch, i)` times one generation,
    `figures(batch, runs)` turns timed runs into bench decode's figures. bench serve alternates its runs with the
    server's rounds (the machine's speed drifts between minutes, so a baseline taken once decides nothing)."""

    def __init__(self, depth: int = 4, model_dim: int | None = None, vocab_size: int = 8192, prompt_len: int = 32,
                 new_tokens: int = 256, dtype=None, top_k: int = 50, temperature: float = 1.0, seed: int = 0,
                 n_kv_head: int | None = None, max_seq_len: int = 2048):
        head_dim = 128
        if model_dim is not None:
            if model_dim % head_dim:
                head_dim = math.gcd(model_dim, head_dim)
            cfg = GPTConfig(vocab_size=vocab_size, depth=depth, model_dim=model_dim, n_head=model_dim // head_dim,
                            n_kv_head=n_kv_head or model_dim // head_dim, head_dim=head_dim, max_seq_len=max_seq_len)
        else:
            cfg = GPTConfig.from_depth(depth, vocab_size=vocab_size, n_kv_head=n_kv_head, max_seq_len=max_seq_len)
        if prompt_len + new_tokens > cfg.max_seq_len:
            raise UserError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds max_seq_len {cfg.max_seq_len}")
        params = gpt.init_params(cfg, seed)
        leaves, tree = jax.tree.flatten(params)  # init zeroes some matrices: fill them so the logits are not uniform
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        self.params = jax.tree.unflatten(tree, [0.02 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        self.cfg, self.new_tokens, self.prompt_len = cfg, new_tokens, prompt_len
        self.engine = Engine(self.params, cfg, _RandomTokens(), dtype=dtype)
        self.prompt = np.random.default_rng(seed).integers(0, vocab_size, prompt_len).tolist()
        self.kw = dict(max_tokens=new_tokens, temperature=temperature, top_k=top_k, stop_tokens=[])
        self.cache_lengths = {}  # batch -> the cache length each decode step of a run read

    def run(self, batch: int, i: int) -> tuple[float, float]:
        """One timed generation of `batch` rows: (time to first token, mean decode step) in seconds."""
        if batch not in self.cache_lengths:
            self.compile(batch)
        compiles = self.engine.compilations
        start = time.perf_counter()
        first = None
        count = 0
        for _ in self.engine.generate(self.prompt, seed=i, num_samples=batch, **self.kw):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert count == self.new_tokens, (count, self.new_tokens)
        if self.engine.compilations != compiles:
            raise RuntimeError("the decode benchmark recompiled after warm-up")
        return first - start, (end - first) / max(1, self.new_tokens - 1)

    def compile(self, batch: int):
        """A first run compiles, and records the cache length each of its decode steps read."""
        calls, decode = [], self.engine._decode_jit

        def recording(params, state, **kw):  # each decode call: (the cache length it read, the steps it took)
            length = state.cache.k[0].shape[1]  # read before the call donates `state`
            out = decode(params, state, **kw)
            calls.append((length, out[3]))
            return out

        self.engine._decode_jit = recording
        try:
            for _ in self.engine.generate(self.prompt, seed=0, num_samples=batch, **self.kw):
                pass
        finally:
            self.engine._decode_jit = decode
        self.cache_lengths[batch] = [S for S, n in calls for _ in range(int(n))]

    def figures(self, batch: int, runs: list[tuple[float, float]]) -> dict:
        """bench decode's figures from timed runs (the best time to first token and step count)."""
        cfg = self.cfg
        ttft, step = min(r[0] for r in runs), min(r[1] for r in runs)
        itemsize = self.engine.dtype.itemsize
        n_params = sum(x.size for x in jax.tree.leaves(self.params))
        weight_bytes = (n_params - cfg.vocab_size * cfg.model_dim + cfg.model_dim) * itemsize  # one embedding row
        lengths = self.cache_lengths[batch]
        cache_len = sum(lengths) / len(lengths)
        kv_bytes = 2 * cfg.depth * batch * cache_len * cfg.n_kv_head * cfg.head_dim * itemsize  # all of it is read
        device = jax.devices()[0]
        peak = peak_bandwidth(device)
        read_rate = (weight_bytes + kv_bytes) / step  # bytes/s: comparable across machines, unlike ratios to PyTorch
        out = {
            "depth": cfg.depth, "model_dim": cfg.model_dim, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
            "batch": batch, "prompt_len": self.prompt_len, "new_tokens": self.new_tokens,
            "dtype": self.engine.dtype.name, "device": getattr(device, "device_kind", str(device)),
            "backend": jax.default_backend(), "ttft_ms": round(ttft * 1e3, 3), "decode_step_ms": round(step * 1e3, 4),
            "decode_tok_per_s": round(batch / step, 1), "decode_tok_per_s_per_row": round(1 / step, 1),
            "weight_bytes": int(weight_bytes), "kv_bytes_per_step": int(kv_bytes),
            "mean_cache_len": round(cache_len, 1),
            "repeats": len(runs), "median_step_ms": round(statistics.median(r[1] for r in runs) * 1e3, 4),
            "read_gb_per_s": round(read_rate / 1e9, 2),
        }
        if peak:
            out["bandwidth_util"] = round(read_rate / peak, 4)
        return out


def benchmark_decode(depth: int = 4, model_dim: int | None = None, vocab_size: int = 8192, batch: int = 1,
                     prompt_len: int = 32, new_tokens: int = 256, dtype=None, repeats: int = 3, top_k: int = 50,
                     temperature: float = 1.0, seed: int = 0, n_kv_head: int | None = None,
                     max_seq_len: int = 2048) -> dict:
    """Time to first token and decode tokens/s of a random-init model (after a warm-up that compiles), best of
    `repeats`, and the rate the step reads its weights and KV cache at ((weights + KV) bytes per step / step time);
    on GPUs also that rate's share of the device's peak bandwidth."""
    bench = DecodeBench(depth=depth, model_dim=model_dim, vocab_size=vocab_size, prompt_len=prompt_len,
                        new_tokens=new_tokens, dtype=dtype, top_k=top_k, temperature=temperature, seed=seed,
                        n_kv_head=n_kv_head, max_seq_len=max_seq_len)
    return bench.figures(batch, [bench.run(batch, i + 1) for i in range(repeats)])
