import io
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax import gpt
from nanojax.checkpoint import StageCheckpoints
from nanojax.config import GPTConfig
from nanojax.engine import Engine
from serve import cli
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=300, depth=2, model_dim=64, n_head=4, n_kv_head=2, head_dim=16, max_seq_len=128)
WORDS = "hello world the of and to in a is that for it as was with be by on not he this are or his".split()


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    return Tokenizer.train(iter(" ".join(rng.choice(WORDS, 30)) for _ in range(300)), CFG.vocab_size)


def save_checkpoint(base_dir, tok, stage):
    """A real stage checkpoint of random weights (init zeroes the head: fill everything), as training writes it."""
    tok.save(base_dir / "tokenizer")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) / math.sqrt(x.shape[-2])),
                          gpt.abstract_params(CFG))
    ck = StageCheckpoints(stage, "d2")
    ck.save(3, params, None, {"step": 3, "model_config": CFG.to_dict(), "tokenizer": tok.fingerprint()})
    ck.close()
    return params


def expected_reply(params, tok, prompt_ids, **kw):
    return "".join(Engine(params, CFG, tok).stream_text(prompt_ids, **kw))


def test_base_prompt_in_a_subprocess_prints_the_continuation(base_dir, tok):
    params = save_checkpoint(base_dir, tok, "base")
    env = {**os.environ, "NANOJAX_BASE_DIR": str(base_dir), "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "serve.cli", "-i", "base", "-p", "Hello", "-t", "0", "-m", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    continuation = expected_reply(params, tok, tok.encode("Hello", prepend=tok.bos_id), temperature=0, max_tokens=8)
    assert continuation and done.stdout == "Hello" + continuation + "\n"


def test_missing_checkpoint_is_a_one_line_error(base_dir, tok, capsys):
    tok.save(base_dir / "tokenizer")
    with pytest.raises(SystemExit) as e:
        cli.main(["-i", "sft", "-p", "Hello"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no sft checkpoints") and err.count("\n") == 1


@pytest.mark.parametrize("argv, match", [(["-m", "0"], "--max-tokens"), (["-t", "-1"], "--temperature"),
                                         (["-k", "-5"], "--top-k")])
def test_bad_flags_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-i", "sft", "-p", "x", *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_chat_prompt_once(base_dir, tok, capsys):
    params = save_checkpoint(base_dir, tok, "sft")
    assert cli.main(["-i", "sft", "-p", "hello world", "-t", "0", "-m", "6"]) == 0
    prompt = tok.render_for_completion([{"role": "user", "content": "hello world"}])
    assert capsys.readouterr().out == expected_reply(params, tok, prompt, temperature=0, max_tokens=6) + "\n"


def test_interactive_chat_keeps_history_and_obeys_commands(base_dir, tok, capsys, monkeypatch):
    save_checkpoint(base_dir, tok, "sft")
    calls = []
    generate = Engine.generate

    def recording(self, prompt_ids, **kw):
        calls.append({"prompt": list(prompt_ids), **kw, "out": []})
        for column in generate(self, prompt_ids, **kw):
            calls[-1]["out"].append(column[0][0])
            yield column

    monkeypatch.setattr(Engine, "generate", recording)
    lines = ["hello", "/temperature 0", "/topk 3", "/topk nope", "world", "/clear", "the end", "/what", "/quit",
             "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli.main(["-i", "sft", "-m", "5"]) == 0
    out = capsys.readouterr().out
    for piece in ("(temperature 0.0)", "(top-k 3)", "(bad value 'nope' for /topk", "(new conversation)",
                  "(unknown command '/what')\ncommands:"):
        assert piece in out
    assert out.count("Assistant: ") == 3 and len(calls) == 3

    render = lambda text: tok.render_for_completion([{"role": "user", "content": text}])  # noqa: E731
    first, second, third = calls
    assert first["prompt"] == render("hello") and (first["temperature"], first["top_k"]) == (0.6, 50)
    # The second turn carries the first one exactly as generated (up to its stop), then the new user turn.
    stops = {tok.encode_special("<|assistant_end|>"), tok.bos_id}
    reply = [t for t in first["out"] if t not in stops][:5] if not set(first["out"]) & stops else \
        first["out"][:next(i for i, t in enumerate(first["out"]) if t in stops)]
    assert second["prompt"] == first["prompt"] + reply + [tok.encode_special("<|assistant_end|>")] + render("world")[1:]
    assert (second["temperature"], second["top_k"]) == (0.0, 3)
    assert third["prompt"] == render("the end")  # /clear forgot the history
