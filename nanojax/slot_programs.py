"""The device programs of continuous batching (nanojax.batching runs them): the prefill of a group of joiners (and
the group sizes), and the decode loop over rows that are different requests (per-row sampling knobs, seeds, step counts
and limits)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from nanojax import gpt
from nanojax.engine import advance_rows
from nanojax.sampling import row_uniforms, sample_rows


@flax.struct.dataclass
class SlotState:
    """The decode batch on the device: the cache and each row's request fields (a row's request may change at turns)."""
    cache: gpt.DecodeCache
    token: jax.Array        # (B,) int32: the last emitted token, fed at the next step
    step: jax.Array         # (B,) int32: tokens emitted so far by the row's request
    done: jax.Array         # (B,) bool: finished, cancelled or empty
    limit: jax.Array        # (B,) int32: done after this many tokens
    seed: jax.Array         # (B,) uint32: the request's seed
    temperature: jax.Array  # (B,) float32
    top_k: jax.Array        # (B,) int32, 0 = off
    top_p: jax.Array        # (B,) float32, 1 = off
    forced: jax.Array       # (B, FORCED_SLOTS) int32: as in engine.DecodeState
    forced_len: jax.Array   # (B,) int32
    forced_pos: jax.Array   # (B,) int32
    more: jax.Array         # (B,) bool
    host: jax.Array         # () bool: the last call stopped for Python


def prefill_groups(joiners: int, sizes: list[int]) -> list[int]:
    """Prefill group sizes for `joiners` (sizes 1, 4, 16, ...): the smallest that holds the rest if at most half of it
    is padding, else the largest they fill (a group reads the weights once; few sizes keep the programs few)."""
    out = []
    while joiners > 0:
        fits = [P for P in sizes if joiners <= P <= 2 * joiners]
        out.append(fits[0] if fits else max(P for P in sizes if P <= joiners))
        joiners -= out[-1]
    return out


def prefill(engine, params, prompts_PL, start_P, knobs, *, cap):
    """A group of joiners' prompts (each right-aligned in a bucket) through the model: each joiner's cache windows
    (per layer, (KV, L, hd)) and the first tokens (sampled at step 0 of each seed, as engine.generate would)."""
    P, L = prompts_PL.shape
    cache = gpt.init_decode_cache(engine.cfg, P, L, engine.dtype).replace(start=start_P)
    logits, cache = engine._forward(params, prompts_PL, cache, last=L - 1)
    u = row_uniforms(knobs["seed"], jnp.zeros((P, 1), jnp.int32))[:, 0]
    first = sample_rows(logits[:, 0], u, knobs["temperature"], knobs["top_k"], knobs["top_p"], cap)
    split = lambda xs: tuple(tuple(x.reshape(P, -1, *x.shape[1:])[i] for x in xs) for i in range(P))  # noqa
    return split(cache.k), split(cache.v), first


def place_firsts(token_B, done_B, rows_P, first_P, stops):
    """A prefilled group's first tokens written into its rows (an index past the batch, a padding row's, is dropped),
    on the device: the decode call is queued behind the prefill without waiting for Python to read them. A row whose
    first token is a stop is done."""
    stopped = jnp.zeros_like(done_B).at[rows_P].set(jnp.isin(first_P, stops), mode="drop")
    return token_B.at[rows_P].set(first_P, mode="drop"), done_B | stopped


def decode(engine, chunk: int, params, state: SlotState, stops, python_end, steps, *, cap):
    """engine._decode with per-row sampling knobs, seeds and step counts, and at most `steps` steps."""
    B, T = state.token.shape[0], chunk
    n_steps = jnp.minimum(jnp.minimum(T, steps), state.cache.k[0].shape[1] - state.cache.pos)
    steps_BT = state.step[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    u_TB = jax.lax.cond(jnp.any(state.temperature > 0), lambda: row_uniforms(state.seed, steps_BT).T,
                        lambda: jnp.zeros((T, B), jnp.float32))

    def step(carry):
        i, st, tokens, masks, _ = carry
        logits, cache = engine._forward(params, st.token[:, None], st.cache)
        sampled = sample_rows(logits[:, 0], jax.lax.dynamic_index_in_dim(u_TB, i, keepdims=False),
                              st.temperature, st.top_k, st.top_p, cap)
        return advance_rows(i, st, tokens, masks, sampled, cache, stops, python_end)

    init = (jnp.int32(0), state, jnp.zeros((B, T), jnp.int32), jnp.zeros((B, T), bool),
            jnp.all(state.done) | state.host)
    n, state, tokens, masks, _ = jax.lax.while_loop(lambda c: (c[0] < n_steps) & ~c[4], step, init)
    return state, tokens, masks, n, state.host
