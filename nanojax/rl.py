"""Reinforcement learning on questions with checkable answers (nanochat's chat_rl): on-policy REINFORCE with a
group-mean baseline; no KL term, no reference model, no ratio clipping; token-level normalisation.

Each step, `RLLoader.next_step(params)` (the training loop's batch source) takes the step's questions, samples
`num_samples` completions of each with the engine (every row of the step in one batched generate call, calculator
live), scores them with the task's reward function and turns them into one update batch:

    inputs  = each sequence without its last token, padded with `pad_id`
    targets = each sequence without its first token; -1 where the engine's mask is 0 (the prompt and the calculator's
              forced output) and on padding
    weights = A / (valid targets of the question's samples x questions in the step), A = reward - mean reward of
              the question's samples

so that the loop's weighted loss, sum(weights x nats) with nats = -logp, is -(sum of logp x A over sampled tokens)
normalised per token: nanochat's objective (each pass's token-mean of logp x A, averaged over passes and questions)
with a pass being a question's whole group of samples. So the update does not depend on --device-batch-size or the
mesh. The stop token is not trained: the engine drops it from each sequence, as nanochat's generate_batch does.
Questions whose samples all scored the same (advantage 0 everywhere) are left out of the update batch: they add
nothing to the loss or its gradient, and most questions are like that when rewards are rare.

Nothing here knows a task: the caller passes the rows, their prompt ids and a (row, completion) -> reward function
(evals.tasks' Task.reward). Sampling seeds derive from (seed, step, first question), so a resumed run samples exactly
what an uninterrupted one would.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from nanojax.common import UserError, compute_dtype

MIN_WIDTH = 64  # smallest update width; widths are 64 x {1, 1.5, 2, 3, 4, 6, ...}: a few programs, not one per length


def width_bucket(n: int, cap: int) -> int:
    """The update batch's width for n input tokens: the smallest of 64, 96, 128, 192, 256, ... >= n, capped at `cap`
    (the model's context, which no input exceeds)."""
    width = MIN_WIDTH
    while width < n:
        width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
    return min(width, cap)


def sampling_seed(*parts: int) -> int:
    """A 31-bit seed from integers (seed, step, question, ...), the same in every process and every run."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def group_advantages(rewards_QN) -> np.ndarray:
    """reward - the mean reward of its question's samples (not divided by the std, as nanochat)."""
    rewards = np.asarray(rewards_QN, np.float32)
    return rewards - rewards.mean(axis=1, keepdims=True)


def pass_at_k(correct_QN, k: int) -> float:
    """Share of questions with a correct answer among their first k samples (nanochat's pass@k)."""
    correct = np.asarray(correct_QN, bool)
    return float(correct[:, :k].any(axis=1).mean()) if correct.size else 0.0


def policy_gradient_rows(seqs, masks, advantages_QN, *, num_questions: int, pad_id: int, width: int):
    """(inputs, targets, weights), each (rows, width), from the rows of some questions (prompt-major: question q's
    samples are rows q*N .. q*N + N - 1). num_questions: questions in the whole step (all processes), the outer
    average. A sequence longer than width + 1 is a caller bug."""
    adv = np.asarray(advantages_QN, np.float32)
    Q, N = adv.shape
    if len(seqs) != Q * N or len(masks) != Q * N:
        raise ValueError(f"{len(seqs)} sequences for {Q} questions x {N} samples")
    inputs = np.full((Q * N, width), pad_id, np.int32)
    targets = np.full((Q * N, width), -1, np.int32)
    for r, (seq, mask) in enumerate(zip(seqs, masks)):
        n = len(seq) - 1
        if n > width:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit width {width}")
        inputs[r, :n] = seq[:-1]
        targets[r, :n] = np.where(np.asarray(mask[1:], bool), seq[1:], -1)
    valid = (targets >= 0).reshape(Q, N, width)
    tokens_Q = np.maximum(valid.sum(axis=(1, 2)), 1).astype(np.float32)
    weights = valid * (adv / (tokens_Q[:, None] * num_questions))[:, :, None]
    return inputs, targets, weights.reshape(Q * N, width).astype(np.float32)


def _global_sum(values) -> np.ndarray:
    """Element-wise sum over processes of a small float array (the identity with one process)."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def _global_max(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling.

class Sampler:
    """The engine that rollouts and evaluation share, built on first use (it needs params) and given the current
    params before every use (the train step donates its inputs). With several processes each samples its own
    questions on its own devices, from a full copy of the params."""

    def __init__(self, model_cfg, tokenizer, mesh=None, dtype=None):
        self.cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
        self.dtype = dtype or compute_dtype()
        self.engine = None
        self.python_start = tokenizer.encode_special("<|python_start|>")

    def load(self, params):
        from nanojax.engine import Engine

        if jax.process_count() > 1:  # the update's params span processes; the engine wants its own full copy
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        mesh = self.mesh
        if mesh is not None and jax.process_count() > 1:
            from nanojax import mesh as meshlib
            mesh = meshlib.make_mesh(str(jax.local_device_count()), devices=jax.local_devices())
        if self.engine is None:
            self.engine = Engine(params, self.cfg, self.tokenizer, dtype=self.dtype, mesh=mesh)
        else:
            self.engine.params = params
        return self.engine

    def sample(self, params, prompts, rows, reward_fn: Callable, *, num_samples: int, seed: int, **sampling) -> dict:
        """Sample num_samples completions of each prompt in one batched call and score them. Returns the
        sequences and masks (prompt-major), rewards (Q, N), completion lengths (Q, N), tool use (Q, N), seconds."""
        engine = self.load(params)
        t0 = time.perf_counter()
        seqs, masks = engine.generate_batch(prompts, num_samples=num_samples, seed=seed, **sampling)
        seconds = time.perf_counter() - t0
        Q, N = len(prompts), num_samples
        rewards = np.zeros((Q, N), np.float32)
        lengths = np.zeros((Q, N), np.int64)
        tools = np.zeros((Q, N), bool)
        for r, seq in enumerate(seqs):
            q, n = divmod(r, N)
            completion = seq[len(prompts[q]):]
            rewards[q, n] = float(reward_fn(rows[q], self.tokenizer.decode(completion)))
            lengths[q, n] = len(completion)
            tools[q, n] = self.python_start in completion
        return {"seqs": seqs, "masks": masks, "rewards": rewards, "lengths": lengths, "tools": tools,
                "seconds": seconds}


def evaluate_pass_at_k(sampler: Sampler, params, prompts, rows, reward_fn: Callable, *, k: int, seed: int,
                       rows_per_call: int = 256, **sampling) -> dict[str, float]:
    """val_pass@1 .. val_pass@k over held-out problems (this process's share: the caller strides them), k samples
    each, as many problems per engine call as fit in rows_per_call rows. Seeds are fixed per problem batch, so two
    evaluations of the same model agree and differences between steps come from the model."""
    per_call = max(1, rows_per_call // k)
    correct = np.zeros((len(prompts), k), bool)
    for start in range(0, len(prompts), per_call):
        out = sampler.sample(params, prompts[start:start + per_call], rows[start:start + per_call], reward_fn,
                             num_samples=k, seed=sampling_seed(seed, 0x5EED, start), **sampling)
        correct[start:start + per_call] = out["rewards"] > 0
    passed = _global_sum([correct[:, :i].any(axis=1).sum() for i in range(1, k + 1)] + [len(prompts)])
    total = max(passed[-1], 1)
    return {f"val_pass@{i}": float(passed[i - 1] / total) for i in range(1, k + 1)}


# ----------------------------------------------------------------------------------------------------------------------
# The training loop's batch source.

class RLLoader:
    """The loop's loader (LOOP_API: next_step, state, step_metrics, close). Step s uses questions s*E .. s*E + E - 1
    of `rows` (wrapping), this process taking its contiguous E / world of them; its state is the step number."""

    def __init__(self, sampler: Sampler, rows, prompts, reward_fn: Callable, *, examples_per_step: int,
                 num_samples: int, rows_per_micro_batch: int, pad_id: int, seed: int = 0, sampling: dict | None = None,
                 state: dict | None = None, rank: int = 0, world: int = 1):
        if num_samples < 2:
            raise UserError(f"--num-samples {num_samples}: RL compares each sample with the others of its question "
                            f"(advantage = reward - the group's mean), so it needs at least 2")
        if examples_per_step < 1 or examples_per_step % world:
            raise UserError(f"--examples-per-step {examples_per_step} does not split across {world} processes; use a "
                            f"positive multiple of {world}")
        if not rows or len(rows) != len(prompts):
            raise UserError(f"RL needs questions: got {len(rows)} rows and {len(prompts)} prompts")
        self.sampler, self.rows, self.prompts, self.reward_fn = sampler, rows, prompts, reward_fn
        self.E, self.N, self.R = examples_per_step, num_samples, rows_per_micro_batch
        self.pad_id, self.seed, self.sampling = pad_id, seed, dict(sampling or {})
        self.rank, self.world = rank, world
        self.step = int((state or {}).get("step", 0))
        self._metrics: dict = {}
        self._handed_over = None

    def questions(self, step: int) -> list[int]:
        """This process's question indices at `step`."""
        per = self.E // self.world
        first = step * self.E + self.rank * per
        return [(first + j) % len(self.rows) for j in range(per)]

    def next_step(self, params) -> dict:
        idx = self.questions(self.step)
        out = self.sampler.sample(params, [self.prompts[i] for i in idx], [self.rows[i] for i in idx], self.reward_fn,
                                  num_samples=self.N, seed=sampling_seed(self.seed, self.step, idx[0]),
                                  **self.sampling)
        rewards = out["rewards"]
        adv = group_advantages(rewards)
        # A question whose samples all scored the same has advantage 0 everywhere: no gradient, so its rows are left
        # out of the update (the loss and its gradient are unchanged; the update gets cheaper).
        live = np.flatnonzero(np.abs(adv).max(axis=1) > 0)
        seqs = [out["seqs"][q * self.N + n] for q in live for n in range(self.N)]
        masks = [out["masks"][q * self.N + n] for q in live for n in range(self.N)]
        longest = _global_max(max((len(s) for s in seqs), default=1))
        width = width_bucket(longest - 1, self.sampler.cfg.max_seq_len)
        inputs, targets, weights = policy_gradient_rows(seqs, masks, adv[live], num_questions=self.E,
                                                        pad_id=self.pad_id, width=width)
        # Micro-batches: a power of two (few step programs), the same in every process; padding rows (no targets,
        # weight 0) fill them.
        need = _global_max(-(-len(seqs) // self.R))
        A = 1 << max(need - 1, 0).bit_length()
        pad = A * self.R - inputs.shape[0]
        if pad:
            inputs = np.concatenate([inputs, np.full((pad, width), self.pad_id, np.int32)])
            targets = np.concatenate([targets, np.full((pad, width), -1, np.int32)])
            weights = np.concatenate([weights, np.zeros((pad, width), np.float32)])
        correct = rewards > 0
        sums = _global_sum([rewards.sum(), correct.sum(), correct.any(axis=1).sum(), out["lengths"].sum(),
                            out["tools"].sum(), rewards.size, rewards.shape[0], out["seconds"]])
        reward, n_correct, n_any, length, tools, samples, questions, seconds = sums  # over all processes
        self._metrics = {"reward": reward / samples, "pass@1": n_correct / samples,
                         "mixed_questions": float(_global_sum([len(live)])[0]),
                         f"pass@{self.N}": n_any / questions, "completion_len": length / samples,
                         "tool_share": tools / samples,
                         "sample_tok_per_s": length / max(seconds / self.world, 1e-9),
                         "sample_s": seconds / self.world}
        self.step += 1
        self._handed_over = time.perf_counter()
        shape = (A, self.R, width)
        return {"inputs": inputs.reshape(shape), "targets": targets.reshape(shape), "weights": weights.reshape(shape)}

    def step_metrics(self) -> dict:
        """The step's numbers; update_s is the time from handing the batch over to this call (the loop asks right
        after the step's update)."""
        metrics = dict(self._metrics)
        if self._handed_over is not None:
            metrics["update_s"] = time.perf_counter() - self._handed_over
        return metrics

    def state(self) -> dict:
        return {"step": self.step}

    def close(self):
        pass
