"""The BPE tokenizer: trained with rustbpe, run with tiktoken, saved in our own small format.

Ids 0..n-1 are the learned mergeable ranks (the 256 single bytes first); the 9 special tokens sit at the top ids
n..n+8 in the order of SPECIAL_TOKENS. Plain text never turns into special tokens, even when it spells one: only
`encode_special`, `prepend`/`append` and the chat renderer emit them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken

from nanojax.common import UserError, atomic_write, base_dir

# GPT-4's split pattern with digits grouped by at most 2 (nanochat measured {1,2} best for val bpb).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = (
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, written back into the conversation
)

FORMAT = "nanojax-bpe-1"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


def default_dir() -> Path:
    return base_dir() / "tokenizer"


def min_vocab_size() -> int:
    return 256 + len(SPECIAL_TOKENS)


def default_num_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


class Tokenizer:
    """A tiktoken Encoding over our ranks, plus the special tokens and the chat rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens=SPECIAL_TOKENS):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly the ids 0..n-1")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = list(special_tokens)
        self._special_ids = {name: n + i for i, name in enumerate(self.special_tokens)}
        self._fingerprint = _fingerprint(self.mergeable_ranks, pattern, self.special_tokens)
        self._enc = tiktoken.Encoding(name=f"nanojax-{self._fingerprint}", pat_str=pattern,
                                      mergeable_ranks=self.mergeable_ranks, special_tokens=self._special_ids)
        self._token_bytes = None

    # -- training ------------------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, text_iterator, vocab_size: int, *, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Learn vocab_size - 9 mergeable tokens from the texts, then put the 9 special tokens on top."""
        import rustbpe

        if isinstance(vocab_size, np.integer):
            vocab_size = int(vocab_size)
        if not isinstance(vocab_size, int) or vocab_size < min_vocab_size():
            raise UserError(f"vocab size {vocab_size} is too small: it must be at least {min_vocab_size()} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        seen = {"docs": 0}

        def texts():  # count documents on the way past, so an empty corpus is caught
            for text in text_iterator:
                seen["docs"] += 1
                yield text

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(texts(), num_ranks, buffer_size=8192, pattern=pattern)
        if seen["docs"] == 0:
            raise UserError("the training corpus is empty: no documents to learn a tokenizer from")
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(ranks) != num_ranks:
            raise UserError(f"the training corpus is too small for vocab size {vocab_size}: it only has enough "
                            f"distinct pairs for {len(ranks) + len(SPECIAL_TOKENS)} tokens; give it more text or "
                            f"ask for a smaller --vocab-size")
        return cls(ranks, trainer.get_pattern(), SPECIAL_TOKENS)

    # -- saving and loading --------------------------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write token_bytes.npy and tokenizer.json (the file whose presence means "a tokenizer lives here"): both
        in full to temporary files first, then renamed into place one right after the other, so that a crash never
        leaves one tokenizer's token_bytes.npy beside another's tokenizer.json."""
        directory = Path(directory)
        by_rank = sorted(self.mergeable_ranks, key=self.mergeable_ranks.__getitem__)
        state = {
            "format": FORMAT,
            "fingerprint": self._fingerprint,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "ranks": [base64.b64encode(token).decode("ascii") for token in by_rank],  # token of rank i at index i
        }
        # The inner file is renamed first: token_bytes.npy, then tokenizer.json.
        with atomic_write(directory / TOKENIZER_FILE, "w") as f, atomic_write(directory / TOKEN_BYTES_FILE, "wb") as b:
            json.dump(state, f, ensure_ascii=True)
            np.save(b, self.token_bytes())
        return directory

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise UserError(f"no tokenizer at {path.parent}: run `python -m tokenizer.train` first")
        try:
            state = json.loads(path.read_text())
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {FORMAT!r}")
            ranks = {base64.b64decode(token): rank for rank, token in enumerate(state["ranks"])}
            tok = cls(ranks, state["pattern"], state["special_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"unreadable tokenizer file {path}: {e}; retrain with `python -m tokenizer.train`") from e
        if tok.fingerprint() != state.get("fingerprint"):
            raise UserError(f"tokenizer file {path} is corrupt (fingerprint mismatch); retrain it")
        return tok

    # -- encoding and decoding -----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}") from None

    def _as_id(self, token) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, (int, np.integer)) and 0 <= token < self.vocab_size:
            return int(token)
        raise ValueError(f"expected a token id in [0, {self.vocab_size}) or a special-token name, got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads: int | None = None):
        """str -> list[int]; list[str] -> list[list[int]] (encoded on num_threads threads). Special-token strings
        in the text are encoded as ordinary text. prepend/append: a token id or a special-token name."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self._enc.encode_ordinary(text) + tail
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        rows = self._encode_batch(list(text), num_threads or default_num_threads())
        if head or tail:
            rows = [head + row + tail for row in rows]
        return rows

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """tiktoken releases the GIL while encoding, so threads scale; each thread takes a contiguous chunk of
        texts (a few per thread for balance) rather than one task per text, which costs more than short texts."""
        encode = self._enc.encode_ordinary
        if num_threads <= 1 or len(texts) <= 1:
            return [encode(t) for t in texts]
        size = -(-len(texts) // (4 * num_threads))
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(min(num_threads, len(chunks))) as pool:
            return [row for rows in pool.map(lambda chunk: [encode(t) for t in chunk], chunks) for row in rows]

    def decode(self, ids) -> str:
        return self._enc.decode(_as_list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(_as_list(ids))

    def id_to_token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(int(token_id))

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 byte length of each token (raw bytes, not a str round trip); 0 for specials,
        so they count for nothing in bits per byte."""
        if self._token_bytes is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int32)
            for token, rank in self.mergeable_ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = lengths
        return self._token_bytes.copy()

    def fingerprint(self) -> str:
        """Short hash of ranks, pattern and special tokens: checkpoints store it to notice a different tokenizer."""
        return self._fingerprint

    # -- conversations -------------------------------------------------------------------------------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """-> (ids, mask): mask 1 on the tokens the assistant is trained to produce. See tokenizer/chat.py."""
        from tokenizer.chat import render_conversation

        return render_conversation(self, conversation, max_tokens=max_tokens)

    def render_for_completion(self, conversation):
        """-> ids that prompt the assistant's next reply (ending with <|assistant_start|>)."""
        from tokenizer.chat import render_for_completion

        return render_for_completion(self, conversation)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self._fingerprint})"


def _as_list(ids) -> list[int]:
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64).tolist()
    return [int(i) for i in ids]


def _fingerprint(ranks: dict[bytes, int], pattern: str, special_tokens) -> str:
    h = hashlib.sha256()
    for token in sorted(ranks, key=ranks.__getitem__):
        h.update(len(token).to_bytes(2, "little") + token)
    h.update(b"\x00pattern\x00" + pattern.encode())
    h.update(b"\x00special\x00" + "\x00".join(special_tokens).encode())
    return h.hexdigest()[:16]


_cache: dict = {}


def get_tokenizer(path=None) -> Tokenizer:
    """The trained tokenizer under $NANOJAX_BASE_DIR/tokenizer (or `path`); loaded once per file version."""
    directory = Path(path) if path is not None else default_dir()
    file = directory / TOKENIZER_FILE
    try:
        stat = file.stat()
    except FileNotFoundError:
        raise UserError(f"no tokenizer at {directory}: run `python -m tokenizer.train` first") from None
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _cache:
        for stale in [k for k in _cache if k[0] == key[0]]:  # the file was rewritten: forget the old version
            del _cache[stale]
        _cache[key] = Tokenizer.load(directory)
    return _cache[key]
