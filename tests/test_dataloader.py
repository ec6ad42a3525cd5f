"""The pretraining loader on Grain (best-fit and stream packing, exact resume across epochs, per-process slices, the
epoch-wrap warning) and the validation split read as one token stream."""
import json
import random
import threading
import time

import numpy as np
import pytest

from nanojax import dataset
from nanojax.dataloader import PretrainLoader, StreamBatches, split_documents
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
    return Tokenizer.train(dataset.iter_documents(corpus, "train"), 300)


@pytest.fixture(scope="module")
def docs(tok, corpus):
    """Every split's documents in order, tokenized with BOS first."""
    return {split: [np.asarray(t, dtype=np.int32)
                    for t in tok.encode(list(dataset.iter_documents(corpus, split)), prepend=tok.bos_id)]
            for split in ("train", "val")}


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_bestfit_rows_start_with_bos_and_hold_whole_documents_then_one_crop(tok, corpus, docs):
    loader = PretrainLoader(tok, corpus, "train", rows=4, seq_len=64, buffer_size=50)
    batches = _take(loader, 10)
    read, kept = loader._packer.tokens_read, loader._packer.tokens_kept
    loader.close()
    whole = {d.tobytes() for d in docs["train"]}
    for b in batches:
        assert b.shape == (4, 65) and b.dtype == np.int32
        assert (b[:, 0] == tok.bos_id).all()
        for row in b:  # split at BOS: every piece but the last is a whole document, the last a document's prefix
            cuts = [*np.flatnonzero(row == tok.bos_id), len(row)]
            pieces = [row[a:z] for a, z in zip(cuts, cuts[1:])]
            assert all(p.tobytes() in whole for p in pieces[:-1])
            assert any(d[:len(pieces[-1])].tobytes() == pieces[-1].tobytes() for d in docs["train"])
    assert kept == 10 * 4 * 65 and read > kept  # kept fraction = kept / read: the crops are the difference
    assert max((b == tok.bos_id).sum(axis=1).max() for b in batches) > 1  # short documents are packed together


def test_stream_rows_are_the_documents_in_order_every_token_once(tok, corpus, docs):
    loader = PretrainLoader(tok, corpus, "train", rows=3, seq_len=32, packing="stream")
    rows = np.concatenate(_take(loader, 20))
    assert loader.kept_fraction() == 1.0
    loader.close()
    assert (rows[1:, 0] == rows[:-1, -1]).all()  # consecutive rows share one token
    stream = np.concatenate(docs["train"])
    np.testing.assert_array_equal(np.concatenate([rows[0, :1], rows[:, 1:].ravel()]), stream[:1 + rows.shape[0] * 32])


@pytest.mark.parametrize("packing", ["bestfit", "stream"])
@pytest.mark.parametrize("skip", [3, 45])
def test_resume_is_exact_also_across_epochs(tok, corpus, skip, packing, capsys):
    # The small val file is ~20k tokens: 105 batches of 8x65 tokens run through it more than twice.
    ref = PretrainLoader(tok, corpus, "val", rows=8, seq_len=64, buffer_size=30, packing=packing)
    _take(ref, skip)
    state = json.loads(json.dumps(ref.state()))  # it must survive JSON (checkpoint data_state)
    assert len(json.dumps(state)) < 2000  # addresses, never tokens
    expected = _take(ref, 60)
    final_epoch = ref.state()["epoch"]
    ref.close()
    resumed = PretrainLoader(tok, corpus, "val", rows=8, seq_len=64, buffer_size=30, packing=packing, state=state)
    got = _take(resumed, 60)
    resumed.close()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert final_epoch >= (2 if packing == "bestfit" else 1)  # (stream uses every token: fewer epochs)
    if skip == 45:
        assert state["epoch"] >= 1  # the saved state itself is past an epoch boundary


def test_epoch_wrap_is_warned_and_counted(tok, corpus, docs, capsys):
    loader = PretrainLoader(tok, corpus, "val", rows=8, seq_len=64, packing="stream")
    assert loader.step_metrics() == {"epoch": 0.0}
    outputs = []
    while loader.state()["epoch"] == 0:
        loader.next_batch()
        outputs.append(capsys.readouterr().out)
    assert loader.step_metrics() == {"epoch": 1.0}
    loader.close()
    # The split's tokens ran out in the last batch taken (stream rows use T of them each), and only then it warned.
    assert len(outputs) == -(-sum(map(len, docs["val"])) // (8 * 64))
    assert not any(outputs[:-1]) and outputs[-1].count("starts epoch 2: documents repeat from here on") == 1


def test_next_step_stacks_micro_batches(tok, corpus):
    a = PretrainLoader(tok, corpus, "train", rows=2, seq_len=16, accum=3)
    b = PretrainLoader(tok, corpus, "train", rows=2, seq_len=16)
    step = a.next_step(params=None)
    rows = np.stack(_take(b, 3))
    a.close(), b.close()
    assert step["inputs"].shape == step["targets"].shape == (3, 2, 16)
    np.testing.assert_array_equal(step["inputs"], rows[..., :-1])
    np.testing.assert_array_equal(step["targets"], rows[..., 1:])


def test_processes_read_disjoint_slices(tok, corpus):
    a = PretrainLoader(tok, corpus, "train", rows=2, seq_len=32, rank=0, world=2)
    b = PretrainLoader(tok, corpus, "train", rows=2, seq_len=32, rank=1, world=2)
    _take(a, 1), _take(b, 1)
    assert a.state()["group"] % 2 == 0 and b.state()["group"] % 2 == 1
    ta, tb = tok.decode(a.next_batch()[0].tolist()), tok.decode(b.next_batch()[0].tolist())
    a.close(), b.close()
    assert ta != tb


def test_single_pass_ends(tok, corpus):
    loader = PretrainLoader(tok, corpus, "val", rows=4, seq_len=64, loop=False)
    n = 0
    with pytest.raises(StopIteration):
        while True:
            loader.next_batch()
            n += 1
    loader.close()
    assert n > 0


def test_split_smaller_than_the_process_count_is_read_whole(tok, corpus):
    # The val file is one row group: process 5 of 8 has none of its own, so it reads all of it.
    solo = PretrainLoader(tok, corpus, "val", rows=2, seq_len=32)
    lonely = PretrainLoader(tok, corpus, "val", rows=2, seq_len=32, rank=5, world=8)
    np.testing.assert_array_equal(solo.next_batch(), lonely.next_batch())
    solo.close(), lonely.close()


def test_bad_packing_is_a_user_error(tok, corpus):
    from nanojax.common import UserError
    with pytest.raises(UserError, match="--packing 'greedy': use one of bestfit, stream"):
        PretrainLoader(tok, corpus, "val", rows=2, seq_len=32, packing="greedy")


def test_close_stops_the_worker_threads(tok, corpus):
    before = {t for t in threading.enumerate() if t.name.startswith("grain")}
    loader = PretrainLoader(tok, corpus, "train", rows=2, seq_len=32, workers=2)
    loader.next_batch()
    loader.close()
    deadline = time.time() + 5
    while [t for t in threading.enumerate() if t.name.startswith("grain") and t not in before]:
        assert time.time() < deadline
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------------------
# Validation: the split as one token stream.

def test_stream_batches_cover_the_split_once_in_order(tok, corpus, docs, capsys):
    stream = np.concatenate(docs["val"])
    split = StreamBatches(split_documents(tok, corpus, "val"), rows=4, seq_len=64, max_tokens=10**9,
                          label=f"the val split of {corpus}")
    batches = list(split)
    assert "is more than the val split of" in capsys.readouterr().out  # capped, and said so
    assert split.tokens == len(stream) - 1 and len(batches) == len(split) == -(-(len(stream) - 1) // (4 * 64))
    inputs = np.concatenate([i for i, _ in batches]).ravel()
    targets = np.concatenate([t for _, t in batches]).ravel()
    valid = targets >= 0
    assert valid.sum() == len(stream) - 1  # every target once, the padding masked
    np.testing.assert_array_equal(inputs[valid], stream[:-1])
    np.testing.assert_array_equal(targets[valid], stream[1:])
    assert [t for _, t in split][-1].tobytes() == batches[-1][1].tobytes()  # the same batches at every call


def test_stream_batches_split_rows_between_processes(tok, corpus):
    one = list(StreamBatches(split_documents(tok, corpus, "train"), rows=4, seq_len=16, max_tokens=1000))
    two = [list(StreamBatches(split_documents(tok, corpus, "train"), rows=2, seq_len=16, max_tokens=1000, rank=r,
                          world=2))
           for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 16  # ceil(1000 / 16) = 63 rows, 4 per global batch
    for b, (x0, x1) in enumerate(zip(*two)):
        np.testing.assert_array_equal(one[b][0], np.concatenate([x0[0], x1[0]]))
        np.testing.assert_array_equal(one[b][1], np.concatenate([x0[1], x1[1]]))
    assert sum(int((t >= 0).sum()) for _, t in one) == 1000


def test_a_state_saved_with_the_other_packing_continues_from_the_next_document(tok, corpus, capsys):
    best = PretrainLoader(tok, corpus, "train", rows=2, seq_len=32)
    _take(best, 3)
    state = best.state()
    best.close()
    stream = PretrainLoader(tok, corpus, "train", rows=2, seq_len=32, packing="stream", state=state)
    assert stream.state() == {**state, "buffer": [], "packing": "stream"}
    stream.close()
    assert "saved with --packing bestfit and this run packs stream" in capsys.readouterr().out
