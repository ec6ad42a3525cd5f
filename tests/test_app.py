"""serve.app: every route and limit through Starlette's TestClient and a real uvicorn on 127.0.0.1, the official
`openai` client, the command line, and the page in a headless chromium (skipped, with the reason printed, when there
is none). The model is scripted (tests/test_engine.py's ScriptedEngine): whatever the conversation, the reply is
"Hi✓😀" then dots until max_tokens, one token per UTF-8 byte, so multi-byte characters are split across tokens."""
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serve import app as app_lib
from serve.app import MAX_BODY, ChatServer
from test_engine import byte_ids, models, scripted, special, tok  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
REPLY = "Hi✓😀"


@pytest.fixture(scope="module")
def server(scripted, tok):
    chain = [special(tok, "<|assistant_start|>")] + byte_ids(tok, REPLY + ".")
    scripted.script(bigram=dict(zip(chain, chain[1:])) | {chain[-1]: chain[-1]})  # then "." forever
    return ChatServer(scripted, tok, model_id="nanojax-test", max_batch=4, max_queue=2)


@pytest.fixture(scope="module")
def client(server):
    with TestClient(server.app()) as c:
        yield c


def reply(max_tokens):
    """The scripted reply cut to max_tokens tokens (one per byte)."""
    data = (REPLY + "." * max_tokens).encode()[:max_tokens]
    return data.decode("utf-8", errors="ignore")


def events(text: str) -> list:
    assert text.endswith("\n\n")
    return [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.strip().split("\n\n")]


def chat(content="hello", **kw):
    return {"messages": [{"role": "user", "content": content}], **kw}


# ----------------------------------------------------------------------------------------------------------------------
# nanochat's protocol, the OpenAI API, the other routes (TestClient).

def test_nanochat_stream_never_splits_a_character(client):
    r = client.post("/chat/completions", json=chat(max_tokens=14, temperature=0))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    assert got[-1] == {"done": True} and all(set(e) == {"token"} for e in got[:-1])
    assert "".join(e["token"] for e in got[:-1]) == reply(14) == "Hi✓😀....."
    assert all("\ufffd" not in e["token"] for e in got[:-1])


def test_openai_non_streaming_and_streaming(client):
    r = client.post("/v1/chat/completions", json=chat(model="nanojax-test", max_tokens=10, seed=3))
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["model"] == "nanojax-test"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi✓😀."}
    assert body["choices"][0]["finish_reason"] == "length"
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 10,
                             "total_tokens": prompt_tokens + 10}
    r = client.post("/v1/chat/completions", json=chat(max_completion_tokens=6, stream=True, stop=["✓"],
                                                        stream_options={"include_usage": True}))
    got = events(r.text)
    assert got[-1] == "[DONE]" and got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got[1:-2]) == "Hi"  # the stop string cuts
    assert got[-3]["choices"][0]["finish_reason"] == "stop" and got[-2]["choices"] == []
    assert got[-2]["usage"]["prompt_tokens"] == prompt_tokens


def test_other_routes(client, server):
    assert client.get("/").text.startswith("<!DOCTYPE html>") and "Ctrl+Shift+N" in client.get("/").text
    logo = client.get("/logo.svg")
    assert logo.headers["content-type"] == "image/svg+xml" and logo.text.startswith("<svg")
    assert client.get("/v1/models").json()["data"][0]["id"] == "nanojax-test"
    assert client.get("/health").json() == {"status": "ok", "ready": True, "model": "nanojax-test", "free_slots": 4,
                                            "waiting": 0, "warm_up": {"programs": 0, "compiled": 0, "seconds": 0.0,
                                                                      "done": False}}
    stats = client.get("/stats").json()
    assert stats["active_streams"] == 0 and stats["engine"]["active"] == 0 and stats["engine"]["requests"] >= 0
    assert {"tokens_per_s", "batch_occupancy", "waiting", "free_slots"} <= set(stats["engine"])
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://x.test"}).headers


def test_the_calculator_runs_as_in_the_cli(client, scripted, tok):
    before = scripted._params
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    chain = [special(tok, "<|assistant_start|>"), ps] + byte_ids(tok, "7*6") + [pe]
    oe, z = special(tok, "<|output_end|>"), byte_ids(tok, "Z")[0]
    scripted.script(bigram=dict(zip(chain, chain[1:])) | {oe: z})
    try:
        got = events(client.post("/chat/completions", json=chat(temperature=0)).text)
    finally:
        scripted._params = before
    assert "".join(e.get("token", "") for e in got) == \
        "<|python_start|>7*6<|python_end|><|output_start|>42<|output_end|>Z"


BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 501}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "y" * 8000}] * 2
     + [{"role": "user", "content": "z"}]}, "messages"),  # 32,001 characters
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),  # alternation
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    (chat(temperature=2.5), "temperature"), (chat(temperature="hot"), "temperature"),
    (chat(temperature=True), "temperature"), (chat(top_k=201), "top_k"), (chat(top_k=1.5), "top_k"),
    (chat(top_k=-1), "top_k"), (chat(max_tokens=0), "max_tokens"), (chat(max_tokens=4097), "max_tokens"),
    (chat(max_tokens="9"), "max_tokens"), (chat(top_p=0), "top_p"), (chat(seed=1.5), "seed"),
    ([1, 2], "body"),
]
BAD_OPENAI = [(chat(stop=[1]), "stop"), (chat(stop=["a"] * 5), "stop"), (chat(n=2), "n"),
              (chat(stream="yes"), "stream"),
              (chat(max_completion_tokens=5000), "max_completion_tokens"), (chat(logprobs=True), "logprobs"),
              (chat(presence_penalty=0.5), "presence_penalty")]


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/chat/completions"])
def test_bad_requests_are_400s_naming_the_field_and_never_reach_the_engine(client, server, route):
    before = server.slots.stats()["requests"]
    cases = BAD + (BAD_OPENAI if route.startswith("/v1") else [])
    for body, field in cases:
        r = client.post(route, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.json())
    for data, what in ((b"{not json", "not JSON"), (b'{"messages": "\xff"}', "not valid UTF-8")):
        r = client.post(route, content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400 and what in r.json()["error"]["message"]
    r = client.post(route, content=b" " * (MAX_BODY + 1))
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    r = client.post("/v1/chat/completions", json=chat(model="gpt-4"))
    assert r.status_code == 404 and "nanojax-test" in r.json()["error"]["message"]
    assert server.slots.stats()["requests"] == before
    assert client.get("/chat/completions").status_code == 405


def test_body_size_is_checked_before_reading_it(server):
    """A Content-Length over the cap is refused without reading the body (a streamed body is cut at the cap)."""
    app = server.app()
    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}
    messages = []

    async def send(message):
        messages.append(message)
    scope = {"type": "http", "method": "POST", "path": "/chat/completions",
             "headers": [(b"content-length", b"99999999")], "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("127.0.0.1", 1), "http_version": "1.1"}
    asyncio.run(app(scope, receive, send))
    assert messages[0]["status"] == 413 and sent == []
    messages.clear()
    asyncio.run(app({**scope, "headers": []}, receive, send))  # no length: read until past the cap, then refused
    assert messages[0]["status"] == 413 and len(sent) == MAX_BODY // 65536 + 1


def test_a_full_queue_is_429_with_retry_after(server, tok):
    """Nothing runs the slots here: one free row and max_queue 2, then every further request is refused."""
    busy = ChatServer(server.engine, tok, model_id="x", max_batch=1, max_queue=2)
    client = TestClient(busy.app())  # no `with`: no lifespan, so the loop never takes them
    for _ in range(3):
        busy.slots.submit([tok.bos_id], max_tokens=1)
    r = client.post("/chat/completions", json=chat())
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "rate_limit_error"
    assert busy.slots.stats()["rejected"] == 1


def test_cors_is_off_unless_origins_are_named(server, tok):
    open_server = ChatServer(server.engine, tok, model_id="x", cors_origins=["http://ok.test"])
    c = TestClient(open_server.app())
    ok = c.options("/v1/models", headers={"Origin": "http://ok.test", "Access-Control-Request-Method": "GET"})
    assert ok.headers["access-control-allow-origin"] == "http://ok.test"
    other = c.get("/v1/models", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


# ----------------------------------------------------------------------------------------------------------------------
# A real uvicorn on 127.0.0.1: the openai package, disconnects, the browser.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(server, client):  # after `client` (module order): the slots run under one lifespan at a time
    import uvicorn

    port = free_port()
    config = uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)  # the slots already run, under the TestClient's lifespan
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded: 20 s
        if uv.started:
            break
        time.sleep(0.1)
    assert uv.started
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


def test_the_openai_client_streams_and_does_not(live):
    import openai

    c = openai.OpenAI(base_url=live + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in c.models.list()] == ["nanojax-test"]
    done = c.chat.completions.create(model="nanojax-test", messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    assert done.choices[0].message.content == REPLY and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 9
    stream = c.chat.completions.create(model="nanojax-test", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=12, stream=True, temperature=0.5, top_p=0.9, seed=1)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == REPLY + "..."
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="nanojax-test", messages=[{"role": "user", "content": "hi"}], temperature=3)


def test_clients_that_disconnect_free_their_slots(live, server, monkeypatch):
    import httpx

    deliver = server.slots._deliver

    def slowly(*args):  # a device call every 0.2 s: the replies (at most ~110 tokens here) outlast the hang-ups
        time.sleep(0.2)
        return deliver(*args)
    monkeypatch.setattr(server.slots, "_deliver", slowly)
    before = server.slots.stats()["finished"].get("cancelled", 0)
    for _ in range(3):
        with httpx.stream("POST", live + "/chat/completions", json=chat(max_tokens=4000), timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
    for _ in range(300):  # bounded: 30 s
        stats = httpx.get(live + "/stats").json()
        if stats["engine"]["finished"].get("cancelled", 0) - before == 3 and stats["engine"]["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["engine"]["finished"]["cancelled"] - before == 3 and stats["engine"]["active"] == 0
    assert stats["engine"]["free_slots"] == 4 and stats["active_streams"] == 0 and stats["http"]["disconnected"] >= 3


def test_the_page_in_headless_chromium(live, tmp_path):
    """Load /, send a message, see the streamed reply, edit the message, regenerate the reply, save a screenshot."""
    from cdp import Browser, find_chromium

    binary = find_chromium()
    if binary is None:
        reason = "no chromium found (apt-get install chromium): the browser test is skipped"
        print(f"\nSKIP {reason}", file=sys.__stderr__)
        pytest.skip(reason)
    with Browser(binary, width=420, height=760) as page:  # a phone's width
        page.open(live + "/")
        page.wait("document.querySelector('#input') !== null")
        page.type_and_send("What is 2+2?")
        page.wait(f"document.querySelectorAll('.assistant').length === 1 && "
                  f"document.querySelector('.assistant').textContent.startsWith({json.dumps(REPLY)}) && "
                  f"!document.body.classList.contains('generating')")
        assert page.eval("document.querySelector('.user').textContent") == "What is 2+2?"
        page.eval("document.querySelector('.user').click()")  # edit: back into the input, the turn removed
        assert page.eval("document.querySelector('#input').value") == "What is 2+2?"
        assert page.eval("document.querySelectorAll('.msg').length") == 0
        page.type_and_send(" and 3+3?", clear=False)
        page.wait("document.querySelectorAll('.assistant').length === 1 && "
                  "!document.body.classList.contains('generating')")
        assert page.eval("document.querySelector('.user').textContent") == "What is 2+2? and 3+3?"
        page.eval("document.querySelector('.assistant').click()")  # regenerate
        page.wait("document.querySelectorAll('.assistant').length === 1 && "
                  "!document.body.classList.contains('generating')")
        assert page.eval("document.querySelector('.assistant').textContent").startswith(REPLY)
        page.type_and_send("/temperature 0.3")
        assert "temperature set to 0.3" in page.eval("document.querySelector('.console').textContent")
        assert page.eval("document.querySelector('#banner').classList.contains('shown')") is False
        shot = page.screenshot(tmp_path / "page.png")
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------------------------
# The command line.

def test_missing_checkpoint_and_bad_flags_are_one_line_errors(capsys):
    for argv, match in ((["-i", "sft"], "error: no sft checkpoints"), (["--port", "0"], "--port 0"),
                        (["--max-batch", "0"], "--max-batch 0"), (["-t", "3"], "--temperature 3")):
        with pytest.raises(SystemExit) as e:
            app_lib.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and match in err and err.count("\n") == 1, err


@pytest.mark.slow  # a subprocess loads jax and compiles
def test_serve_app_on_a_checkpoint_in_a_subprocess(base_dir):
    import httpx
    import numpy as np
    from test_cli import CFG, WORDS, save_checkpoint
    from tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    tokenizer = Tokenizer.train(iter(" ".join(rng.choice(WORDS, 30)) for _ in range(300)), CFG.vocab_size)
    save_checkpoint(base_dir, tokenizer, "sft")
    port = free_port()
    env = {**os.environ, "NANOJAX_BASE_DIR": str(base_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.app", "-i", "sft", "--port", str(port), "--max-batch", "2",
                             "--warmup", "32"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # bounded: 120 s
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read()
        for _ in range(600):  # the start-up compiles for prompt buckets 16, 32, cache bucket 128, rows 1 and 2
            warm = httpx.get(url + "/health").json()["warm_up"]
            if warm["done"]:
                break
            time.sleep(0.2)
        # prefills, and per row bucket: decode, first tokens' write, a write per prompt bucket, a gather from the
        # other bucket, a shift
        assert (warm["programs"], warm["compiled"]) == (2 + 2 * (1 + 1 + 2 + 1 + 1), 14)
        compiled = httpx.get(url + "/stats").json()["engine"]["compilations"]
        r = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=5, temperature=0), timeout=120)
        body = r.json()
        assert r.status_code == 200 and body["model"] == "nanojax-sft-d2"
        assert 0 <= body["usage"]["completion_tokens"] <= 5
        stats = httpx.get(url + "/stats").json()
        assert stats["step"] == 3
        # the checkpoint's params as Orbax restored them: the request ran on the programs the warm-up built
        assert stats["engine"]["compilations"] == compiled
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = proc.stdout.read()
    assert "serving nanojax-sft-d2 at http://127.0.0.1:" in out and "warm-up: 14 programs compiled" in out
    assert re.search(r"request \d+: \d+ prompt tokens, \d+ generated, (stop|length), ", out), out  # no text of it
