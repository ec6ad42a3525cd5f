"""The generated offline substitutes: Arithmetic (GSM8K's format, calculator marks the tool agrees with, easy
problems) and SyntheticMC (valid multiple choice); both deterministic, their train and test questions disjoint."""
import re
from collections import Counter

import pytest

from evals.tasks import GSM8K, Arithmetic, SyntheticMC, render_mc
from evals.tasks.gsm8k import answer_parts
from nanojax.sandbox import calculator


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")


def test_arithmetic_rows_are_gsm8k_rows():
    task = Arithmetic("train", size=400)
    assert isinstance(task, GSM8K) and task.substitute_for == "GSM8K" and task.kind == "generative"
    assert list(task.rows) == list(Arithmetic("train", size=400).rows)  # deterministic
    steps = Counter()
    for row in task.rows:
        assert set(row) == {"question", "answer", "seed"}
        assert re.fullmatch(r"(?s).*\n#### \d+", row["answer"])
        parts = answer_parts(row["answer"])
        calls = [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
        assert calls and all(calculator(expr) == out for expr, out in calls)  # the tool prints what we trained on
        steps[len(calls)] += 1
        assert task.evaluate(row, row["answer"]) and task.reward(row, row["answer"]) == 1.0
        assert not task.evaluate(row, "#### -1")
        text = "".join(p["text"] for p in task.to_conversation(row)["messages"][1]["content"] if p["type"] == "text")
        assert task.evaluate(row, text)
    assert steps[1] >= 0.35 * len(task) and steps[2] >= 0.25 * len(task) and set(steps) == {1, 2, 3}
    divisions = [r["answer"] for r in task.rows if "/" in r["answer"]]  # marked with the tool's own "4.0"
    assert divisions and all(re.search(r"<<\d+/\d+=(\d+)\.0>>\1 ", a) for a in divisions)


def test_arithmetic_splits_and_streams_are_disjoint():
    train = {r["question"] for r in Arithmetic("train", size=3000).rows}
    test = {r["question"] for r in Arithmetic("test", size=300).rows}
    assert len(test) > 250 and not train & test
    assert Arithmetic("test", size=1)[0]["seed"] == 10_000_000
    other = Arithmetic("train", size=50, stream=1)
    assert other[0]["seed"] == 100_000_000 and [r["question"] for r in other.rows][:5] != list(train)[:5]


def test_synthetic_mc_rows():
    task = SyntheticMC("train", size=300, choices=(3, 4, 5))
    assert list(task.rows) == list(SyntheticMC("train", size=300, choices=(3, 4, 5)).rows)
    assert task.kind == "categorical"
    counts = Counter()
    for row in task.rows:
        n = len(row["choices"])
        assert 3 <= n <= 5 and row["letters"] == list("ABCDE"[:n]) and row["answer"] in row["letters"]
        assert len(set(row["choices"])) == n
        counts[row["answer"]] += 1
        user = task.to_conversation(row)["messages"][0]["content"]
        assert user == render_mc(row["question"], row["letters"], row["choices"])
        assert task.evaluate(row, row["answer"])
    assert len(counts) == 5 and min(counts[l] for l in "ABC") > 30  # the right answer's place varies
    four = SyntheticMC("train", size=50)
    assert {len(r["choices"]) for r in four.rows} == {4}
    # a few answers checked by hand-written rules
    for row in task.rows:
        right = row["choices"][row["letters"].index(row["answer"])]
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["question"]):
            assert int(right) == eval(m.group(0)[8:-1])
        if m := re.fullmatch(r"Which word is spelled ([a-z-]+)\?", row["question"]):
            assert right == m.group(1).replace("-", "")
        if m := re.fullmatch(r"Which of these words has exactly (\d) letters\?", row["question"]):
            assert len(right) == int(m.group(1)) and all(len(c) != len(right) for c in row["choices"] if c != right)


def test_synthetic_mc_splits_are_disjoint():
    train = {r["question"] + "|".join(r["choices"]) for r in SyntheticMC("train", size=2000).rows}
    test = SyntheticMC("test", size=200).rows
    questions_train = {r["question"] for r in SyntheticMC("train", size=2000).rows}
    assert not questions_train & {r["question"] for r in test} and len(train) > 1900
