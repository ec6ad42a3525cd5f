"""Conversation loaders: the mid-training token stream and the SFT rows, exact to the token, resumable, rank-strided;
nanochat's mixture order; the validation batches."""
import json
import random

import grain
import numpy as np
import pytest

from nanojax.chatloader import (MidLoader, SFTLoader, buckets, collate, mid_val_batches, sft_val_batches)
from tokenizer import Tokenizer

WORDS = "what is the sum of two and three it is five please spell cat c a t thanks you are welcome".split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return Tokenizer.train(iter([" ".join(rng.choice(WORDS) for _ in range(400)) for _ in range(20)]), 300)


def _conversation(i, rng):
    user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30 if i % 7 else 90)))
    return {"messages": [{"role": "user", "content": f"q{i} {user}"}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def conversations():
    rng = random.Random(1)
    return [_conversation(i, rng) for i in range(40)]


@pytest.fixture(scope="module")
def render(tok):
    return lambda conversation: tok.render_conversation(conversation, max_tokens=2048)


def _steps(loader, n):
    return [loader.next_step(None) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------------
# Mid-training: one stream, every token a target.

def test_mid_rows_are_the_rank_strided_stream_and_end_after_one_pass(conversations, render):
    loader = MidLoader(conversations, render, rows=2, seq_len=16, accum=2, rank=1, world=2)
    stream = np.concatenate([render(c)[0] for c in conversations[1::2]])  # the mask is dropped
    steps, progress = [], []
    with pytest.raises(StopIteration):
        while True:
            steps.append(loader.next_step(None))
            progress.append(loader.progress())
    loader.close()
    rows = np.concatenate([s["inputs"].reshape(-1, 16) for s in steps])
    targets = np.concatenate([s["targets"].reshape(-1, 16) for s in steps])
    assert steps[0]["inputs"].shape == (2, 2, 16) and (targets >= 0).all()
    assert len(steps) == (len(stream) - 1) // 16 // 4  # whole steps only; the tail is dropped
    np.testing.assert_array_equal(rows.ravel(), stream[:rows.size])
    np.testing.assert_array_equal(targets.ravel(), stream[1:rows.size + 1])
    assert progress == sorted(progress) and 0.8 < progress[-1] <= 1.0


@pytest.mark.parametrize("skip", [0, 1, 5])
def test_mid_resume_is_exact(conversations, render, skip):
    ref = MidLoader(conversations, render, rows=3, seq_len=8, accum=2)
    _steps(ref, skip)
    state = json.loads(json.dumps(ref.state()))
    expected = _steps(ref, 6)
    ref.close()
    resumed = MidLoader(conversations, render, rows=3, seq_len=8, accum=2, state=state)
    for a, b in zip(expected, _steps(resumed, 6)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    resumed.close()
    assert set(state) == {"cursor", "offset"}


def test_mid_val_is_the_val_stream_once(conversations, render):
    batches = mid_val_batches(conversations, render, rows=4, seq_len=32, max_tokens=10**6)
    stream = np.concatenate([render(c)[0] for c in conversations])
    targets = np.concatenate([t for _, t in batches]).ravel()
    np.testing.assert_array_equal(targets[targets >= 0], stream[1:])
    assert batches.tokens == len(stream) - 1


# ----------------------------------------------------------------------------------------------------------------------
# SFT: one conversation per row, masked targets, bucketed widths.

def test_sft_rows_targets_mask_and_padding(tok, conversations, render):
    pad = tok.encode_special("<|assistant_end|>")
    loader = SFTLoader(conversations, render, rows=2, max_seq_len=256, pad_id=pad, accum=2)
    step = loader.next_step(None)
    loader.close()
    ids_masks = [render(c) for c in conversations[:4]]
    longest = max(len(ids) - 1 for ids, _ in ids_masks)
    width = next(w for w in (64, 128, 256) if w >= longest)
    assert step["inputs"].shape == step["targets"].shape == (2, 2, width)
    for k, (ids, mask) in enumerate(ids_masks):
        inputs, targets = step["inputs"][k // 2, k % 2], step["targets"][k // 2, k % 2]
        n = len(ids) - 1
        np.testing.assert_array_equal(inputs[:n], ids[:-1])
        assert (inputs[n:] == pad).all() and (targets[n:] == -1).all()
        want = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        np.testing.assert_array_equal(targets[:n], want)
        # Trained exactly on the assistant's reply and its <|assistant_end|>: nothing of the user's turn.
        assert tok.decode([t for t in targets if t >= 0]) == conversations[k]["messages"][1]["content"] + \
            "<|assistant_end|>"


def test_sft_widths_come_from_a_few_buckets(tok, conversations, render):
    assert buckets(2048) == [64, 128, 256, 512, 1024, 2048] and buckets(300) == [64, 128, 256, 300]
    loader = SFTLoader(conversations, render, rows=1, max_seq_len=100, pad_id=0)
    widths = {s["inputs"].shape[-1] for s in _steps(loader, 40)}
    loader.close()
    assert widths == {64, 100}  # conversation 0, 7, 14, ... are long: cut to max_seq_len 100, the last bucket
    inputs, targets = collate([(np.arange(10), np.ones(10, int))], pad_id=7, widths=[64])
    assert inputs.shape == (1, 64) and list(inputs[0, 8:11]) == [8, 7, 7] and list(targets[0, 8:10]) == [9, -1]


@pytest.mark.parametrize("skip", [1, 9])
def test_sft_resume_is_exact_across_epochs(conversations, render, skip):
    ref = SFTLoader(conversations, render, rows=2, max_seq_len=128, pad_id=0, accum=2, rank=1, world=3)
    _steps(ref, skip)  # 13 conversations for rank 1 of 3: 9 steps of 4 rows are 2.8 epochs
    state = json.loads(json.dumps(ref.state()))
    expected = _steps(ref, 5)
    ref.close()
    resumed = SFTLoader(conversations, render, rows=2, max_seq_len=128, pad_id=0, accum=2, rank=1, world=3,
                        state=state)
    for a, b in zip(expected, _steps(resumed, 5)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    resumed.close()
    assert state == {"epoch": skip * 4 // 13, "cursor": skip * 4 % 13}


def test_sft_rank_striding(tok, conversations, render):
    loader = SFTLoader(conversations, render, rows=4, max_seq_len=256, pad_id=0, rank=2, world=4)
    first = loader.next_step(None)["inputs"][0]
    loader.close()
    for r, i in enumerate([2, 6, 10, 14]):  # conversations rank, rank + world, ...
        ids = render(conversations[i])[0]
        np.testing.assert_array_equal(first[r, :len(ids) - 1], ids[:-1])


def test_sft_val_batches(conversations, render):
    batches = sft_val_batches(conversations, render, rows=4, max_seq_len=256, pad_id=0, steps=100, rank=0, world=2)
    assert len(batches) == 40 // 8  # capped by the val set: 20 conversations for this process, 4 per batch
    first_ids = render(conversations[0])[0]
    np.testing.assert_array_equal(batches[0][0][0, :len(first_ids) - 1], first_ids[:-1])
    assert all(i.shape[1] in (64, 128, 256) and i.shape == t.shape for i, t in batches)
