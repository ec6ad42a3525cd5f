"""nanojax.batching: requests joining and leaving a running decode batch get exactly what engine.generate gives them
alone; cancelled rows are freed; shapes stay in buckets; a full queue is refused; tool calls and stops work per row."""
import pytest

from nanojax.batching import ADMIT_S, QueueFull, Slots
from test_engine import engines, models, prompt_of, scripted, special, byte_ids, tok  # noqa: F401  (fixtures)


def collect(slots, outs):
    def on_tokens(req, tokens, masks):
        outs.setdefault(req.id, []).extend(tokens)
    return on_tokens


@pytest.mark.slow  # compiles batches of 1, 2 and 4 rows and two cache buckets
def test_joining_and_leaving_requests_get_what_generate_gives_alone(engines):
    """Requests join a running batch at a later device call (one with a prompt longer than the batch's position, so
    the batch shifts), others finish early, the batch grows past a cache bucket: each request's tokens equal
    engine.generate's for the same prompt, settings and seed, greedy and sampled."""
    engine = engines["mha"]  # max_seq_len 256
    specs = [(5, 150, 0.0, 0, None), (20, 3, 0.0, 0, None), (9, 40, 1.0, 5, None), (60, 50, 0.8, 0, 0.9),
             (12, 30, 0.7, 20, None)]
    kw = lambda n, m, T, k, p: dict(max_tokens=m, temperature=T, top_k=k, top_p=p, seed=n)  # noqa: E731
    slots = Slots(engine, max_batch=4, stop_tokens=[])
    outs, reqs = {}, []

    def submit(spec, on_tokens):
        reqs.append(slots.submit(prompt_of(spec[0], spec[0]), on_tokens=on_tokens, **kw(*spec)))

    def first_then_more(req, tokens, masks):  # the long request brings the others once it has 40 tokens
        collect(slots, outs)(req, tokens, masks)
        if len(outs[req.id]) >= 40 and len(reqs) == 2:
            for spec in specs[2:]:
                submit(spec, collect(slots, outs))

    submit(specs[0], first_then_more)
    submit(specs[1], collect(slots, outs))
    slots.run_until_idle()
    stats = slots.stats()
    assert stats["requests"] == 5 and stats["active"] == 0 and stats["finished"] == {"length": 5}
    assert stats["turns"] >= 3 and stats["tokens"] == sum(s[1] for s in specs)
    assert stats["prefill_calls"] == 2  # the first two in one group of 4 rows, the three later ones in another
    for req, spec in zip(reqs, specs):
        n = spec[0]
        want = engine.generate_batch(prompt_of(n, n), stop_tokens=[], **kw(*spec))[0][0][n:]
        assert outs[req.id] == want and req.finish_reason == "length", spec


@pytest.mark.parametrize("max_batch, steps", [(2, [5, 5, 5, 5]), (1, [20])])
def test_calls_are_short_while_a_row_is_free_and_whole_chunks_when_the_batch_is_full(engines, max_batch, steps):
    """With a free row, a call takes the steps that last ADMIT_S at the measured step time (5 here), so a request
    arriving mid-call waits little; a full batch takes whole chunks."""
    slots = Slots(engines["gqa"], max_batch=max_batch, stop_tokens=[])
    slots._step_s = {1: ADMIT_S / 5.5}
    slots._timed = lambda *_: None  # the step time stays as set
    taken, decode = [], slots._decode_jit

    def recording(*args, **kw):
        out = decode(*args, **kw)
        taken.append(out[3])
        return out
    slots._decode_jit = recording
    req = slots.submit(prompt_of(6), max_tokens=21, temperature=0)  # the first token comes from the prefill
    slots.run_until_idle()
    assert req.generated == 21 and [int(n) for n in taken if int(n)] == steps
    slots.close()


def test_a_cache_about_to_fill_grows_on_the_device_without_a_turn(engines):
    """As the engine's does: the next bucket is queued behind the running call instead of a turn that stops the
    device. A lone request from the cache bucket 128 into 192 takes one turn (its admission)."""
    engine = engines["mha"]  # max_seq_len 256
    slots = Slots(engine, max_batch=2, stop_tokens=[])
    outs = {}
    req = slots.submit(prompt_of(6, 3), max_tokens=150, temperature=0, on_tokens=collect(slots, outs))
    slots.run_until_idle()
    assert slots.stats()["turns"] == 1 and req.finish_reason == "length"
    want = engine.generate_batch(prompt_of(6, 3), max_tokens=150, temperature=0, stop_tokens=[])[0][0][6:]
    assert outs[req.id] == want
    slots.close()


def test_cancelled_requests_free_their_rows_and_others_go_on(engines):
    engine = engines["gqa"]
    slots = Slots(engine, max_batch=4, stop_tokens=[])
    outs = {}
    reqs = [slots.submit(prompt_of(6, i), max_tokens=60, temperature=0, on_tokens=collect(slots, outs))
            for i in range(4)]

    def cancel_two(req, tokens, masks):
        collect(slots, outs)(req, tokens, masks)
        if len(outs[req.id]) >= 10:
            slots.cancel(reqs[1])
            slots.cancel(reqs[2])
    reqs[0].on_tokens = cancel_two
    slots.run_until_idle()
    assert [r.finish_reason for r in reqs] == ["length", "cancelled", "cancelled", "length"]
    assert len(outs[reqs[1].id]) < 60 and slots.stats()["finished"] == {"length": 2, "cancelled": 2}
    for i in (0, 3):
        assert outs[reqs[i].id] == engine.generate_batch(prompt_of(6, i), max_tokens=60, temperature=0,
                                                         stop_tokens=[])[0][0][6:]
    stats = slots.stats()
    assert stats["active"] == 0 and stats["free_slots"] == 4 and stats["waiting"] == 0
    waiting = slots.submit(prompt_of(3), max_tokens=5)
    slots.cancel(waiting)  # never ran: finished at once
    assert waiting.finish_reason == "cancelled" and slots.stats()["waiting"] == 0


@pytest.mark.slow  # compiles 20 programs ahead
def test_warm_up_compiles_every_program_so_requests_compile_nothing_and_a_bounded_queue(engines):
    """warm_up compiles the prefill of each prompt bucket, the decode loop of each (rows, cache) bucket and the turns'
    cache edits; requests within them (top-k up to 64 or off, greedy, top-p; one or two rows joining and leaving;
    prompts of three buckets) then make XLA compile nothing at all."""
    engine = engines["gqa"]  # context 128: rows 1 and 2, prompt buckets 16-128, one cache bucket (128)
    slots = Slots(engine, max_batch=2, max_queue=3, stop_tokens=[])
    # prefills + per row bucket: decode, first tokens' write (one prefill size), writes of each prompt bucket, a
    # gather from the other row bucket, a shift
    assert slots.warm_up() == 4 + 2 * (1 + 1 + 4 + 1 + 1)
    warm = slots.stats()["warm_up"]
    assert (warm["programs"], warm["compiled"], warm["done"]) == (20, 20, True)
    compiles = slots.stats()["compilations"]

    def pair(i):  # a top-k row and a greedy/top-p row; either may outlive the other (batch 2, then 1)
        slots.submit(prompt_of(17 + 9 * i, i), max_tokens=5 + i, temperature=0.9, top_k=33 + 10 * i, seed=i)
        slots.submit(prompt_of(10 + i, i), max_tokens=7, temperature=0.0, top_p=0.5 + i / 20, seed=i)
        slots.run_until_idle()
    for i in range(4):
        pair(i)
    slots.submit(prompt_of(3), max_tokens=3, temperature=1.0, seed=9)  # alone, top-k off
    slots.run_until_idle()
    assert slots.stats()["compilations"] == compiles, "a request within the warmed buckets compiled a program"
    for i in range(5):  # 2 rows may be taken by the loop at once; here nothing runs: 2 free rows + 3 queued
        slots.submit(prompt_of(5), max_tokens=2)
    with pytest.raises(QueueFull):
        slots.submit(prompt_of(5), max_tokens=2)
    assert slots.stats()["rejected"] == 1
    slots.run_until_idle()
    assert slots.stats()["finished"]["length"] == 9 + 5


def test_stops_and_calculator_calls_per_row(scripted, tok):
    """A scripted model: one row stops at <|assistant_end|>, another calls the calculator and gets its output
    forced in (mask 0), as engine.generate does."""
    bos, ps, pe = tok.bos_id, special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe, end = special(tok, "<|output_start|>"), special(tok, "<|output_end|>"), special(tok, "<|assistant_end|>")
    x, seven, times, six, z = byte_ids(tok, "X7*6Z")
    chain = [x, ps, seven, times, six, pe]
    scripted.script(bigram=dict(zip(chain, chain[1:])) | {oe: z, z: end})
    slots = Slots(scripted, max_batch=2)
    got = {}

    def on_tokens(req, tokens, masks):
        got.setdefault(req.id, ([], []))
        got[req.id][0].extend(tokens)
        got[req.id][1].extend(masks)
    tool = slots.submit([bos, x], temperature=0, on_tokens=on_tokens)
    plain = slots.submit([bos, z], temperature=0.5, on_tokens=on_tokens)
    slots.run_until_idle()
    output = [os_] + tok.encode("42") + [oe]
    assert got[tool.id] == (chain[1:] + output + [z], [1] * 5 + [0] * len(output) + [1])
    assert got[plain.id] == ([], []) and plain.finish_reason == tool.finish_reason == "stop"
