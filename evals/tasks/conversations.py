"""Conversations from a JSONL file: SFT data, identity conversations. A line is either ours, {"messages": [...]}, or
nanochat's, a bare JSON array of messages. Roles alternate user/assistant (an optional system message first); content
is text, or for an assistant a list of parts {"type": "text"|"python"|"python_output", "text": ...}."""
from __future__ import annotations

import json
from pathlib import Path

from nanojax.common import UserError

from .task import Task

PART_TYPES = ("text", "python", "python_output")


def check_conversation(conversation, where: str) -> dict:
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected {{\"messages\": [...]}} or a JSON array of messages, with at least one")
    first = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: message {i} is not an object with a role and content")
        role, content = message.get("role"), message.get("content")
        expected = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        if role != expected:
            raise UserError(f"{where}: message {i} has role {role!r}, expected {expected!r} "
                            "(roles alternate user/assistant, an optional system message first)")
        if isinstance(content, list) and role == "assistant":
            for part in content:
                if not (isinstance(part, dict) and part.get("type") in PART_TYPES
                        and isinstance(part.get("text"), str)):
                    raise UserError(f"{where}: message {i} has a bad part {str(part)[:80]}; parts are "
                                    f"{{\"type\": one of {PART_TYPES}, \"text\": str}}")
        elif not isinstance(content, str):
            raise UserError(f"{where}: message {i} content must be a string")
    if len(messages) - first < 2:
        raise UserError(f"{where}: a conversation needs a user message and an assistant reply")
    return conversation


class Conversations(Task):
    kind = "conversation"

    def __init__(self, path, name: str | None = None, split: str = "train"):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.splits = (split,)
        super().__init__(split)

    def load(self) -> list[dict]:
        if not self.path.is_file():
            raise UserError(f"{self.name} file not found: {self.path} (expected a JSONL file of conversations)")
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    conversation = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{self.path}:{lineno}: not JSON: {e}") from None
                if isinstance(conversation, list):  # nanochat's format: the messages alone
                    conversation = {"messages": conversation}
                rows.append(check_conversation(conversation, f"{self.path}:{lineno}"))
        self.source = str(self.path)
        return rows

    def to_conversation(self, row: dict) -> dict:
        return {"messages": row["messages"]}
