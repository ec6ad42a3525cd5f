import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax import engine as engine_lib
from nanojax import gpt
from nanojax import mesh as meshlib
from nanojax.common import UserError
from nanojax.config import GPTConfig
from nanojax.engine import Engine, FORCED_SLOTS, cache_bucket, decode_compiler_options
from tokenizer import Tokenizer

VOCAB = 300
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which one two three "
         "héllo wörld café naïve 7*6 12+30 strawberry").split()


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: a 300-token tokenizer, random-weight MHA and GQA models, and one engine per model, shared by the tests
# (each engine compiles once per bucket; the tests reuse the same buckets).

@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, 40)) for _ in range(300)]
    return Tokenizer.train(iter(docs), VOCAB)


MHA = GPTConfig(vocab_size=VOCAB, depth=2, model_dim=64, n_head=4, n_kv_head=4, head_dim=16, max_seq_len=256)
GQA = GPTConfig(vocab_size=VOCAB, depth=2, model_dim=64, n_head=4, n_kv_head=2, head_dim=16, max_seq_len=128)


def random_params(cfg, seed=0):
    """Init zeroes lm_head and the output projections: fill every weight so the logits depend on all of them.
    (numpy draws: no compilation.)"""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) / math.sqrt(x.shape[-2])),
                        gpt.abstract_params(cfg))


@pytest.fixture(scope="module")
def models(tok):
    return {name: (cfg, random_params(cfg, seed)) for seed, (name, cfg) in enumerate((("mha", MHA), ("gqa", GQA)))}


@pytest.fixture(scope="module")
def engines(models, tok):
    return {name: Engine(params, cfg, tok, dtype=jnp.float32) for name, (cfg, params) in models.items()}


_full_forward = jax.jit(gpt.forward, static_argnames=("cfg",))


def assert_greedy(seq, start, params, cfg, tol=1e-4):
    """Every generated token is the argmax of a full (uncached) forward over the sequence before it. The forward is
    causal, so one call over the whole sequence gives the logits at every step. A near-tie may go either way."""
    logits = np.asarray(_full_forward(params, jnp.asarray([seq], jnp.int32), cfg=cfg))[0]
    for i in range(start, len(seq)):
        row = logits[i - 1]
        assert row[seq[i]] >= row.max() - tol, (i, seq[i], int(row.argmax()))


def prompt_of(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB - 9, n).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Correctness against the model.

@pytest.mark.parametrize("name, prompt_len", [("mha", 80), ("gqa", 7)])
def test_greedy_with_cache_equals_full_forward_for_64_steps(engines, models, name, prompt_len):
    cfg, params = models[name]
    prompt = prompt_of(prompt_len)
    seqs, masks = engines[name].generate_batch(prompt, max_tokens=64, temperature=0, stop_tokens=[])
    assert seqs[0][:prompt_len] == prompt and len(seqs[0]) == prompt_len + 64  # chunk boundaries and (MHA) a growth
    assert masks[0] == [0] * prompt_len + [1] * 64
    assert_greedy(seqs[0], prompt_len, params, cfg)
    assert len(set(seqs[0][prompt_len:])) > 5  # not a degenerate model


def test_prompts_of_different_lengths_in_one_batch(engines, models):
    cfg, params = models["gqa"]
    prompts = [prompt_of(11, 1), prompt_of(3, 2)]
    seqs, masks = engines["gqa"].generate_batch(prompts, num_samples=2, max_tokens=12, temperature=0, stop_tokens=[])
    assert len(seqs) == 4
    for r, seq in enumerate(seqs):
        prompt = prompts[r // 2]
        assert seq[:len(prompt)] == prompt and len(seq) == len(prompt) + 12
        assert masks[r] == [0] * len(prompt) + [1] * 12
        assert_greedy(seq, len(prompt), params, cfg)
    assert seqs[0] == seqs[1] and seqs[0] != seqs[2]


def test_swapping_params_changes_output_without_recompiling(engines, models):
    engine = engines["gqa"]
    cfg, params = models["gqa"]
    prompt = prompt_of(5)
    before = engine.generate_batch(prompt, max_tokens=8, temperature=0, stop_tokens=[])[0][0]
    compiles = engine.compilations
    other = random_params(cfg, seed=7)
    engine.params = other
    try:
        after = engine.generate_batch(prompt, max_tokens=8, temperature=0, stop_tokens=[])[0][0]
    finally:
        engine.params = params
    assert engine.compilations == compiles and after != before
    assert_greedy(after, 5, other, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling.

def test_same_seed_same_output_and_seeds_differ(engines):
    engine = engines["gqa"]
    run = lambda seed, **kw: engine.generate_batch(prompt_of(6), max_tokens=40, temperature=1.0, seed=seed,  # noqa
                                                   stop_tokens=[], **kw)[0][0]
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert run(1, top_p=0.9) == run(1, top_p=0.9) != a  # the nucleus path is reproducible too


def test_top_k_1_and_tiny_top_p_equal_greedy(engines):
    engine = engines["gqa"]
    kw = dict(max_tokens=30, stop_tokens=[])
    greedy = engine.generate_batch(prompt_of(9), temperature=0, **kw)[0][0]
    assert engine.generate_batch(prompt_of(9), temperature=1.5, top_k=1, seed=3, **kw)[0][0] == greedy
    assert engine.generate_batch(prompt_of(9), temperature=1.5, top_p=1e-6, seed=3, **kw)[0][0] == greedy


def test_num_samples_rows_are_independent(engines):
    engine = engines["gqa"]
    seqs, _ = engine.generate_batch(prompt_of(6), num_samples=4, max_tokens=20, temperature=1.0, seed=5,
                                    stop_tokens=[])
    assert len({tuple(s) for s in seqs}) == 4
    again, _ = engine.generate_batch(prompt_of(6), num_samples=4, max_tokens=20, temperature=1.0, seed=5,
                                     stop_tokens=[])
    assert again == seqs
    greedy, _ = engine.generate_batch(prompt_of(6), num_samples=4, max_tokens=20, temperature=0, stop_tokens=[])
    assert all(s == greedy[0] for s in greedy)


def test_decode_programs_leave_out_ynnpack_fusions_on_cpus():
    """The decode loop compiles without XLA:CPU's YNNPACK fusions (faster at batch 8); other backends get no option."""
    assert decode_compiler_options("gpu") == {}
    options = decode_compiler_options("cpu")
    assert options == engine_lib.CPU_DECODE_OPTIONS  # this jaxlib knows them all
    matmul_exp = lambda a, b: jnp.exp(a @ b).max(-1)  # noqa: E731
    a, b = jnp.ones((8, 256)), jnp.ones((256, 1024))
    assert "__ynn_fusion" in jax.jit(matmul_exp).lower(a, b).compile().as_text()  # the default does fuse this
    assert "__ynn_fusion" not in jax.jit(matmul_exp, compiler_options=options).lower(a, b).compile().as_text()


# ----------------------------------------------------------------------------------------------------------------------
# Buckets and compilation.

def test_no_recompilation_across_20_requests_within_one_bucket(engines):
    engine = engines["mha"]
    kw = dict(max_tokens=6, temperature=0.8, top_k=20, stop_tokens=[])
    engine.generate_batch(prompt_of(17), seed=0, **kw)  # warm: prompt bucket 32, cache bucket 128
    compiles = engine.compilations
    lengths = [17 + (7 * i) % 16 for i in range(20)]  # 17..32, all in the bucket of 32
    for i, n in enumerate(lengths):
        seqs, _ = engine.generate_batch(prompt_of(n, i), seed=i, top_p=0.5 + i / 40, **{**kw, "top_k": 17 + i % 16})
        assert len(seqs[0]) == n + 6
    assert engine.compilations == compiles, "a prompt length, seed or sampling knob within a bucket recompiled"
    engine.generate_batch(prompt_of(40), **kw)  # the next prompt bucket (64): new programs
    assert engine.compilations > compiles


def test_cache_buckets_and_growth(engines, models, monkeypatch):
    """Cache lengths step through 128, 192, 256, 384, ...; a cache grows once full, and only if some row goes on."""
    assert [cache_bucket(n, 2048) for n in (1, 128, 129, 193, 257, 385, 1537, 4000)] == \
        [128, 128, 192, 256, 384, 512, 2048, 2048]
    engine = engines["mha"]  # max_seq_len 256
    grown = []
    grow = engine._grow_jit
    monkeypatch.setattr(engine, "_grow_jit", lambda state, length: grown.append(length) or grow(state, length=length))
    kw = dict(temperature=0, stop_tokens=[])
    seqs, _ = engine.generate_batch(prompt_of(17), max_tokens=112, **kw)  # the last token sampled at position 127
    assert len(seqs[0]) == 17 + 112 and grown == []
    seqs, _ = engine.generate_batch(prompt_of(17), max_tokens=200, **kw)
    assert len(seqs[0]) == 17 + 200 and grown == [192, 256]
    prompt = prompt_of(130)  # a prompt bucket of 256, a cache bucket of 192: the prefill cuts padding only
    seqs, _ = engine.generate_batch(prompt, max_tokens=70, **kw)
    assert len(seqs[0]) == 200 and grown == [192, 256, 256]
    assert_greedy(seqs[0], 130, *reversed(models["mha"]))


def test_max_seq_len_bounds_generation(engines):
    engine = engines["gqa"]  # max_seq_len 128
    seqs, _ = engine.generate_batch(prompt_of(125), max_tokens=None, temperature=0, stop_tokens=[])
    assert len(seqs[0]) == 129  # 4 new tokens: the last one is never written to the cache
    seqs, _ = engine.generate_batch(prompt_of(128), max_tokens=50, temperature=0, stop_tokens=[])
    assert len(seqs[0]) == 129
    with pytest.raises(UserError, match="129 tokens"):
        engine.generate_batch(prompt_of(129))


@pytest.mark.parametrize("bad, match", [
    (dict(prompt_ids=[]), "non-empty"),
    (dict(prompt_ids=[1, VOCAB]), r"\[0, 300\)"),
    (dict(num_samples=0), "num_samples"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature="hot"), "temperature must be >= 0, got 'hot'"),
    (dict(seed="x"), "seed must be an integer, got 'x'"),
    (dict(stop_tokens=list(range(9))), "stop tokens"),
])
def test_bad_requests_are_user_errors(engines, bad, match):
    kwargs = {"prompt_ids": [1, 2, 3], **bad}
    with pytest.raises(UserError, match=match):
        engines["gqa"].generate_batch(kwargs.pop("prompt_ids"), **kwargs)


def test_sharded_over_8_devices_equals_one_device(engines, models, tok):
    cfg, params = models["gqa"]
    sharded = Engine(params, cfg, tok, dtype=jnp.float32, mesh=meshlib.make_mesh("8"))
    assert sharded.params["layers"][0]["attn_qkv"].sharding.mesh.size == 8
    kw = dict(num_samples=8, max_tokens=10, temperature=0.7, seed=4, stop_tokens=[])
    got, _ = sharded.generate_batch(prompt_of(5), **kw)
    want, _ = engines["gqa"].generate_batch(prompt_of(5), **kw)
    assert got == want


# ----------------------------------------------------------------------------------------------------------------------
# A scripted model inside the real engine: stops, streaming, the calculator tool.

class ScriptedEngine(Engine):
    """The real engine (prefill, device loop, cache, sampling) around a scripted next-token rule: the token at
    position p+1 is `by_position[p+1]` if set, else `bigram[token at p]` if set, else <|assistant_end|>. The script
    lives in the params pytree, so changing it does not recompile."""

    def script(self, by_position=(), bigram=None):
        table = np.full(self.cfg.vocab_size, -1, np.int32)
        for a, b in (bigram or {}).items():
            table[a] = b
        positions = np.full(self.cfg.max_seq_len + 1, -1, np.int32)
        positions[:len(by_position)] = by_position
        self._params = {**self._params, "bigram": jnp.asarray(table), "by_position": jnp.asarray(positions)}

    def _forward(self, params, tokens_BT, cache, last=None):
        logits, new_cache = super()._forward(params, tokens_BT, cache, last)  # the real model fills the real cache
        T = tokens_BT.shape[1]
        positions = cache.pos + jnp.arange(T)
        by_position = params["by_position"][jnp.minimum(positions + 1, self.cfg.max_seq_len)][None, :]
        nxt = jnp.where(by_position >= 0, by_position, params["bigram"][tokens_BT])
        nxt = jnp.where(nxt >= 0, nxt, self.tokenizer.encode_special("<|assistant_end|>"))
        if last is not None:
            nxt = jax.lax.dynamic_slice_in_dim(nxt, last, 1, axis=1)
        return 30.0 * jax.nn.one_hot(nxt, self.cfg.vocab_size), new_cache


@pytest.fixture(scope="module")
def scripted(models, tok):
    cfg, params = models["gqa"]
    engine = ScriptedEngine(params, cfg, tok, dtype=jnp.float32)
    engine.script()
    return engine


def special(tok, name):
    return tok.encode_special(name)


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (the 256 single-byte tokens), so multi-byte characters are split across tokens."""
    ids = {tok.id_to_token_bytes(i): i for i in range(256)}
    return [ids[bytes([b])] for b in text.encode()]


def test_stop_tokens_and_max_tokens(scripted, tok):
    bos, end = tok.bos_id, special(tok, "<|assistant_end|>")
    a, b, c = tok.encode("the"), tok.encode(" of"), tok.encode(" and")
    body = a + b + c
    scripted.script([bos] + body + [end] + a * 5)
    seqs, masks = scripted.generate_batch([bos], temperature=0)
    assert seqs == [[bos] + body] and masks == [[0] + [1] * len(body)]  # the terminal token is dropped
    columns = list(scripted.generate([bos], temperature=0))
    assert [col[0] for col, _ in columns] == body + [end]  # generate yields it, then ends
    seqs, _ = scripted.generate_batch([bos], temperature=0, stop_tokens=[])
    assert seqs[0][1:len(body) + 2] == body + [end]  # no stops: it runs on
    assert len(scripted.generate_batch([bos], temperature=0, max_tokens=2)[0][0]) == 3
    assert len(list(scripted.generate([bos], temperature=0, max_tokens=2))) == 2
    scripted.script([bos] + a + [bos] + b)
    assert scripted.generate_batch([bos], temperature=0)[0] == [[bos] + a]  # <|bos|> ends a row too


def test_stream_text_never_splits_a_character(scripted, tok):
    text = "héllo wörld ✓ 😀 naïve"
    scripted.script([tok.bos_id] + byte_ids(tok, text) + [special(tok, "<|assistant_end|>")])
    deltas = list(scripted.stream_text([tok.bos_id], temperature=0))
    assert deltas == list(text)  # one delta per character although é, ö, ✓, 😀, ï span 2-4 tokens
    assert scripted.complete("", temperature=0) == text


def test_chat_renders_the_conversation_and_returns_the_reply(scripted, tok):
    prompt = tok.render_for_completion([{"role": "user", "content": "hello"}])
    reply = " the answer is one"
    scripted.script(prompt + tok.encode(reply) + [special(tok, "<|assistant_end|>")])
    assert scripted.chat("hello", temperature=0) == reply
    assert scripted.chat({"messages": [{"role": "user", "content": "hello"}]}, temperature=0.9, seed=1) == reply


def test_a_python_call_gets_the_calculator_output_forced_in(scripted, tok):
    """The model writes <|python_start|>7*6<|python_end|>; the engine forces <|output_start|>42<|output_end|> (mask
    0) and the model continues from there: the bigram model emits Z only after <|output_end|>, so Z proves the forced
    tokens went through the model and its cache."""
    bos, ps, pe = tok.bos_id, special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe, end = special(tok, "<|output_start|>"), special(tok, "<|output_end|>"), special(tok, "<|assistant_end|>")
    x, seven, times, six, z = byte_ids(tok, "X7*6Z")
    chain = [x, ps, seven, times, six, pe]
    bigram = dict(zip(chain, chain[1:])) | {oe: z, z: end}
    scripted.script(bigram=bigram)
    output = [os_] + tok.encode("42") + [oe]
    for temperature in (0.0, 1.0):
        seqs, masks = scripted.generate_batch([bos, x], num_samples=2, temperature=temperature, seed=1)
        for seq, mask in zip(seqs, masks):
            assert seq == [bos] + chain + output + [z]
            assert mask == [0, 0] + [1] * 5 + [0] * len(output) + [1]
    # Without tools, or when the calculator refuses, nothing is forced.
    seqs, _ = scripted.generate_batch([bos, x], temperature=0, tools=False, max_tokens=8)
    assert os_ not in seqs[0] and seqs[0][:7] == [bos] + chain
    refused = [x, ps, seven, z, pe, end]  # <|python_start|>7Z<|python_end|>: not arithmetic
    scripted.script(bigram=dict(zip(refused, refused[1:])))
    seqs, masks = scripted.generate_batch([bos, x], temperature=0)
    assert seqs[0] == [bos, x, ps, seven, z, pe] and 0 not in masks[0][2:]


def test_a_long_tool_output_is_fed_across_refills(scripted, tok):
    bos, ps, pe = tok.bos_id, special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe, end = special(tok, "<|output_start|>"), special(tok, "<|output_end|>"), special(tok, "<|assistant_end|>")
    expr = "*".join(["999999999"] * 5)
    result = str(999999999 ** 5)
    output = [os_] + tok.encode(result) + [oe]
    assert len(output) > FORCED_SLOTS  # more than one device call's worth of forced tokens
    expr_ids = tok.encode(expr)
    z = byte_ids(tok, "Z")[0]
    scripted.script([bos, ps] + expr_ids + [pe] + [-1] * len(output) + [z, end])
    seqs, masks = scripted.generate_batch([bos], temperature=0)
    assert seqs[0] == [bos, ps] + expr_ids + [pe] + output + [z]
    assert masks[0] == [0] + [1] * (len(expr_ids) + 2) + [0] * len(output) + [1]


def test_tool_calls_at_every_offset_of_a_device_call(scripted, tok):
    """The next device call is queued before Python reads the current one: a tool call (and its forced output)
    landing at any step of a call, across call boundaries, still comes out exactly once and in order."""
    bos, ps, pe = tok.bos_id, special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe, end = special(tok, "<|output_start|>"), special(tok, "<|output_end|>"), special(tok, "<|assistant_end|>")
    a, z = byte_ids(tok, "aZ")
    expr = byte_ids(tok, "7*6")
    output = [os_] + tok.encode("42") + [oe]
    for filler in range(scripted.chunk - 8, scripted.chunk + 4):
        body = [a] * filler + [ps] + expr + [pe]
        scripted.script([bos] + body + [-1] * len(output) + [z, end])
        seqs, masks = scripted.generate_batch([bos], temperature=0)
        assert seqs[0] == [bos] + body + output + [z], filler
        assert masks[0] == [0] + [1] * len(body) + [0] * len(output) + [1], filler
