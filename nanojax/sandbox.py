"""Running model-written code: the calculator tool and sandboxed program execution (HumanEval, code tasks).

calculator(expr) is what the engine calls between <|python_start|> and <|python_end|>: it never runs Python, it walks
the parsed expression and evaluates a few node types itself (arithmetic on numbers, str.count on a string literal).

execute(code) runs a whole program as untrusted code under kernel isolation from bubblewrap (`bwrap`):
  - new user, network (loopback only, nothing listening), PID, IPC, UTS and cgroup namespaces; no further user
    namespaces inside; started as nobody when the caller is root, so even its user namespace is unprivileged;
  - the file system is a read-only /usr (the interpreter), a fresh /proc, a read-only minimal /dev, and a private tmpfs
    of TMPFS_BYTES at /tmp as the only writable place: the caller's home, the base directory, /dev/shm and the real
    /tmp do not exist in there; the environment is empty but PATH;
  - limits: address space, CPU time, file size (which bounds stdout/stderr too), tasks, no core dumps; a wall-clock
    timeout kills the whole sandbox;
  - a pass is proven: after the program ran to its end the harness prints a random per-run token; an exit (sys.exit(0),
    exit(), os._exit), a signal or a timeout never reaches it and fails with its reason.
Where bubblewrap is missing or the kernel refuses its namespaces (Docker's default seccomp profile, some Kubernetes pods,
Ubuntu 24.04's AppArmor restriction), execute refuses with SandboxUnavailable unless the caller opts in
(allow_unisolated=True, `--allow-unisolated-exec`); the result then says isolated=False. Python-level guards (refused
sockets, processes, writes outside the work directory) run in the child as well: defence in depth only, since a program
can undo them. The token is kept in the child's memory while the program runs: it stops exits, not a program written to
search its own process for the token.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from nanojax.common import UserError

# ----------------------------------------------------------------------------------------------------------------------
# The calculator tool.

MAX_EXPR_CHARS = 1000
CALC_TIME_LIMIT_S = 1.0
MAX_INT_BITS = 4096  # ~1233 decimal digits: no intermediate value grows past this
ARITHMETIC_CHARS = set("0123456789+-*/.() ")

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
}
_NUMBER = (int, float)


class _Reject(Exception):
    """The expression is outside what the calculator evaluates."""


def _check_size(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Reject("number too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Reject("overflow")
    return value


def _eval_node(node, deadline: float):
    if time.monotonic() > deadline:
        raise _Reject("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
            raise _Reject(f"constant {node.value!r}")
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise _Reject("non-finite")
        # Python's own numbers, as nanochat's eval() has them: 10/4 is 2.5, 6/2 is 3.0, 0.1+0.2 is 0.30000000000000004.
        return node.value if isinstance(node.value, str) else _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_node(node.operand, deadline)
        if not isinstance(value, _NUMBER):
            raise _Reject("unary op on a string")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left, deadline), _eval_node(node.right, deadline)
        if not (isinstance(left, _NUMBER) and isinstance(right, _NUMBER)):
            raise _Reject("arithmetic on a string")
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv)):
            raise _Reject("division by zero")
        return _check_size(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        # Exactly "<str literal>.count(<str literal>)": no names, no other attribute, no keywords.
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "count" and isinstance(func.value, ast.Constant)
                and isinstance(func.value.value, str) and len(node.args) == 1 and not node.keywords
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return func.value.value.count(node.args[0].value)
        raise _Reject("call")
    raise _Reject(type(node).__name__)


def calculator(expr: str) -> str | None:
    """Evaluate `expr` as the chat model's calculator: arithmetic (+ - * / // and parentheses on decimal numbers,
    thousands commas allowed) or "<string>".count("<string>"). Returns str() of the Python result, as nanochat's
    engine shows it ("2.5", "3.0" for 6/2, "0.30000000000000004"), or None for anything else (names, attribute
    access, imports, `**`, too long, too slow, division by zero, a non-finite result)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    has_string = "'" in expr or '"' in expr
    if not has_string:
        expr = expr.replace(",", "")  # 1,234 * 2
        if not expr or not set(expr) <= ARITHMETIC_CHARS or "**" in expr:
            return None
    try:
        tree = ast.parse(expr, mode="eval")
        value = _eval_node(tree, time.monotonic() + CALC_TIME_LIMIT_S)
        if not isinstance(value, _NUMBER):
            return None
        return str(value)  # as nanochat's engine shows a result: str() of the Python value
    except (_Reject, SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


# Program execution.

NOBODY = 65534
FILE_SIZE_LIMIT = 16 << 20  # stdout/stderr and any file the program writes
TMPFS_BYTES = 32 << 20  # the sandbox's only writable place
MAX_PROCESSES = 16  # tasks (processes and threads) of the sandbox's user, its own init included
WORKDIR = "/tmp/work"  # inside the sandbox
BWRAP = "bwrap"
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) on a "
                "kernel that allows unprivileged user namespaces, or opt in to running model-written code with only "
                "Python-level guards (--allow-unisolated-exec)")


class SandboxUnavailable(UserError):
    """Kernel isolation is unavailable and the caller did not opt in to running untrusted code without it."""


@dataclasses.dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "memory_exceeded"
    stdout: str
    stderr: str  # the error text: the traceback for a failure, a note for a timeout
    returncode: int | None
    seconds: float
    reason: str = ""  # why it did not pass, in a few words ("" when it passed)
    isolated: bool = True  # False: run without kernel isolation, because the caller opted in

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def error(self) -> str:
        """The last line of the error text ('AssertionError', 'MemoryError', ...)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


# Runs first in the child, as `python -I -c _PRELUDE WORKDIR PROGRAM MEM FSIZE CPU GUARD ISOLATED`, with the run's
# token on stdin. Plain source text: the child must not import anything from this project. Under bubblewrap the
# namespaces, the read-only system and the uid are the kernel's work; only the limits are set here. Without it (the
# caller opted in) it tries what it can itself: its own network namespace, and root drops to nobody.
_PRELUDE = r'''
import os, sys

def _nanojax_sandbox():
    import builtins, io, _io, resource, signal, stat
    workdir, program = sys.argv[1], sys.argv[2]
    mem, fsize, cpu = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    guard, isolated = sys.argv[6] == "1", sys.argv[7] == "1"
    token = os.read(0, 64)  # the proof of a finished run; stdin is /dev/null for the program
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open(program, encoding="utf-8") as f:
        source = f.read()
    info = {"netns": isolated, "uid": os.geteuid(), "isolated": isolated}

    if not isolated:
        try:  # a new network namespace (as root; else inside a new user namespace) has only a down loopback
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            info["netns"] = libc.unshare(%(CLONE_NEWNET)d | (0 if os.geteuid() == 0 else %(CLONE_NEWUSER)d)) == 0
        except Exception:
            pass

        def world_readable(path):
            path = os.path.realpath(path)
            if not os.stat(path).st_mode & stat.S_IROTH:
                return False
            while True:
                if not os.stat(path).st_mode & stat.S_IXOTH:
                    return False
                parent = os.path.dirname(path)
                if parent == path:
                    return True
                path = parent
        if os.geteuid() == 0 and world_readable(os.path.dirname(os.__file__)):
            os.setgroups([])
            os.setgid(%(NOBODY)d)
            os.setuid(%(NOBODY)d)
            info["uid"] = os.geteuid()

    for name, value in (("RLIMIT_AS", mem), ("RLIMIT_FSIZE", fsize), ("RLIMIT_CPU", cpu),
                        ("RLIMIT_NPROC", %(MAX_PROCESSES)d if isolated else 0), ("RLIMIT_CORE", 0)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError, AttributeError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing silently
    import faulthandler
    faulthandler.disable()
    import tempfile
    tempfile.tempdir = workdir
    sys._nanojax_sandbox = info
    if guard:
        _nanojax_guards(workdir)
    code = compile(source, "main.py", "exec")
    del source
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        print(f"SystemExit({e.code!r}): exited before its tests finished", file=sys.stderr)
        raise
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(1, b"\n" + token)  # only a run that got here passes


def _nanojax_guards(workdir):
    """Defence in depth only: Python-level refusals that a determined program can undo."""
    import builtins, io, _io
    root = os.path.realpath(workdir)

    def inside(path):
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(f"{what} is disabled in the sandbox")
        return refused

    def writes(mode):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    real_open, real_fileio, real_os_open = _io.open, _io.FileIO, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if writes(mode) and not isinstance(file, int) and not inside(file):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if writes(mode) and not isinstance(file, int) and not inside(file):
                raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
            super().__init__(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and (dir_fd is not None or not inside(path)):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO

    def paths_inside(name, fn, npaths):
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"os.{name} with dir_fd is disabled in the sandbox")
            for path in args[:npaths]:
                if not inside(path):
                    raise PermissionError(f"os.{name} outside the sandbox directory is not allowed: {path!r}")
            return fn(*args, **kwargs)
        return guarded

    import posix
    one_path = ("remove", "unlink", "rmdir", "truncate", "chmod", "lchmod", "chown", "lchown", "chflags", "lchflags",
                "mkdir", "mkfifo", "mknod", "utime", "chdir", "setxattr", "removexattr")
    two_paths = ("rename", "replace", "link", "symlink")
    for module in (os, posix):
        for name in one_path + two_paths:
            if hasattr(module, name):
                setattr(module, name, paths_inside(name, getattr(module, name), 2 if name in two_paths else 1))
        module.open = guarded_os_open
        for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "_exit", "abort", "chroot",
                     "fchdir", "plock", "posix_spawn", "posix_spawnp", "pidfd_open", "setuid", "setgid", "seteuid",
                     "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setsid", "setpgid",
                     "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
                     "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
            if hasattr(module, name):
                setattr(module, name, refuse(f"os.{name}"))

    import shutil, subprocess, socket, _socket
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse(f"subprocess.{name}"))
    for module in (socket, _socket):
        class GuardedSocket(module.socket):  # a class still, so `class X(socket.socket)` elsewhere keeps working
            def __init__(self, *args, **kwargs):
                raise PermissionError("sockets are disabled in the sandbox")
        module.socket = GuardedSocket
        for name in ("socketpair", "fromfd", "create_connection", "create_server"):
            if hasattr(module, name):
                setattr(module, name, refuse(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "resource",
                 "psutil", "ipdb", "joblib", "tkinter", "_tkinter"):
        sys.modules[name] = None

_nanojax_sandbox()
''' % {"CLONE_NEWNET": CLONE_NEWNET, "CLONE_NEWUSER": CLONE_NEWUSER, "NOBODY": NOBODY, "MAX_PROCESSES": MAX_PROCESSES}


def _python() -> str:
    """The system interpreter when there is one: a venv or pyenv python may live under a home that the sandbox does
    not show (and that uid nobody cannot read)."""
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(path, os.X_OK):
            return path
    return sys.executable


def _bwrap_argv(bwrap: str, python: str) -> list[str]:
    """Namespaces (user, network, PID, IPC, UTS, cgroup), a read-only /usr (and the interpreter's prefix), a fresh /proc
    and /dev (read-only), a bounded tmpfs at /tmp as the only writable place, no environment, uid/gid nobody."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):  # merged-/usr links, or real directories on older systems
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    prefix = Path(os.path.realpath(python)).parents[1]
    if not str(prefix).startswith("/usr"):
        argv += ["--ro-bind", str(prefix), str(prefix)]
    return argv + ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--size", str(TMPFS_BYTES),
                   "--tmpfs", "/tmp", "--dir", WORKDIR, "--chdir", WORKDIR, "--clearenv", "--setenv", "PATH",
                   "/usr/bin:/bin", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox"]


def _user_kwargs() -> dict:
    """Root starts the sandbox as nobody: then even its user namespace maps to an unprivileged user."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}


_ISOLATION: dict = {}


def isolation() -> tuple[bool, str]:
    """(True, "bubblewrap X") where kernel isolation works here, else (False, why not). Probed once per process."""
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        return False, f"bubblewrap ({BWRAP}) is not installed"
    if bwrap not in _ISOLATION:
        try:
            probe = subprocess.run(_bwrap_argv(bwrap, _python()) + ["--", _python(), "-I", "-c", "pass"],
                                   capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                                   **_user_kwargs())
            why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
            ok = probe.returncode == 0
        except (OSError, subprocess.SubprocessError) as e:
            ok, why = False, str(e)
        if ok:
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
            _ISOLATION[bwrap] = (True, version or "bubblewrap")
        else:
            _ISOLATION[bwrap] = (False, f"bubblewrap cannot create its namespaces here ({why})")
    return _ISOLATION[bwrap]


def require_isolation(allow_unisolated: bool = False) -> bool:
    """True when untrusted code will run isolated; False when it will run without (opted in); refuses otherwise."""
    ok, why = isolation()
    if not ok and not allow_unisolated:
        raise SandboxUnavailable(f"model-written code is not run: {why}; {INSTALL_HINT}")
    return ok


def _read(path: str, limit: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _tail(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(os.fstat(f.fileno()).st_size - n, 0))
        return f.read()


def _verdict(code: int | None, timed_out: bool, proven: bool, stderr: str, timeout: float) -> tuple[str, str]:
    """(status, reason). A pass needs the token the harness prints after the program finished and exit status 0."""
    if timed_out:
        return "timeout", f"killed after {timeout:g} s (wall clock)"
    if code == 0 and proven:
        return "passed", ""
    exits = [line for line in stderr.splitlines() if line.startswith("SystemExit(")]
    if exits:
        return "failed", exits[-1]
    if code == 0:
        return "failed", "exited with status 0 before its tests finished (os._exit, or output over the size limit)"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory_exceeded", "out of memory (address-space limit)"
    signum = -code if code < 0 else code - 128 if code > 128 else None  # bubblewrap reports a signal as 128 + n
    if signum in (signal.SIGXCPU, signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGTERM):
        what = "CPU time limit" if signum == signal.SIGXCPU else signal.Signals(signum).name
        return "failed", f"killed by {signal.Signals(signum).name}" + (f" ({what})" if signum == signal.SIGXCPU else "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return "failed", lines[-1][:200] if lines else f"exited with status {code}"


def execute(code: str, timeout: float = 5.0, memory_mb: int = 256, *, allow_unisolated: bool = False,
            guard: bool = True) -> ExecResult:
    """Run `code` as a Python program under kernel isolation (bubblewrap). "passed" only if the program ran to its end:
    the harness then prints a per-run random token, which an exit (sys.exit(0), os._exit, a signal) never reaches.
    Without working isolation this raises SandboxUnavailable, unless `allow_unisolated` (then the result says
    isolated=False). `guard=False` leaves out the Python-level guards (only to test the kernel's layers)."""
    isolated = require_isolation(allow_unisolated)
    token = secrets.token_hex(16).encode()
    outer = tempfile.mkdtemp(prefix="nanojax-sandbox-")
    start = time.monotonic()
    try:
        program = os.path.join(outer, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        limits = [str(memory_mb << 20), str(FILE_SIZE_LIMIT), str(math.ceil(timeout) + 1), "1" if guard else "0"]
        python = _python()
        if isolated:
            work = WORKDIR
            source = open(program, "rb")  # copied into the sandbox's tmpfs by bubblewrap
            argv = (_bwrap_argv(shutil.which(BWRAP), python) + ["--file", str(source.fileno()), f"{WORKDIR}/main.py",
                    "--", python, "-I", "-c", _PRELUDE, work, f"{WORKDIR}/main.py", *limits, "1"])
            extra = {"pass_fds": (source.fileno(),), "env": {}, **_user_kwargs()}
        else:
            work = os.path.join(outer, "work")
            os.mkdir(work, 0o700)
            os.rename(program, os.path.join(work, "main.py"))
            if os.geteuid() == 0:  # the child may drop to nobody: it owns its work dir, and may pass through outer
                os.chown(work, NOBODY, NOBODY)
                os.chown(os.path.join(work, "main.py"), NOBODY, NOBODY)
                os.chmod(outer, 0o711)
            source = None
            argv = [python, "-I", "-c", _PRELUDE, work, os.path.join(work, "main.py"), *limits, "0"]
            extra = {"cwd": work, "env": {"PATH": "/usr/bin:/bin"}}
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        # Output goes to files, not pipes: nothing to deadlock on, and RLIMIT_FSIZE bounds their size.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                                    close_fds=True, **extra)
            if source is not None:
                source.close()
            timed_out = False
            try:
                proc.stdin.write(token)
                proc.stdin.close()
                proc.wait(timeout=timeout)
            except BrokenPipeError:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group; bubblewrap's sandbox dies with it
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        proven = _tail(out_path, len(token) + 1) == b"\n" + token
        stdout = _read(out_path)
        if proven and len(stdout) >= os.path.getsize(out_path):
            stdout = stdout[:-len(token) - 1]
        stdout, stderr = stdout.decode("utf-8", errors="replace"), _read(err_path).decode("utf-8", errors="replace")
        returncode = None if timed_out else proc.returncode
        status, reason = _verdict(returncode, timed_out, proven, stderr, timeout)
        if timed_out:
            stderr += f"\nTimeoutError: killed after {timeout:g} s"
        return ExecResult(status, stdout, stderr, returncode, seconds, reason, isolated)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def probe() -> dict:
    """What a sandboxed child sees: {"netns", "uid", "isolated"} (kernel isolation refused: SandboxUnavailable)."""
    result = execute("import sys; print(sys._nanojax_sandbox)", timeout=10)
    if not result.passed:
        raise RuntimeError(f"sandbox probe failed: {result.reason}: {result.stderr.strip()}")
    return ast.literal_eval(result.stdout.strip())
