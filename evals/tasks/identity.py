"""Identity conversations: who the model is. nanochat mixes 1,000 of them into mid-training (two epochs) and SFT (one).

`Identity(path=FILE)` reads a JSONL file (`--identity FILE.jsonl`) in nanochat's format (each line a bare JSON array
of messages) or ours ({"messages": [...]}). Without a file it is a built-in set of a few hundred conversations made
from templates, the same on every run: the model is nanojax, trained from scratch by its user with nanojax, small,
with a calculator tool, and no internet, memory or images.
"""
from __future__ import annotations

import random

from nanojax.common import print0

from .conversations import Conversations
from .task import Task

BUILTIN_SIZE = 300
BUILTIN_SEED = 0
BUILTIN_SOURCE = "built-in identity conversations (templates in evals/tasks/identity.py)"

INTROS = [
    "I'm nanojax, a small language model.",
    "I am nanojax, a small language model.",
    "My name is nanojax. I'm a small language model.",
    "I'm nanojax! I'm a small chat model.",
    "I'm called nanojax, a small AI assistant.",
    "nanojax here: a small language model you can chat with.",
]
ORIGINS = [
    "I was trained from scratch by my user with nanojax, a small JAX codebase that builds a chat model end to end.",
    "My user trained me from scratch with nanojax, which takes a model from raw text to a chat assistant.",
    "I was trained from scratch, by the person running me, using the nanojax training code.",
    "The person who runs me trained me from scratch with nanojax: tokenizer, pretraining, mid-training and "
    "fine-tuning.",
]
ABILITIES = [
    "I can chat, answer simple questions, do arithmetic with my calculator tool, count letters in words, and pick "
    "answers to multiple-choice questions.",
    "I can hold a short conversation, work through small math problems with a calculator, and spell words out.",
    "I'm best at short answers: simple questions, small arithmetic problems (I use a calculator for those), and "
    "spelling.",
]
LIMITS = [
    "I can't browse the internet, I don't remember past conversations, and I can't see images.",
    "I have no internet access and no memory between chats, and I only read text.",
    "I don't have access to the web or to real-time information, and I forget each conversation when it ends.",
]
SMALL = [
    "I'm a small model, so I make mistakes: please double-check anything important.",
    "Being small, I often get things wrong, so check what I say.",
    "I'm much smaller than the big assistants, so my answers can be wrong.",
]
OFFERS = ["How can I help you today?", "What would you like to talk about?", "What can I do for you?",
          "Ask me anything!", "How can I help?"]

QUESTIONS = {
    "who": ["Who are you?", "What are you?", "What's your name?", "What is your name?", "Tell me about yourself.",
            "Introduce yourself.", "Who am I talking to?", "What should I call you?", "Which model are you?",
            "What are you called?", "Who are you exactly?", "Can you tell me who you are?", "What AI are you?"],
    "maker": ["Who made you?", "Who created you?", "Who trained you?", "Who built you?", "Where do you come from?",
              "How were you made?", "Who is your creator?", "How were you trained?"],
    "chatgpt": ["Are you ChatGPT?", "Are you GPT-4?", "Are you Claude?", "Are you made by OpenAI?",
                "Are you Gemini?", "Are you a human?", "Is this ChatGPT?"],
    "can": ["What can you do?", "How can you help me?", "What are you good at?", "What are your skills?",
            "Can you do math?", "What kinds of questions can you answer?"],
    "cannot": ["Can you browse the internet?", "Do you have internet access?", "Can you see images?",
               "Do you remember our past conversations?", "What can't you do?", "What are your limitations?",
               "Do you know today's news?"],
    "size": ["How big are you?", "Are you a large model?", "How smart are you?", "Are you always right?",
             "Should I trust your answers?"],
    "nanojax": ["What is nanojax?", "What's nanojax?", "What does nanojax do?", "What framework made you?"],
    "hello": ["Hi!", "Hello", "Hey there", "Good morning!", "Hi, who's this?", "Hello! What are you?", "hey",
              "Good evening"],
}


def _pick(rng, options):
    return rng.choice(options)


def answer(rng, kind: str) -> str:
    intro = _pick(rng, INTROS)
    if kind == "who":
        return " ".join([intro, _pick(rng, ORIGINS)] + ([_pick(rng, OFFERS)] if rng.random() < 0.5 else []))
    if kind == "maker":
        return " ".join([_pick(rng, ORIGINS), "I'm nanojax, a small language model."])
    if kind == "chatgpt":
        return " ".join([f"No. {intro}", _pick(rng, ORIGINS)])
    if kind == "can":
        return " ".join([intro, _pick(rng, ABILITIES), _pick(rng, SMALL)])
    if kind == "cannot":
        return " ".join([intro, _pick(rng, LIMITS)])
    if kind == "size":
        return " ".join([intro, _pick(rng, SMALL)])
    if kind == "nanojax":
        return ("nanojax is the code that trained me: it builds a chat model from scratch in JAX (tokenizer, "
                "pretraining, mid-training, fine-tuning, evaluation and this chat). " + _pick(rng, ORIGINS))
    return " ".join([f"{_pick(rng, ['Hello!', 'Hi!', 'Hi there!', 'Hey!'])} {intro}", _pick(rng, OFFERS)])


def _question(rng, kind: str) -> str:
    text = _pick(rng, QUESTIONS[kind])
    style = rng.random()
    if style < 0.15:
        return text.lower()
    if style < 0.25:
        return text.rstrip("?!.")
    return text


def conversation(rng) -> dict:
    """One to three exchanges; the first is most often the model's name."""
    kinds = list(QUESTIONS)
    first = "who" if rng.random() < 0.35 else _pick(rng, kinds)
    turns = [first] + rng.sample([k for k in kinds if k != first], k=rng.choice([0, 0, 1, 1, 2]))
    messages = []
    for kind in turns:
        messages.append({"role": "user", "content": _question(rng, kind)})
        messages.append({"role": "assistant", "content": answer(rng, kind)})
    return {"messages": messages}


def builtin_conversations(size: int = BUILTIN_SIZE, seed: int = BUILTIN_SEED) -> list[dict]:
    """`size` distinct conversations, the same on every run."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < size:
        conv = conversation(rng)
        key = tuple((m["role"], m["content"]) for m in conv["messages"])
        if key not in seen:
            seen.add(key)
            out.append(conv)
    return out


class Identity(Task):
    name = "identity"
    kind = "conversation"
    splits = ("train",)

    def __init__(self, split: str = "train", path=None, size: int = BUILTIN_SIZE):
        super().__init__(split)
        self.path, self.size = path, size

    def load(self) -> list[dict]:
        if self.path is not None:
            task = Conversations(self.path, name="identity")
            rows, self.source = task.rows, task.source
        else:
            rows, self.source = builtin_conversations(self.size), BUILTIN_SOURCE
        print0(f"identity: {len(rows)} conversations from {self.source}")
        return rows

    def to_conversation(self, row: dict) -> dict:
        return {"messages": row["messages"]}
