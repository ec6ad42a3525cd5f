"""`python -m tokenizer.eval`: compression (UTF-8 bytes per token; higher is better) of our tokenizer on the data
source's train and held-out val text and on built-in samples, next to GPT-2's and GPT-4's (cl100k) tokenizers when
tiktoken can fetch them (it needs the network)."""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

from nanojax.common import ArgumentParser, UserError, cli, parse_count, print0
from tokenizer.bpe import get_tokenizer
from tokenizer.samples import SAMPLES
from tokenizer.train import _iter_documents, capped

REFERENCES = {"gpt2": "GPT-2", "cl100k_base": "GPT-4"}


def load_reference(name: str, timeout: float):
    """-> (tiktoken.Encoding or None, why not). tiktoken downloads these on first use and has no timeout of its own,
    so the fetch runs in a daemon thread that we stop waiting for."""
    import tiktoken

    result = {}

    def fetch():
        try:
            result["encoding"] = tiktoken.get_encoding(name)
        except BaseException as e:  # noqa: BLE001 - any failure means "not available"
            message = str(e).strip()  # requests' connection errors run to several hundred characters: name only
            result["error"] = f"{type(e).__name__}: {message}" if 0 < len(message) <= 80 else type(e).__name__

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, f"no answer within {timeout:g}s"
    return result.get("encoding"), result.get("error")


def compression_table(tok, texts: dict[str, list[str]], references: dict) -> tuple[list[dict], str]:
    """Rows of {name, bytes, tokens per tokenizer} and the markdown table. references: label -> Encoding or None."""
    rows = []
    for name, docs in texts.items():
        row = {"text": name, "bytes": sum(len(d.encode("utf-8")) for d in docs),
               "ours": sum(map(len, tok.encode(docs)))}
        for label, encoding in references.items():
            row[label] = sum(map(len, encoding.encode_ordinary_batch(docs))) if encoding is not None else None
        rows.append(row)

    header = ["text", "bytes", "ours tokens", "ours B/tok"]
    for label in references:
        header += [f"{label} tokens", f"{label} B/tok", f"ours vs {label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ours_bpt = row["bytes"] / max(row["ours"], 1)
        cells = [row["text"], f"{row['bytes']:,}", f"{row['ours']:,}", f"{ours_bpt:.2f}"]
        for label in references:
            if row[label] is None:
                cells += ["n/a", "n/a", "n/a"]
            else:
                theirs_bpt = row["bytes"] / max(row[label], 1)
                cells += [f"{row[label]:,}", f"{theirs_bpt:.2f}", f"{100 * (ours_bpt / theirs_bpt - 1):+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tokenizer.eval", description=__doc__.split("`: ", 1)[1])
    p.add_argument("--source", default="demo", help="data source for the train/val rows (default demo)")
    p.add_argument("--max-chars", type=parse_count, default=5_000_000,
                   help="characters of train and of val text to measure (default 5e6)")
    p.add_argument("--compare", default="gpt2,cl100k_base",
                   help="tiktoken encodings to compare with, comma-separated, or 'none' (default gpt2,cl100k_base)")
    p.add_argument("--compare-timeout", type=float, default=10.0, help="seconds to wait for each to download")
    return p


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    names = [] if args.compare.strip() in ("", "none") else [n.strip() for n in args.compare.split(",") if n.strip()]
    import tiktoken
    known = tiktoken.list_encoding_names()
    if unknown := [n for n in names if n not in known]:
        raise UserError(f"--compare {unknown[0]!r} is not a tiktoken encoding; known: {', '.join(known)} (or none)")
    if not args.compare_timeout > 0:
        raise UserError(f"--compare-timeout {args.compare_timeout:g}: must be a positive number of seconds")
    tok = get_tokenizer()
    print0(f"tokenizer: vocab {tok.vocab_size:,}, fingerprint {tok.fingerprint()}")

    texts = {}
    source_label = Path(args.source).name if ("/" in args.source or "*" in args.source) else args.source
    for split in ("train", "val"):
        docs = list(capped(_iter_documents(args.source, split, max_chars=args.max_chars, doc_cap=None),
                           max_chars=args.max_chars))
        if not docs:
            raise UserError(f"source {args.source!r} has no {split} text to evaluate on")
        texts[f"{source_label}-{split}"] = docs
        print0(f"{split}: {len(docs):,} documents, {sum(map(len, docs)):,} chars from source {args.source!r}")
    texts.update({name: [text] for name, text in SAMPLES.items()})

    references, notes = {}, []
    for name in names:
        label = REFERENCES.get(name, name)
        print0(f"loading tiktoken encoding {name!r} ({label}) for comparison ...")
        encoding, why = load_reference(name, args.compare_timeout)
        references[label] = encoding
        if encoding is None:
            notes.append(f"{label} ({name}) unavailable offline: tiktoken could not download it ({why}); "
                         f"its columns say n/a")
    if not names:
        notes.append("no comparison tokenizers requested (--compare none)")

    rows, table = compression_table(tok, texts, references)
    print0("\nbytes per token (higher = better compression):\n" + table)
    for note in notes:
        print0("note: " + note)

    from nanojax.report import log

    val = next(r for r in rows if r["text"].endswith("-val"))
    log("Tokenizer evaluation", [
        {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint(), "source": args.source,
         "val_bytes_per_token": val["bytes"] / max(val["ours"], 1)},
        "Bytes per token (higher = better compression):\n\n" + table,
        *(["Notes:\n" + "\n".join(f"- {n}" for n in notes)] if notes else []),
    ])
    return rows


if __name__ == "__main__":
    main()
