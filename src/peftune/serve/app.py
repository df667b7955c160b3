"""The routes of `peftune serve`: OpenAI's /v1 API over the engine, vLLM's adapter loading, the chat page.

Every refusal is `protocol.error(...)`; handlers raise `APIError`. Generation runs on the engine's worker thread;
its events come back to the event loop through an asyncio queue, so a slow client never blocks the others, and a
client that goes away cancels its request (its row leaves the batch at the next step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PeftuneError
from ..infer.engine import Engine, PromptTooLong, QueueFull
from . import tools as tool_calls
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest,
                       error, new_id, now)


class Settings:
    def __init__(self, api_key: str | None = None, max_body_bytes: int = 1 << 20, adapter_loading: bool = False,
                 default_max_tokens: int = 512) -> None:
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.adapter_loading, self.default_max_tokens = adapter_loading, default_max_tokens


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


async def parse(request: Request, model):
    """The JSON body as `model`, whatever Content-Type the client sent (curl -d sends a form type); 400 otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e.errors())
        raise APIError(400, message, param) from None


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="peftune serve", version="1", docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings = engine, settings

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return error(400, message, param)

    @app.exception_handler(Exception)
    async def _bug(_, exc: Exception):  # a bug, never the client's input: still answered in OpenAI's shape
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error(exc.status_code if exc.status_code < 500 else 400, str(exc.detail))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Body-size limit (413) and the API key on /v1 (401), before any route reads the body."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error(413, f"the request body is larger than {settings.max_body_bytes} bytes")
        if request.url.path.startswith("/v1") and settings.api_key:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return error(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")
        if request.method == "POST" and length is None:  # chunked: count while reading
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_body_bytes:
                    return error(413, f"the request body is larger than {settings.max_body_bytes} bytes")
            request._body = body  # starlette reads a consumed stream from here
        return await call_next(request)

    # ------------------------------------------------------------------ public
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.scheduler.running(), "waiting": engine.scheduler.pending.qsize()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_web("index.html"))

    @app.get("/static/{name}")
    async def static(name: str):
        types = {".js": "text/javascript", ".css": "text/css"}
        ext = os.path.splitext(name)[1]
        if ext not in types or "/" in name or name.startswith("."):
            raise APIError(404, f"no such file: {name}")
        try:
            return Response(_web(name), media_type=types[ext])
        except FileNotFoundError:
            raise APIError(404, f"no such file: {name}") from None

    # ------------------------------------------------------------------ models
    def _card(served) -> dict:
        return {"id": served.name, "object": "model", "created": now(), "owned_by": "peftune",
                "root": served.path or engine.base_path, "parent": None if served is engine.base else engine.base.name,
                "max_model_len": engine.context}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_card(engine.base)] + [_card(s) for s in list(engine.served.values())]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return _card(_served(model_id))

    def _served(name: str):
        try:
            return engine.get(name)
        except KeyError:
            raise APIError(404, f"the model `{name}` does not exist", param="model", code="model_not_found") from None

    # ------------------------------------------------------------------ generation
    async def _run(request: Request, model: str, prompt_ids: list[int], params, param: str):
        """Submits a request; yields its events on the event loop; cancels it when the client goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            engine.check_length(prompt_ids)
        except PromptTooLong as e:
            raise APIError(400, f"this model's maximum context length is {e.limit} tokens; the {param} is "
                           f"{e.tokens} tokens", param=param, code="context_length_exceeded") from None
        try:
            req = engine.submit(model, prompt_ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        return req, events

    async def _collect(request: Request, req, events: asyncio.Queue) -> tuple[str, dict]:
        parts = []
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    raise APIError(400, "the client disconnected") from None
                continue
            if "error" in event:
                raise APIError(500, event["error"])
            if "text" in event:
                parts.append(event["text"])
            if "finish_reason" in event:
                return "".join(parts), event

    async def _sse(req, events: asyncio.Queue, chunk, include_usage: bool, calls: tool_calls.CallStream | None = None):
        """`data: {...}` lines: each text delta, then one chunk with finish_reason, the usage chunk, [DONE]. With
        `calls` (a request with tools), text that may be a tool call is held and ends as tool-call deltas."""
        def line(payload) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            first = chunk({"role": "assistant", "content": ""}, None)
            if first is not None:
                yield line(first)
            while True:
                event = await events.get()
                if "error" in event:
                    yield line({"error": {"message": event["error"], "type": "server_error"}})
                    break
                text = event.get("text")
                if text and calls is not None:
                    text = calls.push(text)
                if text:
                    yield line(chunk({"content": text}, None))
                if "finish_reason" in event:
                    finish = event["finish_reason"]
                    if calls is not None:
                        rest, deltas = calls.finish()
                        if rest:
                            yield line(chunk({"content": rest}, None))
                        if deltas:
                            yield line(chunk({"tool_calls": deltas}, None))
                            finish = "tool_calls"
                    yield line(chunk({}, finish))
                    if include_usage:
                        yield f"data: {json.dumps(chunk(None, None, event['usage']), ensure_ascii=False)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # a no-op when finished; stops the generation when the client went away

    def _n_is_one(body) -> None:
        if body.n not in (None, 1):
            raise APIError(400, "n: only n = 1 is supported", param="n")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        _n_is_one(body)
        served = _served(body.model)
        messages = [m.plain() for m in body.messages]
        prefix = tool_calls.forced_prefix(body.tool_choice) if body.calls_tools() else ""
        try:
            prompt_ids = engine.chat_prompt(served.name, messages, tools=body.tool_list(), answer_prefix=prefix)
        except (PeftuneError, ValueError, TypeError) as e:
            raise APIError(400, f"messages: cannot render this conversation: {e}", param="messages") from None
        req, events = await _run(request, served.name, prompt_ids, body.sampling(body.limit(settings.default_max_tokens)),
                                 "messages")
        rid, created = new_id("chatcmpl"), now()

        if body.stream:
            def chunk(delta, finish, usage=None):
                if delta is None:
                    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                            "choices": [], "usage": usage}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            calls = tool_calls.CallStream(prefix) if body.calls_tools() else None
            return StreamingResponse(_sse(req, events, chunk, include, calls), media_type="text/event-stream")
        text, final = await _collect(request, req, events)
        message, called = tool_calls.message(prefix + text) if body.calls_tools() else \
            ({"role": "assistant", "content": text}, None)
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": called or final["finish_reason"]}],
                "usage": final["usage"]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        _n_is_one(body)
        served = _served(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        if isinstance(prompt, list):
            vocab = len(engine.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            prompt_ids, text_prompt = list(prompt), None
        else:
            prompt_ids, text_prompt = engine.text_prompt(served.name, prompt), prompt
        if not prompt_ids:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        req, events = await _run(request, served.name, prompt_ids, body.sampling(body.max_tokens), "prompt")
        rid, created = new_id("cmpl"), now()
        echo = (text_prompt or "") if body.echo else ""

        if body.stream:
            def chunk(delta, finish, usage=None):
                if delta is None:
                    return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                            "choices": [], "usage": usage}
                if "role" in delta:  # completions have no role chunk; the echo goes first
                    if not echo:
                        return None
                    delta = {"content": echo}
                return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                                     "finish_reason": finish}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(req, events, chunk, include), media_type="text/event-stream")
        text, final = await _collect(request, req, events)
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "text": echo + text, "logprobs": None,
                             "finish_reason": final["finish_reason"]}],
                "usage": final["usage"]}

    # ------------------------------------------------------------------ vLLM's runtime adapter loading
    if settings.adapter_loading:
        @app.post("/v1/load_lora_adapter")
        async def load_adapter(request: Request):
            body = await parse(request, LoadAdapterRequest)
            if body.lora_name in engine.served:
                raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.",
                               param="lora_name")
            try:
                await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
            except PeftuneError as e:
                raise APIError(400, str(e), param="lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_adapter(request: Request):
            body = await parse(request, UnloadAdapterRequest)
            if body.lora_name not in engine.served:
                raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                               code="model_not_found")
            await asyncio.to_thread(engine.unload_adapter, body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _web(name: str) -> str:
    return resources.files("peftune.serve").joinpath(f"web/{name}").read_text("utf-8")
