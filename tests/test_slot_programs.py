"""nanojax.slot_programs: joiners go in few group sizes; a group's prefill gives each joiner what a prefill of its
own gives; its first tokens land in their rows on the device; the decode loop takes at most the steps it is asked
for."""
import functools

import jax
import numpy as np

from nanojax import slot_programs
from nanojax.batching import Slots
from nanojax.slot_programs import prefill_groups
from test_engine import engines, models, prompt_of, tok  # noqa: F401  (fixtures)


def test_joiners_are_prefilled_in_few_group_sizes_with_little_padding():
    sizes = [1, 4, 16]  # Slots(max_batch=32).prefill_sizes
    assert {n: prefill_groups(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16, 31, 33)} == {
        1: [1], 2: [4], 3: [4], 5: [4, 1], 8: [16], 9: [16], 16: [16], 31: [16, 16], 33: [16, 16, 1]}
    assert prefill_groups(3, [1]) == [1, 1, 1]


def test_a_groups_prefill_gives_each_joiner_what_its_own_prefill_gives(engines):
    engine = engines["gqa"]
    prefill = jax.jit(functools.partial(slot_programs.prefill, engine), static_argnames=("cap",))
    lengths, L = [5, 17, 32], 32  # and a padding row: a group of 4
    prompts, start = np.zeros((4, L), np.int32), np.full((4,), L - 1, np.int32)
    for p, n in enumerate(lengths):
        prompts[p, L - n:], start[p] = prompt_of(n, p), L - n
    knobs = dict(seed=np.arange(4, dtype=np.uint32), temperature=np.array([0.9, 0.0, 1.3, 0.0], np.float32),
                 top_k=np.array([0, 0, 5, 0], np.int32), top_p=np.array([1.0, 1.0, 0.8, 1.0], np.float32))
    k_P, v_P, first = prefill(engine.params, prompts, start, knobs, cap=64)
    assert len(k_P) == 4 and k_P[0][0].shape == (engine.cfg.n_kv_head, L, engine.cfg.head_dim)
    for p, n in enumerate(lengths):
        one = {name: x[p:p + 1] for name, x in knobs.items()}
        k1, v1, first1 = prefill(engine.params, prompts[p:p + 1], start[p:p + 1], one, cap=64)
        assert int(first[p]) == int(first1[0])
        for group, alone in ((k_P[p], k1[0]), (v_P[p], v1[0])):
            for x, y in zip(group, alone):  # the prompt's positions (before them: padding nobody reads)
                np.testing.assert_allclose(np.asarray(x)[:, L - n:], np.asarray(y)[:, L - n:], rtol=1e-5, atol=1e-5)


def test_the_decode_loop_takes_at_most_the_steps_asked(engines):
    slots = Slots(engines["gqa"], max_batch=2, stop_tokens=[])
    f = slots._empty_fields(2, 4)
    f["done"][:], f["limit"][:] = False, 100
    for steps, taken in ((3, 3), (0, 0), (100, slots.chunk)):
        state = slots._place(slots._empty_cache(2, 128), f, 4)
        n = slots._decode_jit(engines["gqa"].params, state, slots.stops, slots.python_end, np.int32(steps), cap=64)[3]
        assert int(n) == taken
    slots.close()


def test_a_groups_first_tokens_land_in_its_rows_and_a_stop_ends_its_row():
    token, done = np.array([7, 7, 7, 7], np.int32), np.array([False, True, False, False])
    rows, first, stops = np.array([2, 0, 4, 4], np.int32), np.array([5, 9, 1, 1], np.int32), np.array([9, -1], np.int32)
    token, done = jax.jit(slot_programs.place_firsts)(token, done, rows, first, stops)  # rows 4: padding, dropped
    assert token.tolist() == [9, 7, 5, 7] and done.tolist() == [True, True, False, False]
