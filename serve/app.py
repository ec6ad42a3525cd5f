"""The chat server: a web page, nanochat's streaming protocol and the OpenAI Chat Completions API, with every user's
reply decoded in the same batch (continuous batching, nanojax.batching).

    python -m serve.app -i sft                         # http://127.0.0.1:8000/
    python -m serve.app -i sft --port 8080 --host 0.0.0.0 --max-batch 64 --cors-origin https://example.org

At start-up a background thread compiles every program that conversations of up to --warmup positions meet (prefill,
decode and the cache edits between them, for each batch and length bucket; one-user programs first); until it ends, a
request meeting a program not yet built waits for its compilation (seconds). /health and /stats show its progress.

Routes:
  GET  /                      the chat page (serve/ui.html); GET /logo.svg
  POST /chat/completions      nanochat's protocol: {"messages": [...], "temperature", "top_k", "max_tokens"} ->
                              SSE `data: {"token": "..."}` events, then `data: {"done": true}`
  POST /v1/chat/completions   OpenAI Chat Completions, streaming (`"stream": true`) or not (one JSON with usage)
  GET  /v1/models, /health, /stats
Limits: 1-500 messages, each non-empty and at most 8,000 characters, 32,000 in all; roles user and assistant
(alternating, a leading system message merged into the first user message); temperature 0-2, top_k 0-200, top_p
(0, 1], max_tokens 1-4,096; the body at most 512 KiB (checked before parsing). A bad request is a 400 with
{"error": {"message", "field", "type"}}; past --max-queue waiting requests, a 429 with Retry-After.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from nanojax.common import ArgumentParser, UserError, cli

HERE = Path(__file__).resolve().parent
MAX_BODY = 512 * 1024
MAX_MESSAGES, MAX_CHARS, MAX_TOTAL_CHARS = 500, 8_000, 32_000
MAX_TOKENS, MAX_TOP_K, MAX_STOPS = 4096, 200, 4
RETRY_AFTER_S = 2
log = logging.getLogger("nanojax.serve")


class BadRequest(Exception):
    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def _number(body: dict, field: str, default, lo, hi, *, integer=False, lo_open=False):
    """body[field] checked: a number (an integer if `integer`) in [lo, hi] ((lo, hi] if lo_open); default if absent or
    null."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise BadRequest(field, f"{field} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not ((lo < value) if lo_open else (lo <= value)) or value > hi:
        raise BadRequest(field, f"{field} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return value


def parse_chat(body, defaults: dict, *, openai: bool, model_id: str) -> dict:
    """The request's settings, checked (BadRequest names the first bad field); nothing reaches the engine before."""
    if not isinstance(body, dict):
        raise BadRequest("body", f"the body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        got = f"{len(messages)} messages" if isinstance(messages, list) else repr(type(messages).__name__)
        raise BadRequest("messages", f"messages must be a list of 1-{MAX_MESSAGES} messages, got {got}")
    total = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(where, f"{where} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") and not (role == "system" and i == 0):
            raise BadRequest(f"{where}.role", f"{where}.role must be 'user' or 'assistant' (or 'system' first), "
                                              f"got {role!r}")
        if not isinstance(content, str) or not content:
            raise BadRequest(f"{where}.content", f"{where}.content must be a non-empty string")
        if len(content) > MAX_CHARS:
            raise BadRequest(f"{where}.content", f"{where}.content has {len(content)} characters; at most {MAX_CHARS}")
        total += len(content)
    if total > MAX_TOTAL_CHARS:
        raise BadRequest("messages", f"messages have {total} characters in all; at most {MAX_TOTAL_CHARS}")
    if messages[-1]["role"] != "user":
        raise BadRequest("messages", "the last message must be the user's (the reply is the assistant's)")
    out = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
           "temperature": _number(body, "temperature", defaults["temperature"], 0, 2),
           "top_k": _number(body, "top_k", defaults["top_k"], 0, MAX_TOP_K, integer=True),
           "top_p": _number(body, "top_p", None, 0, 1, lo_open=True),
           "seed": _number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True), "stop": []}
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    out["max_tokens"] = _number(body, token_field, defaults["max_tokens"], 1, MAX_TOKENS, integer=True)
    if openai:
        model = body.get("model")
        if model is not None and model != model_id:
            raise BadRequest("model", f"model {model!r} is not served here; this server serves {model_id!r}", 404)
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream", f"stream must be true or false, got {body['stream']!r}")
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise BadRequest("n", "n must be 1")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (not isinstance(stops, list) or len(stops) > MAX_STOPS
                                  or not all(isinstance(s, str) and s for s in stops)):
            raise BadRequest("stop", f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them")
        out["stop"] = stops or []
        for field in ("frequency_penalty", "presence_penalty"):
            if body.get(field) not in (None, 0, 0.0):
                raise BadRequest(field, f"{field} is not supported (only 0)")
        for field in ("logit_bias", "logprobs", "tools", "functions", "response_format"):
            if body.get(field) not in (None, False, {}, []):
                raise BadRequest(field, f"{field} is not supported by this server")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("stream_options", "stream_options must be an object")
        out["include_usage"] = bool((options or {}).get("include_usage"))
        out["stream"] = body.get("stream", False)
    return out


class ChatServer:
    """One loaded model, its engine's slots, and the request handlers (Starlette's, see `app`)."""

    def __init__(self, engine, tokenizer, *, model_id: str, max_batch: int = 32, max_queue: int = 64,
                 defaults: dict | None = None, cors_origins=(), info: dict | None = None, warmup: int = 0):
        from nanojax.batching import Slots

        self.engine, self.tok, self.model_id = engine, tokenizer, model_id
        self.slots = Slots(engine, max_batch=max_batch, max_queue=max_queue)
        self.defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 512, **(defaults or {})}
        self.info = info or {}
        self.started = time.time()
        self.streams = 0
        self.http = {"bad_requests": 0, "too_busy": 0, "completed": 0, "disconnected": 0}
        self.cors_origins = list(cors_origins)
        self.warmup = warmup  # positions whose programs the start-up compiles (0: none)
        self.closing = False

    # -- requests into prompts -----------------------------------------------------------------------------------

    async def read_json(self, request):
        """The body (at most MAX_BODY bytes, refused before reading more), strict UTF-8, JSON."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise BadRequest("body", f"the body is larger than {MAX_BODY} bytes", 413)
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > MAX_BODY:
                raise BadRequest("body", f"the body is larger than {MAX_BODY} bytes", 413)
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest("body", f"the body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRequest("body", f"the body is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None

    def prompt_ids(self, messages: list) -> list[int]:
        try:
            ids = self.tok.render_for_completion(messages)
        except UserError as e:
            raise BadRequest("messages", str(e)) from None
        context = self.engine.cfg.max_seq_len
        if len(ids) >= context:
            raise BadRequest("messages", f"the conversation is {len(ids)} tokens; the model's context is {context}")
        return ids

    def submit(self, chat: dict, ids: list[int], loop, queue):
        from nanojax.batching import QueueFull

        def on_tokens(req, tokens, masks):  # the slots' thread: hand over to the event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (list(tokens), req.finish_reason))
            except RuntimeError:  # the loop is gone (shutting down)
                pass
        seed = chat["seed"] if chat["seed"] is not None else secrets.randbits(31)
        try:
            return self.slots.submit(ids, max_tokens=chat["max_tokens"], temperature=chat["temperature"],
                                     top_k=chat["top_k"], top_p=chat["top_p"], seed=seed, on_tokens=on_tokens)
        except QueueFull as e:
            raise BadRequest("messages", f"the server is busy ({e}); retry later", 429) from None

    async def text_deltas(self, chat: dict, ids: list[int], outcome: dict):
        """Yield the reply's text as it is generated, never splitting a UTF-8 character; stop strings cut it.
        outcome gets finish_reason and completion_tokens. The request is cancelled if the consumer stops early."""
        from nanojax.engine import TextStream

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        req = self.submit(chat, ids, loop, queue)
        stream, stops = TextStream(self.tok), chat["stop"]
        hold = max((len(s) for s in stops), default=1) - 1  # characters that may begin a stop string
        pending, reason, ended = "", None, False
        self.streams += 1
        try:
            while reason is None:
                tokens, reason = await queue.get()
                pending += "".join(stream.push(t) for t in tokens) + (stream.flush() if reason else "")
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    pending, reason = pending[:cut], "stop"
                    self.slots.cancel(req)
                keep = 0 if reason else min(hold, len(pending))
                if len(pending) > keep:
                    yield pending[:len(pending) - keep]
                    pending = pending[len(pending) - keep:]
            outcome["finish_reason"] = {"stop": "stop", "length": "length"}.get(reason, reason)
            outcome["completion_tokens"] = req.generated
            if reason == "error":
                raise RuntimeError(getattr(req, "error", "the engine failed"))
            self.http["completed"] += 1
            ended = True
        finally:
            self.streams -= 1
            if not ended and reason is None:  # the client went away, or the server stops
                self.http["disconnected"] += 1
                self.slots.cancel(req)
            # One line per request, without the conversation's text (nanochat printed it; a public server should not).
            log.info("request %d: %d prompt tokens, %d generated, %s, %.2f s", req.id, len(ids), req.generated,
                     reason if ended else "disconnected", time.monotonic() - req.submitted)

    # -- handlers --------------------------------------------------------------------------------------------------

    def error(self, e: BadRequest):
        from starlette.responses import JSONResponse

        self.http["too_busy" if e.status == 429 else "bad_requests"] += 1
        kind = {429: "rate_limit_error", 404: "not_found_error", 413: "request_too_large"}.get(e.status,
                                                                                             "invalid_request_error")
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
        return JSONResponse({"error": {"message": e.message, "field": e.field, "type": kind, "param": e.field}},
                            status_code=e.status, headers=headers)

    async def prepare(self, request, *, openai: bool):
        chat = parse_chat(await self.read_json(request), self.defaults, openai=openai, model_id=self.model_id)
        return chat, self.prompt_ids(chat["messages"])

    async def nanochat(self, request):
        """POST /chat/completions: SSE `data: {"token": text}` events, then `data: {"done": true}`."""
        from starlette.responses import StreamingResponse

        try:
            chat, ids = await self.prepare(request, openai=False)
            deltas = self.text_deltas(chat, ids, {})
            first = await anext(deltas, None)  # a full queue is a 429, not a broken stream
        except BadRequest as e:
            return self.error(e)

        async def events():
            try:
                if first is not None:
                    yield _sse({"token": first})
                async for text in deltas:
                    yield _sse({"token": text})
                yield _sse({"done": True})
            except RuntimeError as e:
                yield _sse({"error": str(e)})
            finally:
                await deltas.aclose()
        return StreamingResponse(events(), media_type="text/event-stream", headers=_NO_CACHE)

    async def openai(self, request):
        """POST /v1/chat/completions (OpenAI Chat Completions)."""
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            body_chat, ids = await self.prepare(request, openai=True)
            outcome = {}
            deltas = self.text_deltas(body_chat, ids, outcome)
            first = await anext(deltas, None)
        except BadRequest as e:
            return self.error(e)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": outcome.get("completion_tokens", 0),  # noqa
                         "total_tokens": len(ids) + outcome.get("completion_tokens", 0)}
        if not body_chat["stream"]:
            try:
                text = (first or "") + "".join([t async for t in deltas])
            except RuntimeError as e:
                return JSONResponse({"error": {"message": str(e), "type": "server_error"}}, status_code=500)
            return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": self.model_id,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": outcome["finish_reason"], "logprobs": None}],
                                 "usage": usage()})

        def chunk(delta, finish=None):
            return _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                if first is not None:
                    yield chunk({"content": first})
                async for text in deltas:
                    yield chunk({"content": text})
                yield chunk({}, outcome["finish_reason"])
                if body_chat.get("include_usage"):
                    yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_id, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            except RuntimeError as e:
                yield _sse({"error": {"message": str(e), "type": "server_error"}})
            finally:
                await deltas.aclose()
        return StreamingResponse(events(), media_type="text/event-stream", headers=_NO_CACHE)

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                         "created": int(self.started), "owned_by": "nanojax"}]})

    async def health(self, request):
        from starlette.responses import JSONResponse
        stats = self.slots.stats()
        return JSONResponse({"status": "ok", "ready": True, "model": self.model_id, "free_slots": stats["free_slots"],
                             "waiting": stats["waiting"], "warm_up": stats["warm_up"]})

    async def stats(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"model": self.model_id, **self.info, "uptime_s": round(time.time() - self.started, 1),
                             "active_streams": self.streams, "http": dict(self.http), "engine": self.slots.stats()})

    async def page(self, request):
        from starlette.responses import HTMLResponse
        return HTMLResponse((HERE / "ui.html").read_text(encoding="utf-8"), headers=_NO_CACHE)

    async def logo(self, request):
        from starlette.responses import Response
        return Response((HERE / "logo.svg").read_bytes(), media_type="image/svg+xml")

    def warm_up(self):
        """Compile the programs of the buckets up to self.warmup positions (nanojax.batching.Slots.warm_up), with a
        quarter of the host's cores (XLA compiles on them; on two cores, one, leaving one to serve)."""
        t0 = time.monotonic()
        n = self.slots.warm_up(self.warmup, top_k=max(1, self.defaults["top_k"]),
                               threads=max(1, (os.cpu_count() or 1) // 4), should_stop=lambda: self.closing)
        log.info("warm-up: %d programs compiled in %.1f s (buckets up to %d positions)", n, time.monotonic() - t0,
                 self.warmup)

    def app(self):
        """The Starlette application; the slots' thread runs while it does."""
        import contextlib

        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.slots.start()
            if self.warmup:
                threading.Thread(target=self.warm_up, name="nanojax-warm-up", daemon=True).start()
            try:
                yield
            finally:
                self.closing = True
                self.slots.close()

        routes = [Route("/", self.page), Route("/logo.svg", self.logo),
                  Route("/chat/completions", self.nanochat, methods=["POST"]),
                  Route("/v1/chat/completions", self.openai, methods=["POST"]),
                  Route("/v1/models", self.models), Route("/health", self.health), Route("/stats", self.stats)]
        middleware = [Middleware(CORSMiddleware, allow_origins=self.cors_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["Content-Type", "Authorization"])] if self.cors_origins else []
        return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


_NO_CACHE = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_parser() -> argparse.ArgumentParser:
    from nanojax.checkpoint import STAGES

    p = ArgumentParser(prog="python -m serve.app", description=__doc__.split("\n")[0])
    p.add_argument("-i", "--source", default="sft", choices=tuple(STAGES), help="stage to load")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest depth)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default when a request names none")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default when a request names none")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default when a request names none")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (rounded up to a power of 2)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before a 429")
    p.add_argument("--warmup", type=int, default=512, metavar="POSITIONS",
                   help="at start-up, compile the programs of conversations up to this many tokens, in the "
                        "background (0: none; a request meeting a program not yet built waits for it)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN (repeatable); off by default")
    return p


def check_args(args):
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be in 1-65535")
    if not 0 <= args.temperature <= 2:
        raise UserError(f"--temperature {args.temperature}: must be in [0, 2]")
    if not 0 <= args.top_k <= MAX_TOP_K:
        raise UserError(f"--top-k {args.top_k}: must be in [0, {MAX_TOP_K}]")
    if not 1 <= args.max_tokens <= MAX_TOKENS:
        raise UserError(f"--max-tokens {args.max_tokens}: must be in [1, {MAX_TOKENS}]")
    if not 1 <= args.max_batch <= 1024:
        raise UserError(f"--max-batch {args.max_batch}: must be in [1, 1024]")
    if args.max_queue < 0:
        raise UserError(f"--max-queue {args.max_queue}: must be >= 0")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must be >= 0 (0: no warm-up)")


def server_for(args) -> ChatServer:
    from nanojax import models

    model = models.load(args.source, tag=args.model_tag, step=args.step)
    return ChatServer(model.engine, model.tokenizer, model_id=f"nanojax-{model.stage}-{model.tag}",
                      max_batch=args.max_batch, max_queue=args.max_queue, cors_origins=args.cors_origin,
                      defaults={"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens},
                      info={"source": model.stage, "tag": model.tag, "step": model.step}, warmup=args.warmup)


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    server = server_for(args)
    import uvicorn

    handler = logging.StreamHandler()  # not basicConfig: a library (absl, via Orbax) may have set up the root logger
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    print(f"serving {server.model_id} at http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
