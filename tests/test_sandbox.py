"""The calculator tool and the HumanEval sandbox: right answers, refusals, and every isolation layer."""
import os
import time

import pytest

from nanojax import sandbox
from nanojax.sandbox import calculator, execute


@pytest.fixture(scope="module")
def isolation():
    return sandbox.isolation()


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
# Execution.

def test_happy_path():
    result = execute("import math\nprint(sum(range(10)), math.factorial(5))")
    assert (result.status, result.stdout, result.returncode) == ("passed", "45 120\n", 0)
    assert result.passed and result.stderr == ""


def test_exception_fails_with_error_text():
    result = execute("def f():\n    raise ValueError('boom')\nf()")
    assert result.status == "failed"
    assert result.error == "ValueError: boom"
    assert "Traceback" in result.stderr and "main.py" in result.stderr


def test_exit_code_decides():
    assert execute("import sys; sys.exit(3)").status == "failed"
    assert execute("import sys; sys.exit(0)").status == "passed"


def test_infinite_loop_is_killed_on_time():
    start = time.monotonic()
    result = execute("while True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.returncode is None
    assert elapsed < 1.0 + 2.0


def test_two_gigabytes_is_memory_exceeded():
    result = execute("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert result.status == "memory_exceeded"
    assert "allocated" not in result.stdout and result.error == "MemoryError"


def test_files_inside_the_work_dir_are_fine():
    code = """
import os, pathlib, tempfile, shutil
pathlib.Path('a.txt').write_text('hello')
os.mkdir('d'); open('d/b.txt', 'w').write('x'); shutil.copy('a.txt', 'd/c.txt')
os.rename('a.txt', 'd/a.txt'); os.remove('d/b.txt')
with tempfile.NamedTemporaryFile('w', delete=False) as f:
    f.write('t')
print(sorted(os.listdir('d')), f.name.startswith(os.getcwd()), os.getcwd())
"""
    result = execute(code)
    assert result.status == "passed", result.stderr
    listing, in_work, cwd = result.stdout.rsplit(" ", 2)
    assert listing == "['a.txt', 'c.txt']" and in_work == "True"
    assert not os.path.exists(cwd.strip())  # the work dir is removed afterwards


@pytest.mark.parametrize("how", [
    "open({path!r}, 'w').write('pwned')",
    "open({path!r}, 'a').write('pwned')",
    "import pathlib; pathlib.Path({path!r}).write_text('pwned')",
    "import os; os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import io; io.FileIO({path!r}, 'w')",
])
def test_writing_outside_fails(tmp_path, how):
    path = tmp_path / "outside.txt"
    result = execute(how.format(path=str(path)))
    assert result.status == "failed" and "PermissionError" in result.error
    assert not path.exists()


@pytest.mark.parametrize("how", [
    "import os; os.remove({path!r})",
    "import os; os.unlink({path!r})",
    "import pathlib; pathlib.Path({path!r}).unlink()",
    "import os; os.rename({path!r}, 'stolen.txt')",
    "import shutil; shutil.rmtree({dir!r})",
    "import shutil; shutil.move({path!r}, 'stolen.txt')",
    "import os; os.chmod({path!r}, 0o777)",
    "import os; os.truncate({path!r}, 0)",
])
def test_deleting_or_changing_the_callers_file_fails(tmp_path, how):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    result = execute(how.format(path=str(path), dir=str(tmp_path)))
    assert result.status == "failed" and "PermissionError" in result.error
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("how", [
    "import subprocess; subprocess.run(['touch', {marker!r}])",
    "import subprocess; subprocess.Popen(['touch', {marker!r}]).wait()",
    "import os; os.system('touch ' + {marker!r})",
    "import os; os.popen('touch ' + {marker!r}).read()",
    "import os\nif os.fork() == 0:\n    open({marker!r}, 'w')",
    "import os; os.execv('/usr/bin/touch', ['touch', {marker!r}])",
    "import os; os.posix_spawn('/usr/bin/touch', ['touch', {marker!r}], {{}})",
    "import multiprocessing",
    "import ctypes",
])
def test_spawning_processes_fails(tmp_path, how):
    marker = tmp_path / "spawned"
    result = execute(how.format(marker=str(marker)))
    assert result.status == "failed"
    assert "PermissionError" in result.error or "ImportError" in result.error or "ModuleNotFoundError" in result.error
    assert not marker.exists()


def test_network_connection_fails(loopback):
    """`loopback` (tests/conftest.py) answers "hello" at / and counts every TCP connection it accepts."""
    loopback.files[""] = b"hello"
    port, get = loopback.port, "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(200))"
    for code in (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); {get}",
                 f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port})); {get}",
                 f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2).read())"):
        result = execute(code)
        assert result.status == "failed" and "hello" not in result.stdout, result.stderr
    assert loopback.connections == 0 and loopback.requests == []


def test_kernel_layers_hold_without_the_guard(loopback, tmp_path, isolation):
    """The Python guards are one layer; the network namespace and the dropped uid hold on their own."""
    if not isolation["netns"]:
        pytest.skip("this kernel refuses a new network namespace")
    result = execute(f"import socket; socket.create_connection(('127.0.0.1', {loopback.port}), timeout=2)", guard=False)
    assert result.status == "failed" and "unreachable" in result.stderr.lower()
    assert loopback.connections == 0
    if isolation["uid"] != os.geteuid():  # started as root, running as nobody
        precious = tmp_path / "precious.txt"
        precious.write_text("keep me")
        result = execute(f"import os; os.remove({str(precious)!r})", guard=False)
        assert result.status == "failed" and "PermissionError" in result.error
        assert precious.read_text() == "keep me"


def test_environment_secret_is_invisible(monkeypatch, isolation):
    monkeypatch.setenv("NANOJAX_TEST_SECRET", "hunter2-7f3a")
    code = """
import os
print(dict(os.environ))
try:
    print(open(f"/proc/{os.getppid()}/environ", "rb").read())
except OSError as e:
    print("parent environ denied:", type(e).__name__)
"""
    result = execute(code)
    assert result.status == "passed", result.stderr
    assert "hunter2-7f3a" not in result.stdout + result.stderr
    assert "NANOJAX_TEST_SECRET" not in result.stdout
    env = eval(result.stdout.splitlines()[0])  # a dict literal printed by the child
    assert set(env) <= {"PATH", "LC_CTYPE"}  # LC_CTYPE is Python's own C-locale coercion
    if isolation["uid"] != os.geteuid():
        assert "parent environ denied: PermissionError" in result.stdout
