"""The BPE tokenizer: training, exact round trips, special tokens, save/load, chat rendering masks, the CLIs."""
import importlib
import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanojax.common import UserError
from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_tokenizer
from tokenizer import train as train_cli
from tokenizer import eval as eval_cli

REPO = Path(__file__).resolve().parent.parent
VOCAB = 256 + 9 + 200
MODULES = ["os", "json", "collections", "argparse", "inspect", "pathlib", "re", "functools", "itertools",
           "subprocess", "threading", "decimal", "fractions", "statistics", "textwrap", "string", "datetime",
           "calendar", "csv", "logging"]


def make_corpus() -> list[str]:
    """~400 KB of English-ish text: docstrings of stdlib modules and their public members."""
    docs = set()
    for name in MODULES:
        module = importlib.import_module(name)
        docs.add(inspect.getdoc(module) or "")
        for attr, obj in vars(module).items():
            if not attr.startswith("_"):
                docs.add(inspect.getdoc(obj) or "")
    return sorted(d for d in docs if d)


@pytest.fixture(scope="session")
def corpus():
    return make_corpus()


@pytest.fixture(scope="session")
def tok(corpus):
    return Tokenizer.train(iter(corpus), VOCAB)


def ids_of(tok, *names):
    return [tok.encode_special(n) for n in names]


# ---------------------------------------------------------------------------------------------------------------------
# Training.

def test_vocab_layout(tok):
    assert tok.vocab_size == VOCAB
    assert len(tok.mergeable_ranks) == VOCAB - 9
    assert tok.special_tokens == list(SPECIAL_TOKENS) == [
        "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
        "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    assert [tok.encode_special(n) for n in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.bos_id == VOCAB - 9
    assert all(tok.id_to_token_bytes(b) == bytes([b]) for b in range(256))  # the byte tokens come first
    assert tok.pattern == SPLIT_PATTERN and r"\p{N}{1,2}" in tok.pattern


def test_training_is_deterministic(corpus, tok):
    again = Tokenizer.train(iter(corpus), VOCAB)
    assert again.mergeable_ranks == tok.mergeable_ranks
    assert again.fingerprint() == tok.fingerprint()
    smaller = Tokenizer.train(iter(corpus), VOCAB - 50)
    assert smaller.fingerprint() != tok.fingerprint()
    # BPE merges are learned in order: the smaller vocab is a prefix of the larger one
    assert all(tok.mergeable_ranks[t] == r for t, r in smaller.mergeable_ranks.items())


def test_digits_split_in_pairs(tok):
    pieces = [tok.id_to_token_bytes(i) for i in tok.encode("x 1234567 y")]
    digits = [p for p in pieces if p.strip().isdigit()]
    assert b"".join(digits) == b"1234567" and all(len(p) <= 2 for p in digits)


def test_train_bad_input():
    with pytest.raises(UserError, match="too small.*265"):
        Tokenizer.train(iter(["hello"]), 264)
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(iter([]), 300)
    with pytest.raises(UserError, match="too small for vocab size 1000"):
        Tokenizer.train(iter(["ab ab ab"]), 1000)
    assert Tokenizer.train(iter(["abc"]), 265).vocab_size == 265  # bytes + specials only: no merges needed


# ---------------------------------------------------------------------------------------------------------------------
# Encoding and decoding.

UNICODE = [
    "",
    "plain ASCII, with punctuation!? and numbers 3.14159 and 2024-01-01",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇰🇷🇫🇷 keycap 1️⃣",
    "CJK 中文字符测试 日本語のテキスト 한국어 텍스트",
    "combining e\u0301 a\u0308 n\u0303 zalgo Z\u0351\u0364\u0300a\u0306\u0321l\u0338g\u0317o",
    "controls \x00\x01\x02\x07\x08\x1b[31m\x7f\r\n\t\x0b\x0c \u200b\u200d\ufeff\u2028\u2029",
    "RTL עברית العربية mixed",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0010ffff",
    "   leading and trailing spaces   \n\n\n",
]


@pytest.mark.parametrize("text", UNICODE)
def test_round_trip_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < VOCAB - 9 for i in ids)


def test_round_trip_one_megabyte_without_spaces(tok):
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzé中😀0123456789.,-_"
    text = "".join(rng.choice(alphabet) for _ in range(1_000_000))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("a" * 1_000_000) and tok.decode(tok.encode("a" * 1_000_000)) == "a" * 1_000_000


def test_special_strings_in_text_stay_text(tok):
    text = "".join(SPECIAL_TOKENS) + " <|endoftext|> <|bos|>hello<|assistant_end|>"
    ids = tok.encode(text)
    assert max(ids) < VOCAB - 9  # no special id anywhere
    assert tok.decode(ids) == text
    assert all(max(row) < VOCAB - 9 for row in tok.encode([text, "<|user_start|>"]))


def test_prepend_append(tok):
    body = tok.encode("hello world")
    bos, end = tok.bos_id, tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos, append=end) == [bos] + body + [end]
    assert tok.encode("hello world", append="<|assistant_end|>") == body + [end]
    assert tok.encode(["hello world", ""], prepend=bos) == [[bos] + body, [bos]]
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_batch_equals_single(tok, corpus):
    texts = corpus[:50] + UNICODE
    single = [tok.encode(t) for t in texts]
    assert tok.encode(texts) == single
    assert tok.encode(texts, num_threads=1) == single
    assert tok.encode(texts, num_threads=4) == single
    assert tok.encode(tuple(texts[:3])) == single[:3]


def test_decode_accepts_arrays(tok):
    ids = tok.encode("numpy arrays too")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "numpy arrays too"


def test_token_bytes(tok, corpus):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert (tb[-9:] == 0).all() and (tb[:256] == 1).all() and (tb[256:VOCAB - 9] >= 2).all()
    assert all(tb[i] == len(tok.id_to_token_bytes(i)) for i in range(VOCAB - 9))
    # bits per byte relies on this: the byte lengths of a text's tokens add up to its UTF-8 length,
    # also where a token boundary falls inside a multi-byte character
    for text in [corpus[0], UNICODE[2], UNICODE[3], "<|bos|> x"]:
        ids = tok.encode(text, prepend="<|bos|>")
        assert tb[ids].sum() == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading.

def test_save_load(tok, corpus, tmp_path, base_dir):
    directory = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in directory.iterdir()) == ["token_bytes.npy", "tokenizer.json"]
    loaded = Tokenizer.load(directory)
    assert loaded.mergeable_ranks == tok.mergeable_ranks and loaded.fingerprint() == tok.fingerprint()
    texts = corpus[:20] + UNICODE
    assert loaded.encode(texts) == tok.encode(texts)
    saved_tb = np.load(directory / "token_bytes.npy")
    assert saved_tb.dtype == np.int32 and (saved_tb == tok.token_bytes()).all()

    assert get_tokenizer(directory).fingerprint() == tok.fingerprint()
    with pytest.raises(UserError, match="python -m tokenizer.train"):
        get_tokenizer()  # nothing under $NANOJAX_BASE_DIR/tokenizer yet
    tok.save(base_dir / "tokenizer")
    assert get_tokenizer().encode("abc") == tok.encode("abc")
    assert get_tokenizer() is get_tokenizer()  # loaded once


def test_rewritten_tokenizer_is_reloaded(tok, corpus, base_dir):
    tok.save(base_dir / "tokenizer")
    first = get_tokenizer()
    other = Tokenizer.train(iter(corpus), VOCAB - 100)
    other.save(base_dir / "tokenizer")
    assert get_tokenizer().vocab_size == VOCAB - 100 != first.vocab_size


def test_corrupt_tokenizer_file(tok, tmp_path):
    directory = tok.save(tmp_path / "tok")
    state = json.loads((directory / "tokenizer.json").read_text())
    state["ranks"][300], state["ranks"][301] = state["ranks"][301], state["ranks"][300]
    (directory / "tokenizer.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.load(directory)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        Tokenizer.load(directory)


# ---------------------------------------------------------------------------------------------------------------------
# Chat rendering.

def test_render_simple(tok):
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "It is 4."},
                         {"role": "user", "content": "Thanks!"},
                         {"role": "assistant", "content": "You're welcome."}]}
    ids, mask = tok.render_conversation(conv)
    us, ue, as_, ae = ids_of(tok, "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
    q1, a1, q2, a2 = (tok.encode(m["content"]) for m in conv["messages"])
    expected = [(tok.bos_id, 0)] + [(us, 0)] + [(t, 0) for t in q1] + [(ue, 0), (as_, 0)] + [(t, 1) for t in a1] + \
        [(ae, 1), (us, 0)] + [(t, 0) for t in q2] + [(ue, 0), (as_, 0)] + [(t, 1) for t in a2] + [(ae, 1)]
    assert list(zip(ids, mask)) == expected
    # the trained tokens are exactly the assistant's words and its end marker
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 4.<|assistant_end|>You're welcome.<|assistant_end|>"


def test_render_tool_calls(tok):
    conv = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "How many r in strawberry?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me count. "},
            {"type": "python", "text": "'strawberry'.count('r')"},
            {"type": "python_output", "text": "3"},
            {"type": "text", "text": " There are 3."},
        ]},
    ]}
    ids, mask = tok.render_conversation(conv)
    ps, pe, os_, oe, as_, ae = ids_of(tok, "<|python_start|>", "<|python_end|>", "<|output_start|>",
                                      "<|output_end|>", "<|assistant_start|>", "<|assistant_end|>")
    start = ids.index(as_)
    assert mask[:start + 1] == [0] * (start + 1)
    expected = [(t, 1) for t in tok.encode("Let me count. ")] + [(ps, 1)] + \
        [(t, 1) for t in tok.encode("'strawberry'.count('r')")] + [(pe, 1), (os_, 0)] + \
        [(t, 0) for t in tok.encode("3")] + [(oe, 0)] + [(t, 1) for t in tok.encode(" There are 3.")] + [(ae, 1)]
    assert list(zip(ids[start + 1:], mask[start + 1:])) == expected


def test_render_system_merge(tok):
    with_system = {"messages": [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello."}]}
    merged = {"messages": [{"role": "user", "content": "You are terse.\n\nHi"},
                           {"role": "assistant", "content": "Hello."}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "Hi"  # the caller's conversation is left alone


def test_render_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok " * 50}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10_000)
    ids, mask = tok.render_conversation(conv, max_tokens=20)
    assert len(full_ids) > 20 and (ids, mask) == (full_ids[:20], full_mask[:20])
    assert len(tok.render_conversation(conv)[0]) == len(full_ids)  # default 2048 leaves it whole


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "system"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "alternate"),
    ([], "non-empty"),
    ([{"role": "user", "content": [{"type": "python", "text": "1"}]}], "only text"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part 0"),
    ([{"role": "user", "content": 3}], "string or a list"),
    ([{"role": "user"}], "role"),
])
def test_render_bad_conversations(tok, messages, match):
    with pytest.raises(UserError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris."}]}
    ids = tok.render_for_completion(conv)
    as_ = tok.encode_special("<|assistant_start|>")
    assert ids[-1] == as_ and ids.count(as_) == 1
    assert "Paris" not in tok.decode(ids)
    full, _ = tok.render_conversation(conv)
    assert full[:len(ids)] == ids  # the prompt is exactly the prefix the model continues
    assert tok.decode(full[len(ids):]) == "Paris.<|assistant_end|>"
    # a conversation that already ends with the user's turn is prompted as is
    assert tok.render_for_completion({"messages": conv["messages"][:2]}) == ids


# ---------------------------------------------------------------------------------------------------------------------
# The CLIs.

def run_cli(*args, base_dir):
    env = {"NANOJAX_BASE_DIR": str(base_dir), "PATH": "/usr/bin:/bin", "NANOJAX_PROGRESS": "0"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_train_cli_vocab_too_small(base_dir):
    result = run_cli("-m", "tokenizer.train", "--vocab-size", "200", base_dir=base_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --vocab-size 200 is too small: it must be at least 265 (256 byte tokens + 9 special tokens)"]
    assert not (base_dir / "tokenizer").exists()


def test_eval_cli_without_tokenizer(base_dir):
    result = run_cli("-m", "tokenizer.eval", "--compare", "none", base_dir=base_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no tokenizer at {base_dir / 'tokenizer'}: run `python -m tokenizer.train` first"]


def test_capped():
    stats = {}
    assert list(train_cli.capped(["abcdef", "gh", "ijkl", "mn"], max_chars=9, doc_cap=4, stats=stats)) == \
        ["abcd", "gh", "ijk"]
    assert stats == {"docs": 3, "chars": 9}


def test_train_and_eval_cli_in_process(corpus, base_dir, monkeypatch, capsys):
    calls = []

    def fake_iter_documents(source, split, max_chars=None, doc_cap=None):
        calls.append((source, split, max_chars, doc_cap))
        docs = corpus[:-40] if split == "train" else corpus[-40:]
        return iter(docs + ["x" * 20_000])  # one overlong document, cropped to --doc-cap

    monkeypatch.setattr(train_cli, "_iter_documents", fake_iter_documents)
    monkeypatch.setattr(eval_cli, "_iter_documents", fake_iter_documents)
    tok = train_cli.main(["--vocab-size", str(VOCAB), "--max-chars", "2e9", "--doc-cap", "10000"])
    assert calls == [("demo", "train", 2_000_000_000, 10_000)]
    out = capsys.readouterr().out
    assert f"vocab {VOCAB}" in out and "round trip ok" in out
    assert get_tokenizer().fingerprint() == tok.fingerprint()
    assert tok.mergeable_ranks == Tokenizer.train(iter(corpus[:-40] + ["x" * 10_000]), VOCAB).mergeable_ranks
    report = (base_dir / "report" / "tokenizer-training.md").read_text()
    for key in ["train_time_s", "num_special_tokens: 9", "token_bytes_min: 0", "token_bytes_max", "token_bytes_mean",
                "token_bytes_std", f"vocab_size: {VOCAB}"]:
        assert key in report

    for bad, message in ((["--compare", "gpt2,foo"], "error: --compare 'foo' is not a tiktoken encoding; known: gpt2"),
                         (["--compare-timeout", "0"], "error: --compare-timeout 0: must be a positive number")):
        with pytest.raises(SystemExit):
            eval_cli.main(bad)
        assert capsys.readouterr().err.startswith(message)
    rows = eval_cli.main(["--compare", "none", "--max-chars", "50000"])
    assert [r["text"] for r in rows] == ["demo-train", "demo-val", "news", "korean", "code", "math", "science"]
    val = rows[1]
    val_docs = list(train_cli.capped(corpus[-40:] + ["x" * 20_000], max_chars=50_000))
    assert val["bytes"] == sum(len(d.encode()) for d in val_docs) and val["ours"] == sum(map(len, tok.encode(val_docs)))
    korean = rows[3]
    assert korean["ours"] > korean["bytes"] / 3  # a byte-level vocab trained on English barely compresses Korean
    out = capsys.readouterr().out
    assert "| demo-val |" in out and "| ours B/tok |" in out
    report = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "| korean |" in report and "val_bytes_per_token" in report


def test_eval_table_marks_unavailable_references(tok):
    rows, table = eval_cli.compression_table(tok, {"t": ["hello world"]}, {"GPT-2": None, "same": tok._enc})
    assert rows[0]["GPT-2"] is None and rows[0]["same"] == rows[0]["ours"]
    assert "| t | 11 |" in table and "n/a | n/a | n/a" in table and "+0.0%" in table


def test_benchmark_small(monkeypatch):
    def no_demo(*args, **kwargs):
        raise UserError("demo not prepared")

    monkeypatch.setattr(train_cli, "_iter_documents", no_demo)
    result = train_cli.benchmark(text_mb=0.3, vocab_size=400)
    assert result["text_is_demo"] == 0 and 0.25 < result["text_mb"] < 0.35
    assert result["same_ranks_as_rustbpe"] == 1
    assert all(isinstance(v, (int, float)) for v in result.values())
    assert result["train_mb_s"] > 0 and result["encode_mb_s_batched"] > 0 and result["bytes_per_token"] > 1
    assert train_cli.synthetic_corpus(10_000) == train_cli.synthetic_corpus(10_000)


def test_retraining_over_a_tokenizer_that_checkpoints_use_needs_overwrite(corpus, tok, base_dir, monkeypatch, capsys):
    tok.save(base_dir / "tokenizer")
    for step in (5, 10):  # what a checkpoint keeps of its tokenizer: the fingerprint in its meta
        meta = base_dir / "checkpoints" / "base" / "d2" / str(step) / "meta"
        meta.mkdir(parents=True)
        (meta / "metadata").write_text(json.dumps({"step": step, "tokenizer": tok.fingerprint()}))
    before = {p.name: p.read_bytes() for p in (base_dir / "tokenizer").iterdir()}
    monkeypatch.setattr(train_cli, "_iter_documents", lambda source, split, **kw: iter(corpus))
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--vocab-size", str(VOCAB - 50)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(
        f"error: the tokenizer in {base_dir / 'tokenizer'} (fingerprint {tok.fingerprint()}) is the one 2 "
        f"checkpoint(s) were trained with (base/d2/5, base/d2/10); this run learned a different one (")
    assert err.endswith("which they cannot use: nothing was written; pass --overwrite to replace it anyway\n")
    assert {p.name: p.read_bytes() for p in (base_dir / "tokenizer").iterdir()} == before  # nothing lost
    assert train_cli.main(["--vocab-size", str(VOCAB)]).fingerprint() == tok.fingerprint()  # the same one: fine
    new = train_cli.main(["--vocab-size", str(VOCAB - 50), "--overwrite"])
    assert get_tokenizer().fingerprint() == new.fingerprint() != tok.fingerprint()
    assert "--overwrite: replacing the tokenizer of 2 checkpoint(s)" in capsys.readouterr().out
