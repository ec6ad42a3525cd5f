"""Using checkpoints: load onto other meshes, the REPL object, generate/chat, ls/show/export, and clear errors for a
checkpoint that is missing, rotated away while read, or damaged. (Saving and resuming: test_checkpoint.py.)"""
import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import CFG, ROOT, _env, _logits, _save, base, corpus, saved, trained_tokenizer  # noqa: F401

import nanojax
from nanojax import checkpoint, gpt, models
from nanojax import mesh as meshlib
from nanojax.common import UserError
from nanojax.config import GPTConfig
from tokenizer import Tokenizer


def test_saved_on_8_devices_loads_on_1_and_on_data2_fsdp4_with_identical_logits(saved):
    want_params = jax.tree.map(np.asarray, saved)
    on_one_device = lambda params: _logits(jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, params)), "1")  # noqa
    want = on_one_device(saved)
    for spec in ("1", "data:2,fsdp:4"):
        m = models.load("base", mesh=spec)
        mesh = meshlib.make_mesh(spec)
        if mesh.size == 1:  # one device: no mesh, as arrays made on it (so jit compiles one program for both)
            assert m.mesh is None and all(isinstance(x.sharding, jax.sharding.SingleDeviceSharding)
                                          for x in jax.tree.leaves(m.params))
        else:
            assert m.params["blocks"]["attn_q"].sharding.mesh.shape == mesh.shape
            assert m.params["wte"].sharding.spec == meshlib.logical_to_mesh(("vocab", "embed"), mesh, (300, 128))
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), want_params)
        # The same program over the restored weights: bit for bit; sharded over this mesh: up to summation order.
        np.testing.assert_array_equal(on_one_device(m.params), want)
        np.testing.assert_allclose(_logits(m.params, spec), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jax.tree.map(np.asarray, models.load("base").params)["wte"], want_params["wte"])


def test_repl_load_repr_and_num_params(saved, base):
    m = nanojax.load("base")
    assert (m.stage, m.tag, m.step) == ("base", "d2", 5)
    assert m.config == CFG and m.meta["metrics"]["val_bpb"] == 1.25
    assert m.num_params() == gpt.num_params(CFG) == sum(x.size for x in jax.tree.leaves(m.params))
    assert m.params["blocks"]["attn_q"].shape == (2, 128, 128) and m.params["lm_head"].shape == (128, 300)
    assert m.tokenizer.fingerprint() == Tokenizer.load(base / "tokenizer").fingerprint()
    text = repr(m)
    for piece in ("base/d2 step 5 (final)", f"{gpt.num_params(CFG):,}", "blocks.attn_q (2, 128, 128)", "depth 2",
                  "vocab 300", "val bpb 1.2500", "min val bpb 1.2000"):
        assert piece in text, text
    # Tag and step pick: largest depth tag, latest step, unless asked.
    _save(step=7, final=False)
    assert nanojax.load("base").step == 7 and nanojax.load("base", step=5).step == 5
    rows = nanojax.list_checkpoints()
    assert [(r["stage"], r["tag"], r["step"], r["problem"]) for r in rows] == [("base", "d2", 5, None),
                                                                              ("base", "d2", 7, None)]
    assert all(r["bytes"] > 2 * gpt.num_params(CFG) for r in rows)  # fp32 weights, lightly compressed


def test_generate_and_chat_go_through_the_engine(saved, monkeypatch):
    """The engine is a teammate's module: a stand-in records what the REPL object hands it."""
    import types
    calls = []

    class FakeEngine:
        def __init__(self, params, cfg, tokenizer):
            self.tok = tokenizer
            calls.append(("init", cfg))

        def generate_batch(self, prompt_ids, num_samples=1, max_tokens=16, temperature=1.0, top_k=None, top_p=None,
                           seed=0):
            calls.append(("gen", list(prompt_ids), max_tokens, temperature, top_k, top_p, seed))
            reply = self.tok.encode(" the end") + [self.tok.encode_special("<|assistant_end|>")] + self.tok.encode("x")
            return [list(prompt_ids) + reply], [[0] * len(prompt_ids) + [1] * len(reply)]

    monkeypatch.setitem(sys.modules, "nanojax.engine", types.SimpleNamespace(Engine=FakeEngine))
    m = nanojax.load("base")
    assert m.generate("hello", max_tokens=5, temperature=0.7, seed=3, top_p=0.9).startswith(" the end")
    assert calls[1] == ("gen", m.tokenizer.encode("hello", prepend=m.tokenizer.bos_id), 5, 0.7, None, 0.9, 3)
    assert m.chat([{"role": "user", "content": "hi"}]) == " the end"  # cut at <|assistant_end|>
    assert calls[2][1][-1] == m.tokenizer.encode_special("<|assistant_start|>")
    assert calls[2][3:] == (0.6, 50, None, 0)  # chat's sampling defaults
    assert sum(c[0] == "init" for c in calls) == 1  # one engine per loaded model
    with pytest.raises(UserError, match="prompt must be text or a list of token ids, got 123"):
        m.generate(123)


@pytest.mark.slow  # compiles the engine's prefill and decode
def test_generate_with_the_real_engine_is_greedy_decoding(saved):
    m = nanojax.load("base")
    ids = m.tokenizer.encode("doc 5: the", prepend=m.tokenizer.bos_id)
    seq, stops = list(ids), {m.tokenizer.bos_id, m.tokenizer.encode_special("<|assistant_end|>")}
    # One compiled forward of a fixed width: the model is causal, so the padding after the sequence changes nothing
    # before it (a growing sequence would compile a new forward per token).
    forward, width = jax.jit(lambda p, t: gpt.forward(p, t, m.config)), len(ids) + 4
    for _ in range(4):
        padded = jnp.asarray([seq + [0] * (width - len(seq))])
        token = int(jnp.argmax(forward(m.params, padded)[0, len(seq) - 1]))
        if token in stops:
            break
        seq.append(token)
    assert m.generate("doc 5: the", max_tokens=4, temperature=0.0) == m.tokenizer.decode(seq[len(ids):])


def test_cli_ls_show(saved, capsys):
    models.main(["ls"])
    out = capsys.readouterr().out
    assert "base" in out and "d2" in out and "(final) loss 2.5000, val bpb 1.2500" in out
    models.main(["show", "base", "--tag", "d2", "--step", "5"])
    out = capsys.readouterr().out
    assert "base/d2 step 5 (final)" in out and "vocab_size 300" in out and "val bpb 1.2500" in out
    assert "MB" in out or "KB" in out


def test_export_round_trip_without_jax(saved, base, tmp_path):
    out = tmp_path / "exported"
    models.main(["export", "base", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    # Read back with numpy, safetensors and json only (in a fresh interpreter that never imports jax).
    reader = ("import json, sys, numpy as np; from safetensors.numpy import load_file; d = sys.argv[1]; "
              "w = load_file(d + '/model.safetensors'); c = json.load(open(d + '/config.json')); "
              "np.savez(d + '/../check.npz', **w); print(json.dumps(c['model_config']), 'jax' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", reader, str(out)], capture_output=True, text=True, timeout=60)
    cfg_json, jax_loaded = r.stdout.rsplit(" ", 1)
    assert jax_loaded.strip() == "False", r.stderr
    assert GPTConfig.from_dict(json.loads(cfg_json)) == CFG
    arrays = dict(np.load(tmp_path / "check.npz"))
    want = dict(models._named_leaves(jax.tree.map(np.asarray, saved)))
    assert sorted(arrays) == sorted(want) == ["blocks.attn_k", "blocks.attn_o", "blocks.attn_q", "blocks.attn_v",
                                              "blocks.mlp_fc", "blocks.mlp_proj", "lm_head", "wte"]
    for name in want:
        np.testing.assert_array_equal(arrays[name], want[name])
    config = json.loads((out / "config.json").read_text())
    assert config["tensors"]["blocks.attn_q"]["axes"] == ["layers", "embed", "heads"] and config["step"] == 5
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.fingerprint() == config["tokenizer"] == Tokenizer.load(base / "tokenizer").fingerprint()
    # Rebuilt from the exported files alone, the model gives the checkpoint's logits.
    params = {"wte": arrays["wte"], "lm_head": arrays["lm_head"],
              "blocks": {k.split(".")[1]: v for k, v in arrays.items() if k.startswith("blocks.")}}
    np.testing.assert_array_equal(_logits(params, "1"), _logits(jax.tree.map(np.asarray, saved), "1"))
    with pytest.raises(UserError, match="already exists and is not empty"):
        models.export("base", out)
    with pytest.raises(UserError, match="is a file; pick a new directory"):
        models.export("base", out / "config.json")
    with pytest.raises(UserError, match=r"config.json/sub: cannot create a directory there \(Not a directory\)"):
        models.export("base", out / "config.json" / "sub")



# ----------------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming what was found.

def test_missing_stage_tag_or_step(saved):
    with pytest.raises(UserError, match=r"no sft checkpoints .*; train that stage first \(python -m launch.sft\); "
                                        r"found: base/d2 \(steps 5\)"):
        models.load("sft")
    with pytest.raises(UserError, match="no base checkpoint with tag 'd9'; found tags: d2"):
        models.load("base", tag="d9")
    with pytest.raises(UserError, match="base/d2 has no step 99; found steps: 5"):
        models.load("base", step=99)
    with pytest.raises(UserError, match=r"step must be an integer \(one of 5\), got '5'"):
        models.load("base", step="5")
    with pytest.raises(UserError, match="unknown stage 'chat'"):
        models.load("chat")


def test_a_step_rotated_away_while_read_is_not_called_damaged(saved, monkeypatch):
    """A run training the stage keeps its last --keep steps: the latest one may go while a reader loads it."""
    _save(step=7, final=False)
    real, calls = models._load_step, []

    def rotated_mid_read(stage, tag, step, mesh):
        calls.append(step)
        if step == 7:  # the job saved 9 and removed 7 just as we read it
            shutil.copytree(checkpoint.tag_dir(stage, tag) / "7", checkpoint.tag_dir(stage, tag) / "9",
                            dirs_exist_ok=True)
            shutil.rmtree(checkpoint.tag_dir(stage, tag) / "7")
            raise UserError(f"checkpoint .../{step} is damaged: cannot read its params")
        return real(stage, tag, step, mesh)

    monkeypatch.setattr(models, "_load_step", rotated_mid_read)
    assert models.load("base").step == 9 and calls == [7, 9]  # the newest again
    calls.clear()
    with pytest.raises(UserError, match=r"base/d2 step 7 was deleted while it was read: a running job keeps only its "
                                        r"latest checkpoints; steps now: (5, )?9$"):
        _save(step=7, final=False)
        models.load("base", step=7)  # asked for by number: said, not replaced


def test_damaged_checkpoints_are_errors_not_skipped(saved, base, tmp_path, capsys):
    step_dir = checkpoint.tag_dir("base", "d2") / "5"
    data_files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    sizes = {p: p.stat().st_size for p in data_files}
    for p in data_files:  # truncate every data file of the params item
        p.write_bytes(p.read_bytes()[:16])
    # The sizes recorded when the save completed find it by a stat: ls and show flag the step, load names the file.
    first = sorted(str(p.relative_to(step_dir)) for p in data_files)[0]
    truncated = f"its file {first} is truncated (16 of {sizes[step_dir / first]:,} bytes)"
    with pytest.raises(UserError, match=rf"^checkpoint .*/5 is damaged: {re.escape(truncated)}; delete that "
                                        rf"directory to use an earlier step$"):
        models.load("base")
    assert models.list_checkpoints()[0]["problem"] == f"damaged: {truncated}"
    models.main(["ls"])
    assert f"5: damaged: {truncated}" in capsys.readouterr().out
    models.main(["show", "base"])
    assert f"WARNING: damaged: {truncated}" in capsys.readouterr().out
    # Without that record (a checkpoint saved before it existed): Orbax's read fails, and that is one line too.
    (step_dir / checkpoint.FILES).unlink()
    with pytest.raises(UserError, match=r"checkpoint .*/5 is damaged: cannot read its params"):
        models.load("base")
    # From the command line: the one-line error and nothing else (no tracebacks from reads still in flight).
    r = subprocess.run([sys.executable, "-m", "serve.cli", "-i", "base", "-p", "Hi"], capture_output=True, text=True,
                       env=_env(base, tmp_path / "jax_cache", devices=1), cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint ") and r.stderr.count("\n") == 1, r.stderr
    shutil.rmtree(step_dir / "params")
    with pytest.raises(UserError, match=r"checkpoint .*/5 is damaged: missing params \(found: .*meta"):
        models.load("base")
    assert models.list_checkpoints()[0]["problem"] == "damaged: missing params"
    models.main(["ls"])
    assert "damaged: missing params" in capsys.readouterr().out
