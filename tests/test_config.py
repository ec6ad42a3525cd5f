import json

import pytest

from nanojax.common import UserError
from nanojax.config import GPTConfig, TrainConfig


def test_from_depth_is_nanochats_dial():
    cfg = GPTConfig.from_depth(20)
    assert (cfg.depth, cfg.model_dim, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (20, 1280, 10, 10, 128)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.softcap) == (65536, 2048, 10000.0, 15.0)
    cfg = GPTConfig.from_depth(32, vocab_size=50000, n_kv_head=4, max_seq_len=1024)
    assert (cfg.model_dim, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.max_seq_len) == (2048, 16, 4, 50000, 1024)
    tiny = GPTConfig.from_depth(2, vocab_size=512, head_dim=32, n_kv_head=2, max_seq_len=64)
    assert (tiny.model_dim, tiny.n_head, tiny.n_kv_head) == (128, 4, 2)


def test_depth_that_cannot_form_heads_names_the_values():
    with pytest.raises(UserError) as e:
        GPTConfig.from_depth(3)
    msg = str(e.value)
    assert "depth 3" in msg and "64" in msg and "192" in msg and "head_dim 128" in msg and "multiple of 2" in msg
    with pytest.raises(UserError, match="depth"):
        GPTConfig.from_depth(0)


def test_kv_heads_must_divide_heads():
    with pytest.raises(UserError) as e:
        GPTConfig.from_depth(8, n_kv_head=3)  # 512 / 128 = 4 heads
    msg = str(e.value)
    assert "n_kv_head 3" in msg and "n_head 4" in msg and "[1, 2, 4]" in msg
    with pytest.raises(UserError, match="n_kv_head 0"):
        GPTConfig.from_depth(8, n_kv_head=0)
    assert GPTConfig.from_depth(8, n_kv_head=1).n_kv_head == 1


def test_direct_construction_is_validated():
    good = dict(vocab_size=512, depth=2, model_dim=128, n_head=4, n_kv_head=2, head_dim=32)
    GPTConfig(**good)
    with pytest.raises(UserError, match="model_dim 128 must equal n_head 4 x head_dim 16"):
        GPTConfig(**{**good, "head_dim": 16})
    with pytest.raises(UserError, match="vocab_size"):
        GPTConfig(**{**good, "vocab_size": -1})
    with pytest.raises(UserError, match="head_dim 1 must be even"):
        GPTConfig(**{**good, "model_dim": 4, "head_dim": 1})
    with pytest.raises(UserError, match="softcap"):
        GPTConfig(**good, softcap=0.0)


@pytest.mark.parametrize("field, value, message", [
    ("device_batch_size", 0, "--device-batch-size 0: must be a positive number"),
    ("total_batch_size", -8, "--total-batch-size -8: must be a positive number"),
    ("keep", 0, "--keep 0: must be a positive number"),
    ("matrix_lr", -0.1, "--matrix-lr -0.1: must be zero or more"),
    ("final_lr_frac", 1.5, "--final-lr-frac 1.5: must be between 0 and 1"),
    ("warmup_ratio", 0.9, r"--warmup-ratio 0.9 \+ --warmdown-ratio 0.2 is over 1"),
    ("remat", "bogus", "--remat bogus: use auto, full, none or a jax.checkpoint_policies name"),
    ("run", "../../elsewhere", "--run '../../elsewhere': a run is a directory under runs/, so a plain name"),
    ("run", "..", "--run '..': a run is a directory under runs/"),
    ("num_iterations", 0, "--num-iterations 0: must be a positive number, or -1 for off"),
    ("target_flops", -7.0, "--target-flops -7.0: must be a positive number, or -1 for off"),
    ("packing", "greedy", "--packing 'greedy': use one of bestfit, stream"),
])
def test_train_config_rejects_out_of_range_values_by_flag(field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value})
    TrainConfig(num_iterations=-1, eval_every=0, save_every=-1, grad_clip=0.0)  # the "off" values stay allowed
    TrainConfig(remat="dots_with_no_batch_dims_saveable")


def test_dict_round_trip_through_json():
    cfg = GPTConfig.from_depth(4, vocab_size=8192, n_kv_head=1, max_seq_len=256)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GPTConfig.from_dict(d) == cfg
    with pytest.raises(UserError, match="unknown GPTConfig keys \\['bogus'\\]"):
        GPTConfig.from_dict({**d, "bogus": 1})
    del d["depth"]
    with pytest.raises(UserError, match="incomplete"):
        GPTConfig.from_dict(d)
