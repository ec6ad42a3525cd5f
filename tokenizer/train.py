"""`python -m tokenizer.train`: learn the BPE tokenizer from the train split of a data source and save it under
$NANOJAX_BASE_DIR/tokenizer/. Also `benchmark()`, the figures behind `python -m nanojax.bench tokenizer`."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from nanojax.common import ArgumentParser, UserError, cli, format_duration, parse_count, print0, progress
from tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, default_dir, min_vocab_size


def capped(texts, *, max_chars: int | None = None, doc_cap: int | None = None, stats: dict | None = None,
           bar=None):
    """Yield texts cropped to doc_cap characters, stopping once max_chars characters have been yielded (the last
    document is cropped to land exactly on it). Counts docs and chars into `stats`; advances `bar` by chars."""
    stats = stats if stats is not None else {}
    stats.setdefault("docs", 0)
    stats.setdefault("chars", 0)
    pending = 0  # chars not yet shown on the bar: updating it per document would cost more than the cropping
    for text in texts:
        if doc_cap is not None:
            text = text[:doc_cap]
        if max_chars is not None:
            left = max_chars - stats["chars"]
            if left <= 0:
                break
            text = text[:left]
        stats["docs"] += 1
        stats["chars"] += len(text)
        if bar is not None:
            pending += len(text)
            if pending >= 1 << 20:
                bar.update(pending)
                pending = 0
        yield text
    if bar is not None and pending:
        bar.update(pending)


def _iter_documents(source: str, split: str, **kwargs):
    try:
        from nanojax.dataset import iter_documents
    except ImportError as e:  # pragma: no cover - only while nanojax.dataset is missing
        raise UserError(f"cannot read data source {source!r}: nanojax.dataset is unavailable ({e})") from e
    return iter_documents(source, split, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    about = __doc__.split("`: ", 1)[1].split(" Also")[0]
    p = ArgumentParser(prog="python -m tokenizer.train", description=about)
    p.add_argument("--source", default="demo", help="data source (climbmix, fineweb-edu, demo or a path); default demo")
    p.add_argument("--vocab-size", type=int, default=65536, help="total vocab incl. 9 special tokens (default 65536)")
    p.add_argument("--max-chars", type=parse_count, default=2_000_000_000,
                   help="train on at most this many characters (default 2e9)")
    p.add_argument("--doc-cap", type=parse_count, default=10_000, help="crop each document to this many characters")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer that checkpoints were trained with, by a different one")
    return p


def check_replaceable(new: Tokenizer, overwrite: bool):
    """A different tokenizer over one that checkpoints were trained with makes them unloadable: only with --overwrite.
    Retraining to the same tokenizer (same data and flags: a rerun of speedrun.sh) is always fine."""
    try:
        old = Tokenizer.load(default_dir())
    except UserError:
        return  # none yet, or unreadable: nothing depends on it loading
    if old.fingerprint() == new.fingerprint():
        return
    from nanojax.checkpoint import trained_with

    users = trained_with(old.fingerprint())
    if users and not overwrite:
        shown = ", ".join(users[:4]) + (f" and {len(users) - 4} more" if len(users) > 4 else "")
        raise UserError(f"the tokenizer in {default_dir()} (fingerprint {old.fingerprint()}) is the one "
                        f"{len(users)} checkpoint(s) were trained with ({shown}); this run learned a different one "
                        f"({new.fingerprint()}), which they cannot use: nothing was written; pass --overwrite to "
                        f"replace it anyway")
    if users:
        print0(f"--overwrite: replacing the tokenizer of {len(users)} checkpoint(s); they need the old one back "
               f"(fingerprint {old.fingerprint()}) to be loaded")


def check_vocab_size(vocab_size: int):
    if vocab_size < min_vocab_size():
        raise UserError(f"--vocab-size {vocab_size} is too small: it must be at least {min_vocab_size()} "
                        f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_vocab_size(args.vocab_size)
    print0(f"training a {args.vocab_size:,}-token BPE tokenizer ({args.vocab_size - len(SPECIAL_TOKENS):,} learned "
           f"+ {len(SPECIAL_TOKENS)} special) on source {args.source!r}, train split, at most {args.max_chars:,} "
           f"chars, documents cropped to {args.doc_cap:,} chars")

    documents = _iter_documents(args.source, "train", max_chars=args.max_chars, doc_cap=args.doc_cap)
    stats = {}
    t0 = time.time()
    with progress(desc="reading text", unit="char", unit_scale=True) as bar:
        texts = capped(documents, max_chars=args.max_chars, doc_cap=args.doc_cap, stats=stats, bar=bar)
        tok = Tokenizer.train(texts, args.vocab_size)
    train_time = time.time() - t0
    print0(f"read {stats['docs']:,} documents, {stats['chars']:,} chars; trained in {train_time:.2f}s "
           f"({format_duration(train_time)}, {stats['chars'] / 1e6 / max(train_time, 1e-9):.1f} M chars/s)")

    check_replaceable(tok, args.overwrite)
    directory = tok.save(default_dir())
    token_bytes = tok.token_bytes()
    learned = token_bytes[token_bytes > 0]
    print0(f"saved to {directory}: vocab {tok.vocab_size:,} (specials at ids {tok.bos_id}..{tok.vocab_size - 1}), "
           f"fingerprint {tok.fingerprint()}")
    print0(f"token bytes (learned tokens): min {learned.min()}, max {learned.max()}, mean {learned.mean():.2f}, "
           f"std {learned.std():.2f}")
    longest = sorted(range(len(tok.mergeable_ranks)), key=lambda i: (-int(token_bytes[i]), i))[:5]
    print0("longest tokens: " + ", ".join(repr(tok.id_to_token_bytes(i).decode("utf-8", "replace")) for i in longest))
    sample = "Hello world! The year 2024 was 365 days long. <|bos|> is just text here."
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    print0(f"sample: {len(sample)} chars -> {len(ids)} tokens, round trip ok")

    from nanojax.report import log

    log("Tokenizer training", [
        {"source": args.source, "vocab_size": args.vocab_size, "max_chars": args.max_chars, "doc_cap": args.doc_cap},
        {"documents": stats["docs"], "chars": stats["chars"], "train_time_s": round(train_time, 2),
         "num_special_tokens": len(SPECIAL_TOKENS), "fingerprint": tok.fingerprint(),
         # like nanochat, over all ids: the specials' zeros included
         "token_bytes_min": int(token_bytes.min()), "token_bytes_max": int(token_bytes.max()),
         "token_bytes_mean": float(token_bytes.mean()), "token_bytes_std": float(token_bytes.std())},
    ])
    return tok


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark: `python -m nanojax.bench tokenizer`.

def synthetic_corpus(n_chars: int, seed: int = 0, doc_chars: int = 4000) -> list[str]:
    """English-looking documents from a fixed Zipf-distributed vocabulary of made-up words, with numbers and
    punctuation: a stand-in when no real corpus has been prepared. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "ve", "an", "the", "in", "ex", "ple", "con", "st", "or", "ia",
                 "qu", "de", "ul", "ing", "tion", "er", "ho", "pa", "ne", "we", "y", "is", "at", "ou"]
    n_words = 20_000
    lengths = rng.integers(1, 5, size=n_words)
    vocab = np.array(["".join(rng.choice(syllables, size=n)) for n in lengths])
    p = 1.0 / np.arange(1, n_words + 1)
    words = vocab[rng.choice(n_words, size=n_chars // 6 + 1, p=p / p.sum())].tolist()
    marks = rng.random(len(words))
    numbers = rng.integers(0, 10_000, size=len(words))
    pieces, docs, size = [], [], 0
    for word, mark, number in zip(words, marks, numbers):
        piece = (f"{word}. " if mark < 0.08 else f"{word}, " if mark < 0.14 else f"{number} " if mark < 0.17
                 else f"{word}\n" if mark < 0.18 else f"{word} ")
        pieces.append(piece)
        size += len(piece)
        if size >= doc_chars:
            docs.append("".join(pieces))
            pieces, size = [], 0
    if pieces:
        docs.append("".join(pieces))
    return docs


def _corpus(text_mb: float) -> tuple[list[str], bool]:
    """About text_mb MB of text: the demo source's train split when prepared, else synthetic."""
    n_chars = int(text_mb * 1e6)
    try:
        docs = list(capped(_iter_documents("demo", "train", max_chars=n_chars, doc_cap=10_000), max_chars=n_chars,
                           doc_cap=10_000))
        if sum(map(len, docs)) >= n_chars // 2:
            return docs, True
    except (UserError, OSError):
        pass
    return synthetic_corpus(n_chars), False


def benchmark(text_mb: float = 20, vocab_size: int = 8192, repeats: int = 2) -> dict:
    """Training MB/s through Tokenizer.train vs calling rustbpe directly on the same text, and encoding MB/s on
    one thread vs batched on every core; each the best of `repeats` runs. A flat dict of numbers."""
    import rustbpe

    check_vocab_size(vocab_size)
    docs, is_demo = _corpus(text_mb)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    def train_direct():
        direct = rustbpe.Tokenizer()
        direct.train_from_iterator(iter(docs), vocab_size - len(SPECIAL_TOKENS), buffer_size=8192,
                                   pattern=SPLIT_PATTERN)
        return direct

    def train_ours():  # the CLI's path, cropping wrapper included
        return Tokenizer.train(capped(docs, doc_cap=10_000), vocab_size)

    threads = os.cpu_count() or 1
    best = dict.fromkeys(["direct", "ours", "encode_1", "encode_n"], float("inf"))

    def timed(name, fn):  # keep the best time: a shared machine's noise only ever adds time
        t0 = time.perf_counter()
        result = fn()
        best[name] = min(best[name], time.perf_counter() - t0)
        return result

    for _ in range(repeats):  # alternate the two trainers so neither always runs on a cold cache
        direct = timed("direct", train_direct)
        tok = timed("ours", train_ours)
        ids_1 = timed("encode_1", lambda: tok.encode(docs, num_threads=1))
        ids_n = timed("encode_n", lambda: tok.encode(docs, num_threads=threads))
    n_tokens = sum(map(len, ids_1))
    assert ids_1 == ids_n

    return {
        "text_mb": round(mb, 3),
        "text_is_demo": int(is_demo),
        "vocab_size": vocab_size,
        "train_mb_s": mb / best["ours"],
        "rustbpe_train_mb_s": mb / best["direct"],
        "train_overhead_pct": 100.0 * (best["ours"] / best["direct"] - 1.0),
        "same_ranks_as_rustbpe": int(dict(direct.get_mergeable_ranks()) == tok.mergeable_ranks),
        "encode_mb_s_1_thread": mb / best["encode_1"],
        "encode_mb_s_batched": mb / best["encode_n"],
        "encode_threads": threads,
        "encode_batched_speedup": best["encode_1"] / best["encode_n"],
        "bytes_per_token": mb * 1e6 / max(n_tokens, 1),
    }


if __name__ == "__main__":
    main()
