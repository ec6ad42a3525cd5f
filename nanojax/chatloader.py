"""Conversation data on Grain for mid-training and SFT, as nanochat Oct-2025 feeds them.

The stage passes in its conversations as a random-access dataset (a grain.MapDataset or any sequence;
evals/tasks/mixtures.py builds nanochat's mixtures) and a `render(conversation) -> (ids, mask)` function (tokenizer/chat.py). Each process
takes every world-th conversation from its rank; rendering runs in Grain's worker threads.

- `MidLoader` (mid-training): the conversations' ids concatenated into one token stream (the mask is dropped: every
  token is a target, as nanochat's mid-training does), cut into rows of T+1 that share one token with the next row;
  a single pass: StopIteration at the end of the mixture, `progress()` is the fraction consumed.
- `SFTLoader`: one conversation per row, cut to max_seq_len; inputs = ids[:-1] padded with <|assistant_end|>,
  targets = ids[1:] with -1 where the mask is 0 and in the padding. All micro-batches of a step share one width, the
  smallest of a few buckets (powers of two from 64 to max_seq_len) that holds the step's longest row, so the jitted
  step compiles a handful of times. Epochs repeat forever; the loop counts steps.
- `mid_val_batches` / `sft_val_batches`: the validation sets (bits per byte over the val mixture's stream; val loss
  over val rows).

State is a cursor (and an offset into one conversation for the stream): resuming skips there and renders again.
"""
from __future__ import annotations

import grain
import numpy as np

from nanojax.dataloader import StreamBatches

MIN_BUCKET = 64


def _as_dataset(conversations) -> grain.MapDataset:
    return conversations if isinstance(conversations, grain.MapDataset) else grain.MapDataset.source(conversations)


def _mine(conversations, rank: int, world: int) -> grain.MapDataset:
    return _as_dataset(conversations)[rank::world]


def buckets(max_seq_len: int) -> list[int]:
    """Row widths a step may have: 64, 128, 256, ... and max_seq_len itself."""
    widths, w = [], MIN_BUCKET
    while w < max_seq_len:
        widths.append(w)
        w *= 2
    return [*widths, max_seq_len]


# ----------------------------------------------------------------------------------------------------------------------
# Mid-training: one token stream.

class _RenderIds:
    def __init__(self, render):
        self.render = render

    def __call__(self, conversation):
        ids, _ = self.render(conversation)
        return np.asarray(ids, dtype=np.int32)


class _StreamRowsIterator(grain.DatasetIterator):
    """Rows of row_len tokens from a stream of (position, ids); state: the position of the conversation holding the
    next row's first token and the offset into it."""

    def __init__(self, parent, row_len: int, start: int, offset: int):
        super().__init__(parent)
        self.row_len, self.next_position = row_len, start
        self._current = None  # (position, ids, offset)
        self._offset = offset  # into the first conversation (resume)

    def __next__(self) -> np.ndarray:
        row = np.empty(self.row_len, dtype=np.int32)
        filled = 0
        while filled < self.row_len:
            if self._current is None or self._current[2] == len(self._current[1]):
                ids = next(self._parent)
                self._current = (self.next_position, ids, self._offset)
                self.next_position, self._offset = self.next_position + 1, 0
                continue
            position, ids, offset = self._current
            take = min(len(ids) - offset, self.row_len - filled)
            row[filled:filled + take] = ids[offset:offset + take]
            filled += take
            self._current = (position, ids, offset + take - (filled == self.row_len))  # the last token starts the next
        return row

    def get_state(self) -> dict:
        if self._current is None:
            return {"cursor": self.next_position, "offset": self._offset}
        return {"cursor": self._current[0], "offset": self._current[2]}

    def set_state(self, state):
        raise NotImplementedError("build the loader with state=... to resume")


class _StreamRows(grain.IterDataset):
    def __init__(self, parent, row_len: int, start: int, offset: int):
        super().__init__(parent)
        self.row_len, self.start, self.offset = row_len, start, offset

    def __iter__(self):
        return _StreamRowsIterator(self._parent.__iter__(), self.row_len, self.start, self.offset)


class MidLoader:
    """Mid-training batches: one pass over this process's conversations as a token stream; `next_step()` ->
    {"inputs", "targets"} int32 (accum, rows, seq_len)."""

    def __init__(self, conversations, render, rows: int, seq_len: int, *, accum: int = 1, rank: int = 0,
                 world: int = 1, state: dict | None = None, workers: int = 2):
        self.rows, self.accum = rows, accum
        mine = _mine(conversations, rank, world)
        self.total = len(mine)
        cursor, offset = (state["cursor"], state["offset"]) if state else (0, 0)
        ids = mine[cursor:].map(_RenderIds(render)).to_iter_dataset(
            grain.ReadOptions(num_threads=workers, prefetch_buffer_size=8 * workers))
        self._rows = _StreamRows(ids, seq_len + 1, cursor, offset).__iter__()

    def next_step(self, params=None) -> dict:
        rows = np.stack([np.stack([next(self._rows) for _ in range(self.rows)]) for _ in range(self.accum)])
        return {"inputs": rows[..., :-1], "targets": rows[..., 1:]}

    def state(self) -> dict:
        return self._rows.get_state()

    def progress(self) -> float:
        """Fraction of this process's conversations consumed (mid-training's LR schedule follows it)."""
        return min(1.0, self._rows.get_state()["cursor"] / max(self.total, 1))

    def close(self):
        self._rows.close()


def mid_val_batches(conversations, render, rows: int, seq_len: int, max_tokens: int, *, rank: int = 0,
                    world: int = 1) -> StreamBatches:
    """The val mixture as one token stream (every process renders it in order and takes its own rows of each batch),
    capped at max_tokens targets: the batches for bits per byte, the same at every iteration."""
    def documents():
        for conversation in _as_dataset(conversations):
            yield _RenderIds(render)(conversation)

    return StreamBatches(documents, rows, seq_len, max_tokens, rank=rank, world=world, label="the val mixture")


# ----------------------------------------------------------------------------------------------------------------------
# SFT: one conversation per row.

class _RenderRow:
    def __init__(self, render, max_seq_len: int):
        self.render, self.max_seq_len = render, max_seq_len

    def __call__(self, conversation):
        ids, mask = self.render(conversation)
        return np.asarray(ids[:self.max_seq_len], np.int32), np.asarray(mask[:self.max_seq_len], np.int32)


def collate(rows, pad_id: int, widths: list[int]):
    """[(ids, mask)] -> inputs, targets (len(rows), W): W the smallest bucket holding the longest row's inputs."""
    longest = max(len(ids) - 1 for ids, _ in rows)
    width = next((w for w in widths if w >= longest), widths[-1])
    inputs = np.full((len(rows), width), pad_id, np.int32)
    targets = np.full((len(rows), width), -1, np.int32)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n] = ids[:-1]
        targets[r, :n] = np.where(mask[1:] == 1, ids[1:], -1)
    return inputs, targets


class _Collate:
    def __init__(self, pad_id, widths, accum, rows):
        self.pad_id, self.widths, self.shape = pad_id, widths, (accum, rows)

    def __call__(self, rows):
        inputs, targets = collate(rows, self.pad_id, self.widths)
        return inputs.reshape(*self.shape, -1), targets.reshape(*self.shape, -1)


class SFTLoader:
    """SFT batches: this process's conversations, one per row, epoch after epoch; `next_step()` -> {"inputs",
    "targets"} int32 (accum, rows, W), W one of `buckets(max_seq_len)`."""

    def __init__(self, conversations, render, rows: int, max_seq_len: int, pad_id: int, *, accum: int = 1,
                 rank: int = 0, world: int = 1, state: dict | None = None, workers: int = 2):
        mine = _mine(conversations, rank, world)
        self.count, self.per_step = len(mine), accum * rows
        self.consumed = state["epoch"] * self.count + state["cursor"] if state else 0
        ds = mine.repeat()[self.consumed:].map(_RenderRow(render, max_seq_len))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * self.per_step))
        self._steps = ds.batch(self.per_step, drop_remainder=True,
                               batch_fn=_Collate(pad_id, buckets(max_seq_len), accum, rows)).__iter__()

    def next_step(self, params=None) -> dict:
        inputs, targets = next(self._steps)
        self.consumed += self.per_step
        return {"inputs": inputs, "targets": targets}

    def state(self) -> dict:
        return {"epoch": self.consumed // self.count, "cursor": self.consumed % self.count}

    def progress(self) -> float:
        return (self.consumed % self.count) / self.count

    def close(self):
        self._steps.close()


def sft_val_batches(conversations, render, rows: int, max_seq_len: int, pad_id: int, steps: int, *, rank: int = 0,
                    world: int = 1) -> list:
    """Val loss batches: the first steps x rows conversations of this process (fewer steps if the val set is
    smaller), each batch (inputs, targets) of (rows, W) with a bucketed W, as the training rows are made."""
    mine = _mine(conversations, rank, world)
    steps = min(steps, len(_as_dataset(conversations)) // (rows * world))
    render_row, widths = _RenderRow(render, max_seq_len), buckets(max_seq_len)
    return [collate([render_row(mine[s * rows + r]) for r in range(rows)], pad_id, widths) for s in range(steps)]
