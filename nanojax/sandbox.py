"""Running model-written code: the calculator tool and HumanEval execution.

calculator(expr) is what the engine calls between <|python_start|> and <|python_end|>: it never runs Python, it walks
the parsed expression and evaluates a few node types itself (arithmetic on numbers, str.count on a string literal).

execute(code) runs a whole program in a child Python, layered so that one failing layer is not the end:
  - a fresh process (`python -I`), environment scrubbed to PATH, stdin /dev/null, cwd a fresh temp dir removed after;
  - a new network namespace when the kernel allows it (no interface but a down loopback: even 127.0.0.1 fails);
  - when started as root: drop to uid/gid 65534 (nobody), so the kernel itself refuses to touch the caller's files
    or read its /proc/<pid>/environ, and RLIMIT_NPROC actually applies;
  - rlimits: address space (memory), file size, processes, core dumps;
  - a guard prelude: process spawning, signals, sockets, and writes/deletes outside the temp dir raise PermissionError;
  - a wall-clock timeout that kills the child's whole process group.
It is a guard against accidents and a badly behaved model, not a hardened jail (no seccomp).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

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


# ----------------------------------------------------------------------------------------------------------------------
# Program execution.

NOBODY = 65534
FILE_SIZE_LIMIT = 16 << 20  # stdout/stderr and any file the program writes
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


@dataclasses.dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "memory_exceeded"
    stdout: str
    stderr: str  # the error text: the traceback for a failure, a note for a timeout
    returncode: int | None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def error(self) -> str:
        """The last line of the error text ('AssertionError', 'MemoryError', ...)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


# Runs first in the child, as `python -I -c _PRELUDE WORKDIR PROGRAM MEM_BYTES FSIZE_BYTES GUARD`. Kept as plain
# source text because the child must not import anything from this project.
_PRELUDE = r'''
import os, sys

def _nanojax_sandbox():
    import builtins, io, _io, resource, signal, stat
    workdir, program, guard = sys.argv[1], sys.argv[2], sys.argv[5] == "1"
    mem, fsize = int(sys.argv[3]), int(sys.argv[4])
    with open(program, encoding="utf-8") as f:
        source = f.read()
    info = {"netns": False, "uid": os.geteuid()}

    # 1. Network: a new namespace (as root; else inside a new user namespace) has only a down loopback.
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        flags = %(CLONE_NEWNET)d | (0 if os.geteuid() == 0 else %(CLONE_NEWUSER)d)
        info["netns"] = libc.unshare(flags) == 0
    except Exception:
        pass

    # 2. Root drops to nobody, if that user can still read the standard library it will import.
    def world_readable(path):
        path = os.path.realpath(path)
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while True:
            mode = os.stat(path).st_mode
            if not mode & stat.S_IXOTH:
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

    # 3. Limits.
    for name, value in (("RLIMIT_AS", mem), ("RLIMIT_FSIZE", fsize), ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
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
    if not guard:
        return source

    # 4. Guards. Writes, deletes and renames stay inside workdir; processes, signals and sockets are refused.
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
    # Importing these afterwards raises ImportError (ctypes could undo every guard above).
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "resource",
                 "psutil", "ipdb", "joblib", "tkinter", "_tkinter"):
        sys.modules[name] = None
    return source

_nanojax_source = _nanojax_sandbox()
del _nanojax_sandbox
_nanojax_code = compile(_nanojax_source, "main.py", "exec")
del _nanojax_source
exec(_nanojax_code, {"__name__": "__main__", "__builtins__": __builtins__})
''' % {"CLONE_NEWNET": CLONE_NEWNET, "CLONE_NEWUSER": CLONE_NEWUSER, "NOBODY": NOBODY}


def _python() -> str:
    """The system interpreter when there is one: a venv or pyenv python may live under a home that uid nobody (or a
    new user namespace) cannot read."""
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(path, os.X_OK):
            return path
    return sys.executable


def _read(path: str, limit: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        data = f.read(limit)
    return data.decode("utf-8", errors="replace")


def execute(code: str, timeout: float = 5.0, memory_mb: int = 256, *, guard: bool = True) -> ExecResult:
    """Run `code` as a Python program in the sandbox. "passed" means exit code 0; "memory_exceeded" means it
    failed with a MemoryError under the address-space limit. `guard=False` leaves out the Python-level guards
    (only to test the kernel-level layers)."""
    outer = tempfile.mkdtemp(prefix="nanojax-sandbox-")
    start = time.monotonic()
    try:
        work = os.path.join(outer, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(work, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        if os.geteuid() == 0:  # the child may run as nobody: it owns its work dir, and may pass through outer
            os.chown(work, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
            os.chmod(outer, 0o711)
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        argv = [_python(), "-I", "-c", _PRELUDE, work, program, str(memory_mb << 20), str(FILE_SIZE_LIMIT),
                "1" if guard else "0"]
        # Output goes to files, not pipes: nothing to deadlock on, and RLIMIT_FSIZE bounds their size.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, whatever it started
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _read(out_path), _read(err_path)
        if timed_out:
            status = "timeout"
            stderr += f"\nTimeoutError: killed after {timeout:g} s"
        elif proc.returncode == 0:
            status = "passed"
        elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            status = "memory_exceeded"
        else:
            status = "failed"
        return ExecResult(status, stdout, stderr, None if timed_out else proc.returncode, seconds)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def isolation() -> dict:
    """What the kernel-level layers give on this machine: {"netns": bool, "uid": int} as seen by a sandboxed child."""
    result = execute("import sys; print(sys._nanojax_sandbox)", timeout=10)
    if not result.passed:
        raise RuntimeError(f"sandbox probe failed: {result.stderr.strip()}")
    return ast.literal_eval(result.stdout.strip())
