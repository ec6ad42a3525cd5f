"""The hand-written loader before Grain, kept only for `bench data` to compare against (to be removed). Tokenize documents and pack them into rows of T+1 tokens: every row starts with BOS, nothing is padded.

Packing is best-fit: from a buffer of tokenized documents (each beginning with BOS), a row is filled by repeatedly
taking the largest document that still fits; when none fits, the shortest one is cropped to fill the row exactly and
its remainder is dropped. Tokenization runs in a background thread (tiktoken's batch encode uses more threads).

Resume is exact: `state()` names the next document to consume and the documents waiting in the buffer by their
(row group, index) address, so `restore(state)` re-reads and re-tokenizes them and produces the same next batch, also
across epochs. Each process reads every world-th row group (its own slice) and packs its own rows.
"""
from __future__ import annotations

import bisect
import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from nanojax import dataset


@dataclass
class _Doc:
    tokens: list
    ref: tuple  # (global row group, index in group)


@dataclass
class LoaderState:
    epoch: int = 0
    group: int = 0          # global row-group index of the next document to consume
    doc: int = 0            # index of that document inside its group
    buffer: list = field(default_factory=list)  # [(group, doc), ...] documents waiting to be packed

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "group": self.group, "doc": self.doc, "buffer": [list(r) for r in self.buffer]}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(d["epoch"], d["group"], d["doc"], [tuple(r) for r in d["buffer"]])


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put into a bounded queue unless the reader is stopped first (a plain put could block close() forever)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


class PackedLoader:
    """Yields int32 arrays of shape (rows, T+1) for this process; `rows` is the process-local batch."""

    def __init__(self, tokenizer, source: str, split: str, rows: int, seq_len: int, *, rank: int = 0,
                 world: int = 1, buffer_size: int = 1000, tokenizer_threads: int = 4, prefetch: int = 8,
                 state: dict | None = None, loop: bool = True):
        self.tok, self.source, self.split = tokenizer, source, split
        self.rows, self.row_len = rows, seq_len + 1
        self.rank, self.world = rank, world
        self.buffer_size, self.threads, self.prefetch, self.loop = buffer_size, tokenizer_threads, prefetch, loop
        self._state = LoaderState.from_dict(state) if state else LoaderState()
        self._buffer: list[_Doc] = []
        self._queue = None
        self._exhausted = False
        self._stop = threading.Event()
        self._thread = None
        if self._state.buffer:
            self._buffer = self._load_refs(self._state.buffer)
        self._start_reader()

    # --- reading -----------------------------------------------------------------------------------------------------
    def _encode(self, texts):
        return self.tok.encode(texts, prepend=self.tok.bos_id, num_threads=self.threads)

    def _load_refs(self, refs):
        """Re-tokenize the documents named by (group, doc) refs, in the given order."""
        by_group = {}
        for g, _ in refs:
            if g not in by_group:
                _, texts = next(dataset.iter_row_groups(self.source, self.split, rank=g % self.world,
                                                        world=self.world, start=g))
                by_group[g] = texts
        tokens = self._encode([by_group[g][i] for g, i in refs])
        return [_Doc(t, (g, i)) for t, (g, i) in zip(tokens, refs)]

    def _start_reader(self):
        self._stop_reader()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        args = (self._state.epoch, self._state.group, self._state.doc, self._queue, self._stop)
        self._thread = threading.Thread(target=self._read, args=args, daemon=True, name="nanojax-loader")
        self._thread.start()

    def _stop_reader(self):
        """Stop the reader and wait for it: a daemon thread left inside pyarrow or the tokenizer when the interpreter
        exits can abort the process ("terminate called without an active exception") after all work is saved."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)  # it checks the flag between row groups and while the queue is full
        self._thread = None

    def _read(self, epoch, start_group, start_doc, q, stop):
        """Producer: (epoch, group, first_doc_index, token lists) per row group, forever (or one epoch)."""
        try:
            while not stop.is_set():
                seen = False
                for g, texts in dataset.iter_row_groups(self.source, self.split, rank=self.rank, world=self.world,
                                                        start=start_group):
                    seen = True
                    first = start_doc if g == start_group else 0
                    item = (epoch, g, first, self._encode(texts[first:]) if first < len(texts) else [])
                    if not _put(q, item, stop):
                        return
                if not seen and start_group == 0:
                    if self.world > 1:  # a small split (say, one val shard) with fewer row groups than processes:
                        self.rank, self.world = 0, 1  # every process reads all of it
                        continue
                    raise RuntimeError(f"data source {self.source!r} split {self.split!r} has no documents")
                if not self.loop:
                    _put(q, None, stop)
                    return
                epoch, start_group, start_doc = epoch + 1, 0, 0
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            _put(q, e, stop)

    def _pending(self):
        """Documents of the current row group not yet consumed, refilled from the queue."""
        while True:
            if getattr(self, "_group_docs", None):
                return self._group_docs
            if self._exhausted:
                return None
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # the end of a single pass (loop=False); remember it, the reader has stopped
                self._exhausted = True
                return None
            epoch, g, first, token_lists = item
            self._group_docs = [(_Doc(t, (g, first + i))) for i, t in enumerate(token_lists)]
            self._state.epoch, self._state.group, self._state.doc = epoch, g, first

    def _fill_buffer(self) -> bool:
        while len(self._buffer) < self.buffer_size:
            docs = self._pending()
            if docs is None:
                return bool(self._buffer)
            doc = docs.pop(0)
            self._buffer.append(doc)
            self._state.doc = doc.ref[1] + 1
        return True

    # --- packing -----------------------------------------------------------------------------------------------------
    def _pack_row(self) -> np.ndarray | None:
        row = np.empty(self.row_len, dtype=np.int32)
        filled = 0
        while filled < self.row_len:
            if not self._fill_buffer():
                return None
            space = self.row_len - filled
            # The buffer is kept sorted by length; take the largest document that fits whole, else crop the shortest.
            self._buffer.sort(key=lambda d: len(d.tokens))
            i = bisect.bisect_right([len(d.tokens) for d in self._buffer], space) - 1
            doc = self._buffer.pop(i if i >= 0 else 0)
            take = doc.tokens[:space]
            row[filled:filled + len(take)] = take
            filled += len(take)
        return row

    def next_batch(self) -> np.ndarray:
        rows = []
        for _ in range(self.rows):
            row = self._pack_row()
            if row is None:
                raise StopIteration
            rows.append(row)
        return np.stack(rows)

    def next_inputs_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch as (inputs, targets), each (rows, T): targets are the inputs shifted by one."""
        row = self.next_batch()
        return row[:, :-1], row[:, 1:]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    # --- resume ------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Where the next batch starts: the next unconsumed document and the buffered documents, by address."""
        st = LoaderState(self._state.epoch, self._state.group, self._state.doc, [d.ref for d in self._buffer])
        docs = getattr(self, "_group_docs", None)
        if docs:  # next document is inside the current group
            st.group, st.doc = docs[0].ref
        return st.to_dict()

    def close(self):
        self._stop_reader()
