"""DCLM CORE (arXiv 2406.11794), scored the way nanochat scores it.

For each task of the bundle (evals/core_bundle.py: core.yaml, eval_data/*.jsonl, eval_meta_data.csv):
- rows are shuffled with random.Random(1337), then cut to --max-per-task;
- item i gets K few-shot examples drawn with random.Random(1234 + i) from the other (kept) rows;
- prompts are the DCLM templates, rendered with plain string formatting, BOS prepended:
    few-shot:           each example rendered as below with its gold answer, followed by "\\n\\n"
    multiple_choice:    query + delimiter + choice, one prompt per choice; they share a token prefix, and the tokens
                        after it are the choice's continuation
    schema:             context_option + delimiter + continuation, one prompt per option; they share a token suffix,
                        which is what gets scored
    language_modeling:  context.strip() + delimiter (+ continuation); the prompt without the continuation is stripped
                        of surrounding whitespace, and the tokens after it are the continuation
- sequences longer than the model's max_seq_len lose tokens on the left;
- multiple_choice and schema: the option whose scored tokens have the lowest mean loss wins (first on ties);
  language_modeling: correct iff the greedy argmax equals every continuation token;
- centered = (accuracy - 0.01 * baseline) / (1 - 0.01 * baseline), baseline in percent; CORE = mean over tasks.
  A bundle without all 22 tasks (the offline build) gives a "partial CORE (N/22 tasks, offline)", never "CORE".

The model sits behind `score_fn(tokens_BT) -> (losses_BT, matches_BT)` (numpy in, numpy out), where column t scores
token t+1: losses[b, t] = -log p(tokens[b, t+1] | tokens[b, :t+1]) and matches[b, t] = (argmax == tokens[b, t+1]);
the last column is unused. Sequences of many examples are packed into BOS-padded (B, T) batches, T bucketed to powers
of two and B to powers of two up to a token budget, so jit compiles a handful of shapes.
"""
from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import numpy as np

from evals.core_bundle import (CORE_LABELS, DATA_DIR, LM, MC, META_FILE, SCHEMA, ensure_bundle, is_offline_build,
                               read_baselines, read_config, read_rows)
from nanojax.common import UserError, compute_dtype, format_duration, print0, progress

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
MIN_BUCKET = 64  # shortest padded sequence length
CHUNK_EXAMPLES = 512  # examples rendered and tokenized at a time (10-shot hellaswag would not fit in memory at once)

__all__ = ["ensure_bundle", "load_tasks", "evaluate_task", "evaluate_core", "make_score_fn", "render_prompts",
           "fewshot_examples", "centered"]


# ----------------------------------------------------------------------------------------------------------------------
# Tasks.

def _check_rows(rows: list, task_type: str, path: Path):
    """Every row has its type's fields, so a bad file fails here, naming the file, and not mid-evaluation."""
    for i, row in enumerate(rows):
        try:
            if task_type == MC:
                ok = isinstance(row["query"], str) and isinstance(row["choices"], list) and row["choices"] and \
                    0 <= int(row["gold"]) < len(row["choices"])
            elif task_type == SCHEMA:
                ok = isinstance(row["context_options"], list) and row["context_options"] and \
                    isinstance(row["continuation"], str) and 0 <= int(row["gold"]) < len(row["context_options"])
            else:
                ok = isinstance(row["context"], str) and isinstance(row["continuation"], str)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            fields = {MC: "query, choices, gold", SCHEMA: "context_options, continuation, gold",
                      LM: "context, continuation"}[task_type]
            raise UserError(f"eval bundle data file {path}, row {i + 1}: a {task_type} row needs {fields}; "
                            f"got {str(row)[:200]}")


def load_tasks(bundle, max_per_task: int | None = None) -> list[tuple[dict, list[dict]]]:
    """[(task_meta, rows)] in core.yaml's order. task_meta: label, task_type, dataset_uri, num_fewshot,
    continuation_delimiter, baseline (percent). Rows shuffled with seed 1337, then cut to max_per_task (None or <= 0:
    all)."""
    bundle = Path(bundle)
    config = read_config(bundle)
    baselines = read_baselines(bundle)
    tasks = []
    for t in config["icl_tasks"]:
        label = str(t["label"])
        if label not in baselines:
            raise UserError(f"eval bundle metadata {bundle / META_FILE} has no 'Random baseline' for task {label!r}")
        shots = t.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        delimiter = t.get("continuation_delimiter", " ")
        meta = {"label": label, "task_type": t["icl_task_type"], "dataset_uri": t["dataset_uri"],
                "num_fewshot": int(shots or 0), "continuation_delimiter": " " if delimiter is None else str(delimiter),
                "baseline": float(baselines[label])}
        path = bundle / DATA_DIR / t["dataset_uri"]
        rows = read_rows(path)
        if not rows:
            raise UserError(f"eval bundle data file {path} has no rows")
        _check_rows(rows, meta["task_type"], path)
        random.Random(SHUFFLE_SEED).shuffle(rows)
        if max_per_task is not None and max_per_task > 0:
            rows = rows[:max_per_task]
        tasks.append((meta, rows))
    return tasks


def fewshot_examples(rows: list, idx: int, k: int) -> list:
    """k rows other than rows[idx], drawn with random.Random(1234 + idx). Same draw as sampling from the list of the
    other indices (random.sample only uses the population's length), without building that list per item."""
    k = min(k, len(rows) - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(len(rows) - 1), k)
    return [rows[j + (j >= idx)] for j in picks]


# ----------------------------------------------------------------------------------------------------------------------
# Prompts.

def render_prompts(task_type: str, item: dict, delimiter: str, fewshot=()) -> list[str]:
    """multiple_choice: one prompt per choice; schema: one per context option; language_modeling: [prompt without
    the continuation (stripped), prompt with it]."""
    if task_type == MC:
        prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][int(ex['gold'])]}\n\n" for ex in fewshot)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == SCHEMA:
        prefix = "".join(f"{ex['context_options'][int(ex['gold'])]}{delimiter}{ex['continuation']}\n\n"
                         for ex in fewshot)
        return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == LM:
        prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{prefix}{item['context'].strip()}{delimiter}"
        return [without.strip(), without + item["continuation"]]
    raise UserError(f"unknown icl_task_type {task_type!r}; allowed: {MC}, {SCHEMA}, {LM}")


def _common_prefix(seqs: list) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: list) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def scored_spans(task_type: str, token_lists: list[list[int]], max_seq_len: int | None):
    """[(tokens, start, end)]: the model is scored on tokens[start:end] (predicted from positions start-1..end-2).
    Left-cropped to max_seq_len; at least one scored token whenever the sequence has two."""
    if task_type == MC:
        start = _common_prefix(token_lists)
        spans = [(t, start, len(t)) for t in token_lists]
    elif task_type == SCHEMA:
        suffix = _common_suffix(token_lists)
        spans = [(t, len(t) - suffix, len(t)) for t in token_lists]
    else:
        without, with_continuation = token_lists
        spans = [(with_continuation, _common_prefix([without, with_continuation]), len(with_continuation))]
    out = []
    for tokens, start, end in spans:
        if max_seq_len and len(tokens) > max_seq_len:
            crop = len(tokens) - max_seq_len
            tokens, start, end = tokens[crop:], start - crop, end - crop
        start = max(1, min(start, end - 1))
        out.append((np.asarray(tokens, dtype=np.int32), start, end))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Scoring.

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _buckets(max_seq_len: int | None, longest: int) -> list[int]:
    top = max_seq_len or _pow2_at_least(longest)
    sizes, size = [], MIN_BUCKET
    while size < top:
        sizes.append(size)
        size *= 2
    return sizes + [top]


def _score_spans(score_fn, spans, pad_id: int, max_seq_len, batch_tokens: int, row_multiple: int):
    """(mean loss over the scored tokens, argmax matched them all) for every span, in BOS-padded batches."""
    n = len(spans)
    mean_loss, all_match = np.full(n, np.inf), np.zeros(n, dtype=bool)
    order = sorted(range(n), key=lambda i: len(spans[i][0]))
    buckets = _buckets(max_seq_len, max((len(s[0]) for s in spans), default=1))
    i = 0
    while i < n:
        T = next(b for b in buckets if b >= len(spans[order[i]][0]))
        j = i
        while j < n and len(spans[order[j]][0]) <= T:
            j += 1
        rows_max = max(row_multiple, batch_tokens // T // row_multiple * row_multiple)
        for c in range(i, j, rows_max):
            chunk = order[c:min(j, c + rows_max)]
            B = min(rows_max, -(-_pow2_at_least(len(chunk)) // row_multiple) * row_multiple)
            batch = np.full((B, T), pad_id, dtype=np.int32)
            for r, s in enumerate(chunk):
                batch[r, :len(spans[s][0])] = spans[s][0]
            losses, matches = score_fn(batch)
            losses, matches = np.asarray(losses), np.asarray(matches)
            for r, s in enumerate(chunk):
                _, start, end = spans[s]
                if end - start >= 1 and start >= 1:
                    mean_loss[s] = float(np.mean(losses[r, start - 1:end - 1], dtype=np.float64))
                    all_match[s] = bool(np.all(matches[r, start - 1:end - 1]))
        i = j
    return mean_loss, all_match


def evaluate_task(score_fn, tokenizer, task_meta: dict, rows: list[dict], max_seq_len: int | None, *,
                  batch_tokens: int | None = None, row_multiple: int | None = None, desc: str | None = None) -> float:
    """Accuracy of the model behind `score_fn` on one task's rows. batch_tokens / row_multiple default to the
    score_fn's attributes of those names (make_score_fn sets them), else 8192 and 1."""
    task_type, delimiter, k = task_meta["task_type"], task_meta["continuation_delimiter"], task_meta["num_fewshot"]
    batch_tokens = batch_tokens or getattr(score_fn, "batch_tokens", 8192)
    row_multiple = row_multiple or getattr(score_fn, "row_multiple", 1)
    bos = tokenizer.bos_id
    correct = np.zeros(len(rows), dtype=bool)
    with progress(total=len(rows), desc=desc or task_meta["label"], unit="ex", leave=False) as bar:
        for lo in range(0, len(rows), CHUNK_EXAMPLES):
            idxs = range(lo, min(len(rows), lo + CHUNK_EXAMPLES))
            prompts = [render_prompts(task_type, rows[i], delimiter, fewshot_examples(rows, i, k)) for i in idxs]
            flat = tokenizer.encode([p for ps in prompts for p in ps], prepend=bos)
            spans, owner, at = [], [], 0
            for i, ps in zip(idxs, prompts):
                spans += scored_spans(task_type, flat[at:at + len(ps)], max_seq_len)
                owner.append((i, len(spans) - (1 if task_type == LM else len(ps)), len(spans)))
                at += len(ps)
            mean_loss, all_match = _score_spans(score_fn, spans, bos, max_seq_len, batch_tokens, row_multiple)
            for i, a, b in owner:
                if task_type == LM:
                    correct[i] = all_match[a]
                else:
                    correct[i] = int(np.argmin(mean_loss[a:b])) == int(rows[i]["gold"])
            bar.update(len(idxs))
    return float(correct.mean()) if len(rows) else 0.0


def centered(accuracy: float, baseline_percent: float) -> float:
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


@functools.lru_cache(maxsize=8)
def _jitted_score(cfg, dtype, mesh):
    """One jitted forward per (config, dtype, mesh), so repeated CORE evals during training compile once."""
    import jax
    import jax.numpy as jnp

    from nanojax import gpt

    constrain, out_shardings = None, None
    if mesh is not None:
        from nanojax import mesh as meshlib

        constrain = meshlib.constrain_fn(mesh)
        out_shardings = (meshlib.replicated(mesh),) * 2

    def score(params, tokens_BT):
        logits = gpt.forward(params, tokens_BT, cfg, dtype=dtype, constrain=constrain)  # (B, T, V) fp32
        targets = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, :1]], axis=1)  # last column: a dummy target
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
        # the target is the greedy token iff its logit is the row's max (an exact tie aside): XLA:CPU's argmax is a
        # slow variadic reduce, a max is not
        return losses, target_logit >= jnp.max(logits, axis=-1)

    return jax.jit(score, out_shardings=out_shardings)


class ScoreFn:
    """The model as a score_fn: one jitted forward returning per-position target losses and argmax matches, in the
    compute dtype. With a mesh, batch rows are sharded over its batch axes and the outputs come back replicated."""

    def __init__(self, params, cfg, dtype=None, mesh=None, logits_budget: int | None = None):
        import jax

        self.mesh, self.row_multiple = mesh, 1
        if mesh is not None:
            from nanojax import gpt
            from nanojax import mesh as meshlib

            self.row_multiple = meshlib.axis_size("batch", mesh)
            params = jax.device_put(params, meshlib.shardings(gpt.param_axes(cfg), mesh, params))
        self.params = params
        self._score = _jitted_score(cfg, dtype or compute_dtype(), mesh)
        # (B, T, V) fp32 logits dominate memory: size batches so they stay near the budget (elements).
        if logits_budget is None:
            logits_budget = 2 ** 24 if jax.default_backend() == "cpu" else 2 ** 29
        self.batch_tokens = int(min(max(logits_budget // cfg.vocab_size, cfg.max_seq_len), 64 * cfg.max_seq_len))

    def __call__(self, tokens_BT):
        import jax

        tokens_BT = np.asarray(tokens_BT, dtype=np.int32)
        if self.mesh is not None:
            from nanojax.mesh import batch_sharding

            shape = tokens_BT.shape
            x = jax.make_array_from_callback(shape, batch_sharding(self.mesh, shape), lambda index: tokens_BT[index])
        else:
            x = jax.numpy.asarray(tokens_BT)
        losses, matches = self._score(self.params, x)
        return np.asarray(losses), np.asarray(matches)


def make_score_fn(params, cfg, dtype=None, mesh=None, logits_budget: int | None = None) -> ScoreFn:
    return ScoreFn(params, cfg, dtype=dtype, mesh=mesh, logits_budget=logits_budget)


# ----------------------------------------------------------------------------------------------------------------------
# CORE.

def evaluate_core(params, cfg, tokenizer, max_per_task: int | None = None, mesh=None, *, dtype=None, bundle=None,
                  offline: bool | None = None, score_fn=None, verbose: bool = True) -> dict:
    """Every task of the bundle -> {"tasks": {label: {accuracy, centered, baseline, n}}, "core", "num_tasks",
    "missing", "partial", "label"}. `bundle` defaults to ensure_bundle(offline); `score_fn` to make_score_fn(...)."""
    bundle = Path(bundle) if bundle is not None else ensure_bundle(offline)
    config = read_config(bundle)
    tasks = load_tasks(bundle, max_per_task)
    if score_fn is None:
        score_fn = make_score_fn(params, cfg, dtype=dtype, mesh=mesh)
    results, started = {}, time.time()
    with progress(tasks, desc="CORE", unit="task") as bar:
        for meta, rows in bar:
            t0 = time.time()
            accuracy = evaluate_task(score_fn, tokenizer, meta, rows, cfg.max_seq_len)
            score = centered(accuracy, meta["baseline"])
            results[meta["label"]] = {"accuracy": accuracy, "centered": score, "baseline": meta["baseline"],
                                      "n": len(rows)}
            if verbose:
                print0(f"{meta['label']:<34} accuracy {accuracy:.4f} | centered {score:+.4f} | n {len(rows)} | "
                       f"{format_duration(time.time() - t0)}")
    missing = [label for label in CORE_LABELS if label not in results]
    num = len(results)
    core = float(np.mean([r["centered"] for r in results.values()])) if results else 0.0
    if missing:
        label = f"partial CORE ({num}/{len(CORE_LABELS)} tasks{', offline' if is_offline_build(config) else ''})"
    else:
        label = "CORE"
    if verbose:
        print0(f"{label}: {core:.4f} over {num} tasks in {format_duration(time.time() - started)}"
               + (f"; missing: {', '.join(missing)}" if missing else ""))
    return {"tasks": results, "core": core, "num_tasks": num, "missing": missing, "partial": bool(missing),
            "label": label}
