"""The speedrun's presets: nanochat's numbers for d20/d26/d32, formulas equal to the model's, shards that cover the
tokens at the packer's kept fraction, device batches that shrink to fit and keep the total batch."""
import json
import math
import os
import subprocess
import sys

import pytest

from launch import presets
from nanojax import gpt
from nanojax.config import GPTConfig, TrainConfig

H100x8 = presets.Hardware(8, "NVIDIA H100 80GB HBM3", 80.0)


@pytest.mark.parametrize("name, params, tokens, iterations", [
    ("d20", 560_988_160, 11_219_763_200, 21_400),  # nanochat Oct-2025 speedrun.sh
    ("d26", 1_081_999_360, 21_639_987_200, 41_275),  # ~1.082B (nanochat-facts.md 2b)
    ("d32", 1_879_048_192, 37_580_963_840, 71_680),  # run1000.sh
])
def test_nanochat_tiers(name, params, tokens, iterations):
    d = presets.derive(name, H100x8)
    assert (d["parameters"], d["tokens"], d["iterations"], d["tokens_per_step"]) == (params, tokens, iterations,
                                                                                      524_288)
    p = presets.PRESETS[name]
    cfg = GPTConfig.from_depth(p.depth, vocab_size=p.vocab_size, max_seq_len=p.max_seq_len)
    assert gpt.num_params(cfg) == params and presets.flops_per_token(p.depth, p.vocab_size, 2048) == \
        gpt.flops_per_token(cfg)
    train = TrainConfig(depth=p.depth, device_batch_size=d["device_batch_size"])  # the loop's own arithmetic agrees
    assert train.iterations(params, gpt.flops_per_token(cfg)) == iterations
    assert train.grad_accum_steps(8) == d["grad_accum"] == {"d20": 1, "d26": 2, "d32": 4}[name]
    # the shards cover the tokens the packer reads (its crop included), with the margin, from a source that has them
    shard_tokens = presets.CHARS_PER_SHARD / presets.CHARS_PER_TOKEN
    assert d["shards"] * shard_tokens * presets.KEPT_FRACTION[("fineweb-edu", 2048)] >= tokens * presets.SHARD_MARGIN * 0.999
    assert (d["shards"] - 1) * shard_tokens * presets.KEPT_FRACTION[("fineweb-edu", 2048)] < tokens * presets.SHARD_MARGIN
    assert d["shards"] <= presets.MAX_SHARDS["fineweb-edu"]


def test_d32_flops_and_hours_match_nanochat():
    d = presets.derive("d32", H100x8)
    assert d["flops_per_token"] == pytest.approx(1.20796e10, rel=1e-5)  # run1000.sh's log
    # 8 x 989 TFLOP/s at the assumed MFU: nanochat logged ~31 h at ~51%
    assert d["estimated_hours"] == pytest.approx(1.20796e10 * d["tokens"] / (8 * 989e12 * 0.40) / 3600, rel=1e-3)
    assert d["estimated_usd"] == round(d["estimated_hours"] * 24.0)


def test_batch_shrinks_with_memory_and_devices_and_keeps_the_total():
    p = presets.PRESETS["d20"]
    small = presets.derive("d20", presets.Hardware(2, "Tesla V100-SXM2-16GB", 16.0))
    assert small["device_batch_size"] < p.device_batch_size and small["mesh"] == 2
    assert small["estimated_memory_gib"] <= 16.0 * presets.MEMORY_HEADROOM
    for d in (small, presets.derive("d20", presets.Hardware(1, "H100", 80.0))):
        assert d["device_batch_size"] * 2048 * d["mesh"] * d["grad_accum"] == 524_288
    # 3 GPUs cannot split 256 rows evenly: the run uses 2 of them
    assert presets.derive("d20", presets.Hardware(3, "A100", 80.0))["mesh"] == 2
    # a measured plan (bench memory on the GPUs) drives the same search
    assert presets.fit_device_batch(p, 8, 80.0, plan=lambda b: 10 + b * 4) == 8  # 10 + 32 = 42 <= 68; 16 -> 74
    assert presets.fit_device_batch(p, 8, 80.0, plan=lambda b: 1e9) == 1


def test_cpu_demo_and_no_gpu_fallback():
    d = presets.derive("cpu", presets.Hardware())
    assert (d["depth"], d["iterations"], d["tokens"], d["shards"]) == (4, 600, 1_228_800, 0)
    d20 = presets.derive("d20", presets.Hardware())  # a dry run without GPUs: nanochat's node, said so
    assert d20["gpus"] == 8 and not d20["hardware_detected"] and "no GPU found" in presets.describe(d20)
    assert presets.kept_fraction("fineweb-edu", 2048) == 0.65 and presets.kept_fraction("demo", 300) == 0.421
    assert presets.kept_fraction("/my/parquet", 2000) == 0.65  # another source: FineWeb's figure
    # The demo streams its rows (every token once): 600 steps read 0.46 of an epoch, all fresh text (best fit would
    # read 1.08 epochs and wrap).
    assert "0.46 epochs" in presets.describe(d) and "the loader wraps" not in presets.describe(d)


def test_cli(tmp_path):
    env = {**os.environ, "PATH": "/nonexistent:/usr/bin:/bin", "NANOJAX_PRESET": "d26"}  # no nvidia-smi
    r = subprocess.run([sys.executable, "-m", "launch.presets", "json"], capture_output=True, text=True, env=env)
    assert json.loads(r.stdout)["parameters"] == 1_081_999_360
    r = subprocess.run([sys.executable, "-m", "launch.presets", "show", "--gpus", "4", "--gpu-memory-gib", "40",
                        "d20"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "4 x H100 (40.0 GiB)" in r.stdout and "560,988,160 parameters" in r.stdout
    assert math.isclose(presets.hourly_usd(presets.Hardware(4, "NVIDIA H100")), 12.0)
