"""Tasks we generate, as offline substitutes for training sets that ship in no registry package.

Arithmetic stands in for GSM8K: word problems in GSM8K's own row format {"question", "answer"}, the answer marking
each calculation <<expr=result>> (result as the calculator prints it) and ending "#### N", so GSM8K's rendering
(python / python_output parts) and scoring apply unchanged. Nearly half are one step, most of the rest two, so a
tiny model can earn some reward on them.

SyntheticMC stands in for MMLU auxiliary_train and ARC train: multiple-choice questions about arithmetic, numbers,
letters, words and units, rendered with render_mc like MMLU and ARC. Never rows of an evaluation set.

Row i of a split is drawn from random.Random(seed) with seed = stream * 100_000_000 + (10_000_000 for test) + i,
redrawn until the question's crc32 falls in its split's share (1 in 10 for test), so train and test never share a
question text. `stream` gives the entries a substitute stands in for (MMLU, ARC-Easy, ARC-Challenge) rows of their own.
"""
from __future__ import annotations

import functools
import random
import string
import zlib

from nanojax.sandbox import calculator

from .gsm8k import GSM8K
from .spellingbee import load_words
from .task import LazyRows, MultipleChoiceTask

TEST_OFFSET, STREAM_STRIDE, TEST_SHARE = 10_000_000, 100_000_000, 10

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Leo", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Xin", "Yara", "Zane"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards", "eggs",
         "oranges", "balloons", "coins", "flowers", "toy cars", "candles", "buttons", "cupcakes", "rocks", "beads"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets", "crates"]


def split_seed(split: str, stream: int, index: int) -> int:
    return stream * STREAM_STRIDE + (TEST_OFFSET if split == "test" else 0) + index


def in_split(text: str, split: str) -> bool:
    """1 in TEST_SHARE question texts belong to test, the rest to train: the splits never share a question."""
    return (zlib.crc32(text.encode("utf-8")) % TEST_SHARE == 0) == (split == "test")


def draw(make, split: str, seed: int) -> dict:
    rng = random.Random(seed)
    while True:
        row = make(rng)
        if in_split(row["question"], split):
            return dict(row, seed=seed)


# ----------------------------------------------------------------------------------------------------------------------
# Arithmetic word problems.

def calc(expr: str) -> tuple[str, int]:
    """"12/3" -> ("<<12/3=4.0>>4", 4): the mark with the calculator's own output, then the number in prose."""
    shown = calculator(expr)
    value = int(float(shown))
    return f"<<{expr}={shown}>>{value}", value


def _people(rng):
    first = rng.choice(NAMES)
    return first, rng.choice([n for n in NAMES if n != first])


def _one_step(rng) -> tuple[str, list[str], int]:
    name, friend = _people(rng)
    items = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        mark, r = calc(f"{a}+{b}")
        return (f"{name} has {a} {items}. {friend} gives {name} {b} more. How many {items} does {name} have now?",
                [f"{name} has {a} + {b} = {mark} {items} now."], r)
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        mark, r = calc(f"{a}-{b}")
        return (f"{name} had {a} {items} and gave {b} of them to {friend}. How many {items} does {name} have left?",
                [f"{name} has {a} - {b} = {mark} {items} left."], r)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 20)
        box = rng.choice(CONTAINERS)
        mark, r = calc(f"{a}*{b}")
        return (f"{name} buys {a} {box} of {items}. Each one holds {b} {items}. How many {items} does {name} buy?",
                [f"{name} buys {a} * {b} = {mark} {items}."], r)
    if kind == 3:
        each, n = rng.randint(2, 15), rng.randint(2, 9)
        mark, r = calc(f"{each * n}/{n}")
        return (f"{name} shares {each * n} {items} equally among {n} friends. How many {items} does each friend get?",
                [f"Each friend gets {each * n} / {n} = {mark} {items}."], r)
    if kind == 4:
        price, n = rng.randint(2, 25), rng.randint(2, 12)
        thing = rng.choice(ITEMS)
        mark, r = calc(f"{n}*{price}")
        return (f"One bag of {thing} costs ${price}. How many dollars do {n} bags cost?",
                [f"{n} bags cost {n} * {price} = ${mark}."], r)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    mark, r = calc(f"{a}{op}{b}")
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    question = rng.choice([f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"What is {a} {word} {b}?",
                           f"How much is {a} {op} {b}?"])
    return question, [f"{a} {op} {b} = {mark}."], r


def _two_step(rng) -> tuple[str, list[str], int]:
    name, friend = _people(rng)
    items = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 50), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        m1, r1 = calc(f"{a}+{b}")
        m2, r2 = calc(f"{r1}-{c}")
        return (f"{name} has {a} {items} and buys {b} more. Then {name} gives away {c}. How many {items} does "
                f"{name} have now?", [f"After buying, {name} has {a} + {b} = {m1} {items}.",
                                      f"After giving some away, {name} has {r1} - {c} = {m2} {items}."], r2)
    if kind == 1:
        a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
        box = rng.choice(CONTAINERS)
        m1, r1 = calc(f"{a}*{b}")
        m2, r2 = calc(f"{r1}+{c}")
        return (f"{name} has {a} {box} with {b} {items} in each, and {c} loose {items}. How many {items} does "
                f"{name} have in all?", [f"The {box} hold {a} * {b} = {m1} {items}.",
                                         f"With the loose ones that is {r1} + {c} = {m2} {items}."], r2)
    if kind == 2:
        n, price = rng.randint(2, 9), rng.randint(2, 15)
        bill = rng.choice([b for b in (20, 50, 100, 200) if b >= n * price] or [500])
        thing = rng.choice(ITEMS)
        m1, r1 = calc(f"{n}*{price}")
        m2, r2 = calc(f"{bill}-{r1}")
        return (f"{name} buys {n} bags of {thing} at ${price} per bag and pays with a ${bill} bill. How many dollars "
                f"of change does {name} get?", [f"The bags cost {n} * {price} = ${m1}.",
                                                 f"The change is {bill} - {r1} = ${m2}."], r2)
    if kind == 3:
        a, k = rng.randint(2, 30), rng.randint(2, 5)
        m1, r1 = calc(f"{a}*{k}")
        m2, r2 = calc(f"{a}+{r1}")
        return (f"{name} has {a} {items}. {friend} has {k} times as many {items} as {name}. How many {items} do "
                f"they have together?", [f"{friend} has {a} * {k} = {m1} {items}.",
                                         f"Together they have {a} + {r1} = {m2} {items}."], r2)
    pages, days, extra = rng.randint(5, 40), rng.randint(2, 7), rng.randint(1, 30)
    m1, r1 = calc(f"{pages}*{days}")
    m2, r2 = calc(f"{r1}+{extra}")
    return (f"{name} reads {pages} pages a day for {days} days, then reads {extra} more pages. How many pages does "
            f"{name} read in total?", [f"In {days} days {name} reads {pages} * {days} = {m1} pages.",
                                       f"In total that is {r1} + {extra} = {m2} pages."], r2)


def _three_step(rng) -> tuple[str, list[str], int]:
    name, _ = _people(rng)
    wage, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 6)
    spent = rng.randint(1, wage * hours * days - 1)
    m1, r1 = calc(f"{wage}*{hours}")
    m2, r2 = calc(f"{r1}*{days}")
    m3, r3 = calc(f"{r2}-{spent}")
    return (f"{name} earns ${wage} an hour and works {hours} hours a day for {days} days. Then {name} spends "
            f"${spent}. How many dollars does {name} have left?",
            [f"Each day {name} earns {wage} * {hours} = ${m1}.", f"Over {days} days that is {r1} * {days} = ${m2}.",
             f"After spending, {name} has {r2} - {spent} = ${m3} left."], r3)


def arithmetic_problem(rng) -> dict:
    roll = rng.random()
    question, lines, answer = (_one_step if roll < 0.45 else _two_step if roll < 0.85 else _three_step)(rng)
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {answer}"}


def make_arithmetic_row(split: str, stream: int, index: int) -> dict:
    return draw(arithmetic_problem, split, split_seed(split, stream, index))


class Arithmetic(GSM8K):
    """Offline substitute for GSM8K: generated word problems in GSM8K's row format."""
    name = "Arithmetic"
    substitute_for = "GSM8K"
    generated = True

    def __init__(self, split: str = "train", size: int = 7473, stream: int = 0):
        super().__init__(split)
        self.size, self.stream = size, stream

    def load(self):
        self.source = f"offline substitute for {self.substitute_for}: arithmetic word problems generated from seeds"
        return LazyRows(functools.partial(make_arithmetic_row, self.split, self.stream), range(self.size))

    def __repr__(self):
        return f"Arithmetic(split={self.split!r}, size={self.size}, stream={self.stream})"


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice.

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("open", "closed"), ("full", "empty"), ("early", "late"), ("happy", "sad"), ("hard", "soft"),
             ("wet", "dry"), ("old", "new"), ("loud", "quiet"), ("rich", "poor"), ("high", "low")]
UNITS = [("minutes", "hours", 60), ("seconds", "minutes", 60), ("days", "weeks", 7), ("months", "years", 12),
         ("centimeters", "meters", 100), ("grams", "kilograms", 1000), ("hours", "days", 24)]


def _numbers_near(rng, answer: int, n: int) -> list[int]:
    options = {answer}
    while len(options) < n:
        options.add(answer + rng.choice([-10, -2, -1, 1, 2, 10, rng.randint(-20, 20)]))
    return sorted(options - {answer})


def _other_words(rng, by_length: dict[int, list[str]], n: int, avoid) -> list[str]:
    """n distinct random words, none in `avoid` (a word or a length)."""
    out = []
    while len(out) < n:
        length = rng.choice([k for k in by_length if k != avoid])
        word = rng.choice(by_length[length])
        if word != avoid and word not in out:
            out.append(word)
    return out


def _mc_question(rng, by_length: dict[int, list[str]], n: int) -> tuple[str, str, list[str]]:
    """-> (question, right answer, n - 1 wrong answers)."""
    kind = rng.randrange(9)
    if kind == 0:
        a, b, op = rng.randint(2, 50), rng.randint(2, 50), rng.choice("+-*")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"What is {a} {op} {b}?", str(answer), [str(x) for x in _numbers_near(rng, answer, n)]
    if kind == 1:
        values = rng.sample(range(1, 1000), n)
        largest = rng.random() < 0.5
        right = max(values) if largest else min(values)
        return (f"Which of these numbers is the {'largest' if largest else 'smallest'}?", str(right),
                [str(v) for v in values if v != right])
    if kind == 2:
        i = rng.randrange(25)
        letters = string.ascii_uppercase
        return (f"Which letter comes right after {letters[i]} in the English alphabet?", letters[i + 1],
                rng.sample([c for c in letters if c != letters[i + 1]], n - 1))
    if kind == 3:
        word = rng.choice(by_length[rng.choice(list(by_length))])
        return f"Which word is spelled {'-'.join(word)}?", word, _other_words(rng, by_length, n - 1, word)
    if kind == 4:
        length = rng.choice(list(by_length))
        right = rng.choice(by_length[length])
        return (f"Which of these words has exactly {length} letters?", right,
                _other_words(rng, by_length, n - 1, length))
    if kind == 5:
        small, big, factor = rng.choice(UNITS)
        k = rng.randint(2, 12)
        return (f"How many {small} are in {k} {big}?", str(k * factor),
                [str(x) for x in _numbers_near(rng, k * factor, n)])
    if kind == 6:
        even = rng.random() < 0.5
        right = 2 * rng.randint(1, 99) + (0 if even else 1)
        wrong = rng.sample(range(1 if even else 2, 200, 2), n - 1)
        return f"Which of these numbers is {'even' if even else 'odd'}?", str(right), [str(v) for v in wrong]
    if kind == 7:
        pair = rng.choice(OPPOSITES)
        word, right = pair if rng.random() < 0.5 else pair[::-1]
        others = rng.sample([w for p in OPPOSITES for w in p if w not in pair], n - 1)
        return f"What is the opposite of \"{word}\"?", right, others
    i = rng.randrange(7)
    return (f"Which day of the week comes right after {DAYS[i]}?", DAYS[(i + 1) % 7],
            rng.sample([d for d in DAYS if d != DAYS[(i + 1) % 7]], n - 1))


def mc_problem(by_length: dict[int, list[str]], choices: tuple[int, ...], rng) -> dict:
    n = rng.choice(choices)
    question, right, wrong = _mc_question(rng, by_length, n)
    options = wrong[:n - 1]
    options.insert(rng.randrange(n), right)
    letters = [chr(ord("A") + i) for i in range(n)]
    return {"question": question, "choices": options, "letters": letters, "answer": letters[options.index(right)]}


def make_mc_row(by_length: dict[int, list[str]], choices: tuple[int, ...], split: str, stream: int,
                index: int) -> dict:
    return draw(functools.partial(mc_problem, by_length, choices), split, split_seed(split, stream, index))


class SyntheticMC(MultipleChoiceTask):
    """Offline substitute for MMLU auxiliary_train and ARC train: generated multiple-choice questions (four choices,
    or three to five with choices=(3, 4, 5) as in ARC)."""
    name = "SyntheticMC"
    splits = ("train", "test")
    substitute_for = "MMLU auxiliary_train, ARC train"
    generated = True

    def __init__(self, split: str = "train", size: int = 10_000, stream: int = 0, choices: tuple[int, ...] = (4,)):
        super().__init__(split)
        self.size, self.stream, self.choices = size, stream, tuple(choices)

    def load(self):
        by_length = {k: [] for k in range(3, 9)}
        for word in load_words()[0]:
            if len(word) in by_length:
                by_length[len(word)].append(word)
        self.source = f"offline substitute for {self.substitute_for}: multiple-choice questions generated from seeds"
        make = functools.partial(make_mc_row, by_length, self.choices, self.split, self.stream)
        return LazyRows(make, range(self.size))

    def __repr__(self):
        return f"SyntheticMC(split={self.split!r}, size={self.size}, stream={self.stream})"
