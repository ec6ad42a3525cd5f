"""The inference engine: KV-cache prefill and decode, sampling, stop tokens, the calculator tool, streaming.

    engine = Engine(params, cfg, tokenizer)              # dtype: compute dtype (bf16 on GPUs); mesh: optional
    for tokens, masks in engine.generate(ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50, seed=1):
        ...                                              # one column per step: a token and a mask per row
    seqs, masks = engine.generate_batch(ids, ...)        # prompt + completion per row, terminal token dropped
    for delta in engine.stream_text(ids, ...): ...       # row 0 as text, never splitting a UTF-8 character
    engine.complete("Once upon a time", ...) -> str      # raw continuation (BOS + text)
    engine.chat("What is 2+2?" | messages | {"messages": ...}, ...) -> str   # the assistant's reply

`ids` is one prompt (list of ids) or several (list of lists; rows are prompt-major: prompt p's samples are rows
p*num_samples ... p*num_samples + num_samples - 1). Masks are 1 for sampled tokens and 0 for forced ones (the
calculator's output) and for the prompt in generate_batch.

How it runs:
  - The model runs as gpt.cached_forward over a gpt.DecodeCache (gpt.py explains that layout): per layer, (rows x kv
    heads, length, head dim) in the compute dtype (GQA shrinks it). All rows write at one shared position; prompts of
    different lengths end at the same place, each row masking the padding before its own start.
  - Prefill runs each distinct prompt once, padded to a length bucket, then copies it into its samples' rows.
  - Shapes come in buckets, never per length: prompt length a power of two (>= 16), rows a power of two, cache length
    one of 128, 192, 256, 384, 512, 768, ... (powers of two and 1.5x them), moving to the next when it is full (so
    attention reads at most 1.5x the keys in use), all capped at max_seq_len. Each jitted function compiles once per
    bucket and top-k size (temperature, top-k, top-p and the seed are traced values); `engine.compilations` counts
    traces.
  - Decoding runs on the device: a lax.while_loop of up to `chunk` steps per call that stops early when every row is
    done, when a row samples <|python_end|> (Python then runs the calculator and queues <|output_start|> result
    <|output_end|> for that row, which the next call feeds through the same loop with mask 0), or when a row's forced
    queue needs refilling. Python only streams columns, runs tools and decides when to stop, and it queues the next
    call before reading the current one's tokens, so the device does not wait while Python streams (a call queued
    behind one that stopped for Python takes no step).
  - Sampling: temperature 0 is greedy; else top-k, then top-p (nucleus), then inverse-CDF sampling with one uniform per
    row from key(seed) folded with the step and the row: reproducible, rows independent, whatever the chunking.
  - A row stops at <|assistant_end|> or <|bos|> (override with stop_tokens=), after max_tokens tokens, or when the
    sequence reaches max_seq_len.
"""
from __future__ import annotations

import codecs
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nanojax import gpt
from nanojax.common import UserError, compute_dtype
from nanojax.config import GPTConfig
from nanojax.sampling import sample, top_k_cap, uniforms
from nanojax.sandbox import calculator

MIN_BUCKET = 16      # smallest prompt length bucket
MIN_CACHE = 128      # smallest cache length bucket (each cache bucket is one more decode program)
CHUNK = 32           # decode steps per device call (at most)
FORCED_SLOTS = 32    # forced tokens handed to the device per call; longer tool outputs are refilled between calls
STOP_SLOTS = 8       # stop tokens are a fixed-size array, padded with -1, so custom stops do not recompile
CACHE_AXES = ("batch", "seq", "head_dim")  # one layer's cache: (rows x kv heads, length, head dim)
DEFAULT_STOPS = ("<|assistant_end|>", "<|bos|>")
# The decode loop's XLA:CPU options, each measured on a 2-core CPU at batch 8: without YNNPACK fusions (~8% faster;
# equal at batch 1) and with 512-bit vectors in the loops XLA emits itself (~4%; the ISA caps it on other CPUs).
# Prefill, with its (rows x prompt) matmuls, keeps the defaults.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512}


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= n (at least `minimum`), capped at `cap`."""
    return min(cap, max(minimum, 1 << max(0, n - 1).bit_length()))


def cache_bucket(n: int, cap: int) -> int:
    """The cache length for n positions: the smallest of 128, 192, 256, 384, 512, 768, ... >= n, capped at `cap`.
    Half steps between powers of two: a batch-8 decode step reads its whole cache, so a cache at most 1.5x (not 2x)
    the keys in use is ~7% faster on a 2-core CPU, for one more decode program per power of two."""
    length = MIN_CACHE
    while length < n:
        length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
    return min(length, cap)


def buckets_upto(of, limit: int) -> list[int]:
    """The buckets `of(n)` gives for n = 1, 2, ... up to the one holding `limit` (what a warm-up compiles)."""
    out = [of(1)]
    while out[-1] < of(limit):
        out.append(of(out[-1] + 1))
    return out


@functools.cache
def decode_compiler_options(platform: str) -> dict:
    """Those of CPU_DECODE_OPTIONS that this CPU's XLA knows (each checked once by compiling a one-op program)."""
    if platform != "cpu":
        return {}
    known = {}
    for name, value in CPU_DECODE_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
        except (jax.errors.JaxRuntimeError, ValueError, TypeError):  # an XLA without it, a jit without the kwarg
            continue
        known[name] = value
    return known


def _to_length(x_RSH, length: int):
    """One layer's cache (rows x kv heads, positions, head dim) zero-padded, or cut, to `length` positions. Only
    padding is ever cut: a prompt's bucket can be longer than its first cache bucket (256 and 192 for 130 tokens)."""
    return jnp.pad(x_RSH[:, :length], ((0, 0), (0, max(0, length - x_RSH.shape[1])), (0, 0)))


# ----------------------------------------------------------------------------------------------------------------------
# Device state between decode calls.

@flax.struct.dataclass
class DecodeState:
    cache: gpt.DecodeCache
    token: jax.Array       # (B,) int32: the last emitted token, fed at the next step
    step: jax.Array        # () int32: tokens emitted per row so far
    done: jax.Array        # (B,) bool
    limit: jax.Array       # (B,) int32: a row is done after this many tokens (max_tokens, or a full cache)
    key: jax.Array         # the request's PRNG key
    forced: jax.Array      # (B, FORCED_SLOTS) int32: tokens to emit instead of sampling, in order
    forced_len: jax.Array  # (B,) int32: how many of `forced` are valid
    forced_pos: jax.Array  # (B,) int32: how many of them were emitted
    more: jax.Array        # (B,) bool: more forced tokens wait in Python's queue
    host: jax.Array        # () bool: the last call stopped for Python (a tool call to run, a queue to refill); no
                           # call takes a step until Python clears it


class _Row:
    """Python's view of one row: done or not, the tool call being collected, the forced tokens still to emit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.done = limit <= 0
        self.in_python = False
        self.expr: list[int] = []
        self.queue: list[int] = []


def _is_number(x) -> bool:
    """For checking requests: a real number (not a bool, not a string)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def advance_rows(i, st, tokens_BT, masks_BT, sampled_B, cache, stops, python_end):
    """One decode step's bookkeeping for every row, given what it sampled (the engine's loop and the server's slots
    share it): a queued forced token (a tool's output) wins over the sample, a stop token or the row's limit ends it,
    and the loop hands back to Python for a tool call to run or a forced queue to refill before a row would sample.
    -> the decode loop's next carry (i + 1, state, tokens, masks, stop the chunk?)."""
    forcing = st.forced_pos < st.forced_len
    forced = jnp.take_along_axis(st.forced, jnp.minimum(st.forced_pos, FORCED_SLOTS - 1)[:, None], 1)[:, 0]
    token = jnp.where(forcing, forced, sampled_B)
    forced_pos = st.forced_pos + forcing
    live = ~st.done
    done = st.done | jnp.isin(token, stops) | (st.step + 1 >= st.limit)
    host = jnp.any(live & ~forcing & (token == python_end))
    host |= jnp.any(~done & st.more & (forced_pos >= st.forced_len))
    st = st.replace(cache=cache, token=token, step=st.step + 1, done=done, forced_pos=forced_pos, host=host)
    tokens_BT = jax.lax.dynamic_update_index_in_dim(tokens_BT, token, i, axis=1)
    masks_BT = jax.lax.dynamic_update_index_in_dim(masks_BT, ~forcing, i, axis=1)
    return i + 1, st, tokens_BT, masks_BT, jnp.all(done) | host


class Engine:
    """See the module docstring. `params` are cast once to the compute dtype; set `engine.params` to swap weights
    of the same shapes without recompiling (RL)."""

    def __init__(self, params, cfg: GPTConfig, tokenizer, *, dtype=None, mesh=None, chunk: int = CHUNK):
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.dtype = jnp.dtype(dtype or compute_dtype())
        self.chunk = int(chunk)
        self.compilations = 0  # traces of the jitted prefill / decode functions: stays flat once warm
        self.params = params
        self._prefill_jit = jax.jit(self._prefill, static_argnames=("cache_len", "cap"))
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        options = decode_compiler_options(platform)
        self._decode_jit = jax.jit(self._decode, static_argnames=("cap",), donate_argnums=(1,),
                                   **({"compiler_options": options} if options else {}))
        self._grow_jit = jax.jit(self._grow, static_argnames=("length",))
        specials = set(tokenizer.special_tokens) if hasattr(tokenizer, "special_tokens") else set()
        self._special = lambda name: tokenizer.encode_special(name) if name in specials else None
        self.default_stops = [i for i in map(self._special, DEFAULT_STOPS) if i is not None]
        tool_ids = [self._special(n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                               "<|output_end|>")]
        self._tool_ids = None if None in tool_ids else tool_ids

    # -- weights and layout ------------------------------------------------------------------------------------------

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        params = jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)
        if self.mesh is not None:
            from nanojax import mesh as mesh_lib
            params = jax.device_put(params, mesh_lib.shardings(gpt.param_axes(self.cfg), self.mesh, params))
        self._params = gpt.decode_params(params, self.cfg)

    def _constrain_cache(self, cache: gpt.DecodeCache) -> gpt.DecodeCache:
        """On a mesh, cache rows follow the batch rule of nanojax.mesh (replicated if they do not divide)."""
        if self.mesh is None:
            return cache
        from jax.sharding import NamedSharding
        from nanojax import mesh as mesh_lib
        kv = NamedSharding(self.mesh, mesh_lib.logical_to_mesh(CACHE_AXES, self.mesh, cache.k[0].shape))
        c = jax.lax.with_sharding_constraint
        return cache.replace(k=tuple(c(x, kv) for x in cache.k), v=tuple(c(x, kv) for x in cache.v))

    def _forward(self, params, tokens_BT, cache: gpt.DecodeCache, last=None):
        """(logits, cache): see gpt.cached_forward. The one place the model is called, so tests can script a model."""
        return gpt.cached_forward(params, tokens_BT, cache, self.cfg, self.dtype, last)

    # -- the jitted functions ----------------------------------------------------------------------------------------

    def _prefill(self, params, prompts_PL, length, start_P, rows_B, limit_B, seed, knobs, stops, *,
                 cache_len: int, cap):
        """Run the P distinct prompts once, copy them into the B rows' cache, sample every row's first token.
        Prompt p sits at [start_p, length) of its row of `prompts_PL`; what follows (up to the bucket) is padding,
        computed but never seen, and overwritten by the tokens generated next."""
        self.compilations += 1
        P, L = prompts_PL.shape
        B = rows_B.shape[0]
        cache = gpt.init_decode_cache(self.cfg, P, L, self.dtype).replace(start=start_P)
        logits, cache = self._forward(params, prompts_PL, cache, last=length - 1)
        KV = self.cfg.n_kv_head
        rows_R = (rows_B[:, None] * KV + jnp.arange(KV)[None, :]).reshape(-1)  # each row's kv heads
        grow = lambda x: _to_length(x[rows_R], cache_len)  # noqa: E731
        big = self._constrain_cache(gpt.DecodeCache(k=tuple(map(grow, cache.k)), v=tuple(map(grow, cache.v)),
                                                    pos=length, start=start_P[rows_B]))
        key = jax.random.key(seed)
        row_ids = jnp.arange(B, dtype=jnp.int32)
        token = sample(logits[rows_B, 0], uniforms(key, jnp.zeros((1,), jnp.int32), row_ids)[0], knobs, cap)
        done = jnp.isin(token, stops) | (limit_B <= 1)
        zeros = jnp.zeros((B,), jnp.int32)
        return DecodeState(cache=big, token=token, step=jnp.int32(1), done=done, limit=limit_B, key=key,
                           forced=jnp.zeros((B, FORCED_SLOTS), jnp.int32), forced_len=zeros, forced_pos=zeros,
                           more=jnp.zeros((B,), bool), host=jnp.bool_(False))

    def _grow(self, state: DecodeState, *, length: int) -> DecodeState:
        """The same cache in the next bucket. Caches grow as rows get longer, so attention reads at most 1.5x the
        keys in use (a torch engine slices its cache; XLA shapes are static)."""
        self.compilations += 1
        pad = functools.partial(_to_length, length=length)
        cache = state.cache
        return state.replace(cache=self._constrain_cache(cache.replace(k=tuple(map(pad, cache.k)),
                                                                        v=tuple(map(pad, cache.v)))))

    def _decode(self, params, state: DecodeState, knobs, stops, python_end, *, cap):
        """Up to `chunk` steps on the device, as many as the cache has room for, none while state.host is set.
        Returns (state, tokens (B, chunk), masks (B, chunk), n steps taken, state.host)."""
        self.compilations += 1
        B = state.token.shape[0]
        n_steps = jnp.minimum(self.chunk, state.cache.k[0].shape[1] - state.cache.pos)
        steps_T = state.step + jnp.arange(self.chunk, dtype=jnp.int32)
        u_TB = jax.lax.cond(knobs["temperature"] == 0, lambda: jnp.zeros((self.chunk, B), jnp.float32),
                            lambda: uniforms(state.key, steps_T, jnp.arange(B, dtype=jnp.int32)))

        def step(carry):
            i, st, tokens, masks, _ = carry
            logits, cache = self._forward(params, st.token[:, None], st.cache)
            sampled = sample(logits[:, 0], jax.lax.dynamic_index_in_dim(u_TB, i, keepdims=False), knobs, cap)
            return advance_rows(i, st, tokens, masks, sampled, cache, stops, python_end)

        init = (jnp.int32(0), state, jnp.zeros((B, self.chunk), jnp.int32), jnp.zeros((B, self.chunk), bool),
                jnp.all(state.done) | state.host)
        n, state, tokens, masks, _ = jax.lax.while_loop(lambda c: (c[0] < n_steps) & ~c[4], step, init)
        return state, tokens, masks, n, state.host

    # -- requests ----------------------------------------------------------------------------------------------------

    def _prompts(self, prompt_ids) -> list[list[int]]:
        if isinstance(prompt_ids, np.ndarray):
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise UserError("prompt_ids must be a non-empty list of token ids (or a list of such lists)")
        prompts = [list(p) for p in prompt_ids] if isinstance(prompt_ids[0], (list, tuple, np.ndarray)) \
            else [list(prompt_ids)]
        V, S = self.cfg.vocab_size, self.cfg.max_seq_len
        for p in prompts:
            if not p:
                raise UserError("a prompt is empty: give at least one token (e.g. <|bos|>)")
            if len(p) > S:
                raise UserError(f"a prompt has {len(p)} tokens; the model's context (max_seq_len) is {S}")
            bad = [t for t in p if not (isinstance(t, (int, np.integer)) and 0 <= t < V)]
            if bad:
                raise UserError(f"token ids must be integers in [0, {V}); got {bad[:5]}")
        return [[int(t) for t in p] for p in prompts]

    def _check_sampling(self, num_samples, max_tokens, temperature, top_k, top_p, seed):
        """A UserError naming the first bad setting of a request."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise UserError(f"num_samples must be a positive integer, got {num_samples!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise UserError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        if not (_is_number(temperature) and temperature >= 0):
            raise UserError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise UserError(f"top_k must be a non-negative integer or None (0 = off), got {top_k!r}")
        if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
            raise UserError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise UserError(f"seed must be an integer, got {seed!r}")

    def generate(self, prompt_ids, *, num_samples: int = 1, max_tokens: int | None = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 42, stop_tokens=None,
                 tools: bool = True):
        """Yield (token_column, mask_column) per step, one entry per row (rows that are done keep appearing with
        filler tokens until every row is done, as nanochat's engine does). stop_tokens: ids that end a row (default
        <|assistant_end|> and <|bos|>); tools: run the calculator on <|python_start|>..<|python_end|>."""
        prompts = self._prompts(prompt_ids)
        self._check_sampling(num_samples, max_tokens, temperature, top_k, top_p, seed)
        stops = self.default_stops if stop_tokens is None else [int(t) for t in stop_tokens]
        if len(stops) > STOP_SLOTS:
            raise UserError(f"at most {STOP_SLOTS} stop tokens, got {len(stops)}")
        top_k = min(top_k, self.cfg.vocab_size) if top_k else None
        cap = top_k_cap(top_k, self.cfg.vocab_size)
        knobs = {"temperature": np.float32(temperature), "top_k": np.int32(top_k or 0),
                 "top_p": np.float32(1.0 if top_p is None else top_p)}
        tool_ids = self._tool_ids if tools else None

        # Buckets: rows, prompt length, cache length.
        length = max(len(p) for p in prompts)
        S_max = self.cfg.max_seq_len
        n_rows = len(prompts) * num_samples
        B = 1 << (n_rows - 1).bit_length()
        P = 1 << (len(prompts) - 1).bit_length()
        S = cache_bucket(length + 1, S_max)  # the next bucket once full
        prompts_PL = np.zeros((P, bucket(length, S_max)), np.int32)
        start_P = np.zeros((P,), np.int32)
        for i, p in enumerate(prompts):
            start_P[i] = length - len(p)
            prompts_PL[i, start_P[i]:length] = p
        rows_B = np.array([r // num_samples for r in range(n_rows)] + [0] * (B - n_rows), np.int32)
        limits = [min(max_tokens or S_max, S_max - length + 1)] * n_rows  # the last token is never written
        limit_B = np.array(limits + [0] * (B - n_rows), np.int32)  # padding rows are done from the start
        stops_arr = np.array(stops + [-1] * (STOP_SLOTS - len(stops)), np.int32)

        state = self._prefill_jit(self._params, prompts_PL, np.int32(length), start_P, rows_B, limit_B,
                                  np.uint32(seed % 2 ** 32), knobs, stops_arr, cache_len=S, cap=cap)
        rows = [_Row(limit) for limit in limits]
        stop_set = set(stops)
        column = np.asarray(state.token)[:n_rows].tolist()
        yield from self._emit([column], [[1] * n_rows], rows, stop_set, tool_ids)
        decode = functools.partial(self._decode_jit, self._params, knobs=knobs, stops=stops_arr, cap=cap,
                                   python_end=np.int32(tool_ids[1] if tool_ids else -1))
        pos = length  # where the next token is written (the one just sampled)
        call = None
        while not all(r.done for r in rows):
            if call is None:  # Python's turn: forced tokens from the rows' queues
                if pos >= S:  # rows end by max_seq_len (their limit), and caches grow ahead: never loop idle
                    raise RuntimeError(f"engine bug: no room in the cache at position {pos} of {S}")
                call = decode(self._hand_over(state, rows))
            # Queue the next call before reading this one: the device runs on while Python streams. When this call
            # stops for Python (state.host), the next one takes no step and Python takes over. A call that may fill
            # the cache is followed by a bigger cache (padding only, harmless if it stopped early), unless every row
            # ends first.
            upcoming = call[0]
            longest = max(r.limit for r in rows if not r.done)  # tokens a live row may still emit
            if pos + self.chunk >= S and S < S_max and longest > S - pos:
                S = cache_bucket(S + 1, S_max)
                upcoming = self._grow_jit(upcoming, length=S)
            upcoming = decode(upcoming)
            _, tokens, masks, n, host = call
            n = int(n)
            pos += n
            tokens = np.asarray(tokens)[:n_rows, :n].T.tolist()
            masks = np.asarray(masks)[:n_rows, :n].T.astype(int).tolist()
            yield from self._emit(tokens, masks, rows, stop_set, tool_ids)
            state, call = upcoming[0], (None if bool(host) or pos >= S else upcoming)

    def _hand_over(self, state: DecodeState, rows) -> DecodeState:
        """The state with each live row's queued tokens (up to FORCED_SLOTS of them) to force, host flag cleared."""
        B = state.token.shape[0]
        forced = np.zeros((B, FORCED_SLOTS), np.int32)
        forced_len = np.zeros((B,), np.int32)
        more = np.zeros((B,), bool)
        for i, r in enumerate(rows):
            if r.queue and not r.done:
                n = min(len(r.queue), FORCED_SLOTS)
                forced[i, :n], forced_len[i], more[i] = r.queue[:n], n, len(r.queue) > n
        return state.replace(forced=jnp.asarray(forced), forced_len=jnp.asarray(forced_len),
                             forced_pos=jnp.zeros((B,), jnp.int32), more=jnp.asarray(more), host=jnp.bool_(False))

    def _emit(self, token_columns, mask_columns, rows, stop_set, tool_ids):
        """Advance Python's per-row state over some columns (done rows, tool calls, forced queues) and yield them."""
        for tokens, masks in zip(token_columns, mask_columns):
            for r, token, mask in zip(rows, tokens, masks):
                if r.done:
                    continue
                r.limit -= 1
                if mask == 0:
                    r.queue.pop(0)
                if token in stop_set or r.limit <= 0:
                    r.done = True
                elif tool_ids is not None:
                    self._tool_step(r, token, tool_ids)
            yield tokens, masks
            if all(r.done for r in rows):
                return

    def _tool_step(self, row: _Row, token: int, tool_ids):
        python_start, python_end, output_start, output_end = tool_ids
        if token == python_start:
            row.in_python, row.expr = True, []
        elif token == python_end and row.in_python:
            row.in_python = False
            result = calculator(self.tokenizer.decode(row.expr))
            if result is not None:
                row.queue += [output_start] + self.tokenizer.encode(result) + [output_end]
        elif row.in_python:
            row.expr.append(token)

    def generate_batch(self, prompt_ids, *, num_samples: int = 1, **kwargs):
        """-> (sequences, masks), one per row: the prompt then the completion without its terminal (stop) token;
        mask 0 on the prompt and on forced tokens, 1 on sampled ones (nanochat's generate_batch)."""
        prompts = self._prompts(prompt_ids)
        stops = set(self.default_stops if kwargs.get("stop_tokens") is None else kwargs["stop_tokens"])
        seqs = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(s) for s in seqs]
        done = [False] * len(seqs)
        for tokens, mask_col in self.generate(prompts, num_samples=num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(tokens, mask_col)):
                if done[i]:
                    continue
                if token in stops:
                    done[i] = True
                else:
                    seqs[i].append(token)
                    masks[i].append(mask)
        return seqs, masks

    def stream_text(self, prompt_ids, **kwargs):
        """Text deltas of row 0 as tokens arrive; a multi-byte character split over tokens comes out whole.
        Special tokens (tool calls) appear as their names; the stop token does not appear."""
        stops = set(self.default_stops if kwargs.get("stop_tokens") is None else kwargs["stop_tokens"])
        text = TextStream(self.tokenizer)
        for tokens, _ in self.generate(prompt_ids, **{**kwargs, "num_samples": 1}):
            if tokens[0] in stops:
                break
            if delta := text.push(tokens[0]):
                yield delta
        if tail := text.flush():
            yield tail

    def complete(self, text: str, **kwargs) -> str:
        """Continue raw text (a base model's job): BOS + text in, the continuation out."""
        return "".join(self.stream_text(self.tokenizer.encode(text, prepend=self.tokenizer.bos_id), **kwargs))

    def chat(self, conversation, **kwargs) -> str:
        """The assistant's reply to a user string, a list of messages or a {"messages": [...]} conversation."""
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        return "".join(self.stream_text(self.tokenizer.render_for_completion(conversation), **kwargs))


class TextStream:
    """Token ids in, text out, holding back the bytes of a character that is not complete yet."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
