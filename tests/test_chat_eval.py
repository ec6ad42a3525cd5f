"""evals/chat.py: the categorical scorer, pass@k, ChatCORE, and the CLI's errors."""
import inspect
import random
import subprocess
import sys

import numpy as np
import pytest

from evals import chat
from evals.tasks import ARC, GSM8K, MMLU
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    docs = [inspect.getdoc(m) or "" for m in (random, subprocess, sys, np, pytest, inspect)]
    return Tokenizer.train(iter(docs + ["A B C D E =A =B =C =D"] * 10), 400)


def _mc_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"id": str(i), "question": f"question {i}?", "choices": [f"c{j}" for j in range(4)],
             "letters": list("ABCD"), "answer": rng.choice("ABCD")} for i in range(n)]


def _task(cls, rows, *args):
    task = cls(*args)
    task._rows, task.source = rows, "test fixture"
    return task


def _stub(tok, rows, pick):
    """Last-position logits putting all mass on `pick(row)`'s letter token; rows are found by their question."""
    by_question = {r["question"]: r for r in rows}

    def last_logits(prompts):
        out = np.zeros((len(prompts), tok.vocab_size), np.float32)
        for i, ids in enumerate(prompts):
            text = tok.decode(ids)
            row = next(r for q, r in by_question.items() if q in text)
            out[i, chat.letter_token(tok, pick(row))] = 10.0
        return out
    return last_logits


@pytest.mark.parametrize("make", [lambda rows: _task(ARC, rows, "ARC-Easy"), lambda rows: _task(MMLU, rows)])
def test_categorical_gold_scores_one_and_always_a_scores_chance(tok, make):
    rows = _mc_rows(400)
    task = make(rows)
    assert chat.evaluate_categorical(task, rows, tok, _stub(tok, rows, lambda r: r["answer"])) == 1.0
    always_a = chat.evaluate_categorical(task, rows, tok, _stub(tok, rows, lambda r: "A"))
    assert abs(always_a - 0.25) < 0.06  # 400 rows: chance within noise
    assert always_a == pytest.approx(sum(r["answer"] == "A" for r in rows) / len(rows))


def test_only_allowed_letters_compete(tok):
    rows = [dict(r, letters=list("ABC"), choices=["x", "y", "z"], answer="C") for r in _mc_rows(8)]
    task = _task(ARC, rows, "ARC-Easy")

    def prefers_d(prompts):  # mass on D (not allowed), then C
        out = np.zeros((len(prompts), tok.vocab_size), np.float32)
        out[:, chat.letter_token(tok, "D")] = 10.0
        out[:, chat.letter_token(tok, "C")] = 5.0
        return out
    assert chat.evaluate_categorical(task, rows, tok, prefers_d) == 1.0


def test_generative_pass_at_k(tok):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(6)]
    task = _task(GSM8K, rows)

    def second_sample_right(prompts, n):
        out = []
        for ids in prompts:
            i = int(tok.decode(ids).split("What is ")[1].split(" ")[0])
            out += [f"#### {2 * i + 1}"] + [f"so #### {2 * i}"] * (n - 1)
        return out
    assert chat.evaluate_generative(task, rows, tok, second_sample_right, num_samples=1) == 0.0
    assert chat.evaluate_generative(task, rows, tok, second_sample_right, num_samples=2) == 1.0


def test_chat_core_centering():
    perfect = {name: 1.0 for name in chat.BASELINES}
    chance = {name: base for name, base in chat.BASELINES.items()}
    assert chat.chat_core(perfect) == pytest.approx(1.0)
    assert chat.chat_core(chance) == pytest.approx(0.0)
    assert chat.chat_core({"MMLU": 0.4, "GSM8K": 0.1}) == pytest.approx(((0.4 - 0.25) / 0.75 + 0.1) / 2)


@pytest.mark.parametrize("args, message", [(["-i", "sft", "-a", "Nope"], "unknown task 'Nope'"),
                                           (["-i", "sft", "-a", ""], "unknown task ''"),
                                           (["-i", "sft", "-a", "MMLU"], "no sft checkpoints")])
def test_cli_errors(base_dir, args, message):
    env = {"NANOJAX_BASE_DIR": str(base_dir), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "NANOJAX_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "evals.chat", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("isolation, allow, runs, note", [
    ((True, "bubblewrap 0.8.0"), False, True, "sandboxed (bubblewrap 0.8.0)"),
    ((False, "bubblewrap (bwrap) is not installed"), False, False,
     "not run: bubblewrap (bwrap) is not installed (see --allow-unisolated-exec)"),
    ((False, "bubblewrap (bwrap) is not installed"), True, True,
     "run WITHOUT kernel isolation (--allow-unisolated-exec): bubblewrap (bwrap) is not installed"),
])
def test_humaneval_runs_only_sandboxed_unless_opted_in(monkeypatch, capsys, isolation, allow, runs, note):
    from evals.tasks import GSM8K, HumanEval
    from nanojax import sandbox
    monkeypatch.setattr(sandbox, "isolation", lambda: isolation)
    gsm, humaneval = GSM8K(), HumanEval()
    tasks, notes = chat.sandbox_gate([gsm, humaneval], allow)
    assert tasks == ([gsm, humaneval] if runs else [gsm]) and notes == {"HumanEval": note}
    assert humaneval.allow_unisolated == (allow and not isolation[0])
    out = capsys.readouterr().out
    assert (f"HumanEval: model-written code is {note}" if runs else
            "HumanEval not run: bubblewrap (bwrap) is not installed; install bubblewrap") in out
    accuracies = {"GSM8K": 0.5, **({"HumanEval": 0.25} if runs else {})}
    table = chat.results_table(accuracies, {"GSM8K": "d", "HumanEval": "d"}, notes, 8).splitlines()
    assert table[-1] == (f"| HumanEval | 0.2500 | 8 | d; {note} |" if runs else f"| HumanEval | - | 0 | {note} |")
