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
  - Each device call runs up to `chunk` decode steps (sampling knobs, seed and step count per row; fewer while a row
    is free, see ADMIT_S). Python queues the next call before reading the current one's tokens, except when it wants
    a turn: requests waiting for a free row, a row cancelled, the batch small enough for a smaller bucket, a cache
    about to fill that moving the rows back would make room in, or a tool call to run. A cache about to fill
    otherwise grows to the next bucket on the device, queued behind the running call (as the engine's does).
  - A turn: the rows still running are kept (in place, or gathered to the front when the batch bucket changes); the
    cache is shifted left to the oldest running row's start (so attention reads at most the longest sequence, rounded
    up to a cache bucket) or right when a joining prompt is longer than `pos`; the joiners are prefilled in groups of 1,
    4, 16, ... rows (each prompt right-aligned in the group's prompt bucket), their first tokens sampled, and each
    one's cache written into its row. The rows' small fields are edited in numpy and sent back in one transfer; the
    first tokens go into their rows on the device, and Python reads them once the next decode call is queued (the
    device goes from the prefill to the decode without waiting for the host).
  - Shapes come in buckets: rows a power of two up to max_batch, prompts and caches as in the engine, top-k size a
    power of two from 64. The decode loop compiles once per (rows, cache, top-k) bucket and the prefill once per
    (group, prompt, top-k) bucket, never per request; a turn's cache edits are small programs per array shape, shared by
    every layer. `warm_up(max_len)` compiles all of them for conversations up to max_len positions before requests
    come (the server does it at start-up); `stats()["compilations"]` counts every XLA compilation in the process
    since the slots were made (jax.monitoring), so a request that waited for one shows.
  - Past max_queue waiting requests, submit raises QueueFull (the server answers 429).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanojax import gpt, slot_programs
from nanojax.common import UserError
from nanojax.engine import (FORCED_SLOTS, STOP_SLOTS, Engine, _Row, bucket, buckets_upto, cache_bucket,
                            decode_compiler_options)
from nanojax.sampling import top_k_cap
from nanojax.slot_programs import SlotState, prefill_groups

# Rows asking top_k <= 64 (or none) share the top-k size 64, so the usual mix of settings needs one program per shape
# (a 256-candidate TopK costs ~3x a 64-candidate one at 32 rows on a CPU).
MIN_TOP_K_CAP = 64
# While a row is free, a device call takes the steps that last about this long at its batch size (measured), so a
# request arriving mid-call waits little for a turn; a full batch takes whole chunks (nobody can join it).
ADMIT_S = 0.05


class QueueFull(Exception):
    """Every row is busy and max_queue requests already wait."""


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
        self.prefill_sizes = [4 ** i for i in range(self.max_batch.bit_length()) if 4 ** i <= self.max_batch]
        self.chunk = int(chunk or engine.chunk)
        self.compiled = [0, 0.0]  # XLA compilations in this process since now, and their seconds
        jax.monitoring.register_event_duration_secs_listener(self._on_jax_event)
        stops = list(engine.default_stops if stop_tokens is None else map(int, stop_tokens))  # ids ending a request
        if len(stops) > STOP_SLOTS:
            raise UserError(f"at most {STOP_SLOTS} stop tokens, got {len(stops)}")
        self.stops, self.stop_set = np.array(stops + [-1] * (STOP_SLOTS - len(stops)), np.int32), set(stops)
        tool_ids = engine._tool_ids
        self.tool_ids, self.python_end = tool_ids, np.int32(tool_ids[1] if tool_ids else -1)
        platform = (engine.mesh.devices.flat[0] if engine.mesh is not None else jax.devices()[0]).platform
        options = decode_compiler_options(platform)
        decode = functools.partial(slot_programs.decode, engine, self.chunk)
        self._decode_jit = jax.jit(decode, static_argnames=("cap",), donate_argnums=(1,),
                                   **({"compiler_options": options} if options else {}))
        self._prefill_jit = jax.jit(functools.partial(slot_programs.prefill, engine), static_argnames=("cap",))
        self._firsts: list = []  # the last turn's groups: (first tokens on the device, their rows); see _admit
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = []  # the device batch's rows; None: free
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = collections.Counter()    # requests, finished per reason, tokens, decode calls, turns, ...
        self._recent = collections.deque()      # (time, tokens) of recent device calls, for tokens/s
        self._occupancy = [0.0, 0.0]            # sum over calls of live rows / batch rows, calls
        self._stale = False                     # a cancelled request's row still runs on the device
        self._step_s, self._last_end = {}, 0.0  # rows -> seconds per decode step (see ADMIT_S); the last call's end
        self.warm = {"programs": 0, "compiled": 0, "seconds": 0.0, "done": False}  # warm_up's progress
        if engine.mesh is None:
            self._placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            self._placement = jax.sharding.NamedSharding(engine.mesh, jax.sharding.PartitionSpec())
        # One program per (rows, cache) bucket: eager zeros cost a dispatch per layer's k and v (~2 ms of a lone
        # request's time to first token on a CPU, against 0.1 ms).
        zeros = lambda rows, length: engine._constrain_cache(  # noqa: E731
            gpt.init_decode_cache(self.cfg, rows, length, engine.dtype))
        self._zeros_jit = jax.jit(zeros, static_argnames=("rows", "length"),
                                  **({} if engine.mesh is not None else {"out_shardings": self._placement}))
        self._firsts_jit = jax.jit(slot_programs.place_firsts, out_shardings=self._placement)

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
                    else 0.0, "decode_calls": self.counts["calls"], "prefill_calls": self.counts["prefills"],
                    "turns": self.counts["turns"],
                    "compilations": self.compiled[0], "compile_s": round(self.compiled[1], 2),
                    "warm_up": dict(self.warm)}

    def _on_jax_event(self, event: str, seconds: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiled[0] += 1
            self.compiled[1] += seconds

    # -- the loop ----------------------------------------------------------------------------------------------------

    def start(self):
        with self._cv:
            self._closed = False
        self._thread = threading.Thread(target=self._serve_forever, name="nanojax-slots", daemon=True)
        self._thread.start()
        return self

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._on_jax_event)
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
                call = self._dispatch(state)
                self._deliver_firsts()
            S = call[0].cache.k[0].shape[1]
            S_next, upcoming = self._next_cache(pos, S), None
            if S_next is not None:  # a bigger cache: the next bucket, padding at the end
                state = call[0] if S_next == S else call[0].replace(cache=self._move(call[0].cache, 0, S_next))
                upcoming = self._dispatch(state)
            _, tokens, masks, n, host, sent = call
            n = int(n)
            self._timed(tokens.shape[0], n, sent)
            pos += n
            self._deliver(np.asarray(tokens)[:, :n].T.tolist(), np.asarray(masks)[:, :n].T.tolist(), self._live())
            if upcoming is not None and not bool(host) and pos < S_next and self._live():
                call = upcoming
            else:  # a turn next; a call queued behind this one took no step (host, or a full cache) unless every
                # request finished, when its tokens have no reader
                if upcoming is not None:
                    pos += int(upcoming[3])
                state, call = (upcoming or call)[0], None

    def _live(self) -> list[int]:
        return [i for i, r in enumerate(self._rows) if r is not None]

    def _next_cache(self, pos: int, S: int) -> int | None:
        """The cache length of the call to queue behind the current one (S, or the next bucket when a row may reach
        the end of S during the current call or the next), or None: take a turn after the current call instead."""
        live, S_max = self._live(), self.cfg.max_seq_len
        if self._waiting and len(live) < self.max_batch:
            return None
        if self._stale or any(self._rows[i].cancelled for i in live) or len(live) <= len(self._rows) // 2:
            return None
        longest = max(self._rows[i].row.limit for i in live)  # tokens a live row may still emit
        if pos + self.chunk <= S or S >= S_max or longest <= S - pos:
            return S
        oldest = min(self._rows[i].start for i in live)  # a turn moves the rows back to it: room enough then?
        return None if cache_bucket(pos - oldest + self.chunk, S_max) <= S else cache_bucket(S + 1, S_max)

    def _dispatch(self, state: SlotState):
        """Queue a device call (Python's queued forced tokens are handed over at turns only: a call queued behind
        another continues from that one's state)."""
        live = self._live()
        cap = self._cap(max([self._rows[i].top_k for i in live] or [0]))
        steps = self.chunk
        if len(live) < self.max_batch:  # see ADMIT_S; a batch size not yet timed takes 4 steps
            per_step = self._step_s.get(len(self._rows))
            steps = min(self.chunk, max(1, int(ADMIT_S / per_step)) if per_step else 4)
        self.counts["calls"] += 1
        out = self._decode_jit(self.engine.params, state, self.stops, self.python_end, np.int32(steps), cap=cap)
        return *out, time.perf_counter()

    def _timed(self, rows: int, n: int, sent: float):
        """A call of `n` steps at `rows` rows, sent at `sent`, has just ended: its seconds per step into the average
        (it started when it was sent or when the call before it ended, whichever came later)."""
        now = time.perf_counter()
        if n:
            per_step = (now - max(sent, self._last_end)) / n
            self._step_s[rows] = 0.7 * self._step_s.get(rows, per_step) + 0.3 * per_step
        self._last_end = now

    def _hand_over(self, cache: gpt.DecodeCache, f: dict, pos: int) -> SlotState:
        """The turn's state on the device: forced tokens from the rows' queues, rows Python no longer runs (free or
        cancelled) marked done."""
        self._stale = False
        f["forced"][:], f["forced_len"][:], f["forced_pos"][:], f["more"][:] = 0, 0, 0, False
        for i, req in enumerate(self._rows):
            if req is None:
                f["done"][i] = True
            elif req.row.queue:
                n = min(len(req.row.queue), FORCED_SLOTS)
                f["forced"][i, :n], f["forced_len"][i], f["more"][i] = req.row.queue[:n], n, len(req.row.queue) > n
        return self._join_firsts(self._place(cache, f, pos))

    def _place(self, cache: gpt.DecodeCache, f: dict, pos: int) -> SlotState:
        """A SlotState from the cache and the numpy fields, every array committed to the device as a decode call
        leaves them (jit compiles again for arrays that are not, so a turn would miss the programs warm_up built)."""
        small = jax.device_put({**f, "pos": np.int32(pos), "host": np.bool_(False)}, self._placement)
        k, v = self._committed((cache.k, cache.v))
        return SlotState(cache=gpt.DecodeCache(k=k, v=v, pos=small.pop("pos"), start=small.pop("start")), **small)

    def _committed(self, arrays):
        """`arrays` committed to the engine's device (a prefill's outputs are not when the params are not); on a mesh
        they are already placed by the batch rule."""
        return arrays if self.engine.mesh is not None else jax.device_put(arrays, self._placement)

    def _cap(self, top_k: int) -> int:
        """The static top-k size of a call whose rows ask at most `top_k` (0: off; see MIN_TOP_K_CAP)."""
        return top_k_cap(max(top_k, MIN_TOP_K_CAP), self.cfg.vocab_size)

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
        """Between device calls: drop finished rows, admit waiting requests, resize and shift the batch, hand Python's
        forced tokens over. The rows' small fields are edited in numpy and sent back in one transfer (eager jnp edits
        compile a program per shape); the cache goes through nanojax.gpt's small programs, one per array shape.
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
            cache, f, pos = self._empty_cache(B, needed), self._empty_fields(B, longest), longest
            rows: list[Request | None] = [None] * B
        else:
            cache = state.cache
            f = {name: np.array(x) for name, x in jax.device_get({**self._fields(state), "start": cache.start}).items()}
            S = cache.k[0].shape[1]
            if B != B_old or longest != pos or needed > S:
                shift = longest - pos
                if B != B_old:  # running rows to the front; B_old: an empty row
                    cache, f = self._gather(cache, f, np.array(live + [B_old] * (B - len(live))), pos)
                if shift or needed != S:
                    cache = self._move(cache, shift, needed)
                    f["start"] += shift
                rows = [self._rows[i] for i in live] + [None] * (B - len(live)) if B != B_old else list(self._rows)
                for r in rows:
                    if r is not None:
                        r.start += shift
                pos = longest
            else:
                rows = list(self._rows)
        free = [i for i, r in enumerate(rows) if r is None][:len(joiners)]
        with self._cv:
            self._rows = rows
            for i, req in zip(free, joiners):
                rows[i] = req
                req.start = pos - len(req.prompt)
        if joiners:
            cache = self._admit(cache, f, pos, joiners, free)
        return self._hand_over(cache, f, pos), pos

    def _admit(self, cache: gpt.DecodeCache, f: dict, pos: int, joiners: list[Request], rows: list[int]):
        """The joiners' prompts prefilled in groups (prefill_groups), each one's cache written into its row; their
        first tokens stay on the device (self._firsts) until the decode call after the turn is queued."""
        KV, done = self.cfg.n_kv_head, 0
        for P in prefill_groups(len(joiners), self.prefill_sizes):
            group, group_rows, done = joiners[done:done + P], rows[done:done + P], done + P
            L = bucket(max(len(r.prompt) for r in group), self.cfg.max_seq_len)
            prompts, start = np.zeros((P, L), np.int32), np.full((P,), L - 1, np.int32)  # padding rows: one token
            knobs = self._empty_knobs(P)
            for p, (req, row) in enumerate(zip(group, group_rows)):
                prompts[p, L - len(req.prompt):], start[p] = req.prompt, L - len(req.prompt)
                for name in knobs:
                    knobs[name][p] = f[name][row] = getattr(req, name)
                f["limit"][row], f["start"][row], f["step"][row] = req.limit, pos - len(req.prompt), 1
                f["done"][row] = req.limit <= 1  # (or its first token is a stop: place_firsts)
            self.counts["prefills"] += 1
            k_P, v_P, first = self._prefill_jit(self.engine.params, prompts, start, knobs,
                                                cap=self._cap(max(r.top_k for r in group)))
            for p, row in enumerate(group_rows):  # each (KV, L, hd): put_rows' shapes do not vary with P
                k, v = self._committed((k_P[p], v_P[p]))
                rows_R = np.arange(row * KV, (row + 1) * KV, dtype=np.int32)
                put = lambda x, new: gpt.put_rows(x, new, rows_R, np.int32(pos))  # noqa: E731
                cache = cache.replace(k=tuple(map(put, cache.k, k)), v=tuple(map(put, cache.v, v)))
            self._firsts.append((first, group_rows))
        return self.engine._constrain_cache(cache)

    def _join_firsts(self, state: SlotState) -> SlotState:
        """The turn's first tokens written into the state on the device (place_firsts, one call per group)."""
        token, done = state.token, state.done
        for first, group_rows in self._firsts:  # a padding row's index: past the batch; first committed as warm_up's
            rows_P = np.array(group_rows + [len(self._rows)] * (len(first) - len(group_rows)), np.int32)
            token, done = self._firsts_jit(token, done, rows_P, jax.device_put(first, self._placement), self.stops)
        return state.replace(token=token, done=done)

    def _deliver_firsts(self):
        """The first tokens of the last turn's joiners to their requests (after the next decode call is queued)."""
        firsts, self._firsts = self._firsts, []
        column, rows = [0] * len(self._rows), []
        for first, group_rows in firsts:
            for row, token in zip(group_rows, np.asarray(first).tolist()):
                column[row] = token
                rows.append(row)
        if rows:
            self._deliver([column], [[1] * len(column)], rows)

    @staticmethod
    def _empty_knobs(rows: int) -> dict:
        """The sampling knobs of `rows` prefill rows (greedy: a padding row's choice costs nothing)."""
        return dict(seed=np.zeros((rows,), np.uint32), temperature=np.zeros((rows,), np.float32),
                    top_k=np.zeros((rows,), np.int32), top_p=np.ones((rows,), np.float32))

    # -- compiling ahead of requests ---------------------------------------------------------------------------------

    def warm_up(self, max_len: int | None = None, *, top_k: int = MIN_TOP_K_CAP, threads: int = 1,
                should_stop=lambda: False) -> int:
        """Compile, before requests come, every program that serving conversations of up to `max_len` positions
        (default: the context) with top_k <= `top_k` meets: the prefill of each (group, prompt) bucket, the decode
        loop of each (rows, cache) bucket, the turns' cache edits and first tokens' writes, so that no request waits
        for a compilation (seconds for the first two). One-row programs first (a lone chat needs them first), then two
        rows, four, ...; `threads` compile at once (XLA compiles on the host's cores); `should_stop()` ends it early.
        self.warm shows the progress. Returns the programs compiled."""
        S_max, KV, hd = self.cfg.max_seq_len, self.cfg.n_kv_head, self.cfg.head_dim
        max_len = min(max_len or S_max, S_max)
        caches = buckets_upto(lambda n: cache_bucket(n, S_max), max_len)
        prompts = buckets_upto(lambda n: bucket(n, S_max), max_len)
        rows = [1 << i for i in range(self.max_batch.bit_length())]
        cap = self._cap(top_k)
        zeros = lambda *shape: jnp.zeros(shape, self.engine.dtype, device=self._placement)  # noqa: E731
        index = lambda n: np.arange(n, dtype=np.int32)  # noqa: E731
        jobs = []
        for B in rows:  # the calls _turn, _admit, _gather and _move make, on arrays of the same kinds
            if B in self.prefill_sizes:
                jobs += [lambda B=B, L=L: self._compile_prefill(B, L, cap) for L in prompts]
            jobs += [lambda B=B, P=P: self._compile_firsts(B, P) for P in self.prefill_sizes]
            jobs += [lambda B=B, S=S: self._compile_decode(B, S, cap) for S in caches]
            jobs += [lambda B=B, S=S, L=L: gpt.put_rows(zeros(B * KV, S, hd), zeros(KV, L, hd), index(KV), np.int32(0))
                     for S in caches for L in prompts]
            jobs += [lambda B=B, S=S, b=b: gpt.take_rows(zeros(b * KV, S, hd), index(B * KV) % (b * KV))
                     for S in caches for b in rows if b != B]
            jobs += [lambda B=B, S=S, T=T: gpt.shift_rows(zeros(B * KV, S, hd), np.int32(0), length=T)
                     for S in caches for T in caches]
        t0, lock = time.monotonic(), threading.Lock()
        self.warm = {"programs": len(jobs), "compiled": 0, "seconds": 0.0, "done": False}

        def compile_one(job):
            if not should_stop():
                job()
                with lock:
                    self.warm["compiled"] += 1
                    self.warm["seconds"] = round(time.monotonic() - t0, 1)

        with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="nanojax-warm-up") as pool:
            for done in [pool.submit(compile_one, job) for job in jobs]:
                done.result()
        self.warm["done"] = self.warm["compiled"] == len(jobs)
        return self.warm["compiled"]

    def _compile_decode(self, rows: int, length: int, cap: int):
        """The decode program a turn calls for a batch of `rows` and a cache of `length` (the same arguments), and
        the empty cache's program of that shape on the way."""
        state = self._place(self._empty_cache(rows, length), self._empty_fields(rows, 0), 0)
        self._decode_jit.lower(self.engine.params, state, self.stops, self.python_end, np.int32(0), cap=cap).compile()

    def _compile_firsts(self, rows: int, group: int):
        """The first tokens' write _join_firsts calls for a batch of `rows` and a group of `group` (the same kinds)."""
        token, done, first = jax.device_put((np.zeros(rows, np.int32), np.ones(rows, bool), np.zeros(group, np.int32)),
                                            self._placement)
        self._firsts_jit(token, done, np.zeros(group, np.int32), first, self.stops)

    def _compile_prefill(self, rows: int, length: int, cap: int):
        """The prefill program _admit calls for `rows` prompts in a bucket of `length` (the same argument types)."""
        self._prefill_jit.lower(self.engine.params, np.zeros((rows, length), np.int32), np.zeros((rows,), np.int32),
                                self._empty_knobs(rows), cap=cap).compile()

    # -- the state edits of a turn (numpy fields; the cache through nanojax.gpt's small programs) ----------------------

    def _fields(self, state: SlotState) -> dict:
        """The rows' small fields (all but the cache and the host flag), as a turn edits them in numpy."""
        names = [f.name for f in dataclasses.fields(SlotState) if f.name not in ("cache", "host")]
        return {name: getattr(state, name) for name in names}

    def _empty_fields(self, rows: int, pos: int) -> dict:
        """The numpy fields of `rows` empty rows (done) starting at pos, as _fields names them, and "start"."""
        z = lambda dtype=np.int32: np.zeros((rows,), dtype)  # noqa: E731
        return {"token": z(), "step": z(), "done": np.ones((rows,), bool), "limit": z(), "seed": z(np.uint32),
                "temperature": z(np.float32), "top_k": z(), "top_p": np.ones((rows,), np.float32),
                "forced": np.zeros((rows, FORCED_SLOTS), np.int32), "forced_len": z(), "forced_pos": z(),
                "more": z(bool), "start": np.full((rows,), pos, np.int32)}

    def _empty_cache(self, rows: int, length: int) -> gpt.DecodeCache:
        return self._zeros_jit(rows=rows, length=length)  # (pos and start: _place sets them)

    def _gather(self, cache: gpt.DecodeCache, f: dict, order_B, pos: int):
        """Rows gathered by `order_B` into a batch of its length (an index past the old batch: an empty row, done)."""
        B_old, KV = len(f["token"]), self.cfg.n_kv_head
        empty, index = order_B >= B_old, np.minimum(order_B, B_old - 1)
        rows_R = (index[:, None] * KV + np.arange(KV)).reshape(-1).astype(np.int32)
        take = lambda x: gpt.take_rows(x, rows_R)  # noqa: E731
        f = {name: x[index] for name, x in f.items()}
        f["done"] |= empty
        f["start"][empty] = pos
        return self.engine._constrain_cache(cache.replace(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)))), f

    def _move(self, cache: gpt.DecodeCache, shift: int, length: int) -> gpt.DecodeCache:
        """Every sequence moved `shift` positions along a cache of `length`. What wraps around is padding: nothing
        runs past pos or before a start (RoPE follows each row's own positions, so moving changes no result)."""
        move = lambda x: gpt.shift_rows(x, np.int32(shift), length=length)  # noqa: E731  (as warm_up calls it)
        return self.engine._constrain_cache(cache.replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v))))
