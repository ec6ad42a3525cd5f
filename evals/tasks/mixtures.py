"""Task mixtures on Grain, and the named mixtures of the chat stages.

TaskSequence concatenates tasks' conversations; TaskMixture also shuffles them once with a seed (nanochat shuffles
its (task, row) list with random.Random(42); ours is Grain's index shuffle with seed 42, so the order differs but is
as fixed). A task listed twice is two epochs of it. `.dataset` is a random-access grain.MapDataset of conversation
dicts {"messages": [...]} that loaders slice by process; reading it past its length (index len..2*len-1) gives the
next epoch, shuffled anew (Grain's per-epoch seed), while `mixture[i]` is the first epoch only.

    mixture = build_mixture("sft-train", scale="demo", identity=None)
    len(mixture), mixture[0], mixture.dataset[3::8], mixture.describe()

Full scale is nanochat's (Oct 2025) mixtures and row counts; the demo scale is small enough for a tiny CPU model to
learn the chat format, its name and its calculator in minutes.
"""
from __future__ import annotations

import dataclasses

import grain

from nanojax.common import UserError, print0

from . import load_task
from .task import Task

SHUFFLE_SEED = 42


class _Conversations:
    """A task as a random-access source of conversation dicts (what grain.MapDataset.source wraps)."""

    def __init__(self, task: Task):
        self.task = task

    def __len__(self):
        return len(self.task)

    def __getitem__(self, index: int) -> dict:
        return self.task.to_conversation(self.task.rows[index])


class TaskSequence:
    """The tasks' conversations one task after another."""

    def __init__(self, tasks: list[Task], name: str = ""):
        if not tasks:
            raise UserError(f"mixture {name or '(unnamed)'} has no tasks")
        self.tasks, self.name = list(tasks), name
        self.dataset = grain.MapDataset.concatenate([grain.MapDataset.source(_Conversations(t)) for t in self.tasks])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of a mixture of {len(self)}")
        return self.dataset[index % len(self)]

    def describe(self) -> list[dict]:
        """One dict per entry: task, split, rows, source and substitute_for (None unless an offline substitute)."""
        return [{"task": t.name, "split": t.split, "rows": len(t), "source": t.source,
                 "substitute_for": t.substitute_for} for t in self.tasks]


class TaskMixture(TaskSequence):
    """The tasks' conversations in one seeded shuffle."""

    def __init__(self, tasks: list[Task], seed: int = SHUFFLE_SEED, name: str = ""):
        super().__init__(tasks, name)
        self.seed = seed
        self.dataset = self.dataset.shuffle(seed=seed)


Mixture = TaskMixture


# ----------------------------------------------------------------------------------------------------------------------
# The named mixtures.

@dataclasses.dataclass(frozen=True)
class Entry:
    task: str
    split: str
    stop: int | None = None  # the first `stop` rows (of the seed-42-shuffled set)
    kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. size for generated tasks
    substitute: dict = dataclasses.field(default_factory=dict)  # extra arguments for an offline substitute


FULL = {  # nanochat cf587ac scripts/mid_train.py and chat_sft.py
    "mid-train": [Entry("SmolTalk", "train"), Entry("MMLU", "auxiliary_train"), Entry("GSM8K", "train"),
                  Entry("identity", "train"), Entry("identity", "train"),
                  Entry("SimpleSpelling", "train", kwargs={"size": 200_000}),
                  Entry("SpellingBee", "train", kwargs={"size": 80_000})],
    "mid-val": [Entry("SmolTalk", "test"), Entry("MMLU", "test", stop=5200), Entry("GSM8K", "test", stop=420)],
    "sft-train": [Entry("ARC-Easy", "train"), Entry("ARC-Challenge", "train"), Entry("GSM8K", "train"),
                  Entry("SmolTalk", "train", stop=10_000), Entry("identity", "train"),
                  Entry("SimpleSpelling", "train", kwargs={"size": 300}),
                  Entry("SpellingBee", "train", kwargs={"size": 300})],
    "sft-val": [Entry("SmolTalk", "test")],
}

# The demo's chats: their first exchanges within 700 characters, so that 9 in 10 end (with <|assistant_end|>) inside
# the demo's 256-token context (at 1,200 characters fewer than half did, and the model learned not to end its turns).
SHORT_CHATS = {"max_chars": 700}


def short_chats(split: str, stop: int) -> Entry:
    return Entry("SmolTalk", split, stop=stop, kwargs=SHORT_CHATS, substitute=SHORT_CHATS)


DEMO = {  # the offline CPU demo: identity and arithmetic get a generous share
    "mid-train": [short_chats("train", 1200), Entry("MMLU", "auxiliary_train", stop=400),
                  Entry("GSM8K", "train", stop=1000), Entry("identity", "train"), Entry("identity", "train"),
                  Entry("SimpleSpelling", "train", kwargs={"size": 300}),
                  Entry("SpellingBee", "train", kwargs={"size": 300})],
    "mid-val": [short_chats("test", 150), Entry("MMLU", "test", stop=100), Entry("GSM8K", "test", stop=100)],
    "sft-train": [Entry("ARC-Easy", "train", stop=150), Entry("ARC-Challenge", "train", stop=100),
                  Entry("GSM8K", "train", stop=500), short_chats("train", 400), Entry("identity", "train"),
                  Entry("SimpleSpelling", "train", kwargs={"size": 100}),
                  Entry("SpellingBee", "train", kwargs={"size": 100})],
    "sft-val": [short_chats("test", 200)],
}
SCALES = {"full": FULL, "demo": DEMO}
MIXTURES = tuple(FULL)


def build_mixture(name: str, *, scale: str = "full", identity=None, seed: int = SHUFFLE_SEED) -> TaskMixture:
    """The named mixture at `scale`, its rows loaded (offline substitutes where the real sets cannot be had);
    `identity` is a JSONL file of identity conversations (default: the built-in set). Logs one line per entry."""
    if scale not in SCALES:
        raise UserError(f"unknown mixture scale {scale!r}; allowed: {', '.join(SCALES)}")
    if name not in SCALES[scale]:
        raise UserError(f"unknown mixture {name!r}; allowed: {', '.join(SCALES[scale])}")
    tasks, loaded = [], {}
    for entry in SCALES[scale][name]:
        kwargs = dict(entry.kwargs, path=identity) if entry.task == "identity" else entry.kwargs
        same = repr((entry.task, entry.split, entry.stop, entry.substitute, kwargs))  # listed twice: loaded once
        if same not in loaded:
            loaded[same] = load_task(entry.task, entry.split, stop=entry.stop, substitute=entry.substitute, **kwargs)
        tasks.append(loaded[same])
    mixture = TaskMixture(tasks, seed=seed, name=name)
    for d in mixture.describe():
        note = f" (offline substitute for {d['substitute_for']})" if d["substitute_for"] else ""
        print0(f"{name} ({scale}): {d['task']} {d['split']}: {d['rows']} rows{note}")
    print0(f"{name} ({scale}): {len(mixture)} rows in all")
    return mixture
