"""What every task is, for chat evaluation and training: rows (loaded on first use), how a row becomes a
conversation, how a completion is scored. Kinds: "categorical" (the model picks one of `letters(row)`; scored on the
letter), "generative" (the model writes an answer; `evaluate` parses it) and "conversation" (training chats, not
scored). A view (`task.view(start, stop, step)`) is a slice of a task's rows; LazyRows are generated on access."""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from nanojax.common import UserError

SHUFFLE_SEED = 42  # nanochat shuffles its HF tasks with datasets' shuffle(seed=42) == default_rng(42).permutation


class Task:
    name: str = ""
    kind: str = ""  # "categorical" | "generative" | "conversation"
    splits: tuple[str, ...] = ("test",)
    substitute_for: str | None = None  # an offline substitute names what it stands in for
    generated = False  # rows made from seeds: the constructor takes a `size`

    def __init__(self, split: str = "test"):
        if split not in self.splits:
            raise UserError(f"{self.name} has no split {split!r}; allowed: {', '.join(self.splits)}")
        self.split = split
        self.source: str | None = None
        self._rows: list[dict] | None = None

    def load(self) -> list[dict]:
        """Read the rows (and set self.source). Called once, on first use of `rows`."""
        raise NotImplementedError

    @property
    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = self.load()
        return self._rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, split={self.split!r})"

    def to_conversation(self, row: dict) -> dict:
        """{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}; the assistant turn is the reference."""
        raise NotImplementedError

    def evaluate(self, row: dict, completion: str) -> bool:
        raise NotImplementedError

    def reward(self, row: dict, completion: str) -> float:
        return float(self.evaluate(row, completion))

    def view(self, start: int = 0, stop: int | None = None, step: int = 1) -> "TaskView":
        """Rows start:stop:step of this task (nanochat's Task(start, stop, step)); stop=N is the first N rows."""
        return TaskView(self, start, stop, step)


class TaskView(Task):
    """A lazy start:stop:step slice of a task's rows; rendering and scoring are the task's."""

    def __init__(self, task: Task, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise UserError(f"bad slice {start}:{stop}:{step} of {task.name}; start, stop >= 0 and step >= 1")
        self.task, self.start, self.stop, self.step = task, start, stop, step
        self.name, self.kind, self.split, self.splits = task.name, task.kind, task.split, task.splits
        self._rows = None

    @property
    def source(self):
        return self.task.source

    @property
    def substitute_for(self):
        return self.task.substitute_for

    def load(self):
        return self.task.rows[self.start:self.stop:self.step]

    def __repr__(self):
        return f"{self.task!r}[{self.start}:{'' if self.stop is None else self.stop}:{self.step}]"

    def to_conversation(self, row):
        return self.task.to_conversation(row)

    def evaluate(self, row, completion):
        return self.task.evaluate(row, completion)

    def reward(self, row, completion):
        return self.task.reward(row, completion)

    def letters(self, row):
        return self.task.letters(row)


class LazyRows(Sequence):
    """Generated rows made on access: row k is make_row(indices[k]). Slicing gives another LazyRows."""

    def __init__(self, make_row, indices: range):
        self.make_row, self.indices = make_row, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return LazyRows(self.make_row, self.indices[k])
        return self.make_row(self.indices[k])


def shuffled(rows: list, seed: int = SHUFFLE_SEED) -> list:
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice.

def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """nanochat's multiple-choice prompt. The letter follows "=" with no space so it is the same token as the bare
    letter the model answers with."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


class MultipleChoiceTask(Task):
    """Rows are {"question", "choices", "letters", "answer" (a letter), ...}."""

    kind = "categorical"

    def letters(self, row: dict) -> list[str]:
        return list(row["letters"])

    def to_conversation(self, row: dict) -> dict:
        return {"messages": [
            {"role": "user", "content": render_mc(row["question"], row["letters"], row["choices"])},
            {"role": "assistant", "content": row["answer"]},
        ]}

    def evaluate(self, row: dict, completion: str) -> bool:
        return completion.strip() == row["answer"]


# ----------------------------------------------------------------------------------------------------------------------
# "#### N" answers (GSM8K, SpellingBee), scored as nanochat scores them: the first "#### " followed by digits, dots,
# commas and an optional minus; commas removed; then compared as strings ("#### 18.0" is not "18").

FINAL_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def final_answer(text: str) -> str | None:
    """The answer after the first "#### ", commas removed; None when there is none."""
    match = FINAL_ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def same_answer(completion: str, reference: str | None) -> bool:
    answer = final_answer(completion)
    return answer is not None and answer == reference
