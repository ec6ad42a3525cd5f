"""Sampling the next token on the device: greedy, top-k, top-p (nucleus), from reproducible per-row uniform draws.

Pure functions, jitted inside the engine's prefill and decode loop (nanojax.engine).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

def top_k_cap(top_k: int | None, vocab_size: int) -> int | None:
    """The static part of the sampling settings: top-k runs lax.top_k over a power of two of candidates >= top_k
    (top_k itself is traced), so top_k 40 and 50 share a program; None when top-k is off."""
    return None if not top_k else min(vocab_size, 1 << (top_k - 1).bit_length())


def _max_and_first_index(x, axis: int):
    """The max along `axis` and the first index holding it, as a max and a min: XLA:CPU runs argmax as a variadic
    reduce, ~5x slower at a vocabulary of 8,192 (45 us of a 330 us batch-1 decode step). No index holds a NaN max:
    the index is then the axis length."""
    n = x.shape[axis]
    top = jnp.max(x, axis=axis, keepdims=True)
    positions = jnp.arange(n, dtype=jnp.int32).reshape([n if a == axis % x.ndim else 1 for a in range(x.ndim)])
    return jnp.squeeze(top, axis), jnp.min(jnp.where(x == top, positions, n), axis=axis)


def first_argmax(x_BV):
    """jnp.argmax over the last axis (the first index of the max), without XLA:CPU's argmax."""
    return jnp.minimum(_max_and_first_index(x_BV, -1)[1], x_BV.shape[-1] - 1)  # a NaN row: the last index


def top_k_by_columns(x_BV, k: int, groups: int = 8):
    """lax.top_k over the last axis in two small TopKs. XLA:CPU's TopK is a partial sort whose cost is its scan
    (~1 ns an element) and its heap replacements (~50 ns each; ~300 per row of 8,192 shuffled logits): ~150 us for a
    batch-8 decode step. Split each row into `groups` rows of C = V / groups columns: the k largest values lie in the
    k columns with the largest maxima. So take the top k column maxima, then the top k of those k columns' values:
    TopKs over ~C and ~groups x k values, each given its columns' maxima first so that the heap starts nearly full of
    winners (~60 us). Same values and indices as lax.top_k, except which of exactly equal values wins. Other
    backends have their own TopK kernels, and small shapes gain nothing: plain lax.top_k there."""
    B, V = x_BV.shape
    C = V // groups
    if V % groups or V < 1024 or C % k or C < 2 * k or jax.default_backend() != "cpu":
        return jax.lax.top_k(x_BV, k)

    def top_of_grid(grid_BRK):
        """The top k of a (B, R, k) grid, fed to TopK as the k column maxima then the rest: values, rows, columns."""
        R = grid_BRK.shape[1]
        top, row = _max_and_first_index(grid_BRK, 1)
        rest = jnp.where(jnp.arange(R)[None, :, None] == row[:, None, :], -jnp.inf, grid_BRK).reshape(B, R * k)
        values, pos = jax.lax.top_k(jnp.concatenate([top, rest], axis=1), k)
        lead = pos < k  # a column maximum (row[pos]), else rest[pos - k]
        rows = jnp.where(lead, jnp.take_along_axis(jnp.minimum(row, R - 1), jnp.minimum(pos, k - 1), 1),
                         (pos - k) // k)
        return values, rows, jnp.where(lead, pos, (pos - k) % k)

    grid = x_BV.reshape(B, groups, C)  # column c holds x[c], x[c + C], ...
    _, block, lane = top_of_grid(jnp.max(grid, axis=1).reshape(B, C // k, k))
    cols = block * k + lane            # (B, k): the columns with the k largest maxima
    values, row, j = top_of_grid(jnp.take_along_axis(grid, cols[:, None, :], axis=2))
    return values, row * C + jnp.take_along_axis(cols, j, 1)


def uniforms(key, steps_T, rows_B):
    """(T, B) uniform draws in [0, 1): row r at step s draws from fold_in(fold_in(key, s), r), so rows are
    independent and a request is reproducible whatever the chunking. The decode loop draws a whole chunk's at once:
    XLA:CPU runs each threefry call as a small while loop, ~50 us of a batch-8 step when drawn step by step."""
    one = lambda s, r: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, s), r))  # noqa: E731
    return jax.vmap(lambda s: jax.vmap(lambda r: one(s, r))(rows_B))(steps_T)


def sample(logits_BV, u_B, knobs: dict, cap: int | None):
    """One token per row, from its uniform draw u_B (see uniforms). knobs: traced scalars temperature (0 = greedy),
    top_k (used when cap is not None) and top_p (1 = off). Greedy and nucleus sampling are lax.cond branches, so one
    program serves every setting of the knobs."""
    temperature, top_k, top_p = knobs["temperature"], knobs["top_k"], knobs["top_p"]

    def inverse_cdf(probs_BN):
        """Index of the first entry whose cumulative mass reaches the row's uniform draw."""
        cdf = jnp.cumsum(probs_BN, axis=-1)
        u = jnp.maximum(u_B * cdf[:, -1], jnp.finfo(jnp.float32).tiny)  # never a leading zero-probability entry
        return jnp.minimum(jnp.sum(cdf < u[:, None], axis=-1), cdf.shape[-1] - 1)

    def nucleus(probs_BN):
        """Keep the smallest prefix (of probabilities sorted descending) whose mass reaches top_p."""
        return jnp.where(jnp.cumsum(probs_BN, axis=-1) - probs_BN < top_p, probs_BN, 0.0)

    def draw(logits):
        logits = logits / jnp.maximum(temperature, 1e-6)
        if cap is not None:  # candidates sorted by descending logit; ranks >= top_k are masked out
            values, index = top_k_by_columns(logits, cap)
            probs = jax.nn.softmax(jnp.where(jnp.arange(cap) < top_k, values, -jnp.inf), axis=-1)
            probs = jax.lax.cond(top_p < 1, nucleus, lambda p: p, probs)
            return jnp.take_along_axis(index, inverse_cdf(probs)[:, None], axis=-1)[:, 0]

        def sorted_nucleus(logits):  # top-p alone sorts the whole vocabulary
            values, index = jax.lax.top_k(logits, logits.shape[-1])
            choice = inverse_cdf(nucleus(jax.nn.softmax(values, axis=-1)))
            return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0]

        return jax.lax.cond(top_p < 1, sorted_nucleus, lambda x: inverse_cdf(jax.nn.softmax(x, axis=-1)), logits)

    return jax.lax.cond(temperature == 0, first_argmax, draw, logits_BV.astype(jnp.float32)).astype(jnp.int32)


def row_uniforms(seeds_B, steps_BT):
    """(B, T) uniform draws for rows that are different requests: row b at step s draws from
    fold_in(fold_in(key(seed_b), s), 0), the draw `uniforms` gives a one-row request of that seed, so a request served
    among others samples what it would alone."""
    one = lambda seed, s: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), s), 0))  # noqa
    return jax.vmap(lambda seed, steps: jax.vmap(lambda s: one(seed, s))(steps))(seeds_B, steps_BT)


def sample_rows(logits_BV, u_B, temperature_B, top_k_B, top_p_B, cap: int | None):
    """`sample` with the knobs given per row (a batch of different requests): temperature 0 is greedy, top_k 0 is off
    (the whole vocabulary), top_p 1 is off. `cap` (static) bounds the batch's top_k (top_k_cap of its largest); the
    whole-vocabulary path runs only when some sampling row has top_k 0."""
    logits = logits_BV.astype(jnp.float32)
    x = logits / jnp.maximum(temperature_B, 1e-6)[:, None]
    sampling = temperature_B > 0

    def inverse_cdf(probs_BN):
        cdf = jnp.cumsum(probs_BN, axis=-1)
        u = jnp.maximum(u_B * cdf[:, -1], jnp.finfo(jnp.float32).tiny)
        return jnp.minimum(jnp.sum(cdf < u[:, None], axis=-1), cdf.shape[-1] - 1)

    def nucleus(probs_BN):
        kept = jnp.where(jnp.cumsum(probs_BN, axis=-1) - probs_BN < top_p_B[:, None], probs_BN, 0.0)
        return jnp.where(top_p_B[:, None] < 1, kept, probs_BN)

    def whole_vocabulary(x):
        def sorted_nucleus(x):
            values, index = jax.lax.top_k(x, x.shape[-1])
            return jnp.take_along_axis(index, inverse_cdf(nucleus(jax.nn.softmax(values, axis=-1)))[:, None], 1)[:, 0]
        plain = inverse_cdf(jax.nn.softmax(x, axis=-1))
        return jax.lax.cond(jnp.any(sampling & (top_k_B == 0) & (top_p_B < 1)),
                            lambda x: jnp.where(top_p_B < 1, sorted_nucleus(x), plain), lambda x: plain, x)

    def top_k_rows(x):
        values, index = top_k_by_columns(x, cap)
        probs = nucleus(jax.nn.softmax(jnp.where(jnp.arange(cap) < top_k_B[:, None], values, -jnp.inf), axis=-1))
        return jnp.take_along_axis(index, inverse_cdf(probs)[:, None], axis=-1)[:, 0]

    if cap is None:
        sampled = whole_vocabulary(x)
    else:  # each path only when some sampling row takes it, so one program serves every mix of settings
        top = jax.lax.cond(jnp.any(sampling & (top_k_B > 0)), top_k_rows, lambda x: jnp.zeros(x.shape[:1], jnp.int32),
                           x)
        rest = jax.lax.cond(jnp.any(sampling & (top_k_B == 0)), whole_vocabulary, lambda x: top, x)
        sampled = jnp.where(top_k_B > 0, top, rest)
    greedy = jax.lax.cond(jnp.any(~sampling), first_argmax, lambda x: jnp.zeros(x.shape[:1], jnp.int32), logits)
    return jnp.where(sampling, sampled, greedy).astype(jnp.int32)
