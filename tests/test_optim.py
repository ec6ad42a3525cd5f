"""nanojax.optim: orthogonalisation, Muon and AdamW groups, schedules, clipping, sharded == unsharded, convergence."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from nanojax import mesh as meshlib
from nanojax import optim

D, V = 16, 24


def tree_of(shapes_or_fn, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes_or_fn,
                        is_leaf=lambda x: isinstance(x, tuple))


def shapes(L=2, d=D):
    return {"wte": (V, d), "lm_head": (d, V),
            "blocks": {"attn_q": (L, d, d), "attn_o": (L, d, d), "mlp_fc": (L, d, 4 * d), "mlp_proj": (L, 4 * d, d)}}


AXES = {"wte": ("vocab", "embed"), "lm_head": ("embed", "vocab"),
        "blocks": {"attn_q": ("layers", "embed", "heads"), "attn_o": ("layers", "heads", "embed"),
                   "mlp_fc": ("layers", "embed", "mlp"), "mlp_proj": ("layers", "mlp", "embed")}}


def singular_values(X):
    return np.linalg.svd(np.asarray(X, np.float32), compute_uv=False)


# ----------------------------------------------------------------------------------------------------------------------
# Orthogonalisation

@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
@pytest.mark.parametrize("ns", ["newton-schulz", "polar-express"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orthogonalization_is_close_to_semi_orthogonal(shape, ns, dtype):
    G = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 7.0
    coeffs, safety = optim.NS_METHODS[ns]
    X = optim.newton_schulz(jnp.asarray(G), 5, coeffs, dtype=dtype, norm_safety=safety)
    assert X.shape == shape and X.dtype == jnp.float32
    s = singular_values(X)
    assert 0.5 < s.min() and s.max() < 1.5, (s.min(), s.max())
    # the same singular vectors as G: X is close to U V^T
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    assert np.abs(np.asarray(X) - U @ Vt).max() < 0.5
    assert np.linalg.norm(np.asarray(X) - U @ Vt) / np.linalg.norm(U @ Vt) < 0.3


@pytest.mark.parametrize("ns", ["newton-schulz", "polar-express"])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_gram_form_equals_the_plain_iterations(ns, shape):
    """The fp32 Gram-matrix form (used for wide matrices) against the plain iterations: a random matrix and a
    gradient-like one (low rank plus noise, with tiny singular values)."""
    rng = np.random.default_rng(5)
    coeffs, safety = optim.NS_METHODS[ns]
    low_rank = rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1])) + 0.01 * rng.standard_normal(shape)
    for G in (rng.standard_normal(shape), low_rank):
        G = jnp.asarray(G, jnp.float32)
        plain = optim.newton_schulz(G, 5, coeffs, norm_safety=safety, gram=False)
        gram = optim.newton_schulz(G, 5, coeffs, norm_safety=safety, gram=True)
        bf16 = optim.newton_schulz(G, 5, coeffs, norm_safety=safety, dtype=jnp.bfloat16)  # what nanochat runs
        error = lambda X: float(jnp.linalg.norm(X - plain) / jnp.linalg.norm(plain))  # noqa: E731
        assert error(gram) < 5e-3 and error(gram) < error(bf16) / 4, (error(gram), error(bf16))
        np.testing.assert_array_equal(optim.newton_schulz(G, 5, coeffs, norm_safety=safety), gram)  # the default
    square = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)  # not wide enough to gain: plain
    np.testing.assert_array_equal(optim.newton_schulz(square), optim.newton_schulz(square, gram=False))


def test_polar_express_is_tighter_than_the_quintic():
    G = jnp.asarray(np.random.default_rng(1).standard_normal((32, 128)), jnp.float32)
    quintic = singular_values(optim.newton_schulz(G))
    polar = singular_values(optim.newton_schulz(G, 5, optim.POLAR_EXPRESS_COEFFS, norm_safety=1.01))
    assert np.abs(polar - 1).max() < np.abs(quintic - 1).max()


def test_stacked_equals_per_layer():
    G = jnp.asarray(np.random.default_rng(2).standard_normal((3, 16, 40)), jnp.float32)
    stacked = optim.orthogonalize_stacked(G, dtype=jnp.float32)
    for layer in range(3):
        np.testing.assert_allclose(stacked[layer], optim.newton_schulz(G[layer]), rtol=1e-5, atol=1e-6)


def test_zero_matrix_stays_zero():  # the padding layers
    assert not np.any(np.asarray(optim.newton_schulz(jnp.zeros((8, 12)))))


# ----------------------------------------------------------------------------------------------------------------------
# Schedules

def test_lr_schedule_key_steps():
    lrm = optim.schedule(100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 99: 0.1 + 0.9 * 0.05, 100: 0.1}
    for step, value in expected.items():
        assert float(lrm(step)) == pytest.approx(value, abs=1e-6), step
    default = optim.schedule(1000)  # no warmup, constant, last 20% linearly to 0
    assert [float(default(s)) for s in (0, 800, 900, 1000)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert float(jax.jit(default)(jnp.int32(950))) == pytest.approx(0.25)


def test_momentum_schedule():
    momentum = optim.momentum_schedule(300)
    assert [float(momentum(s)) for s in (0, 150, 300, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])


# ----------------------------------------------------------------------------------------------------------------------
# The transformation

def make(params, **kw):
    kw = {"model_dim": D, "grad_clip": None, "muon_dtype": jnp.float32, **kw}
    return optim.make_optimizer(params, **kw)


def test_state_is_a_dict_of_arrays_with_a_step_count():
    params = tree_of(shapes())
    tx = make(params)
    state = tx.init(params)
    assert set(state) == {"count", "mu", "nu"}
    assert jax.tree.structure(state["mu"]) == jax.tree.structure(params)
    assert set(state["nu"]) == {"wte", "lm_head"}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    _, state = jax.jit(tx.update)(tree_of(shapes(), seed=1), state)
    _, state = jax.jit(tx.update)(tree_of(shapes(), seed=2), state)
    assert int(optim.step_count(state)) == 2


def test_muon_first_step_and_d_to_4d_scale():
    params = tree_of(shapes(L=1))
    G = np.random.default_rng(3).standard_normal((D, 4 * D)).astype(np.float32)
    grads = tree_of(shapes(L=1), seed=4)
    grads["blocks"]["mlp_fc"] = G[None]
    grads["blocks"]["mlp_proj"] = G.T[None]
    updates, _ = make(params).update(grads, make(params).init(params))
    ortho = np.asarray(optim.newton_schulz(jnp.asarray(G)))
    # step 0: Nesterov momentum of one gradient is a multiple of it, and orthogonalisation ignores the scale
    np.testing.assert_allclose(updates["blocks"]["mlp_fc"][0], -0.02 * 2.0 * ortho, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(updates["blocks"]["mlp_proj"][0], -0.02 * 1.0 * ortho.T, rtol=1e-4, atol=1e-6)


def test_muon_momentum_follows_the_schedule_from_the_stored_step():
    params = tree_of(shapes())
    grads = tree_of(shapes(), seed=5)
    tx = make(params)
    state = tx.init(params)
    state["count"] = jnp.int32(150)  # as if restored from a checkpoint at step 150: momentum 0.90
    _, new = tx.update(grads, state)
    np.testing.assert_allclose(new["mu"]["blocks"]["attn_q"], 0.10 * grads["blocks"]["attn_q"], rtol=1e-5)
    assert int(new["count"]) == 151


def test_adamw_groups_equal_optax_adamw():
    params = tree_of(shapes(), scale=0.5)
    kw = dict(weight_decay=0.1, model_dim=D, init_lr_frac=0.5)
    tx = make(params, **kw)
    lrm = optim.schedule(10, 0.2, 0.3, 0.1)
    scale = (D / 768) ** -0.5 * 0.5
    ref = {name: optax.adamw(lambda c, lr=lr: lr * scale * lrm(c), b1=0.8, b2=0.95, eps=1e-10, weight_decay=0.1)
           for name, lr in (("wte", 0.2), ("lm_head", 0.004))}
    state = tx.init(params)
    ref_state = {name: ref[name].init(params[name]) for name in ref}
    ours, theirs = dict(params), {name: params[name] for name in ref}
    update, ref_update = jax.jit(tx.update), {name: jax.jit(ref[name].update) for name in ref}
    for step in range(6):
        grads = tree_of(shapes(), seed=10 + step)
        updates, state = update(grads, state, ours, lr_multiplier=lrm(step))  # the loop's host-side schedule
        ours = optax.apply_updates(ours, updates)
        for name in ref:
            u, ref_state[name] = ref_update[name](grads[name], ref_state[name], theirs[name])
            theirs[name] = optax.apply_updates(theirs[name], u)
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    assert not np.allclose(ours["wte"], params["wte"])


def test_gradient_clipping():
    params = tree_of(shapes())
    grads = tree_of(shapes(), seed=6)
    norm = float(optax.tree.norm(grads))
    clipped, _ = make(params, grad_clip=1.0).update(grads, make(params).init(params))
    by_hand, _ = make(params, grad_clip=None).update(jax.tree.map(lambda g: g / norm, grads), make(params).init(params))
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    small = jax.tree.map(lambda g: g / (2 * norm), grads)  # norm 0.5: untouched
    a, _ = make(params, grad_clip=1.0).update(small, make(params).init(params))
    b, _ = make(params, grad_clip=None).update(small, make(params).init(params))
    np.testing.assert_allclose(a["wte"], b["wte"], rtol=1e-6)


def test_bad_names_fail_early():
    with pytest.raises(ValueError, match="polar-express"):
        make(tree_of(shapes()), ns="newton")
    with pytest.raises(ValueError, match="no optimizer group for parameter scale"):
        make({**tree_of(shapes()), "scale": np.ones(3, np.float32)})


# ----------------------------------------------------------------------------------------------------------------------
# Sharded: whole matrices per device, same numbers

@pytest.mark.parametrize("spec", ["8", "data:2,fsdp:4"])
def test_sharded_update_equals_single_device(spec):
    L = 3  # not a multiple of 8 or 4: the padding path
    params = tree_of(shapes(L=L))
    grads = [tree_of(shapes(L=L), seed=s) for s in (7, 8)]

    def run(mesh):
        tx = make(params, mesh=mesh, param_axes=AXES)
        p_shard = meshlib.shardings(AXES, mesh, params)
        state = tx.init(params)
        s_shard = optim.opt_state_shardings(state, p_shard, mesh)
        update = jax.jit(tx.update, in_shardings=(p_shard, s_shard), out_shardings=(p_shard, s_shard))
        state = jax.device_put(state, s_shard)
        for g in grads:
            updates, state = update(jax.device_put(g, p_shard), state)
        return updates, state, p_shard, s_shard

    ref_updates, ref_state, *_ = run(meshlib.make_mesh("1"))
    updates, state, p_shard, s_shard = run(meshlib.make_mesh(spec))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    ax = meshlib.param_axis(meshlib.make_mesh(spec))
    assert s_shard["mu"]["blocks"]["mlp_fc"].spec == P(None, ax)
    assert s_shard["nu"]["wte"].spec == P(None, ax) and s_shard["count"].spec == P()
    assert updates["blocks"]["mlp_proj"].sharding.spec == P(None, None, ax)


def test_newton_schulz_work_is_split_over_devices():
    """8 stacked (64 x 64) matrices on 8 devices: each device orthogonalises one whole matrix, with no collective
    inside the iteration (only the resharding around it)."""
    mesh = meshlib.make_mesh("8")
    G = jnp.zeros((8, 64, 64))

    def compiled(m, spec):
        sharding = jax.sharding.NamedSharding(mesh, spec)
        fn = jax.jit(lambda g: optim.orthogonalize_stacked(g, dtype=jnp.float32, mesh=m,
                                                           logical_axes=("layers", "embed", "mlp")),
                     in_shardings=sharding, out_shardings=sharding)
        return fn.lower(G).compile()

    one_matrix = 5 * 3 * 2 * 64 ** 3  # 5 unrolled iterations of 3 matmuls: one whole matrix's orthogonalisation
    ours = compiled(mesh, P(None, "data"))
    assert ours.cost_analysis()["flops"] < 1.1 * one_matrix
    assert "all-reduce" not in ours.as_text()  # no matmul is split across devices
    redundant = compiled(None, P())  # replicated, no constraint: every device does all 8
    assert redundant.cost_analysis()["flops"] > 7.9 * one_matrix


# ----------------------------------------------------------------------------------------------------------------------
# It optimises

@pytest.mark.parametrize("ns", ["newton-schulz", "polar-express"])
def test_least_squares_loss_decreases(ns):
    rng = np.random.default_rng(9)
    X = jnp.asarray(rng.standard_normal((64, V)), jnp.float32)
    Y = X @ jnp.asarray(rng.standard_normal((V, V)) / np.sqrt(V), jnp.float32)
    params = {"wte": tree_of((V, D), seed=1, scale=0.3), "lm_head": tree_of((D, V), seed=2, scale=0.3),
              "blocks": {"mlp_fc": tree_of((2, D, D), seed=3, scale=0.3)}}

    def loss(p):
        h = X @ p["wte"]
        for layer in range(2):
            h = h + h @ p["blocks"]["mlp_fc"][layer]
        return jnp.mean(jnp.square(h @ p["lm_head"] - Y))

    tx = optim.make_optimizer(params, model_dim=768, ns=ns, embedding_lr=0.05,
                              unembedding_lr=0.05)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    state, losses = tx.init(params), []
    for _ in range(50):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
