"""`edgeloop serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the scheduling engine.

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", ...}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ... }   (the model's chat template)
    GET  /v1/models             the one model served
    GET  /health                200 while serving, 503 while draining or after the engine stopped
    GET  /metrics               queue depth, active rows, rows per block call, tokens/s, exit-depth histogram

Streaming answers are Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`.
Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad
request (malformed JSON, unknown model, invalid values, a prompt beyond the context), 429 when
the queue is full, 500 (or an error object in the stream) for a request whose engine step failed,
503 while draining or after the engine stopped. A client that disconnects cancels its request and frees its row. edgeloop's
own knobs ride along as extra fields: `exit` (the exit policy), `loops`, `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`; responses carry `usage` and an `edgeloop` block (mean loops, depths).
The engine runs in its own thread; SIGTERM (uvicorn's graceful shutdown) drains it and exits.
"""


import asyncio
import contextlib
import json
import time
import uuid
from edgeloop.errors import EdgeloopError

MAX_TOKENS_LIMIT = 1 << 16


def create_app(model, engine, model_name: str):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from edgeloop.runtimes.engine import EngineFailed, Event, QueueFull

    state = {"draining": False}

    class Options(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
        max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
        temperature: float | None = Field(default=None, ge=0, le=100)
        top_p: float | None = Field(default=None, gt=0, le=1)
        top_k: int | None = Field(default=None, ge=0)
        min_p: float | None = Field(default=None, ge=0, lt=1)
        repetition_penalty: float | None = Field(default=None, gt=0, le=100)
        seed: int | None = Field(default=None, ge=0, lt=1 << 64)
        stop: str | list[str] | None = None
        stream: bool = False
        n: int = Field(default=1, ge=1, le=1)
        exit: str | None = None
        loops: int | None = Field(default=None, ge=1)
        ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens whatever the model says

        @field_validator("temperature", "top_p", "min_p", "repetition_penalty")
        @classmethod
        def finite(cls, v):
            if v is not None and v != v:
                raise ValueError("must be a finite number")
            return v

    class Completion(Options):
        prompt: str | list[int]

    class Message(BaseModel):
        role: str
        content: str

    class Chat(Options):
        messages: list[Message] = Field(min_length=1)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state["draining"] = True  # uvicorn stopped taking requests (SIGTERM): finish the admitted ones
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.stop(drain=True, timeout=300))

    app = FastAPI(title="edgeloop", version="1", lifespan=lifespan)

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON")
        return error(400, f"{loc}: {first['msg']}" if loc else first["msg"], param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/health")
    async def health():
        if state["draining"] or engine.error is not None:
            return JSONResponse({"status": "draining" if state["draining"] else "error"}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "edgeloop"}]}

    @app.get("/metrics")
    async def metrics():
        return engine.status()

    def build_request(body: Options, prompt):
        if body.model != model_name:
            raise EdgeloopError(f"model {body.model!r} is not served here (this server serves {model_name!r})")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        options = {k: v for k, v in {"max_new_tokens": body.max_completion_tokens or body.max_tokens,
                                     "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                                     "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
                                     "seed": body.seed, "stop": stop, "exit": body.exit, "loops": body.loops,
                                     "ignore_eos": body.ignore_eos or None}.items()
                   if v is not None}
        config = model.generation_config(**options)
        return model._request(prompt, config)

    async def run(request: Request, body: Options, prompt, chat: bool):
        try:
            req = build_request(body, prompt)
        except EdgeloopError as e:
            return error(400, str(e))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            return error(429, str(e), "rate_limit_exceeded")
        except EngineFailed as e:
            return error(503, str(e), "server_error")
        except EdgeloopError as e:
            return error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(stream(request, job, events, rid, created, chat), media_type="text/event-stream")
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return error(499, "client closed the request")
                    continue
                if event.kind == "done":
                    break
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        if req.stats.finish_reason == "error":
            return error(500, f"the engine failed: {engine.error or engine.last_error}", "server_error")
        return final(req, rid, created, chat)

    def usage(req) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.generated),
                "total_tokens": len(req.prompt) + len(req.generated)}

    def finish_reason(req) -> str:
        return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(req.stats.finish_reason,
                                                                                          req.stats.finish_reason)

    def extra(req) -> dict:
        return {"mean_loops": round(req.stats.mean_loops, 4), "depths": req.stats.depths, "exit": req.stats.exit_policy}

    def final(req, rid: str, created: int, chat: bool) -> dict:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": req.text},
                      "finish_reason": finish_reason(req)}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": req.text, "logprobs": None, "finish_reason": finish_reason(req)}
            kind = "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                "usage": usage(req), "edgeloop": extra(req)}

    async def stream(request: Request, job, events: asyncio.Queue, rid: str, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None = None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_name, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                try:
                    event: Event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return
                    continue
                if event.kind == "piece":
                    yield chunk(event.text)
                elif event.kind == "done":
                    req = job.request
                    if req.stats.finish_reason == "error":  # OpenAI streams an error object, then ends
                        failure = {"message": f"the engine failed: {engine.error or engine.last_error}",
                                   "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': failure})}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    last = json.loads(chunk(None, finish_reason(req))[6:])
                    last["usage"], last["edgeloop"] = usage(req), extra(req)
                    yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        except (asyncio.CancelledError, GeneratorExit):
            engine.cancel(job)
            raise

    @app.post("/v1/completions")
    async def completions(request: Request, body: Completion):
        if state["draining"]:
            return error(503, "the server is shutting down", "server_error")
        return await run(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: Chat):
        if state["draining"]:
            return error(503, "the server is shutting down", "server_error")
        try:
            prompt = model.tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                         add_generation_prompt=True)
        except EdgeloopError as e:
            return error(400, str(e))
        return await run(request, body, prompt, chat=True)

    return app


def serve(path: str, *, host: str = "127.0.0.1", port: int = 8000, max_rows: int = 8, max_queue: int = 64,
          scheduler: str = "depth", model_name: str | None = None, threads: int | None = None,
          log_level: str = "info") -> None:
    import uvicorn

    import edgeloop
    from edgeloop.runtimes.engine import Engine

    model = edgeloop.load(path, **({"threads": threads} if threads else {}))
    engine = Engine(model, max_rows=max_rows, max_queue=max_queue, scheduler=scheduler)
    engine.start()
    name = model_name or str(path).rstrip("/").split("/")[-1]
    app = create_app(model, engine, name)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=300)
