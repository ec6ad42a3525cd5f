"""nanojax.sampling: the sampling functions against plain jax ops and known distributions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax.sampling import first_argmax, sample, top_k_by_columns, top_k_cap, uniforms

_sample = jax.jit(sample, static_argnames=("cap",))


def test_first_argmax_equals_argmax_ties_included():
    x = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32)
    x[1, [7, 250]] = 10.0  # a tie: the first index wins, as with argmax
    x[2, :] = 0.0
    x[3, -1] = 99.0
    np.testing.assert_array_equal(jax.jit(first_argmax)(x), np.argmax(x, axis=-1))


@pytest.mark.parametrize("V, k", [(8192, 64), (8192, 1), (1024, 64), (2048, 128), (4096, 512), (300, 5)])
def test_top_k_by_columns_equals_lax_top_k(V, k):
    """Two TopKs over column maxima and their columns: the same values and indices, in the same order (4096 with
    k=512 and 300: plain lax.top_k)."""
    x = np.random.default_rng(V + k).normal(size=(4, V)).astype(np.float32)
    x[1, :: V // 8] += 5.0  # the top values of one row in a single column
    x[2, ::k] += 3.0        # the largest column maxima all at one lane of the first TopK's blocks
    x[3] = np.round(x[3])   # many ties: which of equal values wins may differ
    values, index = map(np.asarray, jax.jit(top_k_by_columns, static_argnums=1)(x, k))
    want_values, want_index = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(index[:3], want_index[:3])
    np.testing.assert_array_equal(np.take_along_axis(x, index, 1), values)
    assert all(len(set(row)) == k for row in index.tolist())


@pytest.mark.parametrize("temperature, top_k, top_p, expected", [
    (1.0, None, 1.0, [0.5, 0.25, 0.15, 0.1]),
    (1.0, 2, 1.0, [2 / 3, 1 / 3, 0, 0]),
    (1.0, None, 0.6, [2 / 3, 1 / 3, 0, 0]),           # keeps the smallest prefix reaching 0.6: tokens 0 and 1
    (1.0, 3, 0.9, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),  # top-p over the renormalised top-k
    (2.0, None, 1.0, np.sqrt([0.5, 0.25, 0.15, 0.1]) / np.sqrt([0.5, 0.25, 0.15, 0.1]).sum()),
    (0.0, None, 1.0, [1, 0, 0, 0]),
])
def test_sampling_distribution(temperature, top_k, top_p, expected):
    rows = 20_000
    probs = np.array([0.15, 0.5, 0.1, 0.25])  # shuffled, so index order is not probability order
    order = np.array([1, 3, 0, 2])              # token ids from most to least likely
    logits = jnp.asarray(np.tile(np.log(probs), (rows, 1)), jnp.float32)
    knobs = {"temperature": np.float32(temperature), "top_k": np.int32(top_k or 0), "top_p": np.float32(top_p)}
    u = uniforms(jax.random.key(0), jnp.array([3]), jnp.arange(rows))[0]
    tokens = np.asarray(_sample(logits, u, knobs, cap=top_k_cap(top_k, 4)))
    freq = np.bincount(tokens, minlength=4)[order] / rows
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert top_k_cap(50, 8192) == 64 and top_k_cap(None, 10) is None and top_k_cap(9, 8) == 8
