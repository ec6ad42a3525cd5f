"""Pretraining data on Grain: each process reads its own row groups, tokenizes them in Grain's worker threads, packs
documents into rows of T+1 tokens with our packer, and hands the training loop one optimizer step at a time.

    RowGroups (this process's row groups: g = rank, rank + world, ...)      grain.MapDataset.source
      -> repeat (epochs) -> read + tokenize each group (BOS first)           .repeat().map_with_index()
      -> start at the resume point, prefetched by worker threads             [start:].to_iter_dataset(ReadOptions)
      -> Pack, bestfit or stream (ours): rows of T+1 tokens                 an IterDataset with its own state
      -> rows per micro-batch -> next_step(): inputs/targets (A, R, T)       .batch(R)

Packing (`--packing`): `bestfit` (default) fills each row from a buffer of documents, taking the largest one that fits
whole; when none fits, the shortest is cropped to fill the row and its rest is dropped, so every row starts with BOS
and nothing is padded (nanochat's later loader). `stream` concatenates the documents into one token stream and cuts
it into rows anywhere, consecutive rows sharing one token, so every token is an input once and a target once
(nanochat's Oct-2025 loader).

State is small and exact: the next document to read, by (row group, index), and the documents held by the packer, by
address (plus the offset into the current one for `stream`). Resuming rebuilds the pipeline at that row group and
re-reads and re-tokenizes the held documents, so the next rows equal those of an uninterrupted run, across epochs too.
No tokens are stored. The state is saved as the checkpoint's `data_state` item (nanojax/checkpoint.py): every
process's state gathered into one JSON item of the same Orbax checkpoint, rather than through Grain's Orbax handler,
which writes one file per process and restores only onto the same process count (a resume on another count continues
from the first row group no process had reached).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import grain
import numpy as np

from nanojax import dataset
from nanojax.common import UserError, print0
from nanojax.config import check_packing

DEFAULT_WORKERS = 2  # reader/tokenizer threads (`bench data`: 1 and 2 within noise on 2 cores, docs/performance.md)


@dataclass
class LoaderState:
    epoch: int = 0
    group: int = 0          # global row-group index of the next document to read
    doc: int = 0            # index of that document inside its group
    buffer: list = field(default_factory=list)  # [[group, doc], ...] held by the packer ([group, doc, offset]: stream)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "group": self.group, "doc": self.doc, "buffer": [list(r) for r in self.buffer]}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(int(d["epoch"]), int(d["group"]), int(d["doc"]), [tuple(r) for r in d.get("buffer", [])])


class RowGroups:
    """Random-access source: this process's row groups of a split (element i -> global row-group index). A split with
    fewer row groups than processes (a small validation shard) is read whole by every process."""

    def __init__(self, source, split: str, rank: int = 0, world: int = 1):
        self.source, self.split, self.rank, self.world = str(source), split, rank, world
        self.table = dataset.row_groups(source, split)
        if not self.table:
            raise UserError(f"empty corpus: the {split} split of {source} has no row groups")
        self.groups = list(range(rank, len(self.table), world)) or list(range(len(self.table)))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> int:
        return self.groups[i % len(self.groups)]

    def texts(self, g: int) -> list[str]:
        return dataset.read_row_group(*self.table[g])

    def position(self, group: int) -> int:
        """Index of the first of our row groups at or after global index `group` (len(self) when none is)."""
        return bisect.bisect_left(self.groups, group)

    def __repr__(self):  # stable: Grain compares a source's repr on restore
        return f"RowGroups({self.source!r}, {self.split!r}, rank={self.rank}, world={self.world})"


class Tokenize:
    """(index in the repeated source, g) -> (epoch, g, [int32 token array per document, BOS first])."""

    def __init__(self, groups: RowGroups, tokenizer):
        self.groups, self.tok = groups, tokenizer

    def __call__(self, index: int, g: int):
        texts = self.groups.texts(g)
        docs = self.tok.encode(texts, prepend=self.tok.bos_id, num_threads=1) if texts else []
        return index // len(self.groups), g, [np.asarray(d, dtype=np.int32) for d in docs]


def tokenized_groups(groups: RowGroups, tokenizer, start: int, *, workers: int = DEFAULT_WORKERS,
                     loop: bool = True) -> grain.IterDataset:
    """The row groups from position `start` of the repeated source (epoch x len + index), read and tokenized by
    `workers` Grain threads, in order. (Threads: tiktoken and pyarrow release the GIL; worker processes measured no
    faster on 2 cores, docs/performance.md.)"""
    ds = grain.MapDataset.source(groups).repeat(None if loop else 1).map_with_index(Tokenize(groups, tokenizer))
    ds = ds[start:]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers))


# ----------------------------------------------------------------------------------------------------------------------
# The packers: Grain transformations whose state is addresses, never tokens.

class _PackIterator(grain.DatasetIterator):
    """Walks the documents of the tokenized row groups, keeping the address of the next one."""

    def __init__(self, parent, groups: RowGroups, tokenizer, row_len: int, state: LoaderState):
        super().__init__(parent)
        self.groups, self.tok, self.row_len = groups, tokenizer, row_len
        self.epoch, self.group, self.doc = state.epoch, state.group, state.doc
        self._skip = state.doc  # the first group read is the one the state names: its first `doc` documents are done
        self._pending: list = []  # documents of the current group not yet taken
        self.tokens_read = self.tokens_kept = 0

    def _reload(self, refs) -> list:
        """The documents named by (group, doc) refs, re-read and re-tokenized (resume only)."""
        texts = {g: self.groups.texts(g) for g in {r[0] for r in refs}}
        tokens = self.tok.encode([texts[r[0]][r[1]] for r in refs], prepend=self.tok.bos_id) if refs else []
        return [np.asarray(t, dtype=np.int32) for t in tokens]

    def _next_doc(self):
        """((group, doc), tokens) of the next document; StopIteration at the end of a single pass."""
        while not self._pending:
            epoch, g, docs = next(self._parent)
            first, self._skip = self._skip, 0
            if epoch > self.epoch:
                print0(f"warning: the data loader ran out of {self.groups.split} data and starts epoch {epoch + 1}: "
                       f"documents repeat from here on (download more shards or train fewer steps)")
            self.epoch, self.group, self.doc = epoch, g, first
            self._pending = [((g, i), docs[i]) for i in range(len(docs) - 1, first - 1, -1)]  # reversed: pop() is next
        ref, tokens = self._pending.pop()
        self.doc = ref[1] + 1
        return ref, tokens

    def _position(self) -> tuple[int, int]:
        """(group, doc) of the next document to read: inside the current group, or the next one."""
        return (self._pending[-1][0] if self._pending else (self.group, self.doc))

    def epochs(self) -> float:
        """Epochs of this process's row groups begun so far, as a fraction (1.37: a third into the second)."""
        return self.epoch + self.groups.position(self.group) / len(self.groups)

    def kept_fraction(self) -> float:
        return self.tokens_kept / self.tokens_read if self.tokens_read else 1.0

    def _state(self, buffer) -> dict:
        group, doc = self._position()
        return {**LoaderState(self.epoch, group, doc, buffer).to_dict(), "packing": self.packing}

    def set_state(self, state):
        raise NotImplementedError("build the loader with state=... to resume (the pipeline starts at that row group)")


class _BestFitIterator(_PackIterator):
    packing = "bestfit"

    def __init__(self, parent, groups, tokenizer, row_len, state, buffer_size):
        super().__init__(parent, groups, tokenizer, row_len, state)
        self.buffer_size = buffer_size
        self._keys, self._docs, self._seq = [], [], 0  # sorted by (length, arrival), docs parallel to keys
        for ref, tokens in zip(state.buffer, self._reload(state.buffer)):
            self._insert(ref, tokens)

    def _insert(self, ref, tokens):
        key = (len(tokens), self._seq)
        self._seq += 1
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._docs.insert(i, (ref, tokens))

    def __next__(self) -> np.ndarray:
        row = np.empty(self.row_len, dtype=np.int32)
        filled = 0
        while filled < self.row_len:
            try:
                while len(self._keys) < self.buffer_size:
                    self._insert(*self._next_doc())
            except StopIteration:
                if not self._keys:
                    raise
            space = self.row_len - filled
            # The largest document that fits whole; when none does, the shortest, cropped to the space left.
            i = max(bisect.bisect_right(self._keys, (space, math.inf)) - 1, 0)
            self._keys.pop(i)
            _, tokens = self._docs.pop(i)
            take = min(len(tokens), space)
            row[filled:filled + take] = tokens[:take]
            filled += take
            self.tokens_read += len(tokens)
            self.tokens_kept += take
        return row

    def get_state(self) -> dict:
        return self._state([ref for ref, _ in self._docs])


class _StreamIterator(_PackIterator):
    packing = "stream"

    def __init__(self, parent, groups, tokenizer, row_len, state):
        super().__init__(parent, groups, tokenizer, row_len, state)
        self._current = None  # (ref, tokens, offset of the next row's first token)
        if state.buffer:
            (g, i, offset), = state.buffer
            self._current = ((g, i), self._reload([(g, i)])[0], offset)

    def __next__(self) -> np.ndarray:
        row = np.empty(self.row_len, dtype=np.int32)
        filled = 0
        while filled < self.row_len:
            if self._current is None or self._current[2] == len(self._current[1]):
                ref, tokens = self._next_doc()
                self._current = (ref, tokens, 0)
                self.tokens_read += len(tokens)
            ref, tokens, offset = self._current
            take = min(len(tokens) - offset, self.row_len - filled)
            row[filled:filled + take] = tokens[offset:offset + take]
            filled += take
            # A full row's last token is the next row's first.
            self._current = (ref, tokens, offset + take - (filled == self.row_len))
        self.tokens_kept += self.row_len - 1
        return row

    def kept_fraction(self) -> float:
        return 1.0  # every token is trained on (the one shared per row boundary is counted once)

    def get_state(self) -> dict:
        ref, _, offset = self._current if self._current else (None, None, None)
        return self._state([[*ref, offset]] if ref else [])


class Pack(grain.IterDataset):
    """Rows of `row_len` tokens from tokenized row groups, packed `bestfit` or `stream`, starting at `state`."""

    def __init__(self, parent: grain.IterDataset, groups: RowGroups, tokenizer, row_len: int, packing: str,
                 state: LoaderState, buffer_size: int = 1000):
        super().__init__(parent)
        self.groups, self.tok, self.row_len, self.packing = groups, tokenizer, row_len, packing
        self.start, self.buffer_size = state, buffer_size

    def __iter__(self) -> _PackIterator:
        parent = self._parent.__iter__()
        if self.packing == "stream":
            return _StreamIterator(parent, self.groups, self.tok, self.row_len, self.start)
        return _BestFitIterator(parent, self.groups, self.tok, self.row_len, self.start, self.buffer_size)

    def __str__(self):
        return f"Pack({self.packing}, row_len={self.row_len})"


# ----------------------------------------------------------------------------------------------------------------------
# The loader the training loop calls.

class PretrainLoader:
    """One optimizer step of packed rows per `next_step()`: int32 inputs and targets of shape (accum, rows, T) for
    this process. Infinite (it starts a new epoch when the split runs out, with a warning) unless loop=False."""

    def __init__(self, tokenizer, source, split: str, rows: int, seq_len: int, *, accum: int = 1, rank: int = 0,
                 world: int = 1, packing: str = "bestfit", buffer_size: int = 1000, workers: int = DEFAULT_WORKERS,
                 state: dict | None = None, loop: bool = True):
        check_packing(packing)
        self.rows, self.seq_len, self.accum, self.packing = rows, seq_len, accum, packing
        self.groups = RowGroups(source, split, rank, world)
        if state and state.get("packing", packing) != packing:
            print0(f"note: the data position was saved with --packing {state['packing']} and this run packs {packing}: "
                   f"the documents its packer held are skipped")
            state = {**state, "buffer": []}
        st = LoaderState.from_dict(state) if state else LoaderState()
        pos = self.groups.position(st.group)
        if pos == len(self.groups):  # (a state from another process count can point past our last group)
            st = LoaderState(st.epoch + 1, self.groups.groups[0], 0, st.buffer)
            pos = 0
        elif self.groups[pos] != st.group:
            st = LoaderState(st.epoch, self.groups[pos], 0, st.buffer)
        docs = tokenized_groups(self.groups, tokenizer, st.epoch * len(self.groups) + pos, workers=workers, loop=loop)
        packed = Pack(docs, self.groups, tokenizer, seq_len + 1, packing, st, buffer_size)
        self._batches = iter(packed.batch(rows, drop_remainder=True))
        self._packer = self._batches._parent  # (Grain's batch iterator wraps ours and returns its state)

    def next_batch(self) -> np.ndarray:
        """(rows, T+1) int32."""
        return next(self._batches)

    def next_step(self, params=None) -> dict:
        rows = np.stack([self.next_batch() for _ in range(self.accum)])
        return {"inputs": rows[..., :-1], "targets": rows[..., 1:]}

    def state(self) -> dict:
        return self._batches.get_state()

    def progress(self) -> float:
        return self._packer.epochs() % 1.0

    def step_metrics(self) -> dict:
        return {"epoch": self._packer.epochs()}

    def kept_fraction(self) -> float:
        """Tokens placed in rows / tokens of the documents taken from the buffer (best-fit crops the rest)."""
        return self._packer.kept_fraction()

    def close(self):
        self._batches.close()

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: a split as one token stream, as nanochat measures bits per byte.

def split_documents(tokenizer, source, split: str):
    """() -> the split's documents in order, each an int32 token array with BOS first (read as they are needed)."""
    def documents():
        for _, texts in dataset.iter_row_groups(source, split):
            for tokens in tokenizer.encode(texts, prepend=tokenizer.bos_id):
                yield np.asarray(tokens, dtype=np.int32)

    return documents


class StreamBatches:
    """The first `max_tokens` targets of a token stream (documents in order, e.g. `split_documents`, cut into rows of
    T+1 that share one token with the next row), never packed and never repeated: how nanochat measures bits per
    byte. Batches of `rows` rows per process (process p takes its own rows of each global batch); the last batch is
    padded with rows of target -1. The stream is read once, on first use, and kept."""

    def __init__(self, documents, rows: int, seq_len: int, max_tokens: int, *, rank: int = 0, world: int = 1,
                 label: str = "the split", flag: str = "--eval-tokens"):
        self.documents, self.label, self.flag = documents, label, flag
        self.rows, self.seq_len, self.max_tokens, self.rank, self.world = rows, seq_len, max_tokens, rank, world
        self._stream = None

    def _read(self) -> np.ndarray:
        parts, total = [], 0
        for tokens in self.documents():
            parts.append(tokens)
            total += len(tokens)
            if total > self.max_tokens:  # one more than the targets wanted: the first target needs an input
                break
        stream = np.concatenate(parts)[:self.max_tokens + 1] if parts else np.zeros(0, np.int32)
        if len(stream) - 1 < self.max_tokens:
            held = max(len(stream) - 1, 0)
            print0(f"note: {self.flag} {self.max_tokens:,} is more than {self.label} holds ({held:,} tokens): "
                   f"evaluating all of it once instead")
        return stream

    @property
    def tokens(self) -> int:
        """Targets evaluated (all processes together)."""
        if self._stream is None:
            self._stream = self._read()
        return max(len(self._stream) - 1, 0)

    def __len__(self) -> int:
        rows = -(-self.tokens // self.seq_len)
        return -(-rows // (self.rows * self.world))

    def __iter__(self):
        T, n = self.seq_len, self.tokens
        stream = self._stream
        for b in range(len(self)):
            inputs = np.zeros((self.rows, T), np.int32)
            targets = np.full((self.rows, T), -1, np.int32)
            for r in range(self.rows):
                start = ((b * self.world + self.rank) * self.rows + r) * T
                piece = stream[start:min(start + T, n) + 1]
                if len(piece) > 1:
                    inputs[r, :len(piece) - 1], targets[r, :len(piece) - 1] = piece[:-1], piece[1:]
            yield inputs, targets
