"""SpellingBee and SimpleSpelling: synthetic spelling tasks, as nanochat makes them.

SpellingBee asks "how many <letter> are in <word>?" (51 question templates in 7 languages) and answers by spelling
the word out with a running count, checking with a python `.count` call, and ending "#### N". SimpleSpelling asks
"Spell the word: <word>" and answers "<word>:w,o,r,d".

Words: nanochat's list (dwyl english-words, words_alpha.txt) when the network allows, else the vendored
evals/data/words_web2.txt.gz (the public-domain web2 list as shipped in the PyPI package english-words==2.0.2), an
offline substitute named as such. Row i is drawn from random.Random(i) for train and random.Random(10_000_000 + i)
for test (nanochat's later fix: its first version's test seeds repeated the train rows), so rows are the same on
every run given the same word list.
"""
from __future__ import annotations

import functools
import gzip
import os
import random
import string
from pathlib import Path

from nanojax.common import base_dir, download, subdir

from .sources import load_with_fallback, offline
from .task import LazyRows, Task, same_answer

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORDS_NAME = "the dwyl english-words list (words_alpha.txt)"
VENDORED_WORDS = Path(__file__).resolve().parents[1] / "data" / "words_web2.txt.gz"
TEST_SEED_OFFSET = 10_000_000
WORD_SHUFFLE_SEED = 42  # SimpleSpelling's own shuffled copy of the list

# nanochat's mix of languages: 30 English, 4 Spanish, 4 Chinese, 4 Korean, 3 French, 3 German, 3 Japanese.
TEMPLATES = [
    # English
    "How many {letter} are in the word {word}",
    "How many {letter} does {word} have",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "How many times does the letter {letter} occur in the word {word}",
    "What is the count of {letter} in {word}",
    "Tell me how many {letter} there are in {word}",
    "In {word}, how many {letter} are there",
    "How many {letter}s are in {word}",
    "Count the {letter} in {word}",
    "Find the number of {letter} in the word {word}",
    "How often does the letter {letter} show up in {word}",
    "Can you count how many {letter} are in {word}",
    "Please tell me the number of times {letter} appears in {word}",
    "How many occurrences of {letter} are there in {word}",
    "What's the number of {letter} letters in {word}",
    "Give me the count of the letter {letter} in {word}",
    "Within the word {word}, how many times does {letter} appear",
    "Spell out {word} and count the {letter}",
    "How many {letter} can you find in {word}",
    "Quick question: how many {letter} are in {word}",
    "Determine how many times the letter {letter} is used in {word}",
    "Letter count: {letter} in {word}",
    "I wonder how many {letter} the word {word} contains",
    "Could you tell me how many {letter} appear in the word {word}",
    "How many instances of the letter {letter} does {word} contain",
    "Count every {letter} in the word {word}",
    "If you spell {word}, how many {letter} do you get",
    "What number of times does {letter} appear in the word {word}",
    "Do you know how many {letter} are in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}",
    "¿Cuántas veces aparece la letra {letter} en la palabra {word}",
    "Cuenta cuántas {letter} tiene la palabra {word}",
    "¿Cuál es el número de {letter} en {word}",
    # Chinese
    "{word}中有多少个{letter}",
    "单词{word}里有几个字母{letter}",
    "请数一数{word}中{letter}出现了几次",
    "{letter}在{word}中出现了多少次",
    # Korean
    "{word}에 {letter}가 몇 개 있나요",
    "단어 {word}에서 {letter}는 몇 번 나오나요",
    "{word}에 있는 {letter}의 개수를 세어 주세요",
    "{word} 안에 {letter}가 몇 번 들어 있나요",
    # French
    "Combien de {letter} y a-t-il dans {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans le mot {word}",
    "Compte le nombre de {letter} dans {word}",
    # German
    "Wie viele {letter} hat das Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "Zähle die {letter} im Wort {word}",
    # Japanese
    "{word}に{letter}はいくつありますか",
    "単語{word}の中に{letter}は何回出てきますか",
    "{word}に含まれる{letter}の数を数えてください",
]


def _clean(words) -> list[str]:
    return sorted({w for w in (w.strip().lower() for w in words) if w.isascii() and w.isalpha()})


def load_words() -> tuple[list[str], str, str | None]:
    """(words, source, substitute_for): the list is read once per process (per base dir and settings)."""
    return _load_words(str(base_dir()), offline(), os.environ.get("NANOJAX_WORDS_URL") or WORDS_URL)


@functools.lru_cache(maxsize=4)
def _load_words(_base: str, _offline: bool, url: str) -> tuple[list[str], str, str | None]:
    def network():
        path = download(url, subdir("task_data", "words") / "words_alpha.txt", retries=3, backoff=0.5, timeout=60)
        return _clean(path.read_text(encoding="utf-8", errors="replace").splitlines())

    def vendored():
        with gzip.open(VENDORED_WORDS, "rt", encoding="utf-8") as f:
            return _clean(f), ("offline substitute: vendored evals/data/words_web2.txt.gz "
                               f"(web2 via PyPI english-words==2.0.2) in place of {WORDS_NAME}")

    words, source = load_with_fallback("spelling word list", network, vendored, network_source="dwyl english-words",
                                       unit="words")
    return words, source, (WORDS_NAME if source.startswith("offline substitute") else None)


def row_seed(split: str, index: int) -> int:
    return index + (TEST_SEED_OFFSET if split == "test" else 0)


# ----------------------------------------------------------------------------------------------------------------------
# SpellingBee.

def make_row(words: list[str], seed: int) -> dict:
    """nanochat's draw order: word, letter (90% one of the word's, else any), template, lower-casing (30%), the
    letter's quote, the word's quote, a question mark (50%)."""
    rng = random.Random(seed)
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
    template = rng.choice(TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
    if rng.random() < 0.5:
        question += "?"
    return {"seed": seed, "word": word, "letter": letter, "count": word.count(letter), "question": question}


def answer_parts(word: str, letter: str) -> list[dict]:
    """The reference answer: spell the word with a running count, check with python, then "#### N"."""
    count, lines = 0, []
    for i, char in enumerate(word, 1):
        if char == letter:
            count += 1
            lines.append(f"{i}:{char} hit! count={count}\n")
        else:
            lines.append(f"{i}:{char}\n")
    manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first."
              f"\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of '{letter}':\n"
              + "".join(lines) + f"\nThis gives us {count}.")
    return [
        {"type": "text", "text": manual},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


class _Spelling(Task):
    kind = "generative"
    splits = ("train", "test")
    generated = True

    def __init__(self, split: str = "test", size: int = 256):
        super().__init__(split)
        self.size = size
        self.seed_offset = row_seed(split, 0)

    def words(self) -> list[str]:
        words, self.source, self.substitute_for = load_words()
        return words

    def generated(self, make, words) -> LazyRows:
        return LazyRows(functools.partial(make, words), range(self.seed_offset, self.seed_offset + self.size))

    def __repr__(self):
        return f"{type(self).__name__}(split={self.split!r}, size={self.size})"


class SpellingBee(_Spelling):
    name = "SpellingBee"

    def load(self):
        return self.generated(make_row, self.words())

    def to_conversation(self, row: dict) -> dict:
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_parts(row["word"], row["letter"])},
        ]}

    def evaluate(self, row: dict, completion: str) -> bool:
        return same_answer(completion, str(row["count"]))


# ----------------------------------------------------------------------------------------------------------------------
# SimpleSpelling.

def make_simple_row(words: list[str], seed: int) -> dict:
    return {"seed": seed, "word": random.Random(seed).choice(words)}


class SimpleSpelling(_Spelling):
    name = "SimpleSpelling"

    def load(self):
        words = list(self.words())
        random.Random(WORD_SHUFFLE_SEED).shuffle(words)
        return self.generated(make_simple_row, words)

    def to_conversation(self, row: dict) -> dict:
        word = row["word"]
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}

    def evaluate(self, row: dict, completion: str) -> bool:
        word = row["word"]
        return completion.strip() == f"{word}:{','.join(word)}"
