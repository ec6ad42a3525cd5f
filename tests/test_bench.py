"""bench.py's command line (the benchmarks themselves are measurements, not tests: see docs/performance.md)."""
import pytest

from nanojax import bench


@pytest.mark.parametrize("argv, message", [
    (["decode", "--batch", "0"], "error: --batch 0: must be a positive number\n"),
    (["decode", "--repeats", "0"], "error: --repeats 0: must be a positive number\n"),
    (["train", "--steps", "-1"], "error: --steps -1: must be a positive number\n"),
    (["data", "--seconds", "0"], "error: --seconds 0.0: must be a positive number\n"),
    (["serve", "--clients", "0"], "error: --clients 0: must be a positive number\n"),
    (["serve", "--requests", "-5"], "error: --requests -5: must be a positive number\n"),
    (["serve", "--rounds", "0"], "error: --rounds 0: must be a positive number\n"),
    (["decode", "--depth", "2", "--n-kv-head", "3"], "error: n_kv_head 3 must divide n_head 1 (depth 2); allowed: [1]\n"),
    (["memory", "--mesh", "0"], "error: --mesh '0': every axis size must be at least 1; allowed forms: "),
    (["memory", "--mesh", "100000"], "error: --mesh '100000' needs 100000 devices; a memory plan simulates at most 1024 "
                                     "on the CPU\n"),
    (["tokenizer", "--vocab-size", "10"], "error: --vocab-size 10 is too small: it must be at least 265 "),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message) and err.count("\n") == 1
