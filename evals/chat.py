"""Evaluate a chat checkpoint (or any stage) on the chat tasks and ChatCORE.

    python -m evals.chat -i sft                          # every task, every problem
    python -m evals.chat -i base --max-problems 16       # a quick look at any stage
    python -m evals.chat -i sft -a "GSM8K|HumanEval"     # some tasks

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU): one batched forward over the prompts, argmax over the answer letters'
tokens only at the last prompt position. Generative tasks (GSM8K, HumanEval, SpellingBee): the engine, greedy by
default, a problem passes if any of --num-samples completions does (pass@k). ChatCORE = mean over tasks of
(acc - baseline) / (1 - baseline), baselines 0.25 for the 4-way multiple choice tasks and 0 for the generative ones.

HumanEval runs the model's programs, which are untrusted code, under kernel isolation (bubblewrap, nanojax.sandbox).
Where that is unavailable it is not run, and the output and the report say so; --allow-unisolated-exec runs it anyway
with Python-level guards only, and the output and the report say that instead.
"""
from __future__ import annotations

import argparse
import functools

import numpy as np

from evals.tasks import CHAT_EVAL as BASELINES  # the chat-eval tasks and their ChatCORE baselines
from nanojax.common import ArgumentParser, UserError, check_args, cli, print0, progress
from nanojax.report import CHAT_EVAL_SECTIONS


def letter_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise UserError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids[0]


def evaluate_categorical(task, rows, tokenizer, last_logits_fn, batch_size: int = 8) -> float:
    """Accuracy of argmax over the allowed letters' logits at the last prompt position.
    last_logits_fn(list of prompt id lists) -> (len, V) array of next-token logits."""
    correct = 0
    for start in progress(range(0, len(rows), batch_size), desc=task.name, unit="batch", leave=False):
        batch = rows[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(task.to_conversation(row)) for row in batch]
        logits = np.asarray(last_logits_fn(prompts))
        for row, row_logits in zip(batch, logits):
            letters = task.letters(row)
            ids = [letter_token(tokenizer, l) for l in letters]
            correct += letters[int(np.argmax(row_logits[ids]))] == row["answer"]
    return correct / max(len(rows), 1)


def evaluate_generative(task, rows, tokenizer, complete_fn, num_samples: int = 1, batch_size: int = 8) -> float:
    """pass@num_samples: complete_fn(list of prompt id lists, num_samples) -> completions (prompt-major)."""
    passed = 0
    for start in progress(range(0, len(rows), batch_size), desc=task.name, unit="batch", leave=False):
        batch = rows[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(task.to_conversation(row)) for row in batch]
        completions = complete_fn(prompts, num_samples)
        for i, row in enumerate(batch):
            passed += any(task.evaluate(row, c) for c in completions[i * num_samples:(i + 1) * num_samples])
    return passed / max(len(rows), 1)


@functools.lru_cache(maxsize=None)
def _last_logits(cfg, dtype):
    """The jitted forward of make_last_logits_fn, one per model shape and dtype: SFT evaluates new params every few
    hundred steps with the same program (a fresh jit each time would compile it again)."""
    import jax
    import jax.numpy as jnp

    from nanojax import gpt

    @jax.jit
    def last_logits(params, tokens_BT, last_B):
        h = gpt.forward(params, tokens_BT, cfg, dtype=dtype)
        return h[jnp.arange(h.shape[0]), last_B]

    return last_logits


def make_last_logits_fn(params, cfg, dtype):
    """One jitted forward per (batch, length bucket): prompts right-padded, logits read at each row's last token."""
    from nanojax.engine import bucket

    last_logits = _last_logits(cfg, dtype)

    def fn(prompts):
        prompts = [p[-cfg.max_seq_len:] for p in prompts]
        T = bucket(max(map(len, prompts)), cfg.max_seq_len)
        B = bucket(len(prompts), 1 << 30) if len(prompts) > 1 else 1
        tokens = np.zeros((B, T), np.int32)
        last = np.zeros(B, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            last[i] = len(p) - 1
        return np.asarray(last_logits(params, tokens, last))[:len(prompts)]

    return fn


def make_complete_fn(engine, tokenizer, max_new_tokens: int, temperature: float, top_k, seed: int = 42):
    # A prompt longer than the context keeps its end (and room to answer), as CORE crops from the left.
    keep = engine.cfg.max_seq_len - min(max_new_tokens, engine.cfg.max_seq_len // 2)

    def fn(prompts, num_samples):
        prompts = [p[-keep:] for p in prompts]
        seqs, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed)
        return [tokenizer.decode(seq[len(prompts[i // num_samples]):]) for i, seq in enumerate(seqs)]
    return fn


def sandbox_gate(tasks, allow_unisolated: bool) -> tuple[list, dict]:
    """The tasks to run, and a note per task that runs model-written code: under which isolation, or why not run."""
    from nanojax import sandbox

    keep, notes = [], {}
    for task in tasks:
        if getattr(task, "runs_untrusted_code", False):
            ok, why = sandbox.isolation()
            if ok:
                notes[task.name] = f"sandboxed ({why})"
            elif allow_unisolated:
                task.allow_unisolated = True
                notes[task.name] = f"run WITHOUT kernel isolation (--allow-unisolated-exec): {why}"
            else:
                notes[task.name] = f"not run: {why} (see --allow-unisolated-exec)"
                print0(f"{task.name} not run: {why}; {sandbox.INSTALL_HINT}")
                continue
            print0(f"{task.name}: model-written code is {notes[task.name]}")
        keep.append(task)
    return keep, notes


def results_table(accuracies: dict, sources: dict, sandbox_notes: dict, max_problems) -> str:
    """Markdown for the output and the report; a task that was not run for want of a sandbox has its row too."""
    lines = ["| task | accuracy | problems | data |", "|---|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {max_problems or 'all'} | {sources[n]}"
              f"{'; ' + sandbox_notes[n] if n in sandbox_notes else ''} |" for n, a in accuracies.items()]
    lines += [f"| {n} | - | 0 | {note} |" for n, note in sandbox_notes.items() if n not in accuracies]
    return "\n".join(lines)


def chat_core(accuracies: dict) -> float:
    centered = [(acc - BASELINES[name]) / (1 - BASELINES[name]) for name, acc in accuracies.items()]
    return float(np.mean(centered)) if centered else 0.0


def parse_args(argv=None):

    p = ArgumentParser(prog="python -m evals.chat", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", dest="stage", required=True, choices=list(CHAT_EVAL_SECTIONS), help="checkpoint stage")
    p.add_argument("-a", "--task-name", default=None, help=f"tasks separated by | (default all: {'|'.join(BASELINES)})")
    p.add_argument("-g", "--tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest depth)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="problems per task (default: all)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward pass or generation batch")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem for generative tasks")
    p.add_argument("-m", "--max-new-tokens", type=int, default=512, help="most tokens per generated answer")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature of generative tasks; 0 is greedy (default: 0.0)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 for all")
    p.add_argument("--allow-unisolated-exec", action="store_true",
                   help="run HumanEval's model-written code even where kernel isolation (bubblewrap) is unavailable")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args, positive=("max_problems", "batch_size", "num_samples", "max_new_tokens"),
               non_negative=("temperature", "top_k"))
    from evals.tasks import get_task

    names = args.task_name.split("|") if args.task_name is not None else list(BASELINES)
    tasks = [get_task(n) for n in names]  # an unknown name fails here, before loading a model
    tasks, sandbox_notes = sandbox_gate(tasks, args.allow_unisolated_exec)
    from nanojax import models, report
    from nanojax.common import compute_dtype
    from nanojax.engine import Engine

    model = models.load(args.stage, args.tag, args.step)
    tok, dtype = model.tokenizer, compute_dtype()
    print0(f"evaluating {args.stage}/{model.tag} step {model.step} on {', '.join(names)}")
    last_logits = make_last_logits_fn(model.params, model.config, dtype)
    engine = Engine(model.params, model.config, tok, dtype=dtype)
    complete = make_complete_fn(engine, tok, args.max_new_tokens, args.temperature, args.top_k or None)
    accuracies, sources = {}, {}
    for task in tasks:
        rows = task.rows[:args.max_problems] if args.max_problems else task.rows
        if task.kind == "categorical":
            acc = evaluate_categorical(task, rows, tok, last_logits, args.batch_size)
        else:
            acc = evaluate_generative(task, rows, tok, complete, args.num_samples, args.batch_size)
        accuracies[task.name], sources[task.name] = acc, task.source
        print0(f"{task.name:<14} accuracy {acc:.4f} ({len(rows)} problems, data: {task.source})")
    table = results_table(accuracies, sources, sandbox_notes, args.max_problems)
    print0(table)
    result = {name: acc for name, acc in accuracies.items()}
    if set(accuracies) == set(BASELINES):
        result["ChatCORE"] = chat_core(accuracies)
        print0(f"ChatCORE: {result['ChatCORE']:.4f}")
    else:
        print0(f"ChatCORE over the {len(accuracies)} tasks run: {chat_core(accuracies):.4f} (not the full ChatCORE)")
    report.log(CHAT_EVAL_SECTIONS[args.stage], [{"checkpoint": f"{args.stage}/{model.tag}/{model.step}",
                                       "max problems": args.max_problems or "all", **result}, table])


if __name__ == "__main__":
    main()
