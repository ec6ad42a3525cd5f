"""evals/core.py and evals/core_bundle.py: prompt rendering and scored spans (exact tokens), few-shot draws, scoring
with stub models (oracle -> 1.0, always-first -> chance, LM), the bundle from a loopback server, corrupt bundles, the
YAML subset, and a random tiny GPT scoring near chance. The offline build is in test_core_offline.py."""
import json
import math
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from evals import core
from evals.core import (evaluate_core, evaluate_task, fewshot_examples, load_tasks, render_prompts, scored_spans)
from evals.core_bundle import LM, MC, SCHEMA, ensure_bundle, parse_yaml_subset, read_config
from nanojax.common import UserError

BOS = 256


class ByteTokenizer:
    """One token per UTF-8 byte, BOS = 256: token sequences can be written down by hand."""
    bos_id = BOS

    def encode(self, text, prepend=None):
        if isinstance(text, str):
            return ([] if prepend is None else [prepend]) + list(text.encode("utf-8"))
        return [self.encode(t, prepend) for t in text]


TOK = ByteTokenizer()


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------------
# Fixture bundles.

WORDS = ["red", "tan", "sky", "owl", "fig", "elm", "ash", "cod", "yak", "emu", "bee", "ant"]


def balanced_golds(n, k, rng):
    """Each option is gold equally often (so always-the-first scores exactly 1/k), in an order unrelated to the text."""
    golds = [i % k for i in range(n)]
    rng.shuffle(golds)
    return golds


def mc_rows(n=24, k=4, seed=0):
    rng = random.Random(seed)
    golds = balanced_golds(n, k, rng)
    return [{"query": f"Q{i}: which?", "choices": [f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in range(k)],
             "gold": golds[i]} for i in range(n)]


def schema_rows(n=24, seed=1):
    rng = random.Random(seed)
    golds = balanced_golds(n, 2, rng)
    names = ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay"]
    rows = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        rows.append({"context_options": [f"{a} met {b}, so {a}", f"{a} met {b}, so {b}"],
                     "continuation": f"saw the {rng.choice(WORDS)}.", "gold": golds[i]})
    return rows


def lm_rows(n=12):
    return [{"context": f" count {i} ", "continuation": f"{i + 1}"} for i in range(n)]


FIXTURE_TASKS = [  # label, type, shots, delimiter, baseline (percent), rows
    ("mc4", MC, 2, "\nAnswer: ", 25, mc_rows()),
    ("schema2", SCHEMA, 0, " ", 50, schema_rows()),
    ("lm", LM, 3, " => ", 0, lm_rows()),
]


def write_bundle(root: Path, tasks=FIXTURE_TASKS, extra_yaml: str = "") -> Path:
    lines = ["# a fixture bundle", extra_yaml, "icl_tasks:"]
    root.mkdir(parents=True, exist_ok=True)
    for label, task_type, shots, delimiter, _, rows in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: fixture/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {task_type}", f"  continuation_delimiter: {json.dumps(delimiter)}"]
        path = root / "eval_data" / "fixture" / f"{label}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\n" + "".join(
        f"{t[0]},fixture,{t[4]}\n" for t in tasks))
    return root


def meta_of(label, task_type, shots, delimiter, baseline):
    return {"label": label, "task_type": task_type, "num_fewshot": shots, "continuation_delimiter": delimiter,
            "baseline": baseline, "dataset_uri": f"fixture/{label}.jsonl"}


# ----------------------------------------------------------------------------------------------------------------------
# Rendering and spans.

def test_multiple_choice_prompts_and_spans():
    item = {"query": "Capital of France?", "choices": ["Paris", "Pisa"], "gold": 0}
    shot = {"query": "2+2?", "choices": ["3", "4"], "gold": 1}
    prompts = render_prompts(MC, item, "\nAnswer: ", [shot])
    assert prompts == ["2+2?\nAnswer: 4\n\nCapital of France?\nAnswer: Paris",
                       "2+2?\nAnswer: 4\n\nCapital of France?\nAnswer: Pisa"]
    spans = scored_spans(MC, TOK.encode(prompts, prepend=BOS), None)
    head = [BOS] + ids("2+2?\nAnswer: 4\n\nCapital of France?\nAnswer: P")  # the common prefix includes the "P"
    assert [s[0].tolist() for s in spans] == [head + ids("aris"), head + ids("isa")]
    assert [(s[1], s[2]) for s in spans] == [(len(head), len(head) + 4), (len(head), len(head) + 3)]


def test_schema_prompts_and_spans_score_the_common_suffix():
    item = {"context_options": ["The cup fell so the cup", "The cup fell so the floor"], "continuation": "broke.",
            "gold": 0}
    shot = {"context_options": ["A", "B"], "continuation": "ok", "gold": 1}
    prompts = render_prompts(SCHEMA, item, " ", [shot])
    assert prompts == ["B ok\n\nThe cup fell so the cup broke.", "B ok\n\nThe cup fell so the floor broke."]
    spans = scored_spans(SCHEMA, TOK.encode(prompts, prepend=BOS), None)
    for (tokens, start, end), prompt in zip(spans, prompts):
        assert tokens.tolist() == [BOS] + ids(prompt)
        assert end == len(tokens) and tokens[start:end].tolist() == ids(" broke.")


def test_language_modeling_prompts_strip_and_span_the_continuation():
    item = {"context": "  The sky is ", "continuation": "blue"}
    shot = {"context": "Grass is\n", "continuation": "green"}
    without, with_ = render_prompts(LM, item, "\nAnswer: ", [shot])
    assert without == "Grass is\nAnswer: green\n\nThe sky is\nAnswer:"  # stripped: no trailing space
    assert with_ == "Grass is\nAnswer: green\n\nThe sky is\nAnswer: blue"
    [(tokens, start, end)] = scored_spans(LM, TOK.encode([without, with_], prepend=BOS), None)
    assert tokens.tolist() == [BOS] + ids(with_)
    assert tokens[start:end].tolist() == ids(" blue")  # byte tokens: the stripped space is part of the continuation


def test_long_sequences_are_cropped_from_the_left():
    item = {"context": "abcdefghij", "continuation": "XYZ"}
    [(tokens, start, end)] = scored_spans(LM, TOK.encode(render_prompts(LM, item, " "), prepend=BOS), 8)
    assert tokens.tolist() == ids("ghij XYZ") and len(tokens) == 8
    assert tokens[start:end].tolist() == ids(" XYZ")
    # a continuation longer than the window keeps at least position 0 as context
    [(tokens, start, end)] = scored_spans(LM, TOK.encode(render_prompts(LM, {"context": "a", "continuation": "Z" * 20},
                                                                        " "), prepend=BOS), 8)
    assert (start, end) == (1, 8)


def test_fewshot_draw_excludes_the_item_is_deterministic_and_matches_the_list_draw():
    rows = list(range(50))
    for idx in (0, 7, 49):
        got = fewshot_examples(rows, idx, 10)
        assert idx not in got and len(set(got)) == 10
        assert got == fewshot_examples(rows, idx, 10)
        reference = random.Random(1234 + idx).sample([i for i in range(50) if i != idx], 10)
        assert got == reference
    assert fewshot_examples(rows, 3, 0) == [] and sorted(fewshot_examples(rows[:4], 1, 10)) == [0, 2, 3]


def test_bpe_tokenizer_continuation_span():
    tokenizer_mod = pytest.importorskip("tokenizer")
    text = ["The sky is blue. Grass is green.\nAnswer: blue. The sea is blue, the sun is yellow. " * 20]
    tok = tokenizer_mod.Tokenizer.train(iter(text), 280)
    item = {"context": "The sea is", "continuation": "blue"}
    [(tokens, start, end)] = scored_spans(LM, tok.encode(render_prompts(LM, item, "\nAnswer: "), prepend=tok.bos_id),
                                          None)
    assert tok.decode(tokens[start:end]) == " blue"
    assert tokens[0] == tok.bos_id


# ----------------------------------------------------------------------------------------------------------------------
# Scoring with stub models.

def strip_pads(row):
    row = list(row)
    while row and row[-1] == BOS:
        row.pop()
    return tuple(row)


def oracle_score_fn(gold_rows: set):
    """Low loss everywhere on sequences that are gold prompts, high elsewhere; argmax always right."""
    def score(tokens_BT):
        losses = np.array([[0.0 if strip_pads(r) in gold_rows else 1.0] * tokens_BT.shape[1] for r in tokens_BT])
        return losses, np.ones(tokens_BT.shape, dtype=bool)
    return score


def gold_sequences(task_type, delimiter, shots, rows):
    gold = set()
    for i, row in enumerate(rows):
        prompts = render_prompts(task_type, row, delimiter, fewshot_examples(rows, i, shots))
        gold.add(tuple(TOK.encode(prompts[row["gold"]], prepend=BOS)))
    return gold


def flat_score_fn(tokens_BT):
    return np.ones(tokens_BT.shape), np.zeros(tokens_BT.shape, dtype=bool)


@pytest.mark.parametrize("task", FIXTURE_TASKS[:2], ids=lambda t: t[0])
def test_oracle_scores_one_and_always_first_scores_chance(task):
    label, task_type, shots, delimiter, baseline, rows = task
    meta = meta_of(label, task_type, shots, delimiter, baseline)
    oracle = oracle_score_fn(gold_sequences(task_type, delimiter, shots, rows))
    acc = evaluate_task(oracle, TOK, meta, rows, 256, batch_tokens=512)
    assert acc == 1.0 and core.centered(acc, baseline) == 1.0
    acc = evaluate_task(flat_score_fn, TOK, meta, rows, 256)  # ties -> the first option, gold cycles through them
    assert acc == pytest.approx(baseline / 100) and core.centered(acc, baseline) == pytest.approx(0.0)


def test_language_modeling_needs_every_continuation_token():
    rows = lm_rows()
    meta = meta_of("lm", LM, 3, " => ", 0)
    assert evaluate_task(oracle_score_fn(set()), TOK, meta, rows, 256) == 1.0
    assert evaluate_task(flat_score_fn, TOK, meta, rows, 256) == 0.0

    def wrong_last_token(tokens_BT):  # matches everywhere except where the target is the final digit "1"
        targets = np.concatenate([tokens_BT[:, 1:], tokens_BT[:, :1]], axis=1)
        return np.ones(tokens_BT.shape), targets != ord("1")

    expected = np.mean([not r["continuation"].count("1") for r in rows])  # only rows without a "1" survive
    assert evaluate_task(wrong_last_token, TOK, meta, rows, 256) == pytest.approx(expected)


def test_batches_are_bos_padded_and_bucketed(monkeypatch):
    shapes = []

    def spy(tokens_BT):
        shapes.append(tokens_BT.shape)
        assert tokens_BT.dtype == np.int32 and (tokens_BT[:, 0] == BOS).all()
        return flat_score_fn(tokens_BT)

    rows = mc_rows(40)
    evaluate_task(spy, TOK, meta_of("mc4", MC, 2, "\nAnswer: ", 25), rows, 512, batch_tokens=2048, row_multiple=4)
    assert all(T in (64, 128, 256, 512) and B % 4 == 0 and B * T <= 2048 for B, T in shapes)
    assert len(set(shapes)) <= 4 and sum(B for B, _ in shapes) >= 160


def test_evaluate_core_on_a_fixture_bundle(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    tasks = load_tasks(bundle)
    assert [m["label"] for m, _ in tasks] == ["mc4", "schema2", "lm"]
    mc_meta, mc_loaded = tasks[0]
    assert mc_meta["num_fewshot"] == 2 and mc_meta["continuation_delimiter"] == "\nAnswer: "
    assert mc_meta["baseline"] == 25.0
    shuffled = mc_rows()
    random.Random(1337).shuffle(shuffled)
    assert mc_loaded == shuffled and len(load_tasks(bundle, max_per_task=5)[0][1]) == 5
    assert load_tasks(bundle, max_per_task=5)[0][1] == shuffled[:5]

    cfg = type("Cfg", (), {"max_seq_len": 256})()
    result = evaluate_core(None, cfg, TOK, bundle=bundle, score_fn=flat_score_fn, verbose=False)
    assert result["tasks"]["mc4"] == {"accuracy": pytest.approx(0.25), "centered": pytest.approx(0.0),
                                      "baseline": 25.0, "n": 24}
    assert result["tasks"]["lm"]["accuracy"] == 0.0 and result["num_tasks"] == 3
    assert result["core"] == pytest.approx(np.mean([r["centered"] for r in result["tasks"].values()]))
    assert result["partial"] and len(result["missing"]) == 22 and result["label"] == "partial CORE (3/22 tasks)"


# ----------------------------------------------------------------------------------------------------------------------
# Reading bundles: the YAML subset, corrupt files.

DCLM_STYLE_YAML = """\
# CORE tasks
icl_tasks:
-
  label: jeopardy
  dataset_uri: world_knowledge/jeopardy_all.jsonl # a comment
  num_fewshot: [10]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: " # this separates questions from answers
  has_categories: true
- label: copa
  dataset_uri: 'commonsense_reasoning/copa.jsonl'
  num_fewshot: [0, 1]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
  weight: 0.5
"""


def test_yaml_subset_parses_dclm_style_config():
    parsed = parse_yaml_subset(DCLM_STYLE_YAML)
    assert parsed == {"icl_tasks": [
        {"label": "jeopardy", "dataset_uri": "world_knowledge/jeopardy_all.jsonl", "num_fewshot": [10],
         "icl_task_type": "language_modeling", "continuation_delimiter": "\nAnswer: ", "has_categories": True},
        {"label": "copa", "dataset_uri": "commonsense_reasoning/copa.jsonl", "num_fewshot": [0, 1],
         "icl_task_type": "multiple_choice", "continuation_delimiter": " ", "weight": 0.5}]}
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(DCLM_STYLE_YAML) == parsed
    with pytest.raises(ValueError, match="line 2"):
        parse_yaml_subset("icl_tasks:\n  - label: [unterminated\n")


def test_yaml_subset_quotes_hide_commas_and_hashes():
    text = "a: ['it''s, #1', \"x, \\\" # y\", don't, 2] # c\nb: 'q # not a comment' # a comment\nc: x#y\n"
    expected = {"a": ["it's, #1", 'x, " # y', "don't", 2], "b": "q # not a comment", "c": "x#y"}
    assert parse_yaml_subset(text) == expected
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(text) == expected


def test_corrupt_bundle_files_are_user_errors_naming_the_file(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    data = bundle / "eval_data" / "fixture" / "schema2.jsonl"
    data.write_text('{"context_options": ["a", "b"], "continuation": "c", "gold": 0}\n{not json\n')
    with pytest.raises(UserError, match="schema2.jsonl"):
        load_tasks(bundle)
    data.write_text('{"query": "q", "choices": ["a"], "gold": 0}\n')  # an MC row in a schema task
    with pytest.raises(UserError, match="schema2.jsonl, row 1: a schema row needs"):
        load_tasks(bundle)
    data.unlink()
    with pytest.raises(UserError, match="schema2.jsonl"):
        load_tasks(bundle)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Other\nmc4,1\n")
    with pytest.raises(UserError, match="eval_meta_data.csv"):
        load_tasks(bundle)
    (bundle / "core.yaml").write_text("icl_tasks: [unterminated\n")
    with pytest.raises(UserError, match="core.yaml"):
        load_tasks(bundle)
    (bundle / "core.yaml").unlink()
    with pytest.raises(UserError, match="core.yaml"):
        read_config(bundle)


# ----------------------------------------------------------------------------------------------------------------------
# The real bundle, from a loopback server.

@pytest.fixture
def server(static_server, monkeypatch):
    """The folder whose eval_bundle.zip NANOJAX_EVAL_BUNDLE_URL names."""
    root, url = static_server
    monkeypatch.setenv("NANOJAX_EVAL_BUNDLE_URL", f"{url}/eval_bundle.zip")
    monkeypatch.delenv("NANOJAX_OFFLINE", raising=False)
    return root


def zip_folder(folder: Path, dest: Path, prefix="eval_bundle/"):
    with zipfile.ZipFile(dest, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, prefix + path.relative_to(folder).as_posix())


def test_bundle_downloads_and_unzips_from_a_loopback_server(server, base_dir, tmp_path):
    zip_folder(write_bundle(tmp_path / "src"), server / "eval_bundle.zip")
    bundle = ensure_bundle()
    assert bundle == base_dir / "eval_bundle" and (bundle / "core.yaml").exists()
    assert not (base_dir / "eval_bundle.zip").exists()  # unzipped, then removed
    assert [m["label"] for m, _ in load_tasks(bundle)] == ["mc4", "schema2", "lm"]
    assert not [p for p in base_dir.iterdir() if p.name.startswith(".eval_bundle")]  # no temp dirs left
    (server / "eval_bundle.zip").unlink()
    assert ensure_bundle(offline=False) == bundle  # already there: no network needed


def test_offline_build_is_replaced_by_the_real_bundle_when_asked(server, base_dir, tmp_path):
    old = base_dir / "eval_bundle"
    write_bundle(old, extra_yaml="nanojax_offline: true")
    (old / ".cache").mkdir()
    (old / ".cache" / "keep.whl").write_text("x")
    zip_folder(write_bundle(tmp_path / "src", FIXTURE_TASKS[:1]), server / "eval_bundle.zip", prefix="")
    assert ensure_bundle() == old and len(load_tasks(old)) == 3  # offline=None: the existing bundle is used
    bundle = ensure_bundle(offline=False)
    assert [m["label"] for m, _ in load_tasks(bundle)] == ["mc4"] and (bundle / ".cache" / "keep.whl").exists()


def test_corrupt_bundle_zip_is_a_user_error_and_is_removed(server, base_dir, tmp_path):
    (server / "eval_bundle.zip").write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(UserError, match="eval_bundle.zip.*corrupt"):
        ensure_bundle(offline=False)
    assert not (base_dir / "eval_bundle.zip").exists() and not (base_dir / "eval_bundle").exists()
    with zipfile.ZipFile(server / "eval_bundle.zip", "w") as z:
        z.writestr("eval_bundle/readme.txt", "no config here")
    with pytest.raises(UserError, match="no core.yaml"):
        ensure_bundle(offline=False)


# ----------------------------------------------------------------------------------------------------------------------
# A real (tiny, random) GPT.

gpt = pytest.importorskip("nanojax.gpt")


def random_params(cfg, seed=0):
    """init_params zeroes lm_head and the output projections (uniform logits, every option tied): fill them all."""
    import jax

    params = gpt.init_params(cfg, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) / math.sqrt(x.shape[-2]) for k, x in
                                     zip(keys, leaves)])


@pytest.fixture(scope="module")
def tiny_model():
    from nanojax.config import GPTConfig

    cfg = GPTConfig.from_depth(2, vocab_size=257, head_dim=32, max_seq_len=128)
    return cfg, random_params(cfg)


def test_score_fn_matches_a_naive_forward(tiny_model):
    import jax
    import jax.numpy as jnp

    cfg, params = tiny_model
    tokens = np.random.default_rng(0).integers(0, 257, (8, 64)).astype(np.int32)
    losses, matches = core.make_score_fn(params, cfg, dtype=jnp.float32)(tokens)
    logits = gpt.forward(params, jnp.asarray(tokens), cfg)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(losses[:, :-1], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(matches[:, :-1], np.argmax(logp[:, :-1], -1) == tokens[:, 1:])

    from nanojax.mesh import make_mesh

    sharded = core.make_score_fn(params, cfg, dtype=jnp.float32, mesh=make_mesh("8"))
    assert sharded.row_multiple == 8
    mesh_losses, mesh_matches = sharded(tokens)
    np.testing.assert_allclose(mesh_losses, losses, rtol=1e-4, atol=1e-4)
    assert (mesh_matches == matches).mean() > 0.99


def test_random_tiny_gpt_scores_near_chance(tiny_model, tmp_path):
    import jax.numpy as jnp

    cfg, params = tiny_model
    tasks = [("mc4", MC, 1, "\nAnswer: ", 25, mc_rows(64, seed=3)), ("schema2", SCHEMA, 0, " ", 50, schema_rows(64)),
             ("lm", LM, 20, " => ", 0, lm_rows(24))]  # 20-shot LM prompts exceed max_seq_len: cropped on the left
    bundle = write_bundle(tmp_path / "bundle", tasks)
    result = evaluate_core(params, cfg, TOK, bundle=bundle, dtype=jnp.float32, verbose=False)
    scores = {label: r["centered"] for label, r in result["tasks"].items()}
    assert all(abs(c) < 0.4 for c in scores.values()), scores
    assert abs(result["core"]) < 0.2 and result["tasks"]["lm"]["accuracy"] == 0.0
    assert result["tasks"]["mc4"]["n"] == 64
    # not chance by way of ties (which pick option 0, and options are gold equally often): its picks are spread out
    score_fn = core.make_score_fn(params, cfg, dtype=jnp.float32)
    for label, task_type, shots, delimiter, baseline, rows in tasks[:2]:
        as_if_first = [dict(r, gold=0) for r in rows]
        picked_first = evaluate_task(score_fn, TOK, meta_of(label, task_type, shots, delimiter, baseline),
                                     as_if_first, cfg.max_seq_len)
        assert 0.05 < picked_first < 0.8, (label, picked_first)
