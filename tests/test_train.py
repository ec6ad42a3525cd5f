"""The training step: sharded steps equal the single-device step, accumulation equals one big batch, and the launch
command rejects bad input before compiling anything."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax import gpt, optim
from nanojax import mesh as meshlib
from nanojax.config import GPTConfig, TrainConfig
from nanojax.train import make_train_step, stacked_batch_sharding

CFG = GPTConfig.from_depth(2, vocab_size=256, max_seq_len=32, head_dim=32)


def _one_step(spec, inputs, targets, steps=1):
    mesh = meshlib.make_mesh(spec)
    axes = gpt.param_axes(CFG)
    abstract = gpt.abstract_params(CFG)
    param_sh = meshlib.shardings(axes, mesh, abstract)
    tx = optim.make_optimizer(abstract, model_dim=CFG.model_dim, mesh=mesh, param_axes=axes)
    opt_sh = optim.opt_state_shardings(jax.eval_shape(tx.init, abstract), param_sh, mesh)
    params = jax.device_put(gpt.init_params(CFG, seed=0), param_sh)
    # Non-zero head and output projections, so every parameter gets a gradient on the first step.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    step = make_train_step(CFG, tx, mesh, param_sh, opt_sh, jnp.float32)
    sh = stacked_batch_sharding(mesh)
    losses = []
    for _ in range(steps):
        batch = {"inputs": jax.device_put(inputs, sh), "targets": jax.device_put(targets, sh)}
        params, opt_state, loss = step(params, opt_state, batch, np.float32(1.0))
        losses.append(float(loss))
    return losses, jax.tree.map(np.asarray, params)


def _assert_params_close(a, b):
    # Adam normalises each gradient element, so float noise in a near-zero gradient moves that element's update by up
    # to ~1e-3 of its learning rate after two steps; everything else agrees far tighter.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3), a, b)
    worst = max(float(np.abs(x - y).mean()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert worst < 1e-6


def _batch(accum, rows, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, CFG.vocab_size, size=(accum, rows, CFG.max_seq_len + 1), dtype=np.int32)
    return data[..., :-1], data[..., 1:]


@pytest.fixture(scope="module")
def single_device_reference():
    inputs, targets = _batch(1, 8)
    return inputs, targets, _one_step("1", inputs, targets, steps=2)


@pytest.mark.parametrize("spec", ["8", "data:2,fsdp:4"])
def test_sharded_step_equals_single_device(spec, single_device_reference):
    inputs, targets, (ref_losses, ref_params) = single_device_reference
    losses, params = _one_step(spec, inputs, targets, steps=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_params_close(params, ref_params)


def test_accumulated_micro_batches_equal_one_big_batch():
    inputs, targets = _batch(4, 2, seed=3)
    targets = targets.copy()
    targets[0, 0, :5] = -1  # uneven valid-token counts: accumulation must weight by tokens, not by micro-batch
    big_in, big_tg = inputs.reshape(1, 8, -1), targets.reshape(1, 8, -1)
    acc_loss, acc_params = _one_step("1", inputs, targets)
    big_loss, big_params = _one_step("1", big_in, big_tg)
    np.testing.assert_allclose(acc_loss, big_loss, rtol=1e-5)
    _assert_params_close(acc_params, big_params)


def test_iterations_and_accumulation_arithmetic():
    cfg = TrainConfig(device_batch_size=32, max_seq_len=2048, total_batch_size=524_288)
    assert cfg.grad_accum_steps(8) == 1 and cfg.grad_accum_steps(1) == 8
    d20 = GPTConfig.from_depth(20, vocab_size=65536)
    # nanochat's Oct-2025 d20 run: ratio 20 over all params -> 21,400 steps of 524,288 tokens.
    assert cfg.iterations(gpt.num_params(d20), gpt.flops_per_token(d20)) == 21_400
    assert TrainConfig(num_iterations=7).iterations(1, 1.0) == 7
    flops = TrainConfig(target_flops=1e18, target_param_data_ratio=-1)
    assert flops.iterations(100, 1e6) == round(1e18 / (1e6 * 524_288))


def _launch(base_dir, *args):
    env = {"NANOJAX_BASE_DIR": str(base_dir), "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "launch.base", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def with_tokenizer(base_dir):
    from tokenizer import Tokenizer
    import inspect, json as js
    text = [inspect.getdoc(m) or "" for m in (js, subprocess, sys, np, pytest)]
    Tokenizer.train(iter(text), 300).save(base_dir / "tokenizer")
    return base_dir


@pytest.mark.parametrize("args, message", [
    (["--mesh", "3"], "3"),
    (["--depth", "3"], "depth 3"),
    (["--depth", "4", "--n-kv-head", "3"], "n_kv_head 3"),
    (["--device-batch-size", "3", "--max-seq-len", "64", "--total-batch-size", "1000"], "--total-batch-size 1000"),
])
def test_bad_input_fails_fast_with_one_line(with_tokenizer, args, message):
    r = _launch(with_tokenizer, "--depth", "2", *args)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_tokenizer_is_a_clear_error(base_dir):
    r = _launch(base_dir, "--depth", "2")
    assert r.returncode == 2 and "tokenizer.train" in r.stderr and "Traceback" not in r.stderr


def test_a_stop_signal_cuts_an_evaluation_short():
    """SIGTERM during an evaluation interrupts it (the loop then saves); between steps it only sets the flag."""
    import os
    import signal

    from nanojax.train import Interrupted, _StopFlag

    evaluated = []

    def long_evaluation():
        os.kill(os.getpid(), signal.SIGTERM)
        evaluated.append("finished")  # never reached: the signal handler raises first

    with _StopFlag() as stop:
        with pytest.raises(Interrupted):
            stop.interruptible(long_evaluation)
        assert stop.signal == "SIGTERM" and stop.requested() and not evaluated
        with pytest.raises(Interrupted):  # a signal already received: the next evaluation does not start
            stop.interruptible(evaluated.append, "started")
    assert not evaluated and signal.getsignal(signal.SIGTERM) is not stop._handle
