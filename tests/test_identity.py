"""Identity conversations: both file formats, errors named by line, and the built-in set."""
import json

import pytest

from evals.tasks import Identity, get_task
from evals.tasks.identity import BUILTIN_SIZE, builtin_conversations
from nanojax.common import UserError

CHAT = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm nanojax."}]


def test_both_formats(tmp_path):
    path = tmp_path / "identity_conversations.jsonl"
    system = [{"role": "system", "content": "Be brief."}] + CHAT
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": system}) + "\n\n")  # nanochat's, then ours
    task = get_task("identity", "train", path=path)
    assert len(task) == 2 and task.source == str(path)
    assert [task.to_conversation(r) for r in task.rows] == [{"messages": CHAT}, {"messages": system}]


@pytest.mark.parametrize("line, match", [
    ('{"messages": [', r"x.jsonl:3: not JSON"),
    ('[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]',
     r"x.jsonl:3: message 0 has role 'assistant', expected 'user'"),
    ('[{"role": "user", "content": "only a question"}]', r"x.jsonl:3: a conversation needs a user message and an"),
    ('[{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]', r"x.jsonl:3: message 0 content"),
    ('["hi", "there"]', r"x.jsonl:3: message 0 is not an object"),
    ('{"conversation": []}', r"x.jsonl:3: expected \{\"messages\": \[...\]\} or a JSON array"),
])
def test_malformed_line_is_named_by_number(tmp_path, line, match):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=match) as info:
        len(Identity(path=path))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"^identity file not found: .*nope.jsonl \(expected a JSONL file"):
        len(Identity(path=tmp_path / "nope.jsonl"))


def test_builtin_set():
    rows = builtin_conversations()
    task = Identity()
    assert rows == builtin_conversations() and len(rows) == BUILTIN_SIZE == len(task)
    assert task.source.startswith("built-in") and task.substitute_for is None
    keys = {json.dumps(r) for r in rows}
    assert len(keys) == len(rows)  # all different
    turns = [len(r["messages"]) // 2 for r in rows]
    assert min(turns) == 1 and max(turns) == 3 and sum(t > 1 for t in turns) > len(rows) // 4  # some multi-turn
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    first_questions = {r["messages"][0]["content"] for r in rows}
    assert len(first_questions) > 60  # many phrasings
    who = [r for r in rows if r["messages"][0]["content"] in ("Who are you?", "What's your name?", "who are you?")]
    assert who and all("nanojax" in r["messages"][1]["content"] for r in who)
    answers = " ".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant")
    for fact in ("trained from scratch", "small", "calculator", "internet"):
        assert fact in answers
