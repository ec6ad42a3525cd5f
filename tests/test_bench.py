"""bench.py's command line (the benchmarks themselves are measurements, not tests: see docs/performance.md)."""
import pytest

from nanojax import bench


@pytest.mark.parametrize("argv, message", [
    (["decode", "--batch", "0"], "error: --batch 0: must be a positive number\n"),
    (["decode", "--repeats", "0"], "error: --repeats 0: must be a positive number\n"),
    (["train", "--steps", "-1"], "error: --steps -1: must be a positive number\n"),
    (["data", "--seconds", "0"], "error: --seconds 0.0: must be a positive number\n"),
])
def test_bad_numbers_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == message
