"""Every task by name, for evaluation and training: `get_task("MMLU")` builds one; rows load on first use.

CHAT_EVAL names the chat-eval tasks (with their ChatCORE baselines). SUBSTITUTES names, for a training set that
cannot be had offline, the generated or registry-package task that stands in for it; `load_task` makes that switch
(when the network source fails or NANOJAX_OFFLINE=1) and says so.
"""
from __future__ import annotations

import functools

from nanojax.common import UserError, print0

from .arc import ARC
from .conversations import Conversations
from .generated import Arithmetic, SyntheticMC
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .identity import Identity
from .mmlu import MMLU
from .smoltalk import ShareGPT, SmolTalk
from .spellingbee import SimpleSpelling, SpellingBee
from .task import MultipleChoiceTask, Task, TaskView, render_mc

TASKS = {
    "ARC-Easy": functools.partial(ARC, "ARC-Easy"),
    "ARC-Challenge": functools.partial(ARC, "ARC-Challenge"),
    "MMLU": MMLU,
    "GSM8K": GSM8K,
    "HumanEval": HumanEval,
    "SpellingBee": SpellingBee,
    "SimpleSpelling": SimpleSpelling,
    "SmolTalk": SmolTalk,
    "identity": Identity,
    # offline substitutes
    "ShareGPT": ShareGPT,
    "Arithmetic": Arithmetic,
    "SyntheticMC": SyntheticMC,
}

# The chat-eval tasks and the accuracy of guessing on each (ChatCORE centres on it).
CHAT_EVAL = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}

# task -> (its substitute, the substitute's arguments). Generated substitutes take a size; by default the real set's.
SUBSTITUTES = {
    "SmolTalk": ("ShareGPT", {}),
    "GSM8K": ("Arithmetic", {}),
    "MMLU": ("SyntheticMC", {"stream": 0, "choices": (4,)}),
    "ARC-Easy": ("SyntheticMC", {"stream": 1, "choices": (3, 4, 5)}),
    "ARC-Challenge": ("SyntheticMC", {"stream": 2, "choices": (3, 4, 5)}),
}
REAL_SIZES = {("GSM8K", "train"): 7473, ("GSM8K", "test"): 1319, ("MMLU", "auxiliary_train"): 99_842,
              ("MMLU", "test"): 14_042, ("ARC-Easy", "train"): 2251, ("ARC-Easy", "test"): 2376,
              ("ARC-Challenge", "train"): 1119, ("ARC-Challenge", "test"): 1172}


def get_task(name: str, split: str = "test", *, start: int = 0, stop: int | None = None, step: int = 1,
             **kwargs) -> Task:
    """The task `name` on `split`; start/stop/step give a view of its rows (stop=N: the first N)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    task = TASKS[name](split=split, **kwargs)
    return task if (start, stop, step) == (0, None, 1) else task.view(start, stop, step)


def load_task(name: str, split: str, *, stop: int | None = None, substitute: dict | None = None,
              **kwargs) -> Task:
    """get_task with its rows loaded; when they cannot be had and the task has an offline substitute, the substitute
    (with `substitute` as extra arguments), named as such in a log line and in its `substitute_for`."""
    task = get_task(name, split, stop=stop, **kwargs)
    try:
        len(task)
        return task
    except UserError as e:
        if name not in SUBSTITUTES:
            raise
        why = str(e)
    sub_name, sub_kwargs = SUBSTITUTES[name]
    sub_split = "train" if split in ("train", "auxiliary_train") else "test"
    sub_kwargs = {**sub_kwargs, **(substitute or {})}
    view = stop
    if TASKS[sub_name].generated:  # as many rows as the real set has (or as asked for)
        sub_kwargs.setdefault("size", stop if stop is not None else REAL_SIZES.get((name, split), 10_000))
        view = None
    sub = get_task(sub_name, sub_split, stop=view, **sub_kwargs)
    (sub.task if isinstance(sub, TaskView) else sub).substitute_for = f"{name} {split}"
    print0(f"{name} {split}: unavailable ({why[:200]}); using the offline substitute {sub_name} {sub_split} "
           "in its place")
    len(sub)
    return sub


__all__ = ["TASKS", "CHAT_EVAL", "SUBSTITUTES", "get_task", "load_task", "Task", "TaskView", "MultipleChoiceTask",
           "render_mc", "ARC", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SimpleSpelling", "SmolTalk",
           "Identity", "Conversations", "ShareGPT", "Arithmetic", "SyntheticMC"]
