"""nanojax.mesh: --mesh specs, the rules table, shardings that land, and sharded == unsharded results."""
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from nanojax import mesh as meshlib
from nanojax.common import UserError

L, D, H, KV, V = 2, 16, 16, 8, 24  # layers, model dim, q width (H*hd), kv width, vocab


def param_shapes(d=D):
    return {"wte": (V, d), "lm_head": (d, V),
            "blocks": {"attn_q": (L, d, H), "attn_k": (L, d, KV), "attn_v": (L, d, KV), "attn_o": (L, H, d),
                       "mlp_fc": (L, d, 4 * d), "mlp_proj": (L, 4 * d, d)}}


PARAM_AXES = {"wte": ("vocab", "embed"), "lm_head": ("embed", "vocab"),
              "blocks": {"attn_q": ("layers", "embed", "heads"), "attn_k": ("layers", "embed", "kv_heads"),
                         "attn_v": ("layers", "embed", "kv_heads"), "attn_o": ("layers", "heads", "embed"),
                         "mlp_fc": ("layers", "embed", "mlp"), "mlp_proj": ("layers", "mlp", "embed")}}


def random_params(d=D, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no compile per shape
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s)).astype(np.float32), param_shapes(d),
                        is_leaf=lambda x: isinstance(x, tuple))


# ----------------------------------------------------------------------------------------------------------------------
# Specs

@pytest.mark.parametrize("spec, sizes", [
    ("1", {"data": 1, "fsdp": 1}), ("8", {"data": 8, "fsdp": 1}), ("data:8", {"data": 8, "fsdp": 1}),
    ("data:2,fsdp:4", {"data": 2, "fsdp": 4}), ("fsdp:8", {"data": 1, "fsdp": 8}),
    (" fsdp:4 , data:2 ", {"data": 2, "fsdp": 4}),
])
def test_parse_mesh(spec, sizes):
    assert meshlib.parse_mesh(spec, 8) == sizes
    mesh = meshlib.make_mesh(spec)
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == sizes
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("spec, why", [
    ("3", "needs 3 devices"), ("data:2,fsdp:2", "needs 4 devices"), ("model:8", "unknown axis 'model'"),
    ("data:x", "malformed"), ("data=8", "malformed"), ("", "malformed"), ("data:8,data:1", "given twice"),
    ("data:0,fsdp:8", "at least 1"),
])
def test_bad_mesh_specs(spec, why):
    with pytest.raises(UserError) as err:
        meshlib.make_mesh(spec)
    message = str(err.value)
    assert why in message and repr(spec) in message and "8 devices" in message and "data:2,fsdp:4" in message


def test_mesh_1_uses_one_device():
    assert meshlib.make_mesh("1").devices.size == 1


# ----------------------------------------------------------------------------------------------------------------------
# The rules

def test_param_specs_on_mesh_8_and_2x4():
    m8, m24 = meshlib.make_mesh("8"), meshlib.make_mesh("data:2,fsdp:4")
    assert meshlib.param_axis(m8) == "data" and meshlib.param_axis(m24) == "fsdp"
    assert meshlib.param_axis(meshlib.make_mesh("fsdp:8")) == "fsdp"
    for mesh, ax in [(m8, "data"), (m24, "fsdp")]:
        specs = jax.tree.map(lambda s: s.spec, meshlib.shardings(PARAM_AXES, mesh, param_shapes()))
        assert specs["wte"] == P(None, ax)
        assert specs["lm_head"] == P(ax)
        assert specs["blocks"]["attn_q"] == P(None, ax)
        assert specs["blocks"]["attn_o"] == P(None, None, ax)
        assert specs["blocks"]["mlp_proj"] == P(None, None, ax)
    assert jax.tree.leaves(jax.tree.map(lambda s: s.spec, meshlib.shardings(PARAM_AXES, meshlib.make_mesh("1")))) \
        == [P()] * 8


def test_activation_and_batch_specs():
    m8, m24 = meshlib.make_mesh("8"), meshlib.make_mesh("data:2,fsdp:4")
    # batch takes every data-parallel axis, so the embed of activations stays whole
    assert meshlib.logical_to_mesh(("batch", "seq", "embed"), m8) == P("data")
    assert meshlib.logical_to_mesh(("batch", "seq", "embed"), m24) == P(("data", "fsdp"))
    assert meshlib.batch_sharding(m24).spec == P(("data", "fsdp"))
    assert meshlib.axis_size("batch", m24) == 8 and meshlib.axis_size("embed", m24) == 4
    # the embedding lookup's layout: batch over the param replicas only, embed like wte (on data:8, the batch layout)
    assert meshlib.logical_to_mesh(("replica_batch", "seq", "embed"), m24) == P("data", None, "fsdp")
    assert meshlib.logical_to_mesh(("replica_batch", "seq", "embed"), m8) == P("data")
    # KV cache rows over the data axes; one row (a single chat) does not split: replicated
    cache_axes = ("layers", "batch", "seq", "kv_heads", "head_dim")
    assert meshlib.logical_to_mesh(cache_axes, m8, (2, 8, 32, 2, 8)) == P(None, "data")
    assert meshlib.logical_to_mesh(cache_axes, m8, (2, 1, 32, 2, 8)) == P()
    assert meshlib.logical_to_mesh(("batch", "seq", "embed"), m8, (1, 1, 16)) == P()  # embed never takes batch's axes
    with pytest.raises(ValueError, match="unknown logical axis 'nonsense'"):
        meshlib.logical_to_mesh(("nonsense",), m8)


def test_non_divisible_dims_stay_replicated():
    m8, m24 = meshlib.make_mesh("8"), meshlib.make_mesh("data:2,fsdp:4")
    shapes = param_shapes(d=12)  # 12 % 8 != 0, 12 % 4 == 0
    specs8 = jax.tree.map(lambda s: s.spec, meshlib.shardings(PARAM_AXES, m8, shapes))
    assert set(jax.tree.leaves(specs8)) == {P()}
    specs24 = jax.tree.map(lambda s: s.spec, meshlib.shardings(PARAM_AXES, m24, shapes))
    assert specs24["blocks"]["mlp_fc"] == P(None, "fsdp")
    params = jax.device_put(random_params(d=12), meshlib.shardings(PARAM_AXES, m8, shapes))
    assert all(s.data.shape == (V, 12) for s in params["wte"].addressable_shards)


@pytest.mark.parametrize("spec, shards", [("8", 8), ("data:2,fsdp:4", 4)])
def test_params_land_sharded(spec, shards):
    mesh = meshlib.make_mesh(spec)
    params = random_params()
    placed = jax.device_put(params, meshlib.shardings(PARAM_AXES, mesh, params))
    assert {s.data.shape for s in placed["wte"].addressable_shards} == {(V, D // shards)}
    assert {s.data.shape for s in placed["blocks"]["mlp_proj"].addressable_shards} == {(L, 4 * D, D // shards)}
    assert {s.data.shape for s in placed["blocks"]["mlp_fc"].addressable_shards} == {(L, D // shards, 4 * D)}
    assert len(placed["wte"].addressable_shards) == 8  # on data:2,fsdp:4 each shard lives on 2 devices
    np.testing.assert_array_equal(np.asarray(placed["wte"]), np.asarray(params["wte"]))


# ----------------------------------------------------------------------------------------------------------------------
# Sharded programs give the unsharded answer

def tiny_loss(params, tokens_BT, constrain):
    """A stand-in for the GPT: embedding, per-layer attention-ish and MLP matmuls, lm_head, cross-entropy."""
    x = constrain(params["wte"][tokens_BT[:, :-1]], ("batch", "seq", "embed"))
    b = params["blocks"]
    for layer in range(L):
        q = x @ b["attn_q"][layer]
        k = x @ b["attn_k"][layer]
        v = x @ b["attn_v"][layer]
        mixed = jnp.concatenate([jax.nn.softmax(k, axis=-1) * v] * (H // KV), axis=-1)
        x = constrain(x + (q * mixed) @ b["attn_o"][layer], ("batch", "seq", "embed"))
        x = constrain(x + jnp.square(jax.nn.relu(x @ b["mlp_fc"][layer])) @ b["mlp_proj"][layer],
                      ("batch", "seq", "embed"))
    logits = x @ params["lm_head"]
    targets = tokens_BT[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def loss_and_grad_on(spec, params, tokens):
    mesh = meshlib.make_mesh(spec)
    p_shard = meshlib.shardings(PARAM_AXES, mesh, params)
    b_shard = meshlib.batch_sharding(mesh, tokens.shape)
    step = jax.jit(jax.value_and_grad(lambda p, t: tiny_loss(p, t, meshlib.constrain_fn(mesh))),
                   in_shardings=(p_shard, b_shard), out_shardings=(meshlib.replicated(mesh), p_shard))
    loss, grads = step(jax.device_put(params, p_shard), jax.device_put(tokens, b_shard))
    return loss, grads, p_shard


def test_sharded_loss_and_grad_equal_single_device():
    params = random_params()
    tokens = np.random.default_rng(1).integers(0, V, (8, 9)).astype(np.int32)
    loss1, grads1, _ = loss_and_grad_on("1", params, tokens)
    for spec in ["8", "data:2,fsdp:4"]:
        loss, grads, p_shard = loss_and_grad_on(spec, params, tokens)
        np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-5)
        for g, g1, s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1), jax.tree.leaves(p_shard)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-4, atol=1e-6)
            assert g.sharding.is_equivalent_to(s, g.ndim)  # gradients come out sharded like the params


def test_embedding_lookup_on_a_mixed_mesh_gathers_no_whole_batch():
    """On data:2,fsdp:4 wte is split along embed over fsdp. Straight from the lookup to the activation layout, the
    partitioner all-gathered the whole batch of embeddings (its "involuntary full rematerialization" warning); through
    gpt's intermediate "replica_batch" layout each move is one all-to-all."""
    from nanojax import gpt
    from nanojax.config import GPTConfig
    cfg = GPTConfig.from_depth(2, vocab_size=256, head_dim=32, max_seq_len=32)
    mesh = meshlib.make_mesh("data:2,fsdp:4")
    params = gpt.init_params(cfg, 0)
    params = jax.device_put(params, meshlib.shardings(gpt.param_axes(cfg), mesh, params))
    tokens = jax.device_put(np.zeros((16, 32), np.int32), meshlib.batch_sharding(mesh))
    grad = jax.jit(jax.grad(lambda p, x: gpt.loss(p, x, x, cfg, constrain=meshlib.constrain_fn(mesh))))
    hlo = grad.lower(params, tokens).compile().as_text()
    gathered = re.findall(r"= \w+\[(\d+),\d+,\d+\]\S* all-gather", hlo)
    assert "all-to-all" in hlo and all(int(rows) < 16 for rows in gathered), gathered


def test_global_batch_single_process():
    mesh = meshlib.make_mesh("data:2,fsdp:4")
    tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    rows = meshlib.local_batch_slice(mesh, tokens.shape)
    assert rows == slice(0, 8)
    batch = meshlib.global_batch(mesh, tokens[rows], tokens.shape)
    assert batch.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch.addressable_shards} == {(1, 5)}
    np.testing.assert_array_equal(np.asarray(batch), tokens)


def test_init_distributed_is_a_noop_without_env(monkeypatch):
    for var in ("NANOJAX_COORDINATOR", "NANOJAX_NUM_PROCESSES", "NANOJAX_PROCESS_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert meshlib.init_distributed() is False
    monkeypatch.setenv("NANOJAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(UserError, match="NANOJAX_NUM_PROCESSES"):
        meshlib.init_distributed()


# ----------------------------------------------------------------------------------------------------------------------
# Two processes x 4 CPU devices = one 8-device mesh

WORKER = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 4)
    from nanojax import mesh as meshlib
    assert meshlib.init_distributed()
    mesh = meshlib.make_mesh("8")
    tokens = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    rows = meshlib.local_batch_slice(mesh, tokens.shape)
    batch = meshlib.global_batch(mesh, tokens[rows], tokens.shape)
    total = jax.jit(lambda x: (x * x).sum(), out_shardings=meshlib.replicated(mesh))(batch)
    print("RESULT", jax.process_index(), rows.start, rows.stop, float(total), flush=True)
""")


@pytest.mark.slow
def test_two_processes_form_one_mesh(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(NANOJAX_COORDINATOR=f"127.0.0.1:{port}", NANOJAX_NUM_PROCESSES="2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.getcwd())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "NANOJAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("RESULT"))
    expected = float((np.arange(48, dtype=np.float32) ** 2).sum())
    assert [r[:3] for r in results] == [["0", "0", "8"], ["1", "8", "16"]]
    assert all(float(r[3]) == expected for r in results)
