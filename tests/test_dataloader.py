import json
import random

import numpy as np
import pytest

from nanojax.dataloader import PackedLoader
from tokenizer import Tokenizer


def _words(rng, n):
    vocab = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two train .jsonl files (documents of very different lengths) and a val file."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    for name, ndocs in (("a.jsonl", 1500), ("b.jsonl", 700), ("c.jsonl", 200)):
        with open(root / name, "w") as f:
            for i in range(ndocs):
                f.write(json.dumps({"text": f"doc {name} {i}: " + _words(rng, rng.choice([3, 10, 40, 150]))}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def tok(corpus):
    from nanojax import dataset
    return Tokenizer.train(dataset.iter_documents(corpus, "train"), 300)


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_rows_start_with_bos_and_have_no_padding(tok, corpus):
    loader = PackedLoader(tok, corpus, "train", rows=4, seq_len=64, buffer_size=50)
    batches = _take(loader, 10)
    loader.close()
    for b in batches:
        assert b.shape == (4, 65) and b.dtype == np.int32
        assert (b[:, 0] == tok.bos_id).all()
    # Every token of every row comes from a document: concatenating documents (each BOS-prefixed) and cropping
    # gives rows whose non-BOS tokens decode to document text, never to a pad id.
    all_tokens = np.concatenate(batches).ravel()
    assert all_tokens.max() < tok.vocab_size
    specials = {tok.encode_special(n) for n in tok.special_tokens} - {tok.bos_id}
    assert not specials.intersection(all_tokens.tolist())
    # Each row is one or more whole documents plus at most one cropped one at its end.
    for row in batches[0]:
        starts = tok.decode(row.tolist()).count("<|bos|>doc ")
        assert (row == tok.bos_id).sum() - 1 <= starts <= (row == tok.bos_id).sum()


def test_best_fit_uses_whole_documents_first(tok, corpus):
    loader = PackedLoader(tok, corpus, "train", rows=8, seq_len=128, buffer_size=200)
    b = loader.next_batch()
    loader.close()
    docs_per_row = (b == tok.bos_id).sum(axis=1)
    assert docs_per_row.max() > 1  # short documents are packed together


@pytest.mark.parametrize("skip", [3, 45])
def test_resume_is_exact_also_across_epochs(tok, corpus, skip):
    # The small val file is ~20k tokens: 105 batches of 8x65 tokens run through it more than twice.
    ref = PackedLoader(tok, corpus, "val", rows=8, seq_len=64, buffer_size=30)
    _take(ref, skip)
    state = json.loads(json.dumps(ref.state()))  # it must survive JSON (checkpoint meta)
    expected = _take(ref, 60)
    final_epoch = ref.state()["epoch"]
    ref.close()
    resumed = PackedLoader(tok, corpus, "val", rows=8, seq_len=64, buffer_size=30, state=state)
    got = _take(resumed, 60)
    resumed.close()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert final_epoch >= 2
    if skip == 45:
        assert state["epoch"] >= 1  # the saved state itself is past an epoch boundary


def test_processes_read_disjoint_slices(tok, corpus):
    a = PackedLoader(tok, corpus, "train", rows=2, seq_len=32, rank=0, world=2)
    b = PackedLoader(tok, corpus, "train", rows=2, seq_len=32, rank=1, world=2)
    ta, tb = tok.decode(a.next_batch()[0].tolist()), tok.decode(b.next_batch()[0].tolist())
    a.close(), b.close()
    assert ta != tb


def test_single_pass_ends(tok, corpus):
    loader = PackedLoader(tok, corpus, "val", rows=4, seq_len=64, loop=False)
    n = 0
    with pytest.raises(StopIteration):
        while True:
            loader.next_batch()
            n += 1
    assert n > 0


def test_split_smaller_than_the_process_count_is_read_whole(tok, corpus):
    # The val file is one row group: process 5 of 8 has none of its own, so it reads all of it.
    solo = PackedLoader(tok, corpus, "val", rows=2, seq_len=32)
    lonely = PackedLoader(tok, corpus, "val", rows=2, seq_len=32, rank=5, world=8)
    np.testing.assert_array_equal(solo.next_batch(), lonely.next_batch())
    solo.close(), lonely.close()


@pytest.mark.parametrize("loop", [True, False])
def test_close_waits_for_the_reader_thread(tok, corpus, loop):
    """A reader left running inside pyarrow or the tokenizer at interpreter exit can abort the process: close()
    stops and joins it, also when its queue is full and nobody reads (prefetch 1)."""
    import threading
    import time

    before = {t for t in threading.enumerate() if t.name == "nanojax-loader"}
    loader = PackedLoader(tok, corpus, "val", rows=2, seq_len=32, prefetch=1, loop=loop)
    loader.next_batch()
    time.sleep(0.3)  # let the reader fill the queue and block on it
    start = time.time()
    loader.close()
    assert time.time() - start < 5
    assert not [t for t in threading.enumerate() if t.name == "nanojax-loader" and t not in before]
