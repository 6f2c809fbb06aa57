"""The OpenAI-compatible FastAPI app around an `AsyncEngine`.

Every generation request is streamed from the engine as deltas (so metrics see each token and a client
that hangs up is noticed); non-streaming responses are assembled from them. A bad request gets an
OpenAI-style error and touches nothing else; a client that disconnects has its requests aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import jaxllm
from jaxllm.async_engine import AsyncEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from serving.metrics import ServerMetrics
from serving.openai_format import Accumulated, APIError, chat_logprobs, completion_logprobs, error_response, sse, usage
from serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from serving.tool_parser import parse_hermes

_DISCONNECT_POLL_S = 0.1


@dataclasses.dataclass
class ServerConfig:
    """The server's own settings (the engine's are in `EngineConfig`)."""

    served_model_names: list[str]
    api_key: str | None = None
    max_queued_requests: int | None = None
    chat_template: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


@dataclasses.dataclass
class Generation:
    """One engine request of an API call: which prompt it serves and its stream of deltas."""

    prompt_index: int
    prompt_text: str | None
    prompt_token_ids: list[int]
    stream: AsyncIterator[RequestOutput]


def build_app(engine: AsyncEngine, config: ServerConfig, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app; `on_ready` runs once the server has started (to say where it listens)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="jaxllm", version=jaxllm.__version__, lifespan=lifespan)
    app.state.engine, app.state.config, app.state.shutting_down = engine, config, False
    app.state.metrics = ServerMetrics(engine.engine, config.served_model_names[0])
    _install_error_handlers(app)
    _install_guards(app)
    _install_routes(app)
    return app


# ----- errors, auth, shutdown -----

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', '')}")
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request")
        return error_response(400, f"{'.'.join(location) + ': ' if location else ''}{message}",
                              location[0] if location else None)

    @app.exception_handler(ValueError)
    async def refused(_: Request, exc: ValueError) -> JSONResponse:
        message = str(exc)
        return error_response(400, message, message.split(" ", 1)[0] if message else None)


def _install_guards(app: FastAPI) -> None:
    app.add_middleware(_Guard, app_state=app.state)


class _Guard:
    """503 while shutting down, 401 without the API key on /v1. A plain ASGI middleware: Starlette's
    `BaseHTTPMiddleware` would hide client disconnects from the endpoints."""

    def __init__(self, app, app_state):
        self.app, self.state = app, app_state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            config: ServerConfig = self.state.config
            rejection = None
            if self.state.shutting_down and request.url.path not in ("/health", "/metrics"):
                rejection = error_response(503, "the server is shutting down")
            elif config.api_key and request.url.path.startswith("/v1") and not _authorized(request, config.api_key):
                rejection = error_response(401, "invalid or missing API key")
            if rejection is not None:
                await rejection(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), api_key.encode())


# ----- routes -----

def _install_routes(app: FastAPI) -> None:
    engine: AsyncEngine = app.state.engine
    config: ServerConfig = app.state.config

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.healthy and not app.state.shutting_down else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": jaxllm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "jaxllm",
             "root": engine.engine.config.model, "max_model_len": engine.engine.config.max_model_len}
            for name in config.served_model_names]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(config, body.model)
        tokenizer = _tokenizer(engine)
        if body.messages is not None:
            text = tokenizer.apply_chat_template(body.messages, chat_template=config.chat_template, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
            tokens = tokenizer.encode(text, add_special_tokens=False)
        elif body.prompt is not None:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
        return {"count": len(tokens), "max_model_len": engine.engine.config.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        _check_model(config, body.model)
        _check_token_ids(engine, body.tokens, "tokens")
        return {"prompt": _tokenizer(engine).decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        _check_request(app, body)
        _check_capacity(app)
        params = body.sampling_params(engine.engine.default_sampling_params(), body.max_tokens, body.logprobs)
        prompts = _completion_prompts(body.prompt)
        generations = _start(engine, [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}
                                      for p in prompts], params, "cmpl")
        handler = _CompletionStream if body.stream else _CompletionResponse
        return await handler(app, body, params, generations).respond(raw)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        _check_request(app, body)
        parse_tools = _tool_parsing(config, body)
        _check_capacity(app)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = body.sampling_params(engine.engine.default_sampling_params(), max_tokens,
                                      (body.top_logprobs or 0) if body.logprobs else None)
        tokenizer = _tokenizer(engine)
        try:
            text = tokenizer.apply_chat_template(
                body.messages, chat_template=body.chat_template or config.chat_template, tokenize=False,
                add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
                tools=[t.model_dump() for t in body.tools] if body.tools else None)
        except Exception as e:  # jinja errors, unknown roles, missing content...
            raise APIError(400, f"cannot apply the chat template to these messages: {e}", "messages") from e
        prompt = {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        generations = _start(engine, [prompt], params, "chatcmpl")
        handler = _ChatStream if body.stream else _ChatResponse
        return await handler(app, body, params, generations, parse_tools).respond(raw)


def _tokenizer(engine: AsyncEngine):
    if engine.engine.tokenizer is None:
        raise APIError(400, "the server runs without a tokenizer (--skip-tokenizer-init)")
    return engine.engine.tokenizer


def _check_model(config: ServerConfig, model: str | None) -> None:
    if model is not None and model not in config.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist.", "model")


def _check_token_ids(engine: AsyncEngine, ids: list[int], param: str) -> None:
    vocab = engine.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab})", param)


def _check_request(app: FastAPI, body) -> None:
    config: ServerConfig = app.state.config
    _check_model(config, body.model)
    field = body.unsupported()
    if field:
        raise APIError(400, f"'{field}' is not supported by this server", field)


def _check_capacity(app: FastAPI) -> None:
    limit = app.state.config.max_queued_requests
    if limit is not None and app.state.engine.num_waiting >= limit:
        raise APIError(429, f"the queue is full ({limit} requests waiting); try again later")


def _tool_parsing(config: ServerConfig, body: ChatCompletionRequest) -> bool:
    """Whether to parse tool calls from the reply: tools given and `tool_choice` auto (needs the flags)."""
    if not body.tools or body.tool_choice == "none":
        return False
    if not (config.enable_auto_tool_choice and config.tool_call_parser):
        raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser',
                       "tool_choice")
    return True


def _completion_prompts(prompt) -> list:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    return list(prompt)


def _start(engine: AsyncEngine, prompts: list[dict], params: SamplingParams, prefix: str) -> list[Generation]:
    """Queue one engine request per prompt; if any is refused, the ones already queued are aborted."""
    base = f"{prefix}-{uuid.uuid4().hex}"
    started: list[Generation] = []
    try:
        for i, prompt in enumerate(prompts):
            text, ids = engine.engine.tokenize_prompt(prompt)
            if text is None and engine.engine.tokenizer is not None:
                text = engine.engine.tokenizer.decode(ids)  # for echo
            stream = engine.generate({"prompt": text, "prompt_token_ids": ids}, params, f"{base}-{i}")
            started.append(Generation(i, text, ids, stream))
    except BaseException:
        for generation in started:
            engine.abort(f"{base}-{generation.prompt_index}")
        raise
    return started


class _Handler:
    """Drains the generations of one API call, observing metrics; subclasses shape the response."""

    object_name = ""

    def __init__(self, app: FastAPI, body, params: SamplingParams, generations: list[Generation],
                 parse_tools: bool = False):
        self.app, self.body, self.params, self.generations = app, body, params, generations
        self.parse_tools = parse_tools
        self.id = f"{'chatcmpl' if isinstance(body, ChatCompletionRequest) else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = body.model or app.state.config.served_model_names[0]
        self.completions = {(g.prompt_index, i): Accumulated(g.prompt_index * params.n + i)
                            for g in generations for i in range(params.n)}

    async def _drain(self, generation: Generation, on_delta: Callable[[Generation, RequestOutput], Awaitable[None]]
                     ) -> None:
        timer = self.app.state.metrics.timer(len(generation.prompt_token_ids))
        async for output in generation.stream:
            timer.tokens(sum(len(c.token_ids) for c in output.outputs))
            for delta in output.outputs:
                self.completions[(generation.prompt_index, delta.index)].add(delta)
            await on_delta(generation, output)
        timer.finished([self.completions[(generation.prompt_index, i)].finish_reason for i in range(self.params.n)])

    def usage(self) -> dict[str, int]:
        prompt = sum(len(g.prompt_token_ids) for g in self.generations)
        return usage(prompt, sum(len(c.token_ids) for c in self.completions.values()))


class _CompletionResponse(_Handler):
    """A whole response at the end; a client that disconnects meanwhile aborts its requests."""

    async def respond(self, raw: Request) -> Response:
        async def nothing(*_):
            return None

        work = asyncio.ensure_future(asyncio.gather(*(self._drain(g, nothing) for g in self.generations)))
        while not work.done():
            await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
            if not work.done() and await raw.is_disconnected():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                return Response(status_code=499)
        work.result()
        return JSONResponse(self.body_json())

    def body_json(self) -> dict[str, Any]:
        choices = []
        for (prompt_index, _), acc in sorted(self.completions.items(), key=lambda kv: kv[1].index):
            prefix = (self.generations[prompt_index].prompt_text or "") if self.body.echo else ""
            logprobs = (completion_logprobs(acc.token_ids, acc.logprobs, self.body.logprobs, len(prefix))
                        if self.body.logprobs is not None else None)
            choices.append({"index": acc.index, "text": prefix + acc.text, "logprobs": logprobs,
                            "finish_reason": acc.finish_reason, "stop_reason": acc.stop_reason})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class _Streaming(_Handler):
    """Server-sent events from all generations of the call, merged, ending with `data: [DONE]`."""

    async def respond(self, raw: Request) -> Response:
        return StreamingResponse(self.events(), media_type="text/event-stream")

    async def events(self) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def push(generation: Generation, output: RequestOutput) -> None:
            await queue.put((generation, output))

        async def drain_all() -> None:
            try:
                await asyncio.gather(*(self._drain(g, push) for g in self.generations))
            finally:
                await queue.put(None)

        work = asyncio.ensure_future(drain_all())
        try:
            for first in self.opening():
                yield sse(first)
            while (item := await queue.get()) is not None:
                for chunk in self.chunks(*item):
                    yield sse(chunk)
            work.result()
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield sse(self.chunk([], usage=self.usage()))
            yield sse("[DONE]")
        finally:
            if not work.done():  # the client went away: abort everything still running
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def chunks(self, generation: Generation, output: RequestOutput) -> list[dict[str, Any]]:
        raise NotImplementedError


class _CompletionStream(_Streaming):
    object_name = "text_completion"

    def chunks(self, generation: Generation, output: RequestOutput) -> list[dict[str, Any]]:
        out = []
        for delta in output.outputs:
            index = generation.prompt_index * self.params.n + delta.index
            logprobs = (completion_logprobs(delta.token_ids, delta.logprobs or [], self.body.logprobs)
                        if self.body.logprobs is not None else None)
            out.append(self.chunk([{"index": index, "text": delta.text, "logprobs": logprobs,
                                    "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}]))
        return out


class _ChatResponse(_CompletionResponse):
    def body_json(self) -> dict[str, Any]:
        choices = []
        for acc in sorted(self.completions.values(), key=lambda a: a.index):
            content, calls = parse_hermes(acc.text) if self.parse_tools else (acc.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            logprobs = (chat_logprobs(acc.token_ids, acc.logprobs, self.body.top_logprobs or 0)
                        if self.body.logprobs else None)
            choices.append({"index": acc.index, "message": message, "logprobs": logprobs,
                            "finish_reason": "tool_calls" if calls else acc.finish_reason,
                            "stop_reason": acc.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class _ChatStream(_Streaming):
    """Content deltas as they come; with tool parsing on, each choice's text is held and sent parsed at its end."""

    object_name = "chat.completion.chunk"

    def opening(self) -> list[dict[str, Any]]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(len(self.completions))])]

    def chunks(self, generation: Generation, output: RequestOutput) -> list[dict[str, Any]]:
        out = []
        for delta in output.outputs:
            acc = self.completions[(generation.prompt_index, delta.index)]
            logprobs = (chat_logprobs(delta.token_ids, delta.logprobs or [], self.body.top_logprobs or 0)
                        if self.body.logprobs else None)
            if not self.parse_tools:
                message, reason = {"content": delta.text}, delta.finish_reason
            elif delta.finish_reason is None:
                continue
            else:
                content, calls = parse_hermes(acc.text)
                message = {"content": content, **({"tool_calls": [
                    {"index": i, **call} for i, call in enumerate(calls)]} if calls else {})}
                reason = "tool_calls" if calls else delta.finish_reason
            out.append(self.chunk([{"index": acc.index, "delta": message, "logprobs": logprobs,
                                    "finish_reason": reason}]))
        return out
