"""The OpenAI-compatible HTTP API over an :class:`~btlm.serve.engine.Engine` (FastAPI; SSE streaming).

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``. Every error is OpenAI's error object with its HTTP status: 400 for a bad
parameter or a prompt longer than the context (code ``context_length_exceeded``), 404 for an unknown model
or route, 500 when generation fails. A request whose client disconnects is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Chunk, Engine, EngineError, SamplingParams, TokenLogprob
from .protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest

#: How chat messages become a prompt when the tokenizer has no chat template (BTLM is a base model and has
#: none): an optional system text, then one ``User: …`` / ``Assistant: …`` line per message, then
#: ``Assistant:`` for the model to continue. ``\nUser:`` is added to the stop sequences so the model does not
#: write the user's next turn.
PLAIN_CHAT_TEMPLATE = "[system]\\n\\nUser: [user]\\nAssistant: [assistant]\\n…Assistant:"
PLAIN_CHAT_STOP = "\nUser:"
_ROLE_LABEL = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def plain_chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented plain chat prompt (see :data:`PLAIN_CHAT_TEMPLATE`)."""
    parts = []
    for m in messages:
        if m.role in ("system", "developer"):
            parts.append(m.text() + "\n\n")
        else:
            parts.append(f"{_ROLE_LABEL[m.role]}: {m.text()}\n")
    return "".join(parts) + "Assistant:"


def create_app(engine: Engine, model_name: str):
    """A FastAPI application serving ``engine`` under the model id ``model_name``."""

    app = FastAPI(title="btlm serve", version="1")

    class EventStream(StreamingResponse):
        """SSE response that cancels its generations however it ends (done, client gone, error)."""

        def __init__(self, events, handles):
            super().__init__(_guard_stream(events), media_type="text/event-stream")
            self.handles = handles

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                for h in self.handles:
                    if not h.done:
                        h.cancel()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request, err: Exception):
        return JSONResponse(APIError(500, f"{type(err).__name__}: {err}", type="server_error").body(), status_code=500)

    def model_card() -> dict:
        chat = "the tokenizer's chat template" if engine.chat_template else (
            f"plain template (base model, no chat template): {PLAIN_CHAT_TEMPLATE}; stop {PLAIN_CHAT_STOP!r}")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "btlm", "engine": engine.name,
                "max_model_len": engine.context_length, "chat_template": chat}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                           type="invalid_request_error", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.name, **engine.stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    def sampling(req, prompt_len: int, max_tokens: int | None, stops: tuple[str, ...], logprobs, prompt_logprobs=False):
        if max_tokens is None:
            max_tokens = engine.context_length - prompt_len
        if prompt_len + max_tokens > engine.context_length:
            raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                                "for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens" if prompt_len < engine.context_length else "prompt",
                           code="context_length_exceeded")
        if max_tokens < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the context ({engine.context_length})",
                           param="messages", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stops,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def submit(ids: list[int], params: SamplingParams):
        try:
            return engine.submit(ids, params)
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None

    # ------------------------------------------------------------------------------- /v1/completions

    def prompt_list(prompt) -> list[tuple[str, list[int]]]:
        """(text, ids) per prompt; an empty prompt starts from the end-of-text token, as BTLM's documents do."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = engine.encode(p) or engine.encode("<|endoftext|>")
                out.append((p, ids))
            else:
                if not p:
                    raise APIError(400, "a token-id prompt must not be empty", param="prompt")
                out.append((engine.decode(p), list(p)))
        return out

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.echo and req.logprobs is not None and not engine.supports_prompt_logprobs:
            raise APIError(400, f"echo with logprobs is not supported by the {engine.name} engine", param="echo")
        prompts = prompt_list(req.prompt)
        params = [sampling(req, len(ids), req.max_tokens, req.stop_list(), req.logprobs,
                           prompt_logprobs=req.echo and req.logprobs is not None) for _, ids in prompts]
        handles = []
        try:
            for (_, ids), p in zip(prompts, params):
                handles.append(submit(ids, p))
        except APIError:
            for h in handles:  # the request fails as a whole
                h.cancel()
            raise
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name, "system_fingerprint": None}
        states = [_CompletionChoice(i, text if req.echo else "", req.logprobs is not None) for i, (text, _) in enumerate(prompts)]

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                usage = _Usage()
                if req.echo:
                    for st in states:
                        yield _sse({**base, "choices": [{"index": st.index, "text": st.text, "logprobs": None,
                                                         "finish_reason": None}]})
                async for i, chunk in _merge(handles):
                    usage.add(chunk)
                    st = states[i]
                    before = len(st.logprobs["tokens"]) if st.logprobs else 0
                    text = st.add(chunk)
                    lp = None
                    if st.logprobs is not None:
                        lp = {k: v[before:] for k, v in st.logprobs.items()}
                    yield _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                     "finish_reason": chunk.finish_reason}]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": usage.body()})
                yield "data: [DONE]\n\n"

            return EventStream(events(), handles)

        usage = _Usage()
        async for i, chunk in _until_disconnect(request, handles):
            usage.add(chunk)
            states[i].add(chunk)
        choices = [{"index": st.index, "text": st.text, "logprobs": st.logprobs, "finish_reason": st.finish_reason}
                   for st in states]
        return {**base, "choices": choices, "usage": usage.body()}

    # -------------------------------------------------------------------------- /v1/chat/completions

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        stops = req.stop_list()
        if engine.chat_template:
            prompt = engine.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            prompt = plain_chat_prompt(req.messages)
            stops += (PLAIN_CHAT_STOP,)
        ids = engine.encode(prompt)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        handle = submit(ids, sampling(req, len(ids), max_tokens, stops, top))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "system_fingerprint": None}

            async def events():
                usage = _Usage()
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
                async for _, chunk in _merge([handle]):
                    usage.add(chunk)
                    delta = {"content": chunk.text} if chunk.text else {}
                    lp = {"content": [_chat_logprob(t) for t in chunk.logprobs]} if req.logprobs else None
                    yield _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                     "finish_reason": chunk.finish_reason}]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": usage.body()})
                yield "data: [DONE]\n\n"

            return EventStream(events(), [handle])

        text, logprobs, finish, usage = "", [], None, _Usage()
        async for _, chunk in _until_disconnect(request, [handle]):
            usage.add(chunk)
            text += chunk.text
            logprobs += [_chat_logprob(t) for t in chunk.logprobs]
            finish = chunk.finish_reason or finish
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": logprobs} if req.logprobs else None, "finish_reason": finish}],
                "usage": usage.body()}

    app.state.engine = engine
    return app


# ------------------------------------------------------------------------------------------- helpers


class _Usage:
    def __init__(self):
        self.prompt = self.completion = 0

    def add(self, chunk: Chunk) -> None:
        if chunk.finish_reason is not None:
            self.prompt += chunk.prompt_tokens
            self.completion += chunk.completion_tokens

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


class _CompletionChoice:
    """One choice of a completion being assembled: its text and OpenAI's legacy logprobs lists."""

    def __init__(self, index: int, echo_text: str, with_logprobs: bool):
        self.index, self.text, self.finish_reason = index, echo_text, None
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if with_logprobs else None
        self._offset = 0

    def add(self, chunk: Chunk) -> str:
        """Append a chunk; return the text it adds."""
        if self.logprobs is not None:
            for entry in (chunk.prompt_logprobs or []) + chunk.logprobs:
                self.logprobs["tokens"].append(entry.token)
                self.logprobs["token_logprobs"].append(entry.logprob)
                self.logprobs["top_logprobs"].append(dict(entry.top) if entry.logprob is not None else None)
                self.logprobs["text_offset"].append(self._offset)
                self._offset += len(entry.token)
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason or self.finish_reason
        return chunk.text


def _chat_logprob(entry: TokenLogprob) -> dict:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in entry.top]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _merge(handles) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of several handles as they come, tagged with the handle's index."""
    if len(handles) == 1:
        async for chunk in handles[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, handle):
        try:
            async for chunk in handle:
                await queue.put((i, chunk))
        except Exception as err:  # handed to the reader, which re-raises it
            await queue.put((i, err))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _engine_error(err: EngineError) -> APIError:
    return APIError(500, str(err), type="server_error")


async def _until_disconnect(request, handles) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of ``handles``; a watcher cancels them when the client disconnects before they finish."""

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        for h in handles:
            h.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for item in _merge(handles):
            yield item
    except EngineError as err:
        raise _engine_error(err) from None
    finally:
        watcher.cancel()
        for h in handles:
            if not h.done:
                h.cancel()


async def _guard_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE events; an engine failure mid-stream becomes an error event (the status line is already sent)."""
    try:
        async for event in events:
            yield event
    except EngineError as err:
        yield _sse(_engine_error(err).body())
