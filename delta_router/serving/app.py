"""OpenAI-compatible HTTP API over a ``BatchScheduler``: ``create_app(scheduler) -> FastAPI``.

``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` -> server-sent events),
``/v1/models``, ``/health``, and with a registry ``POST /v1/adapters`` (register a finetune while
serving: ``{"path", "id"?, "tags"?, "examples"?}``) and ``DELETE /v1/adapters/{id}``.
``model: "auto"`` routes, an adapter id pins it, ``"base"`` is the base model. Every response,
streamed or not, names what served it (``model``,
``x_delta_router.adapter`` and the ``X-Delta-Router-Adapter`` header). Bad requests, malformed
bodies included, get OpenAI-style JSON errors with a 4xx status.

Differences from OpenAI: ``temperature`` defaults to 0 (greedy, deterministic); ``n`` must be 1;
one prompt per completion request; no streaming on ``/v1/completions``; message ``content`` is text
(a string, or a list of text parts joined with newlines); ``seed`` is within torch's range
(-2**63 .. 2**64-1).
"""

from __future__ import annotations

import asyncio
import json
import reprlib
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from delta_router.data.templates import PAPER_PREAMBLES, alpaca_prompt
from delta_router.errors import DeltaRouterError, DuplicateModelError, InvalidModelIdError
from delta_router.model_ids import AUTO_MODEL_NAME, BASE_ADAPTER, BASE_MODEL_NAME
from delta_router.serving.backends import GenerationRequest, GenerationResult
from delta_router.serving.scheduler import AdapterRemovedError, BatchScheduler, Job, run_job


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request bodies -----------------------------------------------------------------------------
class ApiBody(BaseModel):
    """A request body: every text in it must be valid Unicode (JSON's ``\\ud800`` escapes decode
    to lone surrogates, which no tokenizer or file system takes)."""

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data):
        _check_unicode(data)
        return data


def _check_unicode(value) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            surrogate = ascii(exc.object[exc.start])
            raise ValueError(f"text with a lone surrogate ({surrogate}) is not valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


class SamplingFields(ApiBody):
    model_config = ConfigDict(strict=True)  # "5" is not 5, true is not 1

    model: str = AUTO_MODEL_NAME
    max_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1

    @field_validator("n")
    @classmethod
    def one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if not value.strip():
            raise ValueError("prompt is empty")
        return value


class ChatMessage(ApiBody):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, value):
        """OpenAI's list of content parts, ``[{"type": "text", "text": ...}]``, as one string."""
        if not isinstance(value, list):
            return value
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            raise ValueError('only text content parts ({"type": "text", "text": "..."}) are supported')
        return "\n".join(p["text"] for p in value)


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def has_user_turn(cls, value):
        users = [m for m in value if m.role == "user"]
        if not users or not users[-1].content.strip():  # the last one is what is routed and answered
            raise ValueError("the last user message must not be empty")
        return value


def chat_prompt(messages: list[ChatMessage]) -> tuple[str, str]:
    """(prompt, routing text): the Alpaca template the zoo's adapters were trained on.

    The system message replaces the preamble, the last user message is the instruction, and
    earlier turns become the input.
    """
    system = next((m.content for m in messages if m.role == "system"), PAPER_PREAMBLES[0])
    turns = [m for m in messages if m.role != "system"]
    last_user = max(i for i, m in enumerate(turns) if m.role == "user")
    history = "\n".join(f"{m.role.capitalize()}: {m.content}" for m in turns[:last_user])
    instruction = turns[last_user].content
    return alpaca_prompt(instruction, history, system), instruction


# ---- the app ------------------------------------------------------------------------------------
class AdapterBody(ApiBody):
    """``POST /v1/adapters``: a LoRA adapter directory (or cached HF id) to serve."""

    model_config = ConfigDict(strict=True)

    path: str
    id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    examples: list[str] | None = Field(default=None, min_length=1)  # queries of its task: a profile

    @field_validator("examples")
    @classmethod
    def no_blank_examples(cls, value):
        if value is not None and not all(text.strip() for text in value):
            raise ValueError("examples must not be empty texts")
        return value


def create_app(scheduler: BatchScheduler, max_tokens_limit: int = 512, registry=None) -> FastAPI:
    """The API; starts the scheduler's worker with the app and stops it on shutdown. ``registry``
    (a ``serving.registry.AdapterRegistry``) enables ``/v1/adapters``."""
    backend = scheduler.backend

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="delta-router", version="1", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") != "value_error":  # not an object
            message = "the request body must be a JSON object (Content-Type: application/json)"
            return error_response(400, message)
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, err: HTTPException):
        """FastAPI's own errors: a body it cannot decode, an unknown path or method."""
        if isinstance(err.__cause__, UnicodeDecodeError):
            return error_response(400, "the request body is not valid JSON (not UTF-8)", code="invalid_json")
        return error_response(err.status_code, str(err.detail), headers=err.headers)

    def served_names() -> list[str]:
        return ([AUTO_MODEL_NAME] if scheduler.router else []) + [BASE_MODEL_NAME, *backend.model_ids()]

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "backend": backend.name,
            "adapters": len(backend.model_ids()),
            "router": scheduler.router is not None,
            "queued": scheduler.pending,
            **scheduler.stats,
        }

    @app.get("/v1/models")
    def models() -> dict:
        now = int(time.time())
        data = []
        for name in served_names():
            entry = {"id": name, "object": "model", "created": now, "owned_by": "delta-router"}
            if registry is not None and name in registry.index:
                entry["x_delta_router"] = registry.describe(name)
            data.append(entry)
        return {"object": "list", "data": data}

    @app.post("/v1/adapters", status_code=201)
    def register(body: AdapterBody) -> dict:
        if registry is None:
            raise ApiError(404, "this server has no adapter registry")
        try:
            return registry.register(body.path, body.id, body.tags, body.examples)
        except DuplicateModelError as err:
            raise ApiError(409, str(err), "id", "model_exists") from err
        except InvalidModelIdError as err:
            raise ApiError(400, str(err), "id") from err
        except DeltaRouterError as err:
            raise ApiError(400, str(err), "path", "invalid_adapter") from err
        except OSError as err:  # a path the file system refuses: too long, no permission, ...
            message = f"cannot read {reprlib.repr(body.path)}: {err.strerror or err}"
            raise ApiError(400, message, "path", "invalid_adapter") from err

    @app.delete("/v1/adapters/{model_id}")
    def remove(model_id: str) -> dict:
        if registry is None:
            raise ApiError(404, "this server has no adapter registry")
        try:
            registry.remove(model_id)
        except KeyError as err:
            raise ApiError(404, f"model {model_id!r} is not served", "model_id", "model_not_found") from err
        return {"id": model_id, "object": "model", "deleted": True}

    def make_job(body: SamplingFields, prompt: str, route_text: str) -> Job:
        if body.model not in served_names():
            raise ApiError(
                404, f"model {body.model!r} does not exist; see /v1/models", "model", "model_not_found"
            )
        if body.max_tokens > max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {body.max_tokens} exceeds this server's limit {max_tokens_limit}",
                "max_tokens",
            )
        prompt_tokens = backend.count_tokens(prompt)
        if prompt_tokens + body.max_tokens > backend.max_context:
            raise ApiError(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({body.max_tokens}) exceeds the context "
                f"length {backend.max_context}",
                "max_tokens",
                "context_length_exceeded",
            )
        adapter = BASE_ADAPTER if body.model == BASE_MODEL_NAME else body.model
        request = GenerationRequest(
            prompt, adapter, body.max_tokens, body.temperature, body.top_p, body.seed, body.stops()
        )
        return Job(request, route_text, asyncio.get_running_loop())

    def served_by(job: Job) -> dict:
        adapter = job.decision.target if job.decision is not None else job.request.adapter
        info = {"adapter": BASE_MODEL_NAME if adapter == BASE_ADAPTER else adapter}
        if job.decision is not None:
            info["routing"] = job.decision.to_dict()
        return info

    def usage(result: GenerationResult) -> dict:
        total = result.prompt_tokens + result.completion_tokens
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": total,
        }

    def worker_error(err: Exception) -> ApiError:
        if isinstance(err, AdapterRemovedError):  # removed between acceptance and generation
            return ApiError(404, str(err), "model", "model_not_found")
        return ApiError(500, f"generation failed: {err}")

    async def finish(job: Job) -> GenerationResult:
        try:
            return await run_job(scheduler, job)
        except Exception as err:  # noqa: BLE001 - the worker's error, reported to this client
            raise worker_error(err) from err

    def adapter_header(job: Job) -> dict:
        return {"X-Delta-Router-Adapter": served_by(job)["adapter"]}

    def respond(payload: dict, job: Job) -> JSONResponse:
        return JSONResponse(payload, headers=adapter_header(job))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if body.stream:
            raise ApiError(400, "streaming is supported on /v1/chat/completions only", "stream")
        job = make_job(body, body.prompt, body.prompt)
        result = await finish(job)
        info = served_by(job)
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        payload = {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": info["adapter"], "choices": [choice], "usage": usage(result), "x_delta_router": info,
        }  # fmt: skip
        return respond(payload, job)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        prompt, route_text = chat_prompt(body.messages)
        job = make_job(body, prompt, route_text)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            scheduler.submit(job)
            first = await job.events.get()  # the worker routes before it emits: the adapter is known
            if first[0] == "error":
                raise worker_error(first[1])
            events = stream_chat(job, ident, created, first)
            return StreamingResponse(events, media_type="text/event-stream", headers=adapter_header(job))
        result = await finish(job)
        info = served_by(job)
        message = {"role": "assistant", "content": result.text}
        payload = {
            "id": ident, "object": "chat.completion", "created": created, "model": info["adapter"],
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
            "usage": usage(result), "x_delta_router": info,
        }  # fmt: skip
        return respond(payload, job)

    async def stream_chat(job: Job, ident: str, created: int, event: tuple):
        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            payload = {
                "id": ident, "object": "chat.completion.chunk", "created": created,
                "model": served_by(job)["adapter"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra,
            }  # fmt: skip
            return f"data: {json.dumps(payload)}\n\n"

        yield chunk({"role": "assistant", "content": ""}, x_delta_router=served_by(job))
        while True:
            kind, payload = event
            if kind == "text":
                yield chunk({"content": payload})
            elif kind == "done":
                yield chunk({}, payload.finish_reason, usage=usage(payload))
                break
            else:
                error = {"error": {"message": f"generation failed: {payload}", "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
                break
            event = await job.events.get()
        yield "data: [DONE]\n\n"

    return app
