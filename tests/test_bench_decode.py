"""nanojax.bench_decode: the decode benchmark's figures."""
import pytest

from nanojax import gpt
from nanojax.bench_decode import benchmark_decode
from nanojax.config import GPTConfig


@pytest.mark.slow  # compiles its own engine's prefill and decode
def test_benchmark_decode_reports_consistent_figures():
    """bench decode's figures agree with each other; its cache length is the one the engine read."""
    out = benchmark_decode(depth=1, model_dim=64, vocab_size=256, batch=2, prompt_len=8, new_tokens=16, repeats=1)
    cfg = GPTConfig(vocab_size=256, depth=1, model_dim=64, n_head=1, n_kv_head=1, head_dim=64)
    step = out["decode_step_ms"] / 1e3
    assert out["batch"] == 2 and out["dtype"] == "float32" and "bandwidth_util" not in out  # no peak known on a CPU
    assert out["decode_tok_per_s"] == pytest.approx(2 / step, rel=1e-3)
    assert out["weight_bytes"] == 4 * (gpt.num_params(cfg) - 256 * 64 + 64)  # one embedding row per token
    assert out["mean_cache_len"] == 128  # the first cache bucket
    assert out["kv_bytes_per_step"] == pytest.approx(2 * 1 * 2 * out["mean_cache_len"] * 64 * 4, rel=1e-3)
    rate = (out["weight_bytes"] + out["kv_bytes_per_step"]) / step / 1e9
    assert out["read_gb_per_s"] == pytest.approx(rate, rel=1e-2, abs=0.01)
