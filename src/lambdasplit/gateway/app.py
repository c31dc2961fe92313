"""The ASGI app: OpenAI's request and response shapes at the edge, engines behind them.

    GET  /v1/models                 the text model and the image model served
    POST /v1/chat/completions       messages through the chat template; stream = SSE chunks, then [DONE]
    POST /v1/completions            a plain text prompt, the same options
    POST /v1/images/generations     split diffusion, b64_json
    GET  /                          the web page (static/), GET /lambdasplit/config its settings,
    GET  /lambdasplit/requests/ID   what crossed the wire for request ID (the page's panel)

Every response carries a `lambdasplit` object (request_id, mode, split, codec, server,
bytes_up, bytes_down, round_trips; in a stream: in the chunk with the finish_reason) and
the same as X-Lambdasplit-* headers (a stream's headers cannot know the bytes yet: they
carry mode, split, codec and request id). Errors are OpenAI error objects: 400 bad
request, 404 unknown model or request id, 503 when no body server answers, 502 when the
server refused.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import threading
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from lambdasplit.client.generation import Sampling
from lambdasplit.client.session import Cancelled, chat_prompt_ids, text_prompt_ids
from lambdasplit.errors import LambdaSplitError, RemoteError, UsageError
from lambdasplit.gateway.engines import ImageEngine, Recent, TextEngine, Unreachable, is_connection_error, new_id

DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4
STATIC = resources.files("lambdasplit.gateway").joinpath("static")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def api_error(error: BaseException) -> ApiError:
    """A lambdasplit error as the HTTP answer a client can act on, with its one-line reason."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Unreachable) or is_connection_error(error):
        return ApiError(503, str(error), type="server_error", code="body_server_unreachable")
    if isinstance(error, RemoteError):
        return ApiError(502, str(error), type="server_error", code=error.code)
    if isinstance(error, (UsageError, ValueError)):
        return ApiError(400, str(error))
    return ApiError(500, str(error), type="server_error")


# ---------------------------------------------------------------- requests (OpenAI's shapes)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI options are ignored, as other local servers do


class ChatMessage(_Request):
    role: str
    content: str | list[dict] | None = None


class _Sampled(_Request):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict | None = None
    logprobs: Any = None

    def check(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ApiError(400, f"temperature must be between 0 and 2, got {self.temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if len(self.stops()) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop sequences", param="stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> Sampling:
        # OpenAI's defaults: temperature 1, top_p 1; no seed means a fresh one
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p,
                        seed=secrets.randbits(63) if self.seed is None else self.seed)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Sampled):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list | None = None

    def conversation(self) -> list[dict]:
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if not self.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        out = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {message.role!r}",
                               param="messages")
            content = message.content
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "".join(str(part.get("text", "")) for part in content)
            out.append({"role": role, "content": content or ""})
        return out


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int]
    echo: bool | None = False

    def prompt_text(self) -> str | list[int]:
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return prompt


class ImageRequest(_Request):
    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    seed: int | None = None  # extensions: the seed of the initial noise, and the denoising steps
    steps: int | None = None


# ---------------------------------------------------------------- the app


def create_app(text: TextEngine | None = None, image: ImageEngine | None = None) -> FastAPI:
    app = FastAPI(title="lambdasplit gateway", docs_url=None, redoc_url=None)
    recent = text.recent if text is not None else Recent()
    if image is not None:
        image.recent = recent

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(400, f"invalid request: {where}: {first.get('msg', 'bad value')}", param=where or None).response()

    @app.exception_handler(LambdaSplitError)
    async def _lambdasplit_error(_: Request, error: LambdaSplitError):
        return api_error(error).response()

    def text_engine(model: str) -> TextEngine:
        if text is None or model != text.model:
            raise ApiError(404, f"model {model!r} not found; this gateway serves {served()}", code="model_not_found",
                           param="model")
        return text

    def served() -> str:
        names = [e.model for e in (text, image) if e is not None]
        return ", ".join(repr(n) for n in names) or "no model"

    @app.get("/v1/models")
    async def models():
        data = [{"id": e.model, "object": "model", "created": int(time.time()), "owned_by": "lambdasplit",
                 "lambdasplit": e.describe()} for e in (text, image) if e is not None]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        body.check()
        engine = text_engine(body.model)
        try:
            prompt_ids = chat_prompt_ids(engine.device, body.conversation())
        except LambdaSplitError as error:
            raise api_error(error) from None
        prompt_text = _conversation_text(body.conversation())
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _complete(engine, body, request, prompt_ids, prompt_text, limit, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        engine = text_engine(body.model)
        prompt = body.prompt_text()
        if isinstance(prompt, list):
            vocab = engine.device.checkpoint.config.vocab_size
            if not all(isinstance(i, int) and 0 <= i < vocab for i in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids, prompt_text = list(prompt), engine.device.decode(list(prompt))
        else:
            prompt_ids, prompt_text = text_prompt_ids(engine.device, prompt), prompt
        return await _complete(engine, body, request, prompt_ids, prompt_text, body.max_tokens, chat=False)

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest):
        if image is None:
            raise ApiError(404, "this gateway serves no image model (start it with --image-model and --image-server)",
                           code="model_not_found", param="model")
        if body.model not in (None, image.model):
            raise ApiError(404, f"model {body.model!r} not found; this gateway serves {served()}",
                           code="model_not_found", param="model")
        if body.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.response_format not in (None, "b64_json"):
            raise ApiError(400, "only response_format b64_json is supported (nothing is stored to serve a url)",
                           param="response_format")
        size = _parse_size(body.size)
        request_id = new_id("img")
        try:
            result, view = await run_in_threadpool(image.generate, body.prompt, size=size,
                                                   seed=42 if body.seed is None else body.seed, steps=body.steps)
        except LambdaSplitError as error:
            raise api_error(error) from None
        view["id"] = request_id
        recent.add(request_id, view)
        buffer = io.BytesIO()
        result.pil.save(buffer, format="PNG")
        summary = _summary(request_id, view)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode(),
                                       "revised_prompt": None}],
                             "lambdasplit": summary}, headers=_headers(summary))

    @app.get("/lambdasplit/config")
    async def config():
        return {"text": text.describe() if text else None, "image": image.describe() if image else None}

    @app.get("/lambdasplit/requests/{request_id}")
    async def request_view(request_id: str):
        view = recent.get(request_id)
        if view is None:
            raise ApiError(404, f"no recent request {request_id!r} (the gateway keeps the last {recent.size})",
                           param="request_id")
        return view

    @app.get("/")
    async def index():
        return FileResponse(str(STATIC.joinpath("index.html")))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


# ---------------------------------------------------------------- completions


async def _complete(engine: TextEngine, body: _Sampled, request: Request, prompt_ids: list[int], prompt_text: str,
                    limit: int | None, *, chat: bool):
    room = engine.max_positions - len(prompt_ids)
    if limit is not None and limit < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {limit}", param="max_tokens")
    if room < 1 or (limit is not None and limit > room):
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({limit}) exceed the model's "
                            f"{engine.max_positions} positions", param="max_tokens")
    max_new = limit if limit is not None else min(DEFAULT_MAX_TOKENS, room)
    sampling = body.sampling()
    request_id = new_id("chatcmpl" if chat else "cmpl")
    try:
        session = await run_in_threadpool(engine.open_session)  # 503 here, before any answer starts
    except LambdaSplitError as error:
        raise api_error(error) from None

    def run(on_text=None, cancelled=lambda: False):
        try:
            completion = session.complete(prompt_ids, max_new_tokens=max_new, sampling=sampling, stop=body.stops(),
                                          on_text=on_text, cancelled=cancelled)
        finally:
            session.close()
        completion.wire = session.wire()  # after CLOSE: every byte of the session, as generate --json counts
        view = engine.record(request_id, completion, prompt_text, max_new, sampling.to_dict())
        return completion, _summary(request_id, view)

    shape = _ChatShape(request_id, engine.model) if chat else _TextShape(request_id, engine.model)
    if not body.stream:
        try:
            completion, summary = await run_in_threadpool(run)
        except LambdaSplitError as error:
            raise api_error(error) from None
        return JSONResponse(shape.whole(completion, summary), headers=_headers(summary))
    started = threading.Event()  # the stream began: from then on `run` closes the session itself
    return _ClosingEventSource(_stream(run, shape, body.include_usage(), started),
                               headers=_headers(_summary(request_id, session.wire())),
                               on_end=lambda: None if started.is_set() else session.close())


class _ClosingEventSource(EventSourceResponse):
    """Calls `on_end` (in a worker thread) when the response is over, however it ended: a client that
    disconnects before the first chunk means the stream's generator never runs, so without this the
    body session opened for it would stay open on the server until its idle timeout."""

    def __init__(self, *args, on_end, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(run_in_threadpool(self.on_end))


async def _stream(run, shape, include_usage: bool, started: threading.Event):
    started.set()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def work():
        try:
            result = run(on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("text", piece)),
                         cancelled=stop.is_set)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
        except BaseException as error:  # noqa: BLE001 - handed to the stream as an error event
            loop.call_soon_threadsafe(queue.put_nowait, ("error", error))

    loop.run_in_executor(None, work)
    try:
        yield {"data": shape.chunk_json(shape.first())}
        while True:
            kind, value = await queue.get()
            if kind == "text":
                if value:
                    yield {"data": shape.chunk_json(shape.delta(value))}
            elif kind == "error":
                if not isinstance(value, Cancelled):
                    error = api_error(value)
                    yield {"data": _json({"error": {"message": error.message, "type": error.type,
                                                    "param": error.param, "code": error.code}})}
                break
            else:
                completion, summary = value
                yield {"data": shape.chunk_json(shape.last(completion, summary))}
                if include_usage:
                    yield {"data": shape.chunk_json(shape.usage_chunk(completion))}
                break
        yield {"data": "[DONE]"}
    finally:
        stop.set()  # a client that went away stops the generation at its next token


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids),
            "total_tokens": completion.prompt_tokens + len(completion.token_ids)}


class _ChatShape:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, request_id: str, model: str):
        self.id, self.model, self.created = request_id, model, int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, completion, summary) -> dict:
        return {**self._base(self.object),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "logprobs": None, "finish_reason": completion.finish_reason}],
                "usage": _usage(completion), "lambdasplit": summary}

    def _chunk(self, choice: dict | None) -> dict:
        return {**self._base(self.chunk_object), "choices": [choice] if choice else []}

    def first(self) -> dict:
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def delta(self, piece: str) -> dict:
        return self._chunk({"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None})

    def last(self, completion, summary) -> dict:
        chunk = self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": completion.finish_reason})
        chunk["lambdasplit"] = summary
        return chunk

    def usage_chunk(self, completion) -> dict:
        return {**self._chunk(None), "usage": _usage(completion)}

    @staticmethod
    def chunk_json(chunk: dict) -> str:
        return _json(chunk)


class _TextShape(_ChatShape):
    object = chunk_object = "text_completion"

    def whole(self, completion, summary) -> dict:
        return {**self._base(self.object),
                "choices": [{"index": 0, "text": completion.text, "logprobs": None,
                             "finish_reason": completion.finish_reason}],
                "usage": _usage(completion), "lambdasplit": summary}

    def first(self) -> dict | None:
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": None})

    def delta(self, piece: str) -> dict:
        return self._chunk({"index": 0, "text": piece, "logprobs": None, "finish_reason": None})

    def last(self, completion, summary) -> dict:
        chunk = self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": completion.finish_reason})
        chunk["lambdasplit"] = summary
        return chunk


def _json(value) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


def _summary(request_id: str, view: dict) -> dict:
    keys = ("mode", "split", "codec", "server", "bytes_up", "bytes_down", "round_trips")
    return {"request_id": request_id, **{k: view.get(k) for k in keys}}


def _headers(summary: dict) -> dict:
    return {f"X-Lambdasplit-{k.replace('_', '-').title()}": str(v) for k, v in summary.items() if v is not None}


def _conversation_text(messages: list[dict]) -> str:
    """The conversation as the panel searches for it: the whole of every turn's text."""
    return "\n".join(m["content"] for m in messages if m["content"])


def _parse_size(size: str | None) -> int | None:
    if size in (None, "auto"):
        return None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size must be WIDTHxHEIGHT, e.g. 32x32, got {size!r}", param="size") from None
    if width != height:
        raise ApiError(400, "only square sizes are supported", param="size")
    return width
