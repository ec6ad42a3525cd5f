"""RL (nanojax/rl.py, launch/rl.py): rewards from "####" answers, group advantages, the update batch's mask and
weights, the policy-gradient loss against a hand-computed gradient, rollouts through the engine (one batched call,
forced calculator output masked), the loader's exact resume, and the CLI's bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evals.tasks import GSM8K
from nanojax import gpt, rl
from nanojax.common import UserError
from nanojax.config import GPTConfig
from nanojax.engine import Engine
from tokenizer import Tokenizer

CFG = GPTConfig(vocab_size=300, depth=2, model_dim=64, n_head=4, n_kv_head=2, head_dim=16, max_seq_len=128)
WORDS = "what is plus minus times the of and a to she has eggs apples 1 2 3 4 5 6 7 8 9 0 #### = + - *".split()

# Stand-in rows in GSM8K's format (question, answer with <<expr=result>> calculator marks and "#### N").
ROWS = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
        for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (4, 4), (7, 1), (9, 0))]


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    return Tokenizer.train(iter(" ".join(rng.choice(WORDS, 40)) for _ in range(300)), CFG.vocab_size)


def random_params(cfg=CFG, seed=0):
    """Init zeroes the head and output projections: fill every weight so the logits depend on all of them."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) / math.sqrt(x.shape[-2])),
                        gpt.abstract_params(cfg))


# ----------------------------------------------------------------------------------------------------------------------
# Rewards: the first "####" number, commas removed, equal to the reference's.

@pytest.mark.parametrize("completion, reward", [
    ("3 + 4 = 7\n#### 7", 1.0),
    ("<|python_start|>3+4<|python_end|><|output_start|>7<|output_end|>\n#### 7", 1.0),  # a tool-call answer
    ("#### 8", 0.0),
    ("no answer at all: 7", 0.0),
    ("#### 7\n#### 8", 1.0),   # the first answer counts
    ("#### 8\n#### 7", 0.0),
])
def test_reward_of_a_completion(completion, reward):
    assert GSM8K("test").reward(ROWS[1], completion) == reward


@pytest.mark.parametrize("reference, completion, reward", [
    ("1234", "#### 1,234", 1.0),     # commas removed
    ("1,234", "#### 1234", 1.0),
    ("-5", "so #### -5", 1.0),       # negative
    ("-5", "#### 5", 0.0),
    ("2.5", "#### 2.5", 1.0),        # decimal
    ("2.5", "#### 25", 0.0),
    ("18", "#### 18.0", 0.0),        # compared as strings, as nanochat
])
def test_reward_numbers(reference, completion, reward):
    row = {"question": "q", "answer": f"work\n#### {reference}"}
    assert GSM8K("test").reward(row, completion) == reward


# ----------------------------------------------------------------------------------------------------------------------
# Advantages, pass@k, widths, seeds.

def test_group_advantages_subtract_each_question_mean():
    rewards = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    np.testing.assert_array_equal(rl.group_advantages(rewards),
                                  [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0.25, 0.25, 0.25, -0.75]])


def test_pass_at_k_uses_the_first_k_samples():
    correct = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]], bool)
    assert [rl.pass_at_k(correct, k) for k in (1, 2, 3)] == [0.25, 0.5, 0.75]


def test_width_buckets_are_few():
    assert [rl.width_bucket(n, 2048) for n in (1, 64, 65, 96, 97, 129, 200, 300, 1000)] == \
        [64, 64, 96, 96, 128, 192, 256, 384, 1024]
    assert rl.width_bucket(300, 256) == 256
    assert len({rl.width_bucket(n, 2048) for n in range(1, 2049)}) == 11  # 64, 96, ..., 1536, 2048


def test_sampling_seeds_depend_on_every_part_only():
    assert rl.sampling_seed(0, 5, 80) == rl.sampling_seed(0, 5, 80)
    assert len({rl.sampling_seed(0, s, q) for s in range(20) for q in range(20)}) == 400
    assert 0 <= rl.sampling_seed(2 ** 40, -1) < 2 ** 31


# ----------------------------------------------------------------------------------------------------------------------
# The update batch: what is trained, with which weight.

def test_loss_mask_excludes_prompt_forced_output_and_padding():
    P, S, F, pad = 7, 11, 13, 99  # prompt, sampled and forced token ids; pad id
    seqs = [[P, P, P, S, S, F, F, S], [P, P, P, S], [P, P, S, S, S], [P, P, S]]
    masks = [[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 1]]
    adv = np.array([[1.0, -1.0], [0.5, -0.5]], np.float32)
    inputs, targets, weights = rl.policy_gradient_rows(seqs, masks, adv, num_questions=4, pad_id=pad, width=8)
    assert inputs[0].tolist() == [P, P, P, S, S, F, F, pad]
    assert targets[0].tolist() == [-1, -1, S, S, -1, -1, S, -1]  # targets = seq[1:], trained where the mask is 1
    assert targets[1].tolist() == [-1, -1, S] + [-1] * 5 and inputs[1].tolist() == [P, P, P] + [pad] * 5
    assert targets[2].tolist() == [-1, S, S, S] + [-1] * 4 and targets[3].tolist() == [-1, S] + [-1] * 6
    assert ((weights != 0) == (targets >= 0)).all()
    # Question 0 has 3 + 1 trained tokens, question 1 has 3 + 1; 4 questions in the whole step.
    np.testing.assert_allclose(weights[0][targets[0] >= 0], 1.0 / (4 * 4))
    np.testing.assert_allclose(weights[1][targets[1] >= 0], -1.0 / (4 * 4))
    np.testing.assert_allclose(weights[2][targets[2] >= 0], 0.5 / (4 * 4))
    np.testing.assert_allclose(weights[3][targets[3] >= 0], -0.5 / (4 * 4))


class _FixedSampler:
    """Stands in for rl.Sampler: the same rollouts whatever the params."""
    cfg = CFG

    def __init__(self, out):
        self.out = out

    def sample(self, *args, **kwargs):
        return self.out


def test_questions_whose_samples_agree_are_left_out_of_the_update():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 8, 9], [7, 8, 9, 9]]
    masks = [[0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1], [0, 1, 1, 1]]
    rewards = np.array([[1, 0], [0, 0]], np.float32)  # question 1: both wrong, advantage 0
    out = {"seqs": seqs, "masks": masks, "rewards": rewards, "lengths": np.array([[2, 3], [2, 3]]),
           "tools": np.zeros((2, 2), bool), "seconds": 1.0}
    loader = rl.RLLoader(_FixedSampler(out), ROWS, [[1]] * len(ROWS), None, examples_per_step=2, num_samples=2,
                         rows_per_micro_batch=2, pad_id=0)
    batch = loader.next_step(None)
    assert batch["inputs"].shape == (1, 2, 64)
    want = rl.policy_gradient_rows(seqs[:2], masks[:2], rl.group_advantages(rewards[:1]), num_questions=2, pad_id=0,
                                   width=64)  # still averaged over the step's 2 questions
    for key, array in zip(("inputs", "targets", "weights"), want):
        np.testing.assert_array_equal(batch[key][0], array)
    metrics = loader.step_metrics()
    assert metrics["mixed_questions"] == 1 and metrics["reward"] == 0.25 and metrics["pass@2"] == 0.5


def test_rl_loss_gradient_equals_the_hand_computed_one():
    """grad of the loop's weighted loss, sum(weights x nats), equals the grad of the objective written out directly:
    -(1/Q) sum_q (1/T_q) sum_n A_qn sum_t log p(token_t), over the sampled tokens only."""
    cfg = GPTConfig(vocab_size=64, depth=2, model_dim=32, n_head=2, n_kv_head=2, head_dim=16, max_seq_len=32)
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    Q, N = 2, 3
    seqs, masks = [], []
    for r in range(Q * N):
        prompt, completion = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        seqs.append(rng.integers(0, cfg.vocab_size, prompt + completion).tolist())
        masks.append([0] * prompt + [int(m) for m in rng.random(completion) < 0.8])  # some "forced" tokens
    rewards = rng.integers(0, 2, (Q, N)).astype(np.float32)
    rewards[0] = [1, 0, 0]
    adv = rl.group_advantages(rewards)
    inputs, targets, weights = rl.policy_gradient_rows(seqs, masks, adv, num_questions=Q, pad_id=0, width=16)

    @jax.jit
    def weighted_loss(p):
        return jnp.sum(weights * gpt.token_losses(p, inputs, targets, cfg, remat=False))

    # The same objective built from the rollouts alone: log-softmax of the plain forward at each sampled token.
    T = inputs.shape[1]
    padded = np.zeros((Q * N, T + 1), np.int32)
    trained = np.zeros((Q * N, T), np.float32)
    for r, (seq, mask) in enumerate(zip(seqs, masks)):
        padded[r, :len(seq)] = seq
        trained[r, :len(seq) - 1] = mask[1:]
    tokens_Q = trained.reshape(Q, N, T).sum(axis=(1, 2))
    scale = (adv / tokens_Q[:, None]).reshape(Q * N, 1)

    @jax.jit
    def direct_objective(p):
        logp = jax.nn.log_softmax(gpt.forward(p, padded[:, :-1], cfg), axis=-1)
        picked = jnp.take_along_axis(logp, padded[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * trained * scale) / Q

    np.testing.assert_allclose(weighted_loss(params), direct_objective(params), rtol=1e-5, atol=1e-7)
    got, want = jax.grad(weighted_loss)(params), jax.grad(direct_objective)(params)
    norm = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    assert norm > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * norm), got, want)


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts through the real engine.

class ToolEngine(Engine):
    """The real engine around a scripted next-token rule: after <|assistant_start|> the model calls the calculator on
    "3+4" (then writes "#### 7"); the engine must force the output in. Sampling at any temperature
    gives the same tokens (the script's logits are one-hot x 30)."""

    def script(self, chain):
        table = np.full(self.cfg.vocab_size, self.tokenizer.encode_special("<|assistant_end|>"), np.int32)
        for a, b in zip(chain, chain[1:]):
            table[a] = b
        self._params = {**self._params, "bigram": jnp.asarray(table)}

    def _forward(self, params, tokens_BT, cache, last=None):
        logits, new_cache = super()._forward(params, tokens_BT, cache, last)
        nxt = params["bigram"][tokens_BT]
        if last is not None:
            nxt = jax.lax.dynamic_slice_in_dim(nxt, last, 1, axis=1)
        return 30.0 * jax.nn.one_hot(nxt, self.cfg.vocab_size), new_cache


def byte_ids(tok, text):
    ids = {tok.id_to_token_bytes(i): i for i in range(256)}
    return [ids[bytes([b])] for b in text.encode()]


def test_rollout_masks_the_forced_calculator_output(tok):
    sp = tok.encode_special
    tool = [sp("<|python_start|>")] + byte_ids(tok, "3+4") + [sp("<|python_end|>")]
    forced = [sp("<|output_start|>")] + tok.encode("7") + [sp("<|output_end|>")]
    answer = tok.encode("\n#### 7")  # no token twice: a bigram script
    sampler = rl.Sampler(CFG, tok, dtype=jnp.float32)
    sampler.engine = ToolEngine(random_params(), CFG, tok, dtype=jnp.float32)
    sampler.engine.script([sp("<|assistant_start|>")] + tool + [sp("<|output_end|>")] + answer)
    params = sampler.engine.params
    sampler.load = lambda p: sampler.engine  # keep the script's params
    prompts = [tok.render_for_completion([{"role": "user", "content": r["question"]}]) for r in ROWS[:2]]
    out = sampler.sample(params, prompts, ROWS[:2], GSM8K("test").reward, num_samples=2, seed=0, temperature=1.0,
                         top_k=50, max_tokens=32)
    completion = tool + forced + answer
    assert out["seqs"] == [prompts[q] + completion for q in (0, 0, 1, 1)]
    assert out["rewards"].tolist() == [[0.0, 0.0], [1.0, 1.0]]  # 3+4 = 7 is question 1's answer
    assert out["tools"].all() and (out["lengths"] == len(completion)).all()
    inputs, targets, weights = rl.policy_gradient_rows(out["seqs"], out["masks"], rl.group_advantages(out["rewards"]),
                                                       num_questions=2, pad_id=0, width=64)
    row = targets[0][len(prompts[0]) - 1:len(prompts[0]) - 1 + len(completion)]
    assert row.tolist() == tool + [-1] * len(forced) + answer  # forced tokens are never trained
    assert not weights.any()  # every question's samples agree: no advantage, no update


@pytest.fixture(scope="module")
def sampler(tok):
    return rl.Sampler(CFG, tok, dtype=jnp.float32)


def _loader(sampler, tok, state=None, **kw):
    prompts = [tok.render_for_completion([{"role": "user", "content": r["question"]}]) for r in ROWS]
    args = dict(examples_per_step=2, num_samples=4, rows_per_micro_batch=3, pad_id=tok.encode_special(
        "<|assistant_end|>"), seed=7, sampling=dict(temperature=1.0, top_k=50, max_tokens=12), state=state)
    return rl.RLLoader(sampler, ROWS, prompts, lambda row, text: float(len(text) % 2), **{**args, **kw})


def test_one_engine_call_per_step_and_the_batch_layout(sampler, tok):
    params = random_params()
    loader = _loader(sampler, tok)
    sampler.load(params)
    calls = []
    real = sampler.engine.generate_batch
    sampler.engine.generate_batch = lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)
    try:
        batch = loader.next_step(params)
    finally:
        del sampler.engine.generate_batch
    assert calls == [2]  # the step's 2 questions x 4 samples in one call
    m = loader.step_metrics()
    assert set(m) >= {"reward", "pass@1", "pass@4", "completion_len", "tool_share", "sample_tok_per_s", "update_s",
                      "mixed_questions"}
    live = int(m["mixed_questions"])  # questions whose samples disagree: only their rows are trained
    assert live == 2
    A, R, T = batch["inputs"].shape
    assert (A, R) == (4, 3) and T in (64, 96) and batch["targets"].shape == batch["weights"].shape == (A, R, T)
    flat_t, flat_w = batch["targets"].reshape(A * R, T), batch["weights"].reshape(A * R, T)
    assert (flat_t[:8] >= 0).any(axis=1).all()
    assert (flat_t[8:] == -1).all() and not flat_w[8:].any()  # 8 rows need 3 micro-batches, made 4 (a power of 2)
    assert loader.state() == {"step": 1} and loader.questions(1) == [2, 3] and loader.questions(4) == [0, 1]


def test_a_restored_loader_draws_the_same_samples(sampler, tok):
    params = random_params(seed=1)
    first = _loader(sampler, tok)
    batches = [first.next_step(params) for _ in range(2)]
    resumed = _loader(sampler, tok, state=first.state())
    again = _loader(sampler, tok, state={"step": 1})
    b1 = again.next_step(params)
    for key in batches[1]:
        np.testing.assert_array_equal(b1[key], batches[1][key])
    assert resumed.state() == {"step": 2}


@pytest.mark.slow
def test_sampling_sharded_over_8_devices_draws_the_same_batch(sampler, tok):
    from nanojax import mesh as meshlib
    params = random_params(seed=2)
    sharded = rl.Sampler(CFG, tok, mesh=meshlib.make_mesh("8"), dtype=jnp.float32)
    want = _loader(sampler, tok).next_step(params)
    got = _loader(sharded, tok).next_step(params)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("kw, message", [
    (dict(num_samples=1), "--num-samples 1"),
    (dict(examples_per_step=3, world=2), "--examples-per-step 3"),
])
def test_bad_loader_settings_are_user_errors(sampler, tok, kw, message):
    with pytest.raises(UserError, match=message):
        _loader(sampler, tok, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# The CLI: bad input is one line, before any sampling.

def _cli_error(argv, capsys):
    from launch import rl as launch_rl
    with pytest.raises(SystemExit) as e:
        launch_rl.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_without_an_sft_checkpoint_names_the_stage_to_run(base_dir, tok, capsys):
    tok.save(base_dir / "tokenizer")
    err = _cli_error([], capsys)
    assert "no sft checkpoints" in err and ("launch.sft" in err or "cannot train the sft stage" in err)
    assert "no mid checkpoints" in _cli_error(["--source", "mid"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "1"], "--num-samples 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--source", "base"], "--source"),
    (["--mesh", "3"], "3"),
])
def test_cli_bad_flags(argv, message, capsys):
    assert message in _cli_error(argv, capsys)


def test_cli_examples_per_step_must_split_across_processes(monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert "--examples-per-step 3" in _cli_error(["--examples-per-step", "3"], capsys)


# ----------------------------------------------------------------------------------------------------------------------
# The update through the training loop's own step.

class _Negate:
    """An optimizer whose update is -grad (lr_multiplier ignored): one step moves params by exactly -grad."""

    @staticmethod
    def init(params):
        return {}

    @staticmethod
    def update(grads, state, params=None, **extra):
        return jax.tree.map(lambda g: -g, grads), state


@pytest.mark.slow  # compiles the loop's step with accumulation
def test_the_loops_weighted_step_follows_the_policy_gradient(sampler, tok):
    """The loop's jitted step on an RL batch (2 micro-batches, padding rows) moves the params by exactly the gradient
    of -(1/Q) sum_q (1/T_q) sum_n A_qn sum_t log p, written out here from the batch's own pieces."""
    from nanojax import mesh as meshlib
    from nanojax.train import make_train_step, stacked_batch_sharding

    params = random_params(seed=5)
    batch = _loader(sampler, tok, examples_per_step=2, num_samples=3, rows_per_micro_batch=4).next_step(params)
    assert batch["inputs"].shape[1] == 4 and np.abs(batch["weights"]).sum() > 0
    mesh = meshlib.make_mesh("1")
    sh = meshlib.shardings(gpt.param_axes(CFG), mesh, gpt.abstract_params(CFG))
    step = make_train_step(CFG, _Negate, mesh, sh, {}, jnp.float32, remat=False)
    before = jax.tree.map(np.asarray, params)
    after, _, loss = step(params, {}, {k: jax.device_put(v, stacked_batch_sharding(mesh)) for k, v in batch.items()},
                          np.float32(1.0))

    x, y, w = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("inputs", "targets", "weights"))

    def objective(p):
        logp = jax.nn.log_softmax(gpt.forward(p, x, CFG), axis=-1)
        picked = jnp.take_along_axis(logp, np.maximum(y, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(y >= 0, picked * w, 0.0))

    value, grads = jax.value_and_grad(objective)(jax.tree.map(jnp.asarray, before))
    np.testing.assert_allclose(float(loss), float(value), rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b, g: np.testing.assert_allclose(np.asarray(a) - b, -np.asarray(g), rtol=1e-3, atol=1e-6),
                 after, before, grads)


@pytest.mark.slow
def test_one_rl_update_on_8_devices_equals_1(sampler, tok):
    from nanojax import mesh as meshlib
    from nanojax.config import TrainConfig
    from nanojax.train import build_step, stacked_batch_sharding

    params = jax.tree.map(np.asarray, random_params(seed=6))  # host copies: the step donates its inputs
    batch = _loader(sampler, tok, examples_per_step=4, num_samples=4, rows_per_micro_batch=8).next_step(params)
    assert batch["inputs"].shape[1] == 8 and np.abs(batch["weights"]).sum() > 0
    cfg = TrainConfig(init_lr_frac=0.05, grad_clip=0.0, momentum_warmup=0)
    results = []
    for spec in ("1", "8"):
        mesh = meshlib.make_mesh(spec)
        parts = build_step(CFG, cfg, mesh, jnp.float32)
        p = jax.device_put(params, parts.param_sh)
        opt = jax.jit(parts.tx.init, out_shardings=parts.opt_sh)(p)
        b = {k: jax.device_put(v, stacked_batch_sharding(mesh)) for k, v in batch.items()}
        p, _, loss = parts.step(p, opt, b, np.float32(1.0))
        results.append((float(loss), jax.tree.map(np.asarray, p)))
    (loss1, p1), (loss8, p8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-7)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, jax.tree.map(np.asarray, params))
    assert min(jax.tree.leaves(moved)) > 0  # every parameter took a step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)


# ----------------------------------------------------------------------------------------------------------------------
# The whole stage: kill -9 and --resume give the rewards of an uninterrupted run.

# The tiny random model never writes a right answer: a stand-in reward (the completion's length is odd) gives the
# update something to do, so the comparison covers the params and optimizer state as well as the sampling seeds.
DRIVER = ("import sys, evals.tasks as t; t.GSM8K.reward = lambda self, row, text: float(len(text) % 2); "
          "from launch import rl; rl.main(sys.argv[1:])")
RUN_ARGS = ["--task", "Arithmetic", "--num-iterations", "6", "--examples-per-step", "2", "--num-samples", "4",
            "--max-new-tokens", "8", "--device-batch-size", "8", "--eval-every", "3", "--eval-examples", "2",
            "--eval-samples", "2", "--save-every", "2", "--keep", "5"]


def _save_sft(base_dir):
    """A tokenizer that knows the Arithmetic problems' words (short prompts) and a random-weight "sft" checkpoint."""
    from evals.tasks import get_task
    from nanojax.checkpoint import StageCheckpoints
    rows = get_task("Arithmetic", "train", size=200).rows
    tok = Tokenizer.train(iter([r["question"] + " " + r["answer"] for r in rows] * 3), CFG.vocab_size)
    tok.save(base_dir / "tokenizer")
    ck = StageCheckpoints("sft", "d2")
    ck.save(5, random_params(seed=7), None, {"step": 5, "model_config": CFG.to_dict(), "tokenizer": tok.fingerprint()})
    ck.close()


def _steps(base_dir, run):
    import json
    lines = (base_dir / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward" in r]


@pytest.mark.slow
@pytest.mark.timeout(900)  # three runs of the stage, in subprocesses
def test_kill_9_and_resume_reproduce_an_uninterrupted_run(base_dir, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    from nanojax.checkpoint import complete_steps, tag_dir
    _save_sft(base_dir)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NANOJAX_BASE_DIR": str(base_dir), "NANOJAX_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "NANOJAX_PROGRESS": "0",
           # the later runs reuse the first one's compilations
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    cmd = [sys.executable, "-c", DRIVER, *RUN_ARGS]
    done = subprocess.run(cmd + ["--run", "whole"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rl: Arithmetic train (offline substitute for GSM8K" in done.stdout  # the data is named for what it is
    whole = _steps(base_dir, "whole")
    assert [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    assert len({r["loss"] for r in whole}) > 1 and any(r["loss"] != 0 for r in whole)

    directory = tag_dir("rl", "d2")
    shutil.rmtree(directory)  # the second run starts from scratch too
    killed = subprocess.Popen(cmd + ["--run", "cut"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not complete_steps(directory) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    killed.wait()
    saved = complete_steps(directory)
    assert saved and saved[-1] < 6, saved
    resumed = subprocess.run(cmd + ["--run", "cut", "--resume"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {directory}/{saved[-1]}" in resumed.stdout
    cut = _steps(base_dir, "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "loss", "completion_len", "pass@1"):
        assert [r[key] for r in cut] == [r[key] for r in whole], key
