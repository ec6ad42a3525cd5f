import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax import gpt
from nanojax.common import UserError
from nanojax.config import GPTConfig

V, T = 320, 16  # V differs from every model width, so a (..., V) shape can only be logits
MHA = GPTConfig.from_depth(2, vocab_size=V, head_dim=32, max_seq_len=64)  # D 128, 4 heads
GQA = GPTConfig.from_depth(2, vocab_size=V, head_dim=32, n_kv_head=2, max_seq_len=64)
STATIC = ("cfg", "dtype", "chunk", "remat", "scan_layers")
# Jitted once per shape and reused across tests: compiles dominate this file's time.
forward = jax.jit(gpt.forward, static_argnames=("cfg", "dtype", "remat"))
token_losses = jax.jit(gpt.token_losses, static_argnames=STATIC)
loss_and_grad = jax.jit(jax.value_and_grad(gpt.loss), static_argnames=STATIC)


def random_params(cfg, seed=0):
    """Init zeroes lm_head and the output projections, which would hide most bugs: fill every weight instead."""
    params = gpt.init_params(cfg, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) / math.sqrt(x.shape[-2]) if x.ndim == 3 or
                                     x.shape[0] == cfg.model_dim else jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def gqa_params():
    return random_params(GQA)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, V, (2, T)).astype(np.int32)
    targets = rng.integers(0, V, (2, T)).astype(np.int32)
    targets[0, :3] = -1
    targets[1, 7] = -1
    return jnp.asarray(inputs), jnp.asarray(targets)


def naive_loss(params, inputs, targets, cfg):
    logits = gpt.forward(params, inputs, cfg)
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = targets >= 0
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Sizes.

def test_param_counts_equal_nanochats():
    assert gpt.num_params(GPTConfig.from_depth(20)) == 560_988_160
    assert gpt.num_params(GPTConfig.from_depth(32)) == 1_879_048_192
    assert gpt.flops_per_token(GPTConfig.from_depth(32)) == pytest.approx(1.20796e10, rel=1e-5)  # run1000.sh's log


def test_flops_per_token_by_hand():
    # D 128, 4 heads of 32, 2 kv heads, 2 layers, vocab 320, T 64.
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 2 * 128 * 512
    assert gpt.num_params(GQA) == 320 * 128 * 2 + 2 * per_layer
    assert gpt.flops_per_token(GQA) == 6 * (2 * per_layer + 128 * 320) + 12 * 2 * 4 * 32 * 64


def test_abstract_params_and_axes_match_the_real_tree():
    params = gpt.init_params(GQA)
    abstract = gpt.abstract_params(GQA)
    axes = gpt.param_axes(GQA)
    assert set(params) == {"wte", "blocks", "lm_head"} and type(params["blocks"]) is dict
    assert set(params["blocks"]) == {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_fc", "mlp_proj"}
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.map(lambda a, p: (a.shape, a.dtype) == (p.shape, p.dtype), abstract, params) == \
        jax.tree.map(lambda _: True, params)
    is_axes = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    sizes = {"vocab": V, "embed": 128, "layers": 2, "heads": 128, "kv_heads": 64, "mlp": 512}
    for names, p in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params)):
        assert tuple(sizes[n] for n in names) == p.shape
    assert params["blocks"]["attn_q"].shape == (2, 128, 128) and params["blocks"]["attn_k"].shape == (2, 128, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Init.

def test_init_statistics():
    cfg = GPTConfig.from_depth(4, vocab_size=1024, head_dim=64, n_kv_head=1)  # D 256, 4 heads, 1 kv head
    p = gpt.init_params(cfg, seed=3)
    b = p["blocks"]
    for w in (p["lm_head"], b["attn_o"], b["mlp_proj"]):
        assert not np.any(np.asarray(w))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    D = 256
    expected = {"wte": (p["wte"], 1.0), "attn_q": (b["attn_q"], D ** -0.5), "mlp_fc": (b["mlp_fc"], D ** -0.5),
                "attn_k": (b["attn_k"], D ** -0.5 * (64 / D) ** 0.5), "attn_v": (b["attn_v"], D ** -0.5 * 0.5)}
    for name, (w, std) in expected.items():
        w = np.asarray(w)
        assert abs(w.mean()) < 0.05 * std, name
        assert w.std() == pytest.approx(std, rel=0.03), name
    # Layers are drawn independently, seeds differ, a seed repeats.
    assert not np.allclose(b["attn_q"][0], b["attn_q"][1])
    assert not np.allclose(p["wte"], gpt.init_params(cfg, seed=4)["wte"])
    np.testing.assert_array_equal(p["wte"], gpt.init_params(cfg, seed=3)["wte"])


def test_fresh_model_predicts_uniform(batch):
    inputs, targets = batch
    params = gpt.init_params(GQA)
    value, _ = loss_and_grad(params, inputs, targets, cfg=GQA, chunk=5)
    assert float(value) == pytest.approx(math.log(V), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Forward.

def test_causal_masking(gqa_params, batch):
    inputs, _ = batch
    logits = forward(gqa_params, inputs, cfg=GQA)
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(logits))) <= 15.0 and float(jnp.std(logits)) > 0.5  # soft-capped, not degenerate
    changed = inputs.at[:, 9].set((inputs[:, 9] + 1) % V)
    logits2 = forward(gqa_params, changed, cfg=GQA)
    np.testing.assert_array_equal(logits[:, :9], logits2[:, :9])
    assert float(jnp.max(jnp.abs(logits[:, 9:] - logits2[:, 9:]))) > 1e-3


def reference_forward(params, tokens, cfg):
    """The architecture written out plainly in numpy (fp64), one head at a time, as an independent check."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    norm = lambda x: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    T, hd, G = tokens.shape[1], cfg.head_dim, cfg.n_head // cfg.n_kv_head
    angle = np.arange(T)[:, None] * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(x):  # (T, hd): rotate channel i with channel i + hd/2
        a, b = x[:, :hd // 2], x[:, hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    out = []
    for row in np.asarray(tokens):
        x = norm(p["wte"][row])
        for l in range(cfg.depth):
            w = {k: v[l] for k, v in p["blocks"].items()}
            h = norm(x)
            q, k, v = h @ w["attn_q"], h @ w["attn_k"], h @ w["attn_v"]
            heads = []
            for n in range(cfg.n_head):
                g = n // G  # query head n reads kv head n // G
                qn, kn = norm(rope(q[:, n * hd:(n + 1) * hd])), norm(rope(k[:, g * hd:(g + 1) * hd]))
                scores = qn @ kn.T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                heads.append((probs / probs.sum(-1, keepdims=True)) @ v[:, g * hd:(g + 1) * hd])
            x = x + np.concatenate(heads, axis=-1) @ w["attn_o"]
            x = x + np.maximum(norm(x) @ w["mlp_fc"], 0) ** 2 @ w["mlp_proj"]
        out.append(15 * np.tanh(norm(x) @ p["lm_head"] / 15))
    return np.stack(out)


def test_forward_matches_a_plain_reference(gqa_params, batch):
    np.testing.assert_allclose(forward(gqa_params, batch[0], cfg=GQA), reference_forward(gqa_params, batch[0], GQA),
                               atol=2e-4)


def test_module_call_equals_forward(batch):
    from flax import nnx
    model = gpt.GPT(GQA, rngs=nnx.Rngs(0))
    params = gpt.init_params(GQA, 0)
    model.lm_head[...] = 0.1 * params["wte"].T  # make the logits non-trivial
    params["lm_head"] = 0.1 * params["wte"].T
    np.testing.assert_allclose(model(batch[0]), gpt.forward(params, batch[0], GQA), atol=1e-6)


def test_bf16_forward_close_to_fp32(gqa_params, batch):
    inputs, _ = batch
    l32 = forward(gqa_params, inputs, cfg=GQA)
    l16 = forward(gqa_params, inputs, cfg=GQA, dtype=jnp.bfloat16)
    assert l16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(l16 - l32)))
    assert err < 0.05 * float(jnp.max(jnp.abs(l32))), err
    assert float(jnp.mean(jnp.argmax(l16, -1) == jnp.argmax(l32, -1))) > 0.9
    # Training in bf16: master weights and their gradients stay fp32, the loss stays close.
    loss16, grads16 = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5, dtype=jnp.bfloat16)
    loss32, grads32 = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5)
    assert loss16.dtype == jnp.float32 and float(loss16) == pytest.approx(float(loss32), rel=0.02)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    cosine = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert all(cosine(a, b) > 0.95 for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)))


def test_constrain_sees_the_residual_stream(gqa_params, batch):
    seen = []

    def constrain(x, axes):
        assert x.ndim == len(axes)
        seen.append(axes)
        return x

    gpt.loss(gqa_params, *batch, GQA, constrain=constrain)
    assert ("batch", "seq", "embed") in seen and ("batch", "seq", "vocab") in seen


# ----------------------------------------------------------------------------------------------------------------------
# Cached forward (inference): decode_params + init_decode_cache + cached_forward.

cached_forward = jax.jit(gpt.cached_forward, static_argnames=("cfg", "dtype"))


def test_decode_params_join_qkv_and_unstack_layers(gqa_params):
    d = gpt.decode_params(gqa_params, GQA)
    b = gqa_params["blocks"]
    assert set(d) == {"wte", "lm_head", "layers", "rope"} and len(d["layers"]) == GQA.depth
    cos, sin = gpt.rope_tables(jnp.arange(7, 9), GQA.head_dim, GQA.rope_theta, jnp.float32)
    np.testing.assert_array_equal(d["rope"][0][7:9], cos)  # a lookup of what the training forward computes
    np.testing.assert_array_equal(d["rope"][1][7:9], sin)
    for i, layer in enumerate(d["layers"]):
        assert set(layer) == {"attn_qkv", "attn_o", "mlp_fc", "mlp_proj"}
        assert layer["attn_qkv"].shape == (128, 128 + 64 + 64)  # q (H*hd) | k (KV*hd) | v (KV*hd)
        np.testing.assert_array_equal(layer["attn_qkv"], np.concatenate([b["attn_q"][i], b["attn_k"][i],
                                                                          b["attn_v"][i]], axis=-1))
        np.testing.assert_array_equal(layer["mlp_proj"], b["mlp_proj"][i])


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_cached_forward_equals_full_forward(cfg, gqa_params):
    """Two rows with different starts (prompts of 5 and 8 tokens, both ending at position 8; row 0 left-padded with
    junk), prefilled in two pieces, then 4 decode steps: every real position's logits equal the full forward's over
    that row's own sequence (RoPE sees only relative positions, so the shift changes nothing)."""
    params = gqa_params if cfg is GQA else random_params(cfg, seed=5)
    dparams = gpt.decode_params(params, cfg)
    steps, S = 4, 24
    rng = np.random.default_rng(1)
    full = jnp.asarray(rng.integers(0, V, (2, T)).astype(np.int32))
    reference = forward(params, full, cfg=cfg)  # causal: row 0's logits at i are those of full[0, :i + 1]
    prompt = jnp.stack([jnp.concatenate([jnp.asarray(rng.integers(0, V, 3), jnp.int32), full[0, :5]]), full[1, :8]])

    cache = gpt.init_decode_cache(cfg, batch=2, length=S, dtype=jnp.float32).replace(start=jnp.array([3, 0]))
    assert len(cache.k) == len(cache.v) == cfg.depth and cache.k[0].shape == (2 * cfg.n_kv_head, S, 32)
    assert cache.pos.dtype == jnp.int32 and cache.pos.shape == ()
    logits_a, cache = cached_forward(dparams, prompt[:, :4], cache, cfg=cfg, dtype=jnp.float32)
    assert int(cache.pos) == 4
    logits_b, cache = cached_forward(dparams, prompt[:, 4:], cache, cfg=cfg, dtype=jnp.float32)
    assert int(cache.pos) == 8
    prefill = jnp.concatenate([logits_a, logits_b], axis=1)
    assert prefill.shape == (2, 8, V) and bool(jnp.all(jnp.isfinite(prefill)))  # padding queries too: no NaN
    np.testing.assert_allclose(prefill[0, 3:], reference[0, :5], atol=2e-4)
    np.testing.assert_allclose(prefill[1], reference[1, :8], atol=2e-4)

    for s in range(steps):
        tok = jnp.stack([full[0, 5 + s], full[1, 8 + s]])[:, None]
        logits, cache = cached_forward(dparams, tok, cache, cfg=cfg, dtype=jnp.float32)
        assert logits.shape == (2, 1, V)
        np.testing.assert_allclose(logits[0, 0], reference[0, 5 + s], atol=2e-4)
        np.testing.assert_allclose(logits[1, 0], reference[1, 8 + s], atol=2e-4)
    assert int(cache.pos) == 8 + steps

    # One-piece prefill with `last`: only that query's logits come back, equal to the two-piece ones.
    one = gpt.init_decode_cache(cfg, batch=2, length=S, dtype=jnp.float32).replace(start=jnp.array([3, 0]))
    last_logits, one = cached_forward(dparams, prompt, one, cfg=cfg, dtype=jnp.float32, last=7)
    assert last_logits.shape == (2, 1, V) and int(one.pos) == 8
    np.testing.assert_allclose(last_logits[:, 0], prefill[:, 7], atol=2e-5)


def test_cached_forward_in_bf16(gqa_params, batch):
    dparams = jax.tree.map(lambda x: x.astype(jnp.bfloat16), gpt.decode_params(gqa_params, GQA))  # as the engine casts
    cache = gpt.init_decode_cache(GQA, batch=2, length=T, dtype=jnp.bfloat16)
    logits, cache = cached_forward(dparams, batch[0], cache, cfg=GQA, dtype=jnp.bfloat16)
    assert all(k.dtype == jnp.bfloat16 for k in cache.k + cache.v) and int(cache.pos) == T
    assert logits.dtype == jnp.float32 and logits.shape == (2, T, V)
    l16 = forward(gqa_params, batch[0], cfg=GQA, dtype=jnp.bfloat16)
    np.testing.assert_allclose(logits, l16, atol=0.1)
    l32 = forward(gqa_params, batch[0], cfg=GQA)
    assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(l32, -1))) > 0.9


# ----------------------------------------------------------------------------------------------------------------------
# Loss.

@pytest.fixture(scope="module")
def naive(gqa_params, batch):
    per_token = jax.jit(naive_loss, static_argnums=3)(gqa_params, *batch, GQA)
    mean_loss = lambda p: jnp.sum(naive_loss(p, *batch, GQA)) / jnp.sum(batch[1] >= 0)
    grads = jax.jit(jax.grad(mean_loss))(gqa_params)
    return per_token, grads


def test_token_losses_equal_naive_cross_entropy(gqa_params, batch, naive):
    _, targets = batch
    ref, _ = naive
    for chunk in (T, 5):  # unchunked, and chunks that do not divide T
        got = token_losses(gqa_params, *batch, cfg=GQA, chunk=chunk)
        assert got.shape == (2, T) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.sum(jnp.abs(got[targets < 0]))) == 0.0 and float(jnp.min(got[targets >= 0])) > 0
    mean, _ = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5)
    assert float(mean) == pytest.approx(float(jnp.sum(ref) / jnp.sum(targets >= 0)), rel=1e-5)


def test_chunked_loss_gradients_equal_naive(gqa_params, batch, naive):
    _, ref_grads = naive
    _, grads = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_remat_does_not_change_loss_or_grads(gqa_params, batch, naive):
    _, ref_grads = naive
    full_remat, _ = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5)  # the default, remat=True
    for remat in (False, "dots_with_no_batch_dims_saveable"):
        value, grads = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5, remat=remat)
        assert float(value) == pytest.approx(float(full_remat), rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
    with pytest.raises(UserError, match="unknown remat policy 'bogus'"):
        gpt.loss(gqa_params, *batch, GQA, remat="bogus")


def test_scan_and_loop_over_layers_agree(gqa_params, batch, naive):
    """Accelerators scan the stacked layers, CPUs loop over them in Python: the same loss and gradients."""
    _, ref_grads = naive
    values = []
    for scan_layers in (True, False):
        value, grads = loss_and_grad(gqa_params, *batch, cfg=GQA, chunk=5, remat=False, scan_layers=scan_layers)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
        values.append(float(value))
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_remat_saves_memory():
    """Full remat shrinks XLA's plan: the default picks the scanned layers whenever remat is on (unrolled, XLA would
    run every recomputation early and keep it all), and the loop refuses remat rather than ignore it."""
    cfg = GPTConfig.from_depth(4, vocab_size=V, head_dim=32, max_seq_len=256)
    params = gpt.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    temp = {}
    for remat in (True, False):
        grad = jax.jit(jax.grad(lambda p, x: gpt.loss(p, x, x, cfg, remat=remat)))
        temp[remat] = grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.6 * temp[False], temp
    with pytest.raises(UserError, match="remat needs the scanned layers"):
        gpt.loss(random_params(GQA), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32), GQA, remat=True,
                 scan_layers=False)


def test_softcapped_cross_entropy_gradient_equals_autodiff():
    """The hand-written backward against autodiff of the plain formula, with ignored targets and uneven weights."""
    rng = np.random.default_rng(3)
    raw = jnp.asarray(rng.normal(0, 20, (3, 5, 11)), jnp.float32)  # beyond the cap, where tanh bends
    targets = jnp.asarray(rng.integers(0, 11, (3, 5)), jnp.int32).at[1, 2].set(-1).at[2, 0].set(-1)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, (3, 5)), jnp.float32)

    def plain(raw):
        logp = jax.nn.log_softmax(gpt.softcap(raw, 15.0), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(targets >= 0, nll, 0.0)

    fused = lambda raw: gpt.softcapped_cross_entropy(raw, targets, 15.0)  # noqa: E731
    np.testing.assert_allclose(fused(raw), plain(raw), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda r: jnp.sum(fused(r) * weights))(raw)
    want = jax.grad(lambda r: jnp.sum(plain(r) * weights))(raw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got[1, 2]).max()) == 0.0  # an ignored target sends no gradient


def test_attention_override(gqa_params, batch, monkeypatch):
    monkeypatch.setenv("NANOJAX_ATTENTION", "flash")
    with pytest.raises(UserError, match="NANOJAX_ATTENTION='flash'; allowed: xla, cudnn"):
        gpt.forward(gqa_params, batch[0], GQA)
    monkeypatch.setenv("NANOJAX_ATTENTION", "xla")
    np.testing.assert_allclose(gpt.forward(gqa_params, batch[0], GQA), forward(gqa_params, batch[0], cfg=GQA),
                               rtol=1e-5, atol=1e-5)  # eager against jitted: fusion may round differently


def _avals(jaxpr):
    """Every intermediate's abstract value, including inside scan/checkpoint/map bodies."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_loss_never_materialises_full_logits(gqa_params, batch):
    chunk = 4
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda p: gpt.loss(p, *batch, GQA, chunk=chunk)))(gqa_params)
    logits_sizes = [math.prod(a.shape) for a in _avals(jaxpr.jaxpr) if a.ndim >= 3 and a.shape[-1] == V]
    assert logits_sizes and max(logits_sizes) == 2 * chunk * V  # one chunk's (B, chunk, V); all: 2 * 16 * V
    jaxpr = jax.make_jaxpr(lambda p: naive_loss(p, *batch, GQA))(gqa_params)  # the check does see full logits
    assert max(math.prod(a.shape) for a in _avals(jaxpr.jaxpr) if a.ndim >= 3 and a.shape[-1] == V) == 2 * T * V


def test_sharded_loss_equals_single_device(gqa_params, batch, naive):
    """Params split over 8 devices on their embed axis, batch over rows, activations constrained by logical names:
    the same loss and gradients (the contract nanojax.mesh builds on)."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    to_mesh = {"batch": "data", "embed": "data"}

    def constrain(x, axes):
        names = [to_mesh.get(a) for a in axes]
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*names[:1], *[None] * (len(axes) - 1))))

    is_axes = lambda x: isinstance(x, tuple)
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, P(*[to_mesh.get(n) if n == "embed" else None for n in a])),
                             gpt.param_axes(GQA), is_leaf=is_axes)
    params = jax.device_put(gqa_params, shardings)
    inputs, targets = (jnp.tile(x, (4, 1)) for x in batch)  # 8 rows, one per device
    rows = NamedSharding(mesh, P("data"))
    step = jax.jit(jax.value_and_grad(lambda p, x, y: gpt.loss(p, x, y, GQA, constrain=constrain, chunk=5)))
    value, grads = step(params, jax.device_put(inputs, rows), jax.device_put(targets, rows))
    ref_tokens, ref_grads = naive
    assert float(value) == pytest.approx(float(jnp.sum(ref_tokens) / jnp.sum(batch[1] >= 0)), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
