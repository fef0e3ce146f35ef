"""The HTTP layer: an OpenAI-compatible API (FastAPI on uvicorn) over the engine, the chat page, /metrics.

    GET  /health               503 while the model loads, then 200
    GET  /v1/models            the one model served
    POST /v1/chat/completions  the conversation through the checkpoint's chat template
    POST /v1/completions       a text prompt (or token ids) continued
    GET  /metrics              Prometheus text: requests, tokens, tokens/s, queue, KV cache blocks
    GET  /                     the chat page (serve/static/)

Answers stream as server-sent events, one JSON chunk per event and `data: [DONE]` last. Each request gets an
asyncio queue that the engine's thread feeds; when the client goes away (a closed stream, or a closed
connection while a plain answer is being written) the request is cancelled and its slot freed at the next
step. Every error is in OpenAI's shape (protocol.ApiError).
"""

import asyncio
import hmac
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from minillama.config import UserError, option
from minillama.infer.engine import QueueFull
from minillama.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Shaper,
    chat_prompt,
    completion_prompt,
    engine_request,
)

STATIC = Path(__file__).parent / "static"


def error_response(error: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status)


class Guard:
    """Pure ASGI middleware, before any parsing: the body size limit (413), the API key of /v1/ (401,
    compared in constant time) and the count of answers by status code for /metrics."""

    def __init__(self, app, api_key: str | None, max_body: int, counts: Counter):
        self.app, self.api_key, self.max_body, self.counts = app, api_key, max_body, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.api_key.encode()):
                error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                return await error_response(error)(scope, receive, counted)
        body, size = [], 0
        too_large = ApiError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body:
            return await error_response(too_large)(scope, receive, counted)
        while True:  # read it all here (up to the limit), then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await error_response(too_large)(scope, receive, counted)
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # then the real one: the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, counted)


@dataclass(frozen=True)
class ServeConfig:
    """What `minillama serve` takes besides the model."""
    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/ (default $MINILLAMA_API_KEY)")
    model_name: str | None = option(None, "the model id clients send and /v1/models lists (default: the file name)")
    max_tokens: int = option(1024, "answer length for a request without max_tokens (the context caps it)")
    kv_cache_mb: float = option(1024.0, "memory of the paged KV cache that all requests share, MB")
    max_running: int = option(32, "requests generating at once; more wait in the queue")
    max_queue: int = option(64, "requests waiting at most; more are answered 429")
    max_body_kb: int = option(1024, "largest request body, KB; larger are answered 413")

    def __post_init__(self):
        for name in ("port", "max_tokens", "kv_cache_mb", "max_running", "max_queue", "max_body_kb"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")


def create_app(config: ServeConfig, model_id: str, engine=None):
    """The ASGI app. `app.state.engine` is None while loading (503) and set when the model is ready."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="minillama", summary="an OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.engine, app.state.counts = engine, Counter()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "not JSON")
            return error_response(ApiError(400, f"malformed JSON in the request body: {reason}"))
        return error_response(ApiError(400, f"{param or 'body'}: {first.get('msg')}", param))

    @app.exception_handler(Exception)
    async def crashed(request, error: Exception):  # a bug: still OpenAI's shape, and the server lives on
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}"))

    def ready():
        if app.state.engine is None:
            raise ApiError(503, "the model is still loading: try again in a moment", code="model_loading")
        return app.state.engine

    def check_model(name: str | None):
        if name is not None and name != model_id:
            raise ApiError(404, f"the model '{name}' does not exist: this server has '{model_id}'", "model",
                           "model_not_found")

    @app.get("/health")
    async def health():
        from fastapi.responses import JSONResponse

        loading = app.state.engine is None
        return JSONResponse({"status": "loading" if loading else "ok"}, status_code=503 if loading else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "minillama"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        engine = ready()
        check_model(body.model)
        ids = chat_prompt(engine.tokenizer, body.messages)
        return await answer(engine, body, ids, Shaper(True, model_id, engine.tokenizer, body.logprobs), request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = ready()
        check_model(body.model)
        ids = completion_prompt(engine.tokenizer, body.prompt)
        shaper = Shaper(False, model_id, engine.tokenizer, body.logprobs is not None)
        return await answer(engine, body, ids, shaper, request)

    async def answer(engine, body, ids, shaper: Shaper, request: Request):
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        req = engine_request(body, ids, engine.max_tokens, config.max_tokens)
        try:
            seq = engine.submit(req, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except UserError as e:
            raise ApiError(400, str(e), "prompt" if isinstance(body, CompletionRequest) else "messages") from None
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse(seq, queue, shaper, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if event.kind == "token":
                    events.append(event)
                elif event.kind == "error":
                    raise ApiError(500, f"generation failed: {event.message}")
                else:
                    return shaper.response(events, event)
        finally:
            seq.cancel()  # a no-op once it is done; frees the slot if we got here another way

    async def sse(seq, queue, shaper: Shaper, include_usage: bool):
        """Server-sent events; the `finally` runs when the client disconnects, too (starlette cancels us)."""
        try:
            if shaper.chat:
                yield data(shaper.chunk(role=True))
            while True:
                events = [await queue.get()]
                while not queue.empty() and events[-1].kind == "token":  # what piled up: one chunk
                    events.append(queue.get_nowait())
                tokens, last = [e for e in events if e.kind == "token"], events[-1]
                if tokens and (any(e.text for e in tokens) or shaper.logprobs):
                    yield data(shaper.chunk(tokens))
                if last.kind == "error":
                    yield data(ApiError(500, f"generation failed: {last.message}").body())
                    break
                if last.kind == "done":
                    yield data(shaper.chunk(done=last))
                    if include_usage:
                        yield data(shaper.usage_chunk(last))
                    break
            yield "data: [DONE]\n\n"
        finally:
            seq.cancel()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(app.state.engine, app.state.counts),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body_kb * 1024, counts=app.state.counts)
    return app


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def prometheus(engine, counts: Counter) -> str:
    """The Prometheus text exposition format: HELP, TYPE and samples of each metric."""
    lines = []

    def metric(name, kind, help, samples):
        lines.extend([f"# HELP minillama_{name} {help}", f"# TYPE minillama_{name} {kind}"])
        lines.extend(f"minillama_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP answers by status code.",
           [(f'{{code="{code}"}}', n) for code, n in sorted(counts.items())])
    metric("model_loaded", "gauge", "1 once the model is ready.", [("", int(engine is not None))])
    if engine is not None:
        stats, gauges = dict(engine.stats), engine.gauges()
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats["prompt_tokens"])])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", stats["generation_tokens"])])
        metric("sequences_total", "counter", "Generations ended, by how.",
               [(f'{{end="{k}"}}', stats[k]) for k in ("finished", "cancelled", "errors")])
        metric("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               [("", round(gauges["tokens_per_second"], 2))])
        for name, help in (("queue_length", "Requests waiting for a slot."),
                           ("running", "Requests being generated."),
                           ("kv_blocks_used", "Blocks of the paged KV cache in use."),
                           ("kv_blocks_total", "Blocks of the paged KV cache.")):
            metric(name, "gauge", help, [("", gauges[name])])
    return "\n".join(lines) + "\n"


# ---- command line: `minillama serve` ----

def serve_flags(p) -> None:
    from minillama.checkpoint.load import model_flags
    from minillama.cli import add_fields

    model_flags(p)
    add_fields(p, ServeConfig)


def serve_command(args) -> None:
    import dataclasses
    import os
    import threading

    from minillama.checkpoint.load import load_from_flags, resolve_model_path
    from minillama.cli import from_fields

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("minillama serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    config = from_fields(ServeConfig, args)
    config = dataclasses.replace(config, api_key=config.api_key or os.environ.get("MINILLAMA_API_KEY") or None)
    path = resolve_model_path(args.path)  # a wrong path fails now, not in the loading thread
    model_id = config.model_name or (args.path if args.path == "smollm2" else path.name)
    app = create_app(config, model_id)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))

    def load():
        from minillama.infer.engine import Engine

        try:
            model, tokenizer = load_from_flags(args)
        except UserError as e:
            print(f"minillama serve: error: {e}", flush=True)
            server.should_exit = True
            return
        app.state.engine = Engine(model, tokenizer, config.kv_cache_mb, config.max_running, config.max_queue).start()
        print(f"minillama serve: {model_id} is ready", flush=True)

    threading.Thread(target=load, name="minillama-load", daemon=True).start()
    print(f"minillama serve: http://{config.host}:{config.port}/ (chat page), OpenAI API under /v1, "
          f"loading {path} ...", flush=True)
    server.run()
