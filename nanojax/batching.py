"""Continuous batching: requests share each decode step of one engine, joining and leaving between device calls.

    slots = Slots(engine, max_batch=32, max_queue=64)
    slots.start()                                  # a thread runs the device loop (or call slots.run_until_idle())
    req = slots.submit(prompt_ids, max_tokens=256, temperature=0.8, top_k=50, top_p=None, seed=1,
                       on_tokens=lambda req, tokens, masks: ...)   # called from the loop's thread, then once with
                                                                   # req.finish_reason set ("stop", "length",
                                                                   # "cancelled", "error")
    slots.cancel(req)                              # the client went away: its row stops counting at once
    slots.stats()                                  # requests, active, waiting, tokens/s, batch occupancy, ...
    slots.close()

How it runs (the engine's layout, nanojax.engine, with rows that are different requests):
  - Rows share one write position `pos`; row b holds its sequence at [start_b, pos) and RoPE turns each row by its own
    position (gpt.cached_forward), so rows can move along the cache and a prompt prefilled on its own joins anywhere.
  - Each device call runs up to `chunk` decode steps (sampling knobs, seed and step count per row). Python queues the
    next call before reading the current one's tokens, except when it wants a turn: requests waiting for a free row,
    a row cancelled, the batch small enough for a smaller bucket, the cache full, or a tool call to run.
  - A turn: the rows still running are kept (in place, or gathered to the front when the batch bucket changes); the
    cache is shifted left to the oldest running row's start (so attention reads at most the longest sequence, rounded
    up to a cache bucket) or right when a joining prompt is longer than `pos`; joiners are prefilled together
    (right-aligned in a prompt bucket), their first tokens sampled, and their rows written in.
  - Shapes come in buckets: rows a power of two up to max_batch, prompts and caches as in the engine, top-k size a
    power of two. The decode loop compiles once per (rows, cache, top-k) bucket and the prefill once per (joiners,
    prompt, top-k) bucket, never per request; a turn's cache edits are small programs per array shape, shared by
    every layer (`stats()["compilations"]` counts them all).
  - Past max_queue waiting requests, submit raises QueueFull (the server answers 429).
"""
from __future__ import annotations

import collections
import functools
import itertools
import threading
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nanojax import gpt
from nanojax.common import UserError
from nanojax.engine import (FORCED_SLOTS, STOP_SLOTS, Engine, _Row, advance_rows, bucket, cache_bucket,
                            decode_compiler_options)
from nanojax.sampling import row_uniforms, sample_rows, top_k_cap


# The cache edits of a turn, one small program per array shape (shared by every layer's k and v): cheap to compile,
# where a program over the whole state compiled per combination of row, cache and prompt buckets (seconds each).

@jax.jit
def _take_rows(x, index):
    return x[index]


@functools.partial(jax.jit, static_argnames=("length",))
def _shift_rows(x_RSH, shift, *, length: int):
    """Each row moved `shift` positions along a cache of `length`; what wraps around is padding."""
    size = max(length, x_RSH.shape[1])
    return jnp.roll(jnp.pad(x_RSH, ((0, 0), (0, size - x_RSH.shape[1]), (0, 0))), shift, axis=1)[:, :length]


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_rows(x_RSH, new_RLH, rows_R, pos):
    """New rows' windows [0, L) written at [pos - L, pos) of rows `rows_R` (an index past the batch: dropped)."""
    S, L = x_RSH.shape[1], new_RLH.shape[1]
    placed = jax.lax.dynamic_slice_in_dim(jnp.pad(new_RLH, ((0, 0), (S, S), (0, 0))), S + L - pos, S, axis=1)
    return x_RSH.at[rows_R].set(placed.astype(x_RSH.dtype), mode="drop")


class QueueFull(Exception):
    """Every row is busy and max_queue requests already wait."""


@flax.struct.dataclass
class SlotState:
    cache: gpt.DecodeCache
    token: jax.Array        # (B,) int32: the last emitted token, fed at the next step
    step: jax.Array         # (B,) int32: tokens emitted so far by the row's request
    done: jax.Array         # (B,) bool: finished, cancelled or empty
    limit: jax.Array        # (B,) int32: done after this many tokens
    seed: jax.Array         # (B,) uint32: the request's seed
    temperature: jax.Array  # (B,) float32
    top_k: jax.Array        # (B,) int32, 0 = off
    top_p: jax.Array        # (B,) float32, 1 = off
    forced: jax.Array       # (B, FORCED_SLOTS) int32: as in engine.DecodeState
    forced_len: jax.Array   # (B,) int32
    forced_pos: jax.Array   # (B,) int32
    more: jax.Array         # (B,) bool
    host: jax.Array         # () bool: the last call stopped for Python


class Request:
    """One request's settings and Python-side state (its tool call, forced tokens, what it produced)."""
    _ids = itertools.count()

    def __init__(self, prompt, limit, temperature, top_k, top_p, seed, tools, on_tokens):
        self.id = next(Request._ids)
        self.prompt, self.temperature, self.top_k, self.top_p = prompt, temperature, top_k, top_p
        self.seed, self.tools, self.on_tokens = seed, tools, on_tokens
        self.row = _Row(limit)           # limit, done, tool state, forced queue (nanojax.engine)
        self.limit = limit
        self.start = 0                   # where its sequence starts in the cache
        self.generated = 0               # tokens delivered (the stop token not counted)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished = threading.Event()


class Slots:
    """See the module docstring."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, max_queue: int = 64, chunk: int | None = None,
                 stop_tokens=None):
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.cfg = engine, engine.cfg
        self.max_batch = 1 << (max_batch - 1).bit_length()  # a bucket itself
        self.max_queue = max_queue
        self.chunk = int(chunk or engine.chunk)
        self.compilations = 0
        stops = list(engine.default_stops if stop_tokens is None else map(int, stop_tokens))  # ids ending a request
        if len(stops) > STOP_SLOTS:
            raise UserError(f"at most {STOP_SLOTS} stop tokens, got {len(stops)}")
        self.stops, self.stop_set = np.array(stops + [-1] * (STOP_SLOTS - len(stops)), np.int32), set(stops)
        tool_ids = engine._tool_ids
        self.tool_ids, self.python_end = tool_ids, np.int32(tool_ids[1] if tool_ids else -1)
        platform = (engine.mesh.devices.flat[0] if engine.mesh is not None else jax.devices()[0]).platform
        options = decode_compiler_options(platform)
        self._decode_jit = jax.jit(self._decode, static_argnames=("cap",), donate_argnums=(1,),
                                   **({"compiler_options": options} if options else {}))
        self._prefill_jit = jax.jit(self._prefill, static_argnames=("cap",))
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = []  # the device batch's rows; None: free
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = collections.Counter()    # requests, finished per reason, tokens, decode calls, turns, ...
        self._recent = collections.deque()      # (time, tokens) of recent device calls, for tokens/s
        self._occupancy = [0.0, 0.0]            # sum over calls of live rows / batch rows, calls
        self._stale = False                     # a cancelled request's row still runs on the device

    # -- requests ----------------------------------------------------------------------------------------------------

    def submit(self, prompt_ids, *, max_tokens: int | None = 256, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 42, tools: bool = True, on_tokens=None) -> Request:
        """Queue a request (checked as engine.generate checks it); QueueFull past max_queue waiting requests."""
        prompt = self.engine._prompts(prompt_ids)
        if len(prompt) != 1:
            raise UserError("a request is one prompt (a list of token ids)")
        self.engine._check_sampling(1, max_tokens, temperature, top_k, top_p, seed)
        S_max = self.cfg.max_seq_len
        limit = min(max_tokens or S_max, S_max - len(prompt[0]) + 1)
        request = Request(prompt[0], limit, float(temperature), min(int(top_k or 0), self.cfg.vocab_size),
                          1.0 if top_p is None else float(top_p), int(seed) % 2 ** 32, tools, on_tokens)
        with self._cv:
            if self._closed:
                raise QueueFull("the engine is shutting down")
            free = self.max_batch - sum(r is not None for r in self._rows)
            if len(self._waiting) >= self.max_queue + max(0, free):
                self.counts["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests wait for {self.max_batch} rows")
            self._waiting.append(request)
            self.counts["requests"] += 1
            self._cv.notify_all()
        return request

    def cancel(self, request: Request):
        """Stop a request (a client that went away): it finishes as "cancelled" and its row is free at the next turn,
        which the loop takes at its next device call."""
        with self._cv:
            if request.finish_reason is not None:
                return
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._finish(request, "cancelled")
            self._cv.notify_all()

    def _finish(self, request: Request, reason: str):
        request.finish_reason = reason
        request.row.done = True
        self.counts[f"finished_{reason}"] += 1
        if request.on_tokens is not None:
            request.on_tokens(request, [], [])
        request.finished.set()

    def stats(self) -> dict:
        with self._cv:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
            tokens = sum(n for _, n in list(self._recent)[1:])
            live = sum(r is not None for r in self._rows)
            return {"requests": self.counts["requests"], "active": live, "waiting": len(self._waiting),
                    "rejected": self.counts["rejected"], "batch_rows": len(self._rows), "max_batch": self.max_batch,
                    "free_slots": self.max_batch - live,
                    "finished": {k[9:]: v for k, v in self.counts.items() if k.startswith("finished_")},
                    "tokens": self.counts["tokens"], "tokens_per_s": round(tokens / span, 1) if span else 0.0,
                    "batch_occupancy": round(self._occupancy[0] / self._occupancy[1], 3) if self._occupancy[1]
                    else 0.0, "decode_calls": self.counts["calls"], "turns": self.counts["turns"],
                    "compilations": self.compilations + self.engine.compilations
                    + sum(f._cache_size() for f in (_take_rows, _shift_rows, _put_rows))}

    # -- the loop ----------------------------------------------------------------------------------------------------

    def start(self):
        with self._cv:
            self._closed = False
        self._thread = threading.Thread(target=self._serve_forever, name="nanojax-slots", daemon=True)
        self._thread.start()
        return self

    def close(self):
        with self._cv:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for r in waiting:
                self._finish(r, "cancelled")
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._cv:  # requests still running when the loop stopped
            for r in [r for r in self._rows if r is not None]:
                self._finish(r, "cancelled")
            self._rows = []

    def _serve_forever(self):
        try:
            self.run(forever=True)
        except BaseException as e:  # a device error: fail every request rather than hang them
            with self._cv:
                self._closed = True
                for r in [r for r in self._rows if r is not None] + list(self._waiting):
                    r.error = repr(e)
                    self._finish(r, "error")
                self._rows, self._waiting = [], collections.deque()
            raise

    def run_until_idle(self):
        """Serve every queued request to the end in this thread (tests, benchmarks)."""
        self.run(forever=False)

    def run(self, forever: bool):
        state, call, pos = None, None, 0
        while True:
            with self._cv:
                while forever and not self._closed and not self._waiting and call is None and not self._live():
                    self._cv.wait()
                if self._closed or (not forever and not self._waiting and call is None and not self._live()):
                    return
            if call is None:
                state, pos = self._turn(state, pos)
                if state is None:
                    continue
                call = self._dispatch(self._hand_over(state))
            S = call[0].cache.k[0].shape[1]
            upcoming = None if self._want_turn(pos, S) else self._dispatch(call[0])
            _, tokens, masks, n, host = call
            n = int(n)
            pos += n
            self._deliver(np.asarray(tokens)[:, :n].T.tolist(), np.asarray(masks)[:, :n].T.tolist(), self._live())
            if upcoming is not None and not bool(host) and pos < S and self._live():
                call = upcoming
            else:  # a turn next; a call queued behind this one took no step (host, or a full cache) unless every
                # request finished, when its tokens have no reader
                if upcoming is not None:
                    pos += int(upcoming[3])
                state, call = (upcoming or call)[0], None

    def _live(self) -> list[int]:
        return [i for i, r in enumerate(self._rows) if r is not None]

    def _want_turn(self, pos: int, S: int) -> bool:
        """Take a turn after the current call rather than queue the next one."""
        live = self._live()
        B = len(self._rows)
        if self._waiting and len(live) < self.max_batch:
            return True
        if self._stale or any(self._rows[i].cancelled for i in live) or len(live) <= B // 2:
            return True
        return pos + self.chunk > S and S < self.cfg.max_seq_len

    def _dispatch(self, state: SlotState):
        """Queue a device call (Python's queued forced tokens are handed over at turns only: a call queued behind
        another continues from that one's state)."""
        cap = top_k_cap(max([self._rows[i].top_k for i in self._live()] or [0]), self.cfg.vocab_size)
        self.counts["calls"] += 1
        return self._decode_jit(self.engine.params, state, self.stops, self.python_end, cap=cap)

    def _hand_over(self, state: SlotState) -> SlotState:
        """Forced tokens from the rows' queues; rows Python no longer runs (cancelled) are marked done."""
        B = len(self._rows)
        self._stale = False
        forced = np.zeros((B, FORCED_SLOTS), np.int32)
        forced_len = np.zeros((B,), np.int32)
        more, retire = np.zeros((B,), bool), np.zeros((B,), bool)
        for i, req in enumerate(self._rows):
            if req is None:
                retire[i] = True
            elif req.row.queue:
                n = min(len(req.row.queue), FORCED_SLOTS)
                forced[i, :n], forced_len[i], more[i] = req.row.queue[:n], n, len(req.row.queue) > n
        return state.replace(forced=jnp.asarray(forced), forced_len=jnp.asarray(forced_len),
                             forced_pos=jnp.zeros((B,), jnp.int32), more=jnp.asarray(more),
                             done=state.done | jnp.asarray(retire), host=jnp.bool_(False))

    def _deliver(self, token_columns, mask_columns, live: list[int]):
        """Advance the requests of rows `live` over the columns (stops, limits, tool calls), hand each its new
        tokens, and free the rows of the requests that finished."""
        now = time.monotonic()
        with self._cv:
            self._occupancy[0] += len(live) / max(1, len(self._rows))
            self._occupancy[1] += 1
        produced = 0
        for i in live:
            req = self._rows[i]
            if req.cancelled:
                with self._cv:
                    self._rows[i] = None
                    self._finish(req, "cancelled")
                self._stale = True
                continue
            tokens, masks, reason = [], [], None
            for column, mask_column in zip(token_columns, mask_columns):
                token, mask = column[i], int(mask_column[i])
                row = req.row
                row.limit -= 1
                if mask == 0 and row.queue:
                    row.queue.pop(0)
                if token in self.stop_set:
                    reason = "stop"
                    break
                tokens.append(token)
                masks.append(mask)
                if row.limit <= 0:
                    reason = "length"
                    break
                if req.tools and self.tool_ids is not None:
                    self.engine._tool_step(row, token, self.tool_ids)
            produced += len(tokens)
            req.generated += len(tokens)
            if tokens:
                if req.first_token_at is None:
                    req.first_token_at = now
                if req.on_tokens is not None:
                    req.on_tokens(req, tokens, masks)
            if reason is not None:
                with self._cv:
                    self._rows[i] = None
                    self._finish(req, reason)
        with self._cv:
            self.counts["tokens"] += produced
            self._recent.append((now, produced))

    # -- a turn: rows leave and join -----------------------------------------------------------------------------

    def _turn(self, state: SlotState | None, pos: int):
        """Between device calls: drop finished rows, admit waiting requests, resize and shift the batch.
        Returns (state, pos), state None when nothing runs."""
        self.counts["turns"] += 1
        with self._cv:
            for i in self._live():
                if self._rows[i].cancelled:
                    self._finish(self._rows[i], "cancelled")
                    self._rows[i] = None
            live = self._live()
            joiners = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - len(live)))]
        if not live and not joiners:
            self._rows = []
            return None, 0
        S_max = self.cfg.max_seq_len
        longest = max([pos - self._rows[i].start for i in live] + [len(r.prompt) for r in joiners])
        remaining = max([self._rows[i].row.limit for i in live] + [r.limit for r in joiners])
        needed = cache_bucket(min(S_max, longest + min(self.chunk, remaining)), S_max)
        count = len(live) + len(joiners)
        B_old = len(self._rows)
        B = B_old if B_old // 2 < count <= B_old else 1 << (count - 1).bit_length()
        if state is None or not live:
            state, pos = self._empty(np.int32(longest), rows=B, length=needed), longest
            rows: list[Request | None] = [None] * B
        elif B != B_old or longest != pos or needed > state.cache.k[0].shape[1]:
            shift = longest - pos
            if B != B_old:  # running rows to the front; B_old: an empty row
                state = self._gather(state, np.array(live + [B_old] * (B - len(live)), np.int32))
            if shift or needed != state.cache.k[0].shape[1]:
                state = self._move(state, np.int32(shift), length=needed)
            rows = [self._rows[i] for i in live] + [None] * (B - len(live)) if B != B_old else list(self._rows)
            for r in rows:
                if r is not None:
                    r.start += shift
            pos = longest
        else:
            rows = list(self._rows)
        free = [i for i, r in enumerate(rows) if r is None]
        with self._cv:
            self._rows = rows
            for i, req in zip(free, joiners):
                rows[i] = req
                req.start = pos - len(req.prompt)
        if joiners:
            state = self._admit(state, pos, joiners, free[:len(joiners)])
        return state, pos

    def _admit(self, state: SlotState, pos: int, joiners: list[Request], rows: list[int]) -> SlotState:
        S_max = self.cfg.max_seq_len
        L = bucket(max(len(r.prompt) for r in joiners), S_max)
        P = 1 << (len(joiners) - 1).bit_length()
        prompts = np.zeros((P, L), np.int32)
        start = np.full((P,), L - 1, np.int32)
        for j, r in enumerate(joiners):
            start[j] = L - len(r.prompt)
            prompts[j, start[j]:] = r.prompt
        pad = lambda values, fill, dtype: np.array(values + [fill] * (P - len(values)), dtype)  # noqa: E731
        knobs = dict(seed=pad([r.seed for r in joiners], 0, np.uint32),
                     temperature=pad([r.temperature for r in joiners], 0.0, np.float32),
                     top_k=pad([r.top_k for r in joiners], 0, np.int32),
                     top_p=pad([r.top_p for r in joiners], 1.0, np.float32),
                     limit=pad([r.limit for r in joiners], 1, np.int32))
        cap = top_k_cap(max(r.top_k for r in joiners), self.cfg.vocab_size)
        k, v, first = self._prefill_jit(self.engine.params, prompts, start, knobs, cap=cap)
        state = self._insert(state, k, v, np.int32(pos), first, pad(rows, len(self._rows), np.int32),
                                 pad([pos - len(r.prompt) for r in joiners], pos, np.int32), knobs, self.stops)
        column = [0] * len(self._rows)
        for i, token in zip(rows, np.asarray(first)[:len(joiners)].tolist()):
            column[i] = token
        self._deliver([column], [[1] * len(column)], rows)
        return state

    # -- the jitted functions ----------------------------------------------------------------------------------------

    # -- the state edits of a turn (eager, over the small jitted programs above) and the jitted prefill and decode --

    def _empty(self, pos, *, rows: int, length: int) -> SlotState:
        cache = gpt.init_decode_cache(self.cfg, rows, length, self.engine.dtype)
        cache = self.engine._constrain_cache(cache.replace(pos=pos, start=jnp.full((rows,), pos, jnp.int32)))
        z = jnp.zeros((rows,), jnp.int32)
        return SlotState(cache=cache, token=z, step=z, done=jnp.ones((rows,), bool), limit=z,
                         seed=jnp.zeros((rows,), jnp.uint32), temperature=jnp.zeros((rows,), jnp.float32), top_k=z,
                         top_p=jnp.ones((rows,), jnp.float32), forced=jnp.zeros((rows, FORCED_SLOTS), jnp.int32),
                         forced_len=z, forced_pos=z, more=jnp.zeros((rows,), bool), host=jnp.bool_(False))

    def _gather(self, state: SlotState, order_B) -> SlotState:
        """Rows gathered by `order_B` into a batch of its length (an index past the old batch: an empty row, done)."""
        B_old, KV = state.token.shape[0], self.cfg.n_kv_head
        empty = order_B >= B_old
        index = jnp.minimum(order_B, B_old - 1)
        rows_R = (index[:, None] * KV + jnp.arange(KV)[None, :]).reshape(-1)
        cache = state.cache
        cache = gpt.DecodeCache(k=tuple(_take_rows(x, rows_R) for x in cache.k),
                                v=tuple(_take_rows(x, rows_R) for x in cache.v),
                                pos=cache.pos, start=jnp.where(empty, cache.pos, _take_rows(cache.start, index)))
        fields = {f: _take_rows(getattr(state, f), index) for f in ("token", "step", "limit", "seed", "temperature", "top_k",
                                                       "top_p", "forced", "forced_len", "forced_pos", "more")}
        return SlotState(cache=self.engine._constrain_cache(cache), done=_take_rows(state.done, index) | empty,
                         host=jnp.bool_(False), **fields)

    def _move(self, state: SlotState, shift, *, length: int) -> SlotState:
        """Every sequence moved `shift` positions along a cache of `length`. What wraps around is padding: nothing
        runs past pos or before a start (RoPE follows each row's own positions, so moving changes no result)."""
        move = functools.partial(_shift_rows, shift=shift, length=length)
        cache = state.cache
        cache = cache.replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)), pos=cache.pos + shift,
                              start=cache.start + shift)
        return state.replace(cache=self.engine._constrain_cache(cache))

    def _prefill(self, params, prompts_PL, start_P, knobs, *, cap):
        """The joiners' prompts (right-aligned in a bucket) through the model: their caches (P * KV, L, hd) and
        first tokens (sampled at step 0 of each seed, as engine.generate would)."""
        self.compilations += 1
        P, L = prompts_PL.shape
        cache = gpt.init_decode_cache(self.cfg, P, L, self.engine.dtype).replace(start=start_P)
        logits, cache = self.engine._forward(params, prompts_PL, cache, last=L - 1)
        u = row_uniforms(knobs["seed"], jnp.zeros((P, 1), jnp.int32))[:, 0]
        first = sample_rows(logits[:, 0], u, knobs["temperature"], knobs["top_k"], knobs["top_p"], cap)
        return cache.k, cache.v, first

    def _insert(self, state: SlotState, k, v, pos, first_P, rows_P, start_P, knobs, stops) -> SlotState:
        """Write the joiners' rows, their prompts ending at `pos` (row index past the batch: a padding joiner,
        dropped)."""
        KV = self.cfg.n_kv_head
        rows_R = (rows_P[:, None] * KV + np.arange(KV)[None, :]).reshape(-1)
        put = lambda x, new: _put_rows(x, new, rows_R, pos)  # noqa: E731
        at = lambda x, new: x.at[rows_P].set(new, mode="drop")  # noqa: E731
        P = rows_P.shape[0]
        zeros = jnp.zeros((P,), jnp.int32)
        cache = state.cache.replace(k=tuple(map(put, state.cache.k, k)), v=tuple(map(put, state.cache.v, v)),
                                    start=at(state.cache.start, start_P))
        return state.replace(
            cache=self.engine._constrain_cache(cache), token=at(state.token, first_P),
            step=at(state.step, zeros + 1), done=at(state.done, jnp.isin(first_P, stops) | (knobs["limit"] <= 1)),
            limit=at(state.limit, knobs["limit"]), seed=at(state.seed, knobs["seed"]),
            temperature=at(state.temperature, knobs["temperature"]), top_k=at(state.top_k, knobs["top_k"]),
            top_p=at(state.top_p, knobs["top_p"]), forced_len=at(state.forced_len, zeros),
            forced_pos=at(state.forced_pos, zeros), more=at(state.more, zeros > 0))

    def _decode(self, params, state: SlotState, stops, python_end, *, cap):
        """engine._decode with per-row sampling knobs, seeds and step counts."""
        self.compilations += 1
        B, T = state.token.shape[0], self.chunk
        n_steps = jnp.minimum(T, state.cache.k[0].shape[1] - state.cache.pos)
        steps_BT = state.step[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        u_TB = jax.lax.cond(jnp.any(state.temperature > 0), lambda: row_uniforms(state.seed, steps_BT).T,
                            lambda: jnp.zeros((T, B), jnp.float32))

        def step(carry):
            i, st, tokens, masks, _ = carry
            logits, cache = self.engine._forward(params, st.token[:, None], st.cache)
            sampled = sample_rows(logits[:, 0], jax.lax.dynamic_index_in_dim(u_TB, i, keepdims=False),
                                  st.temperature, st.top_k, st.top_p, cap)
            return advance_rows(i, st, tokens, masks, sampled, cache, stops, python_end)

        init = (jnp.int32(0), state, jnp.zeros((B, T), jnp.int32), jnp.zeros((B, T), bool),
                jnp.all(state.done) | state.host)
        n, state, tokens, masks, _ = jax.lax.while_loop(lambda c: (c[0] < n_steps) & ~c[4], step, init)
        return state, tokens, masks, n, state.host
