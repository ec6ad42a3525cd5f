"""`python -m nanojax.bench serve`: the chat server under load on 127.0.0.1, against `bench decode` on the same model.

bench decode's random-init model is saved as an sft checkpoint (its special tokens' columns of lm_head zeroed, so no
client stops early: bench decode has no stop tokens), with a tokenizer trained on the demo corpus, in a temporary base
directory; `python -m serve.app` serves it in a subprocess (nanojax imports nothing from serve/), and this process is
the clients (httpx, asyncio, the OpenAI streaming protocol). The measures start once the server's start-up warm-up
(every program of conversations up to new_tokens + 64 positions) has ended and a round of the same load compiles
nothing new (`warmup_rounds`: 1 when the warm-up covered it all). The machine's speed drifts from one minute to the
next, so each server measure is paired with bench decode runs of the same load in this process (DecodeBench), taken
just before or after it (alternating), for `rounds` rounds; the ratios reported are the medians of the pairs'
(`rounds` lists every pair). Measured:
  - 32 concurrent streaming clients: all complete; aggregate completion tokens/s (first request sent to last token
    received, prefill and joins included) against bench decode's steps at batch 32;
  - one client alone, five requests one after another, each beside a bench decode run at batch 1 (the run first for
    every other request): tokens/s from each request to its last token, against the runs' from the prompt to the
    last token (time to first token + the steps; the text streams in bursts, one a device call, so the first-to-last
    span of the text is not a token count's);
  - 10 clients that hang up mid-stream: the server's /stats show their rows freed;
  - the server's resident memory (VmRSS) before and after 500 sequential requests.
NANOJAX_SERVER_LOG=PATH keeps the server's output there (with JAX_LOG_COMPILES=1: what it compiled, and when).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ALONE_REQUESTS = 5  # a lone client's requests per round, and bench decode's runs at batch 1 beside them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc")


def _make_checkpoint(base: Path, bench):
    """bench decode's random-init model (its params, so both sides decode the same model) as an sft checkpoint."""
    from nanojax.checkpoint import StageCheckpoints
    from tokenizer import SPECIAL_TOKENS, Tokenizer
    from tokenizer.train import _corpus

    docs, _ = _corpus(2)
    tok = Tokenizer.train(iter(docs), bench.cfg.vocab_size)
    tok.save(base / "tokenizer")
    # The special tokens' columns of lm_head zeroed: a logit of 0 is never among the top 50 of this model's (about
    # +-0.3 wide), so no client stops early, as bench decode (which has no stop tokens) never does.
    specials = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    params = {**bench.params, "lm_head": bench.params["lm_head"].at[:, specials].set(0.0)}
    ck = StageCheckpoints("sft", f"d{bench.cfg.depth}")
    meta = {"step": 1, "model_config": bench.cfg.to_dict(), "tokenizer": tok.fingerprint(),
            "note": "random weights for bench serve"}
    ck.save(1, params, None, meta)
    ck.close()


async def _stream(client, url: str, body: dict, hang_up_after: int | None = None) -> dict:
    """One streaming OpenAI request: tokens (from usage), time of the first and last content chunk."""
    start = time.perf_counter()
    first = last = None
    usage, chunks = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first, last, chunks = first or now, now, chunks + 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return {"hung_up": True}
    return {"start": start, "first": first, "last": last, "tokens": usage["completion_tokens"]}


def _body(max_tokens: int, i: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}


async def _load(url: str, model: str, bench, rounds: int, clients: int, new_tokens: int, sequential: int,
                disconnects: int, pid: int) -> dict:
    import httpx

    out = {}
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        body = lambda n, i: {**_body(n, i), "model": model}  # noqa: E731

        async def concurrent(n, offset):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_stream(client, url, body(new_tokens, offset + i)) for i in range(n)))
            end = max(r["last"] or r["start"] for r in results)
            tokens = sum(r["tokens"] for r in results)
            return {"completed": len(results), "tokens": tokens, "tok_per_s": tokens / (end - t0),
                    "ttft_ms_median": 1e3 * float(np.median([r["first"] - r["start"] for r in results if r["first"]]))}

        async def alone(i, decode=None, rnd=0):  # ALONE_REQUESTS one after another (one is a third of a second: too
            # short to time alone); with `decode` (decode run j), each beside a decode run, in the order
            # decode-request, request-decode, ... in even rounds `rnd`, request-decode, ... in odd ones (drift cancels)
            rs, ones = [], []
            for j in range(ALONE_REQUESTS):
                if decode is not None and (rnd + j) % 2 == 0:
                    ones.append(decode(j))
                rs.append(await _stream(client, url, body(new_tokens, i + j)))
                if decode is not None and (rnd + j) % 2:
                    ones.append(decode(j))
            tokens = sum(r["tokens"] for r in rs)
            return {"tokens": tokens, "ttft_ms": 1e3 * np.median([r["first"] - r["start"] for r in rs]),
                    "tok_per_s": tokens / sum(r["last"] - r["start"] for r in rs), "decode": ones}

        compilations = lambda: client.get(url + "/stats")  # noqa: E731

        async def warm(run):  # until a round compiles nothing new (every bucket and join pattern this load meets)
            for n in range(1, 9):
                before = (await compilations()).json()["engine"]["compilations"]
                await run()
                if (await compilations()).json()["engine"]["compilations"] == before:
                    return n
            return n

        async def timed(run):  # (what run returns, the programs the server compiled meanwhile)
            before = (await compilations()).json()["engine"]["compilations"]
            result = await run()
            return result, (await compilations()).json()["engine"]["compilations"] - before

        async def pair(serve, r):  # bench decode at 32 rows first in even rounds, the server first in odd ones
            if r % 2:
                served = await timed(serve)
                return bench.run(clients, 100 * r), served
            decoded = bench.run(clients, 100 * r)
            return decoded, await timed(serve)

        out["warmup_rounds"] = [await warm(lambda: concurrent(clients, 0)), await warm(lambda: alone(5))]
        out["rounds"], decode_runs = [], {clients: [], 1: []}
        for r in range(rounds):  # each server measure next to a decode measure of the same load
            (ttft, step), (many, compiled) = await pair(lambda: concurrent(clients, 1000 * (r + 1)), r)
            decode_runs[clients].append((ttft, step))
            one, compiled1 = await timed(lambda: alone(100 * (r + 1), lambda j: bench.run(1, 100 * r + j), r))
            ones = one["decode"]
            decode_runs[1] += ones
            one_end_to_end = len(ones) * new_tokens / sum(t + (new_tokens - 1) * s for t, s in ones)  # prompt to last
            out["rounds"].append({
                "decode_batch_tok_per_s": round(clients / step, 1),
                "concurrent_tok_per_s": round(many["tok_per_s"], 1),
                "concurrent_vs_decode": round(many["tok_per_s"] * step / clients, 3),
                "concurrent_completed": many["completed"], "concurrent_tokens": many["tokens"],
                "concurrent_ttft_ms_median": round(many["ttft_ms_median"], 1),
                "decode_1_end_to_end_tok_per_s": round(one_end_to_end, 1),
                "alone_tok_per_s": round(one["tok_per_s"], 1),
                "alone_vs_decode_1": round(one["tok_per_s"] / one_end_to_end, 3),
                "alone_ttft_ms": round(one["ttft_ms"], 1), "compilations_while_timed": compiled + compiled1})
        out["decode"] = {b: bench.figures(b, runs) for b, runs in decode_runs.items()}

        stats = (await client.get(url + "/stats")).json()["engine"]
        before = stats["finished"].get("cancelled", 0)
        await asyncio.gather(*(_stream(client, url, body(2000, 2000 + i), hang_up_after=3)
                               for i in range(disconnects)))
        for _ in range(600):  # bounded: 60 s for the server to notice
            stats = (await client.get(url + "/stats")).json()["engine"]
            if stats["finished"].get("cancelled", 0) - before >= disconnects and stats["active"] == 0:
                break
            await asyncio.sleep(0.1)
        out["disconnects"] = {"clients": disconnects, "cancelled": stats["finished"].get("cancelled", 0) - before,
                              "active_after": stats["active"], "free_slots_after": stats["free_slots"]}
        small = lambda i: {**body(8, i), "stream": False}  # noqa: E731
        for i in range(50):  # settle the allocator first
            (await client.post(url + "/v1/chat/completions", json=small(i))).raise_for_status()
        before = _rss_kib(pid)
        t0 = time.perf_counter()
        for i in range(sequential):
            (await client.post(url + "/v1/chat/completions", json=small(10_000 + i))).raise_for_status()
        after = _rss_kib(pid)
        out["sequential"] = {"requests": sequential, "seconds": round(time.perf_counter() - t0, 1),
                             "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
                             "rss_growth": round(after / before - 1, 4)}
    return out


def benchmark_serve(depth: int = 4, vocab_size: int = 8192, max_seq_len: int = 2048, clients: int = 32,
                    new_tokens: int = 256, sequential: int = 500, disconnects: int = 10, rounds: int = 9,
                    dtype=None) -> dict:
    from nanojax.bench_decode import DecodeBench

    bench = DecodeBench(depth=depth, vocab_size=vocab_size, prompt_len=32, new_tokens=new_tokens, dtype=dtype,
                        max_seq_len=max_seq_len)
    with tempfile.TemporaryDirectory(prefix="nanojax-bench-serve-") as tmp:
        base = Path(tmp)
        env = {**os.environ, "NANOJAX_BASE_DIR": str(base), "NANOJAX_PROGRESS": "0"}
        previous = os.environ.get("NANOJAX_BASE_DIR")
        os.environ["NANOJAX_BASE_DIR"] = str(base)
        try:
            _make_checkpoint(base, bench)
        finally:
            if previous is None:
                os.environ.pop("NANOJAX_BASE_DIR")
            else:
                os.environ["NANOJAX_BASE_DIR"] = previous
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(base / "server.log", "w+")  # a file, not a pipe nobody reads while the server runs: it would fill
        proc = subprocess.Popen([sys.executable, "-m", "serve.app", "-i", "sft", "--port", str(port), "--max-batch",
                                 str(clients), "--max-queue", str(4 * clients), "--warmup", str(new_tokens + 64)],
                                cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            import httpx
            for _ in range(1200):  # bounded: 4 minutes to load and start
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {(base / 'server.log').read_text()[-2000:]}")
                try:
                    model = httpx.get(url + "/v1/models", timeout=1).json()["data"][0]["id"]
                    break
                except (httpx.TransportError, ValueError):
                    time.sleep(0.2)
            else:
                raise RuntimeError("the server did not start in 4 minutes")
            for b in (clients, 1):  # while the server warms up: nothing is timed before both are ready
                bench.compile(b)
            for _ in range(6000):  # bounded: 20 minutes for the start-up's compilations
                warm = httpx.get(url + "/health").json()["warm_up"]
                if warm["done"]:
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"the server's warm-up did not end in 20 minutes: {warm}")
            out = asyncio.run(_load(url, model, bench, rounds, clients, new_tokens, sequential, disconnects,
                                    proc.pid))
            stats = httpx.get(url + "/stats").json()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            if os.environ.get("NANOJAX_SERVER_LOG"):
                Path(os.environ["NANOJAX_SERVER_LOG"]).write_text((base / "server.log").read_text())
    decode = out.pop("decode")
    med = lambda key: round(float(np.median([r[key] for r in out["rounds"]])), 3)  # noqa: E731
    return {"depth": depth, "vocab_size": vocab_size, "new_tokens": new_tokens, "dtype": decode[1]["dtype"],
            "clients": clients, **out,
            "concurrent_vs_decode": med("concurrent_vs_decode"), "alone_vs_decode_1": med("alone_vs_decode_1"),
            "concurrent_all_completed": all(r["concurrent_completed"] == clients for r in out["rounds"]),
            "compilations_while_timed": sum(r["compilations_while_timed"] for r in out["rounds"]),
            "decode_batch_best_tok_per_s": decode[clients]["decode_tok_per_s"],
            "decode_1_best_tok_per_s": decode[1]["decode_tok_per_s"],
            "concurrent_best_tok_per_s": max(r["concurrent_tok_per_s"] for r in out["rounds"]),
            "alone_best_tok_per_s": max(r["alone_tok_per_s"] for r in out["rounds"]),
            "server_warm_up": {k: warm[k] for k in ("programs", "seconds")},
            "server_compilations": stats["engine"]["compilations"],
            "batch_occupancy": stats["engine"]["batch_occupancy"]}
