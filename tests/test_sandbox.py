"""The calculator tool and the code sandbox: right answers, refusals, proven passes, and each attack stopped by the
kernel (bubblewrap's namespaces and read-only mounts), as root and as an unprivileged user."""
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from nanojax import sandbox
from nanojax.sandbox import calculator, execute

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# Calculator.

@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"),
    ("(3+4)*5-2", "33"),
    ("1,234 * 2", "2468"),
    ("10/4", "2.5"),  # results are str() of Python's value, as nanochat's engine shows them:
    ("6/2", "3.0"),  # true division is a float
    ("12.5*4", "50.0"),
    ("0.1+0.2", "0.30000000000000004"),
    ("1/3", "0.3333333333333333"),
    ("7//2", "3"),
    ("7.5//2", "3.0"),
    ("(2)", "2"),
    ("-3 + 1", "-2"),
    ("99999999999999999999*99999999999999999999", "9999999999999999999800000000000000000001"),
    ('"strawberry".count("r")', "3"),
    ("'mississippi'.count('ss')", "2"),
    ("'a,b,c'.count(',')", "2"),  # commas inside strings are kept
    ("'abc'.count('a') + 1", "2"),
])
def test_calculator_answers(expr, expected):
    assert calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('true')",
    "().__class__.__bases__",
    "'abc'.upper()",
    "'abc'.__class__",
    "x + 1",
    "print(1)",
    "2**10",
    "9**9**9",
    "'abc'.count('a', 1)",
    "'abc'.count(x)",
    "'a' * 3",
    "[1][0]",
    "1/0",
    "1e5",
    "1 if 1 else 2",
    "lambda: 1",
    "",
    "1+" * 600 + "1",  # over the length limit
    "9" * 400 + "/3",  # too large for a float (Python raises OverflowError)
    "1" + "0" * 300 + ".0*" + "1" + "0" * 300 + ".0",  # a non-finite result (inf)
    "(" * 300 + "1" + ")" * 300,  # nesting beyond the parser
])
def test_calculator_rejects(expr):
    assert calculator(expr) is None


def test_calculator_long_input_is_exact_and_fast():
    expr = "*".join(["99999999999999999999"] * 47)  # 986 characters, just under the limit
    start = time.monotonic()
    assert calculator(expr) == str(99999999999999999999 ** 47)
    assert time.monotonic() - start < 0.5


# ----------------------------------------------------------------------------------------------------------------------

# Execution: results and their reasons. A pass is the harness's token after the program's end, never an exit code.

ISOLATED, WHY = sandbox.isolation()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"no kernel isolation here: {WHY}")


@needs_isolation
def test_happy_path():
    result = execute("import math\nprint(sum(range(10)), math.factorial(5))")
    assert (result.status, result.stdout, result.returncode, result.reason) == ("passed", "45 120\n", 0, "")
    assert result.passed and result.isolated and result.stderr == ""
    assert execute("print('no newline', end='')").stdout == "no newline"  # the token line is not in the output


@needs_isolation
def test_exception_fails_with_error_text():
    result = execute("def f():\n    raise ValueError('boom')\nf()")
    assert result.status == "failed" and result.reason == result.error == "ValueError: boom"
    assert "Traceback" in result.stderr and "main.py" in result.stderr


@needs_isolation
@pytest.mark.parametrize("code, guard, reason", [
    ("import sys; sys.exit(0)", True, "SystemExit(0): exited before its tests finished"),
    ("raise SystemExit(0)", True, "SystemExit(0): exited before its tests finished"),
    ("exit()", True, "SystemExit(None): exited before its tests finished"),
    ("quit(0)", True, "SystemExit(0): exited before its tests finished"),
    ("import sys; sys.exit(3)", True, "SystemExit(3): exited before its tests finished"),
    ("import os; os._exit(0)", False, "exited with status 0 before its tests finished (os._exit, or output over the "
                                      "size limit)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", False, "killed by SIGKILL"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", False, "killed by SIGTERM"),
])
def test_exiting_early_is_a_failure_with_its_reason(code, guard, reason):
    result = execute("print('tests start', flush=True)\n" + code + "\nassert False, 'the tests'", guard=guard)
    assert (result.status, result.reason) == ("failed", reason), result.stderr
    assert result.stdout == "tests start\n"


@needs_isolation
def test_infinite_loop_is_killed_on_time():
    start = time.monotonic()
    result = execute("while True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - start
    assert (result.status, result.returncode, result.reason) == ("timeout", None, "killed after 1 s (wall clock)")
    assert elapsed < 1.0 + 2.0


@needs_isolation
def test_limits_memory_output_and_processes():
    result = execute("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert result.status == "memory_exceeded" and result.error == "MemoryError" and "allocated" not in result.stdout
    result = execute(f"import sys; sys.stdout.write('x' * {sandbox.FILE_SIZE_LIMIT + 1})", guard=False)
    assert result.status == "failed" and result.reason == "OSError: [Errno 27] File too large"
    fork_bomb = ("import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)")
    marker = str(255 << 20)  # the memory limit, in every sandboxed process's argv
    result = execute(fork_bomb, memory_mb=255, guard=False)
    assert result.reason == "BlockingIOError: [Errno 11] Resource temporarily unavailable", result.stderr
    time.sleep(0.2)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    assert left == []  # the sleeping children died with the sandbox


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@needs_isolation
def test_the_work_dir_is_a_bounded_private_tmpfs():
    code = """
import os, pathlib, tempfile, shutil
pathlib.Path('a.txt').write_text('hello')
os.mkdir('d'); open('d/b.txt', 'w').write('x'); shutil.copy('a.txt', 'd/c.txt')
os.rename('a.txt', 'd/a.txt'); os.remove('d/b.txt')
with tempfile.NamedTemporaryFile('w', delete=False) as f:
    f.write('t')
st = os.statvfs('/tmp')
print(sorted(os.listdir('d')), f.name.startswith(os.getcwd()), os.getcwd(), st.f_blocks * st.f_frsize)
print(sorted(os.listdir('/')), sorted(os.environ))
"""
    result = execute(code)
    assert result.status == "passed", result.stderr
    first, second = result.stdout.splitlines()
    assert first == f"['a.txt', 'c.txt'] True /tmp/work {sandbox.TMPFS_BYTES}"
    assert second.startswith("['bin', 'dev', 'lib',") and "'home'" not in second and "'etc'" not in second
    assert second.endswith("['LC_CTYPE', 'PATH', 'PWD']")  # LC_CTYPE: Python's own C-locale coercion


@needs_isolation
def test_environment_secret_and_parent_are_invisible(monkeypatch):
    monkeypatch.setenv("NANOJAX_TEST_SECRET", "hunter2-7f3a")
    code = f"""
import os
print(dict(os.environ), os.getppid(), os.getuid())
try:
    print(open("/proc/{os.getpid()}/environ", "rb").read())
except OSError as e:
    print("parent environ:", type(e).__name__)
"""
    result = execute(code, guard=False)
    assert result.status == "passed", result.stderr
    assert "hunter2-7f3a" not in result.stdout + result.stderr
    assert result.stdout.splitlines()[1] == "parent environ: FileNotFoundError"  # another PID namespace
    assert result.stdout.splitlines()[0].endswith(f" 1 {sandbox.NOBODY}")  # its parent is the sandbox's init


# ----------------------------------------------------------------------------------------------------------------------
# Attacks, run as root and as an unprivileged user. Each is stopped by the kernel: it runs with the Python guards off,
# and with them on it first recovers the real functions from their closures, MRO or a re-imported ctypes.

RECOVER = """
import os, sys, signal
def real(fn, name):  # the C function a guard closes over, or fn itself when there is no guard
    for cell in getattr(fn, '__closure__', None) or ():
        v = cell.cell_contents
        if type(v).__name__ == 'builtin_function_or_method' and v.__name__ == name:
            return v
    return fn
import _socket
Socket = [c for c in _socket.socket.__mro__ if c.__module__ == '_socket'][0]
for name in ('ctypes', '_ctypes'):
    if sys.modules.get(name, 0) is None:
        del sys.modules[name]
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), what + ': ' + os.strerror(ctypes.get_errno()))
open_, remove = real(open, 'open'), real(os.remove, 'remove')
"""


def attacks(precious: Path, home: Path, port: int, victim: int, tag: str) -> dict[str, tuple[str, str]]:
    """name -> (program, the kernel's error that stops it). PARENT is the caller's pid, filled in by whoever runs it."""
    return {
        "overwrite home file": (f"open_({str(precious)!r}, 'w').write('pwned')", "FileNotFoundError"),
        "delete home file": (f"remove({str(precious)!r})", "FileNotFoundError"),
        "new file in home": (f"open_({str(home / tag)!r}, 'w').write('x')", "FileNotFoundError"),
        "ctypes unlink": (f"check(libc.unlink({str(precious).encode()!r}), 'unlink')", "FileNotFoundError"),
        "loopback server": (f"s = Socket(); s.settimeout(2); s.connect(('127.0.0.1', {port}))",
                            "ConnectionRefusedError"),
        "public address": ("s = Socket(); s.settimeout(2); s.connect(('1.1.1.1', 80))", "Network is unreachable"),
        "raw socket": ("Socket(_socket.AF_INET, _socket.SOCK_RAW, _socket.IPPROTO_ICMP)", "Operation not permitted"),
        "fill /tmp": (f"[open_('/tmp/{tag}-%d' % i, 'wb').write(b'x' * (15 << 20)) for i in range(8)]",
                      "No space left on device"),
        "write /dev/shm": (f"open_('/dev/shm/{tag}', 'wb').write(b'x' * (1 << 20))", "Read-only file system"),
        "kill the caller": ("check(libc.kill(PARENT, signal.SIGKILL), 'kill')", "ProcessLookupError"),
        "kill a neighbour": (f"check(libc.kill({victim}, signal.SIGKILL), 'kill')", "ProcessLookupError"),
        "kill everything": ("check(libc.kill(-1, signal.SIGKILL), 'kill')", "ProcessLookupError"),
    }


def _run_attacks(programs: dict, parent: int) -> dict:
    out = {}
    for name, (code, _) in programs.items():
        for guard in (False, True):
            r = execute(RECOVER + code.replace("PARENT", str(parent)), guard=guard)
            out[f"{name}, guard {'on' if guard else 'off'}"] = [r.status, r.reason]
    return out


# Run as nobody: the same attacks through nanojax.sandbox in a process that is not root.
DRIVER = """
import json, os, sys
sys.path[:0] = sys.argv[1:]
import test_sandbox
programs = json.loads(sys.stdin.read())
print(json.dumps(test_sandbox._run_attacks(programs, os.getpid())))
"""


def _assert_stopped(results: dict, programs: dict, precious: Path, home: Path, loopback, victim, tag: str):
    for key, (status, reason) in results.items():
        expected = programs[key.rsplit(",", 1)[0]][1]
        assert status == "failed" and expected in reason, (key, status, reason)
    assert precious.read_text() == "keep me" and sorted(p.name for p in home.iterdir()) == ["precious.txt"]
    assert loopback.connections == 0 and loopback.requests == []
    assert victim.poll() is None  # still running
    assert not list(Path("/tmp").glob(f"{tag}*")) and not list(Path("/dev/shm").glob(f"{tag}*"))


@pytest.fixture
def target(tmp_path):
    """A home directory with a precious file, owned by nobody when we are root, in a place nobody can reach."""
    home = Path(tempfile.mkdtemp(prefix="nanojax-home-", dir="/tmp"))
    (home / "precious.txt").write_text("keep me")
    if os.geteuid() == 0:
        os.chmod(home, 0o755)
        for p in (home, home / "precious.txt"):
            os.chown(p, sandbox.NOBODY, sandbox.NOBODY)
    yield home, f"nanojax-attack-{os.getpid()}-{time.monotonic_ns()}"
    shutil.rmtree(home, ignore_errors=True)


@needs_isolation
def test_attacks_as_this_user_are_stopped_by_the_kernel(loopback, target):
    home, tag = target
    victim = subprocess.Popen(["sleep", "60"])
    try:
        programs = attacks(home / "precious.txt", home, loopback.port, victim.pid, tag)
        results = _run_attacks(programs, os.getpid())
        _assert_stopped(results, programs, home / "precious.txt", home, loopback, victim, tag)
    finally:
        victim.kill()


@needs_isolation
@pytest.mark.skipif(os.geteuid() != 0, reason="this user is already unprivileged (the test above)")
def test_attacks_as_an_unprivileged_user_are_stopped_by_the_kernel(loopback, target):
    import filelock
    home, tag = target
    site = str(Path(filelock.__file__).parents[1])  # the interpreter nobody runs is the system one, not the venv's
    nobody = {"user": sandbox.NOBODY, "group": sandbox.NOBODY, "extra_groups": []}
    victim = subprocess.Popen(["sleep", "60"], **nobody)
    try:
        programs = attacks(home / "precious.txt", home, loopback.port, victim.pid, tag)
        r = subprocess.run([sandbox._python(), "-c", DRIVER, str(Path(__file__).parent), str(ROOT), site],
                           input=json.dumps(programs), capture_output=True, text=True, timeout=240, cwd="/",
                           env={"PATH": os.environ["PATH"], "HOME": str(home), "NANOJAX_BASE_DIR": str(home / "base")},
                           **nobody)
        assert r.returncode == 0, r.stderr
        _assert_stopped(json.loads(r.stdout), programs, home / "precious.txt", home, loopback, victim, tag)
    finally:
        victim.kill()


# ----------------------------------------------------------------------------------------------------------------------
# Without kernel isolation: refused, unless the caller opts in.

def test_no_bubblewrap_is_refused_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "nanojax-no-such-bwrap")
    with pytest.raises(sandbox.SandboxUnavailable, match=r"^model-written code is not run: bubblewrap "
                                                         r"\(nanojax-no-such-bwrap\) is not installed; install "
                                                         r"bubblewrap .*--allow-unisolated-exec\)$"):
        execute("print(1)")
    result = execute("import sys; print(1); sys.exit(0)", allow_unisolated=True)
    assert not result.isolated and result.status == "failed" and result.reason.startswith("SystemExit(0)")
    result = execute("print(sum(range(10)))", allow_unisolated=True)
    assert (result.status, result.stdout, result.isolated) == ("passed", "45\n", False)


def test_namespaces_refused_by_the_kernel_is_refused(monkeypatch, target):
    """A bwrap that fails as it does under Docker's default profile or Ubuntu 24.04's user-namespace restriction."""
    fake = target[0] / "bwrap"  # where nobody may run it
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "BWRAP", str(fake))
    assert sandbox.isolation() == (False, "bubblewrap cannot create its namespaces here (bwrap: setting up uid map: "
                                          "Permission denied)")
    with pytest.raises(sandbox.SandboxUnavailable) as e:
        execute("print(1)")
    assert str(e.value).startswith("model-written code is not run: bubblewrap cannot create its namespaces here "
                                   "(bwrap: setting up uid map: Permission denied); install bubblewrap")
    assert execute("print(2)", allow_unisolated=True).stdout == "2\n"


def test_unisolated_still_has_its_guards(tmp_path, monkeypatch):
    """Opted in, the Python guards and limits are what is left: they still refuse the plain attempts."""
    monkeypatch.setattr(sandbox, "BWRAP", "nanojax-no-such-bwrap")
    path = tmp_path / "outside.txt"
    result = execute(f"open({str(path)!r}, 'w').write('pwned')", allow_unisolated=True)
    assert result.status == "failed" and "PermissionError" in result.reason and not path.exists()
    assert execute("while True:\n    pass", timeout=1.0, allow_unisolated=True).status == "timeout"
