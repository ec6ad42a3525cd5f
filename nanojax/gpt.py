"""The GPT (nanochat's Oct-2025 architecture), as pure functions of a plain parameter dict.

Per layer: x = x + attn(norm(x)); x = x + mlp(norm(x)). Parameter-free RMSNorm after the embedding, before attention,
before the MLP, on q and k (after RoPE) and before the head. RoPE theta 10,000 (half-split rotation), causal GQA
attention, ReLU^2 MLP of width 4D, no biases, untied embedding and head, fp32 logits soft-capped 15*tanh(x/15).

The layers' weights are stacked on a leading axis (Muon vmaps over it) and run with lax.scan on accelerators, so compile
time does not grow with depth; on CPUs without remat a Python loop over the layers is ~6% faster per step (no
stacked-gradient updates) and compiles quickly at CPU sizes. Master weights are fp32; matmuls run in `dtype` (bf16 on
GPUs), weights cast at use.

Entry points: forward (logits) and loss / token_losses (training) over whole sequences; for inference, cached_forward
(prefill and decode over a DecodeCache, from init_decode_cache) runs the same layers from decode_params(params, cfg).

Parameters (layout (in, out), used as x @ W):
    wte (V, D); blocks: attn_q (L, D, H*hd), attn_k/attn_v (L, D, KV*hd), attn_o (L, H*hd, D),
    mlp_fc (L, D, 4D), mlp_proj (L, 4D, D); lm_head (D, V).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from nanojax.common import UserError
from nanojax.config import GPTConfig

RMS_EPS = 1e-6
LOSS_CHUNK_BYTES = 2 << 30  # fp32 logits (over the whole batch) the loss may hold at once; beyond it, it chunks over T


# ----------------------------------------------------------------------------------------------------------------------
# The module: it only defines and initialises the parameters; everything else is a pure function of their dict.

def _normal(key, shape, fan_in: int, fan_out: int):
    """nanochat's Linear init (arXiv 2310.17813): N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)))."""
    std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
    return std * jax.random.normal(key, shape, jnp.float32)


class Blocks(nnx.Module):
    """All layers' matrices, stacked on a leading layer axis."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        L, D, q_dim, kv_dim = cfg.depth, cfg.model_dim, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.attn_q = nnx.Param(_normal(rngs.params(), (L, D, q_dim), D, q_dim))
        self.attn_k = nnx.Param(_normal(rngs.params(), (L, D, kv_dim), D, kv_dim))
        self.attn_v = nnx.Param(_normal(rngs.params(), (L, D, kv_dim), D, kv_dim))
        self.attn_o = nnx.Param(jnp.zeros((L, q_dim, D), jnp.float32))  # zero: each block starts as the identity
        self.mlp_fc = nnx.Param(_normal(rngs.params(), (L, D, 4 * D), D, 4 * D))
        self.mlp_proj = nnx.Param(jnp.zeros((L, 4 * D, D), jnp.float32))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.model_dim), jnp.float32))
        self.blocks = Blocks(cfg, rngs=rngs)
        self.lm_head = nnx.Param(jnp.zeros((cfg.model_dim, cfg.vocab_size), jnp.float32))

    def __call__(self, tokens_BT, **kw):
        """Logits, for the REPL; training and inference use the pure functions below."""
        return forward(_plain(nnx.to_pure_dict(nnx.state(self, nnx.Param))), tokens_BT, self.cfg, **kw)


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def init_params(cfg: GPTConfig, seed: int = 0) -> dict:
    """Fresh fp32 parameters as a plain nested dict. Works under jax.jit (e.g. with out_shardings) and eval_shape."""
    return _init(cfg, seed)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: GPTConfig, seed):
    """One compiled program instead of one dispatch per tensor; the seed is traced, so new seeds do not recompile."""
    _, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(jax.random.key(seed))))
    return _plain(nnx.to_pure_dict(state))


def abstract_params(cfg: GPTConfig) -> dict:
    """The parameters' shapes and dtypes (jax.ShapeDtypeStruct), without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg))


def param_axes(cfg: GPTConfig) -> dict:
    """Logical axis names of every parameter, mapped to mesh axes by nanojax.mesh's rules table."""
    return {
        "wte": ("vocab", "embed"),
        "blocks": {
            "attn_q": ("layers", "embed", "heads"),
            "attn_k": ("layers", "embed", "kv_heads"),
            "attn_v": ("layers", "embed", "kv_heads"),
            "attn_o": ("layers", "heads", "embed"),
            "mlp_fc": ("layers", "embed", "mlp"),
            "mlp_proj": ("layers", "mlp", "embed"),
        },
        "lm_head": ("embed", "vocab"),
    }


def num_params(cfg: GPTConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def flops_per_token(cfg: GPTConfig) -> float:
    """nanochat's (Oct-2025) training estimate: 6 x non-embedding params + 12 * L * H * hd * T for attention."""
    n_matmul = num_params(cfg) - cfg.vocab_size * cfg.model_dim
    return float(6 * n_matmul + 12 * cfg.depth * cfg.n_head * cfg.head_dim * cfg.max_seq_len)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks.

def _identity(x, axes):
    return x


def rms_norm(x):
    """Parameter-free RMSNorm over the last axis, reduced in fp32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, dtype):
    """cos, sin of shape positions.shape + (1, head_dim // 2), broadcasting over heads."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BTNH, cos, sin):
    """Rotate channel pairs (i, i + hd/2) by the position's angle (half-split, not interleaved)."""
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def softcap(logits, cap: float):
    return cap * jnp.tanh(logits / cap)


def _attention_impl(dtype, head_dim: int) -> str:
    """cuDNN flash attention on GPUs in bf16/fp16 (jax's implementation=None means XLA); XLA elsewhere.
    NANOJAX_ATTENTION=xla|cudnn overrides."""
    override = os.environ.get("NANOJAX_ATTENTION", "").strip().lower()
    if override:
        if override not in ("xla", "cudnn"):
            raise UserError(f"NANOJAX_ATTENTION={override!r}; allowed: xla, cudnn")
        return override
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def causal_attention(q_BTNH, k_BTKH, v_BTKH, implementation: str):
    """Causal attention with GQA (N a multiple of K). cuDNN refuses some shapes at trace time: fall back to XLA."""
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="cudnn")
        except (NotImplementedError, RuntimeError) as e:
            warnings.warn(f"cuDNN attention unavailable ({e}); using XLA attention")
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="xla")


def _remat(fn, remat):
    """remat=True: keep only the layer inputs (full recompute); False: keep everything; a string: that
    jax.checkpoint_policies policy, e.g. "dots_with_no_batch_dims_saveable" (keeps the weight matmuls' outputs)."""
    if remat is False or remat is None:
        return fn
    if remat is True:
        policy = jax.checkpoint_policies.nothing_saveable
    else:
        policy = getattr(jax.checkpoint_policies, str(remat), None)
        if policy is None or str(remat).startswith("_"):
            raise UserError(f"unknown remat policy {remat!r}; use True, False or a jax.checkpoint_policies name "
                            f"such as 'dots_with_no_batch_dims_saveable'")
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def _linear(x, W):
    """x (..., in) @ W (in, out) as one 2-D matmul. For an N-D x, XLA:CPU builds W's gradient by first copying dY into
    a transposed buffer element by element (~40% of a CPU train step); the 2-D form needs no copy."""
    return (x.reshape(-1, x.shape[-1]) @ W).reshape(*x.shape[:-1], W.shape[-1])


def _qkv(layer, x_BTD, cos, sin, cfg: GPTConfig, dtype):
    """Normed input -> q (B,T,H,hd), k, v (B,T,KV,hd): RoPE on q and k, then QK-norm."""
    B, T, _ = x_BTD.shape
    h = rms_norm(x_BTD)
    q = _linear(h, layer["attn_q"].astype(dtype)).reshape(B, T, cfg.n_head, cfg.head_dim)
    k = _linear(h, layer["attn_k"].astype(dtype)).reshape(B, T, cfg.n_kv_head, cfg.head_dim)
    v = _linear(h, layer["attn_v"].astype(dtype)).reshape(B, T, cfg.n_kv_head, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return rms_norm(q), rms_norm(k), v


def _finish(layer, x_BTD, y_BTNH, dtype, constrain):
    """Attention output projection + residual, then the ReLU^2 MLP + residual."""
    B, T, _ = x_BTD.shape
    x = x_BTD + _linear(y_BTNH.reshape(B, T, -1), layer["attn_o"].astype(dtype))
    x = constrain(x, ("batch", "seq", "embed"))
    u = constrain(jnp.square(jax.nn.relu(_linear(rms_norm(x), layer["mlp_fc"].astype(dtype)))), ("batch", "seq", "mlp"))
    x = x + _linear(u, layer["mlp_proj"].astype(dtype))
    return constrain(x, ("batch", "seq", "embed"))


def _embed(params, tokens_BT, dtype, constrain):
    x = jnp.take(params["wte"], tokens_BT, axis=0).astype(dtype)
    # The lookup's rows keep wte's embed sharding, batch split only over the param replicas: from there to the
    # activation layout is one all-to-all each way (directly, the partitioner gathered the whole batch on a mixed mesh).
    x = constrain(x, ("replica_batch", "seq", "embed"))
    return constrain(rms_norm(x), ("batch", "seq", "embed"))


def _raw_logits(h_BTD, lm_head, dtype):
    """fp32 logits before the softcap (the matmul accumulates and outputs in fp32)."""
    h = h_BTD.reshape(-1, h_BTD.shape[-1])  # 2-D, as in _linear
    logits = jnp.matmul(h, lm_head.astype(dtype), preferred_element_type=jnp.float32)
    return logits.reshape(*h_BTD.shape[:-1], -1)


def _head(h_BTD, lm_head, cfg: GPTConfig, dtype):
    """fp32 soft-capped logits."""
    return softcap(_raw_logits(h_BTD, lm_head, dtype), cfg.softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softcapped_cross_entropy(raw_BTV, targets_BT, cap: float):
    """Cross entropy (nats, 0 where the target is -1) of cap * tanh(raw / cap) logits. Its backward is one fused pass,
    (softmax - onehot) * (1 - (logits / cap)^2), from the saved capped logits and logsumexp; autodiff's took several
    passes over the (B, T, V) logits (~2% of a CPU train step)."""
    return _softcapped_ce_fwd(raw_BTV, targets_BT, cap)[0]


def _softcapped_ce_fwd(raw_BTV, targets_BT, cap):
    logits = softcap(raw_BTV, cap)
    valid = targets_BT >= 0
    safe = jnp.where(valid, targets_BT, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - target_logit, 0.0), (logits, lse, safe, valid)


def _softcapped_ce_bwd(cap, residuals, g_BT):
    logits, lse, safe, valid = residuals
    g = jnp.where(valid, g_BT, 0.0)[..., None]
    onehot = jnp.arange(logits.shape[-1], dtype=safe.dtype) == safe[..., None]
    d_logits = jnp.exp(logits - lse[..., None]) - onehot
    return d_logits * g * (1 - jnp.square(logits * (1.0 / cap))), None


softcapped_cross_entropy.defvjp(_softcapped_ce_fwd, _softcapped_ce_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Training / full-sequence forward.

def hidden_states(params, tokens_BT, cfg: GPTConfig, *, dtype=jnp.float32, constrain: Callable | None = None,
                  remat=True, attn_impl: str | None = None, scan_layers: bool | None = None):
    """Final normed hidden states (B, T, D) in `dtype`, before lm_head (the loss chunks over the head itself).
    scan_layers: lax.scan over the stacked layers, or a Python loop; None = scan, except on CPUs without remat (module
    docstring). The loop never rematerialises: unrolled, XLA is free to run every recomputation early and keep it."""
    constrain = constrain or _identity
    impl = attn_impl or _attention_impl(dtype, cfg.head_dim)
    if impl not in ("xla", "cudnn"):
        raise UserError(f"attention implementation {impl!r}; allowed: xla, cudnn")
    T = tokens_BT.shape[1]
    cos, sin = rope_tables(jnp.arange(T)[None, :], cfg.head_dim, cfg.rope_theta, dtype)

    def block(x, layer):
        q, k, v = _qkv(layer, x, cos, sin, cfg, dtype)
        y = causal_attention(q, k, v, impl)
        return _finish(layer, x, y, dtype, constrain), None

    x = _embed(params, tokens_BT, dtype, constrain)
    rematerialise = remat not in (False, None)
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu" or rematerialise
    if scan_layers:
        x, _ = jax.lax.scan(_remat(block, remat), x, params["blocks"])
    else:
        if rematerialise:
            raise UserError("remat needs the scanned layers (scan_layers=True or None)")
        for i in range(cfg.depth):
            x, _ = block(x, jax.tree.map(lambda w: w[i], params["blocks"]))
    return constrain(rms_norm(x), ("batch", "seq", "embed"))


def forward(params, tokens_BT, cfg: GPTConfig, *, dtype=jnp.float32, constrain: Callable | None = None,
            remat=False, attn_impl: str | None = None, scan_layers: bool | None = None):
    """Logits (B, T, V) fp32, soft-capped, over the whole sequence (no cache: see cached_forward for inference)."""
    h = hidden_states(params, tokens_BT, cfg, dtype=dtype, constrain=constrain, remat=remat, attn_impl=attn_impl,
                      scan_layers=scan_layers)
    return _head(h, params["lm_head"], cfg, dtype)


def token_losses(params, inputs_BT, targets_BT, cfg: GPTConfig, *, dtype=jnp.float32,
                 constrain: Callable | None = None, chunk: int | None = None, remat=True, attn_impl: str | None = None,
                 scan_layers: bool | None = None):
    """Cross entropy in nats per position (B, T) fp32; 0 where the target is -1 (ignored).

    When the (B, T, V) fp32 logits would exceed LOSS_CHUNK_BYTES (or `chunk` positions are asked for), the head,
    softcap and logsumexp run over chunks of positions under jax.checkpoint, so neither the forward nor the backward
    holds more than one chunk's logits. Small enough logits are computed in one piece: no recomputation.
    """
    constrain = constrain or _identity
    h_BTD = hidden_states(params, inputs_BT, cfg, dtype=dtype, constrain=constrain, remat=remat, attn_impl=attn_impl,
                          scan_layers=scan_layers)
    B, T, D = h_BTD.shape
    if chunk is None:
        chunk = max(1, LOSS_CHUNK_BYTES // (B * cfg.vocab_size * 4))
    C = max(1, min(int(chunk), T))
    n = -(-T // C)
    pad = n * C - T
    if pad:
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)), constant_values=-1)
    h_nBCD = h_BTD.reshape(B, n, C, D).swapaxes(0, 1)
    t_nBC = targets_BT.reshape(B, n, C).swapaxes(0, 1)
    lm_head = params["lm_head"].astype(dtype)

    def chunk_losses(args):
        h_BCD, t_BC = args
        raw = constrain(_raw_logits(h_BCD, lm_head, dtype), ("batch", "seq", "vocab"))
        return softcapped_cross_entropy(raw, t_BC, cfg.softcap)

    if n == 1:
        return chunk_losses((h_BTD, targets_BT))[:, :T]
    losses_nBC = jax.lax.map(jax.checkpoint(chunk_losses), (h_nBCD, t_nBC))
    return losses_nBC.swapaxes(0, 1).reshape(B, n * C)[:, :T]


def loss(params, inputs_BT, targets_BT, cfg: GPTConfig, **kw):
    """Mean nats over the targets that are not -1 (scalar fp32); 0 if there are none."""
    losses = token_losses(params, inputs_BT, targets_BT, cfg, **kw)
    count = jnp.sum(targets_BT >= 0)
    return jnp.sum(losses) / jnp.maximum(count, 1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Cached forward for inference: prefill (T > 1) and decode (T == 1) over a KV cache. Used by nanojax.engine.
#
#     dparams = decode_params(params, cfg)                 # once per set of weights (the engine casts them first)
#     cache = init_decode_cache(cfg, batch, length, dtype).replace(start=start_B)
#     logits, cache = cached_forward(dparams, prompt_BT, cache, cfg, dtype, last=T - 1)   # prefill
#     logits, cache = cached_forward(dparams, token_B1, cache, cfg, dtype)                # one decode step
#
# Same weights, same maths (_embed, _finish, _head themselves) as the training forward; the layout differs because a
# decode step is a few tiny matmuls whose cost is mostly overhead (each choice was measured on the CPU, where together
# they made a decode step about 4x faster than a scan-based cached forward): layers are unrolled over per-layer
# weights and caches (no per-step slicing of the stacked weights); q/k/v are one matmul; all rows share one write
# position, so a new token's k/v go in with one in-place dynamic_update_slice (XLA turns a per-row scatter into a
# select over the whole cache); each layer's cache is (B * KV, S, hd), one batch dimension, so attention reads it in
# place (no transposed or reshaped copy); prefill computes the head only at the last position. Prompts of different
# lengths all end where the longest ends, each row masking out the keys before its `start`: RoPE only sees relative
# positions, so the shift changes nothing.

@flax.struct.dataclass
class DecodeCache:
    k: tuple          # per layer (B * KV, S, hd) in the compute dtype, after RoPE and QK-norm; row b's heads together
    v: tuple          # per layer (B * KV, S, hd)
    pos: jax.Array    # () int32: where every row writes its next token
    start: jax.Array  # (B,) int32: a row's first real position (keys before it are padding)


def init_decode_cache(cfg: GPTConfig, batch: int, length: int, dtype) -> DecodeCache:
    """An empty cache of `length` positions for `batch` rows, pos 0, every row starting at 0."""
    zeros = lambda: jnp.zeros((batch * cfg.n_kv_head, length, cfg.head_dim), dtype)  # noqa: E731
    return DecodeCache(k=tuple(zeros() for _ in range(cfg.depth)), v=tuple(zeros() for _ in range(cfg.depth)),
                       pos=jnp.int32(0), start=jnp.zeros((batch,), jnp.int32))


# Cache edits between decode calls (nanojax.batching's turns), one small program per array shape, shared by every
# layer's k and v: cheap to compile, where a program over the whole cache compiles per combination of row, cache and
# prompt buckets (seconds each).

@jax.jit
def take_rows(x, index):
    return x[index]


@functools.partial(jax.jit, static_argnames=("length",))
def shift_rows(x_RSH, shift, *, length: int):
    """Each row moved `shift` positions along a cache of `length`; what wraps around is padding."""
    size = max(length, x_RSH.shape[1])
    return jnp.roll(jnp.pad(x_RSH, ((0, 0), (0, size - x_RSH.shape[1]), (0, 0))), shift, axis=1)[:, :length]


@functools.partial(jax.jit, donate_argnums=(0,))
def put_rows(x_RSH, new_RLH, rows_R, pos):
    """New rows' windows [0, L) written at [pos - L, pos) of rows `rows_R` (an index past the batch: dropped)."""
    S, L = x_RSH.shape[1], new_RLH.shape[1]
    placed = jax.lax.dynamic_slice_in_dim(jnp.pad(new_RLH, ((0, 0), (S, S), (0, 0))), S + L - pos, S, axis=1)
    return x_RSH.at[rows_R].set(placed.astype(x_RSH.dtype), mode="drop")


def decode_params(params, cfg: GPTConfig) -> dict:
    """{"wte", "lm_head", "layers": (layer 0's dict, ...), "rope": (cos, sin)} from the stacked parameter dict, with
    q, k and v joined into one matrix "attn_qkv" (one matmul instead of three: small matmuls cost mostly their launch
    on a CPU), and rope_tables for every position, fp32 (XLA:CPU fuses a step's cos and sin into each of their
    consumers, recomputed for every element: 16 such fusions cost ~40 us of a batch-8 step; a lookup costs nothing)."""
    b = params["blocks"]
    qkv = jnp.concatenate([b["attn_q"], b["attn_k"], b["attn_v"]], axis=-1)
    layers = tuple({"attn_qkv": qkv[i], "attn_o": b["attn_o"][i], "mlp_fc": b["mlp_fc"][i],
                    "mlp_proj": b["mlp_proj"][i]} for i in range(qkv.shape[0]))
    rope = rope_tables(jnp.arange(cfg.max_seq_len), cfg.head_dim, cfg.rope_theta, jnp.float32)
    return {"wte": params["wte"], "lm_head": params["lm_head"], "layers": layers, "rope": rope}


def _qkv_joined(layer, x_BTD, cos, sin, cfg: GPTConfig, dtype):
    """_qkv with the joined matrix: normed input -> q (B,T,H,hd), k, v (B,T,KV,hd), RoPE then QK-norm on q and k."""
    B, T, _ = x_BTD.shape
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    qkv = rms_norm(x_BTD) @ layer["attn_qkv"].astype(dtype)
    q = qkv[..., :H * hd].reshape(B, T, H, hd)
    k = qkv[..., H * hd:(H + KV) * hd].reshape(B, T, KV, hd)
    v = qkv[..., (H + KV) * hd:].reshape(B, T, KV, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return rms_norm(q), rms_norm(k), v


def cached_forward(dparams, tokens_BT, cache: DecodeCache, cfg: GPTConfig, dtype, last=None):
    """Write the T tokens' k/v at positions pos..pos+T-1 (the caller keeps pos + T <= S: dynamic_update_slice would
    clamp) and attend: row b's query i sees key j iff start_b <= j <= pos + i; RoPE turns row b's position j by
    j - start_b. `dparams` come from decode_params.
    Returns (logits fp32 (B, T, V), or (B, 1, V) at query index `last` only when given; the cache with pos + T)."""
    B, T = tokens_BT.shape
    S = cache.k[0].shape[1]
    KV, G, hd = cfg.n_kv_head, cfg.n_head // cfg.n_kv_head, cfg.head_dim
    positions_T = cache.pos + jnp.arange(T, dtype=jnp.int32)
    # RoPE by each row's own position (from its start), not by where it sits in the cache: rows can then be moved
    # along the cache, and a prompt prefilled on its own can join a running batch (nanojax.batching).
    rotation_BT = jnp.clip(positions_T[None, :] - cache.start[:, None], 0, dparams["rope"][0].shape[0] - 1)
    cos, sin = (t[rotation_BT].astype(dtype) for t in dparams["rope"])
    keys_S, queries_Q = jnp.arange(S, dtype=jnp.int32), jnp.repeat(positions_T, G)  # Q = (t, g)
    # R = (b, kv head). A padding query (before its row's start) sees only itself: no all-masked row, no NaN.
    visible_RQS = ((keys_S[None, :] <= queries_Q[:, None])[None]
                   & ((keys_S >= jnp.repeat(cache.start, KV)[:, None])[:, None, :]
                      | (keys_S[None, :] == queries_Q[:, None])[None]))
    x = _embed(dparams, tokens_BT, dtype, _identity)
    at = (0, cache.pos, 0)
    heads_first = lambda y, n: y.reshape(B, T, KV, n, hd).transpose(0, 2, 1, 3, 4).reshape(B * KV, T * n, hd)  # noqa
    ks, vs = [], []
    for layer, k_all, v_all in zip(dparams["layers"], cache.k, cache.v):
        q, k, v = _qkv_joined(layer, x, cos, sin, cfg, dtype)
        # One batch dimension (rows x kv heads) on both sides of the attention matmuls: XLA then reads the updated
        # cache in place (with (B, KV, ...) it reshapes it, fuses the update into the reshape too, and copies).
        k_all = jax.lax.dynamic_update_slice(k_all, heads_first(k, 1).astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, heads_first(v, 1).astype(v_all.dtype), at)
        scores = jnp.einsum("rqh,rsh->rqs", heads_first(q, G), k_all.astype(dtype), preferred_element_type=jnp.float32)
        # QK-norm makes |q| = |k| = sqrt(hd), so a score is at most sqrt(hd) and exp cannot overflow: a softmax
        # without subtracting the max (its reduction was ~1.5% of a batch-8 CPU step).
        weights = jnp.where(visible_RQS, jnp.exp(scores * (1.0 / math.sqrt(hd))), 0.0)
        probs = (weights / jnp.sum(weights, axis=-1, keepdims=True)).astype(dtype)
        y = jnp.einsum("rqs,rsh->rqh", probs, v_all.astype(dtype))
        y = y.reshape(B, KV, T, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, KV * G, hd)
        x = _finish(layer, x, y, dtype, _identity)
        ks.append(k_all)
        vs.append(v_all)
    if last is not None:
        x = jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1)
    logits = _head(rms_norm(x), dparams["lm_head"], cfg, dtype)
    return logits, cache.replace(k=tuple(ks), v=tuple(vs), pos=cache.pos + T)
