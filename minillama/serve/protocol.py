"""The OpenAI API's shapes: request bodies (pydantic models, whose JSON schema is the OpenAPI document),
their translation into engine requests, and the response bodies and stream chunks.

Supported, with OpenAI's names and defaults: messages / prompt (a string, or one prompt as token ids),
max_tokens and max_completion_tokens, temperature, top_p, seed, stop (a string or up to 16), stream,
stream_options.include_usage, logprobs / top_logprobs. Extensions, as vLLM and llama.cpp name them: top_k,
min_p, repetition_penalty, ignore_eos. Refused with a 400 that says so: n > 1, best_of > 1, echo, suffix,
logit_bias, presence/frequency penalties, tools, response formats other than text, several prompts.
Unknown fields are ignored, as most OpenAI-compatible servers do.
"""

import secrets
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from minillama.config import GenerationConfig, UserError
from minillama.infer.engine import Event, Request


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


SEED = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator.manual_seed takes


class Sampling(BaseModel):
    """Fields both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = SEED
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def refuse_unsupported(self) -> None:
        unsupported = [("n", self.n != 1, "only n=1 is supported: send one request per answer"),
                       ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
                       ("presence_penalty", self.presence_penalty != 0, "presence_penalty is not supported: use "
                                                                        "repetition_penalty"),
                       ("frequency_penalty", self.frequency_penalty != 0, "frequency_penalty is not supported: "
                                                                          "use repetition_penalty")]
        for param, bad, message in unsupported:
            if bad:
                raise ApiError(400, message, param, "unsupported_parameter")

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16 or any(not s or len(s) > 256 for s in stop):
            raise ApiError(400, "stop: give at most 16 non-empty strings of at most 256 characters", "stop")
        return tuple(stop)

    def generation(self, max_new_tokens: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                seed=self.seed, stop_strings=self.stop_strings(), ignore_eos=self.ignore_eos)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise ApiError(400, "tools are not supported", "tools", "unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "only the text response format is supported", "response_format",
                           "unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for param, bad in (("echo", self.echo), ("suffix", self.suffix), ("best_of", (self.best_of or 1) != 1)):
            if bad:
                raise ApiError(400, f"{param} is not supported", param, "unsupported_parameter")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise ApiError(400, "one prompt per request: send a string or one list of token ids", "prompt")


# ---- requests -> engine ----

def chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """The conversation through the checkpoint's chat template (infer/templates.py), as token ids."""
    from minillama.infer.templates import render_chat

    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = render_chat(tokenizer, rendered, add_generation_prompt=True)
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    return tokenizer.encode(text, bos=False, special=True)  # the template writes any BOS itself


def completion_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        return list(prompt)
    return tokenizer.encode(prompt if isinstance(prompt, str) else prompt[0], special=True)


def engine_request(body: Sampling, ids: list[int], context: int, default_max_tokens: int) -> Request:
    """An engine Request; without max_tokens the answer may run to the context, at most default_max_tokens."""
    body.refuse_unsupported()
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if asked is None:
        asked = max(1, min(default_max_tokens, context - len(ids)))
    if len(ids) + asked > context:
        raise ApiError(400, f"this model's context is {context} tokens, but the prompt has {len(ids)} tokens and "
                            f"{param} is {asked} ({len(ids) + asked} in all): shorten the prompt or ask for at "
                            f"most {max(0, context - len(ids))} tokens", param, "context_length_exceeded")
    if isinstance(body, ChatRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    try:
        return Request(ids, body.generation(asked), logprobs)
    except UserError as e:
        raise ApiError(400, str(e)) from None


# ---- engine events -> responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def chat_logprobs(tokenizer, events: list[Event]) -> dict:
    def entry(token, logprob):
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [entry(e.token, e.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                        for e in events if e.token is not None]}


def completion_logprobs(tokenizer, events: list[Event], offset: int = 0) -> dict:
    tokens = [e for e in events if e.token is not None]
    texts = [tokenizer.decode([e.token]) for e in tokens]
    offsets = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [e.logprob for e in tokens], "text_offset": offsets,
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in e.top_logprobs} for e in tokens]}


class Shaper:
    """Builds one request's response body or stream chunks, for /v1/chat/completions or /v1/completions."""

    def __init__(self, chat: bool, model: str, tokenizer, logprobs: bool):
        self.chat, self.model, self.tokenizer, self.logprobs = chat, model, tokenizer, logprobs
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        self.sent = 0  # characters streamed so far (completions' text_offset)

    def head(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def response(self, events: list[Event], done: Event) -> dict:
        text = "".join(e.text for e in events)
        if self.chat:
            lp = chat_logprobs(self.tokenizer, events) if self.logprobs else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": done.finish_reason}
        else:
            lp = completion_logprobs(self.tokenizer, events) if self.logprobs else None
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": done.finish_reason}
        body = self.head("chat.completion" if self.chat else "text_completion", [choice])
        return body | {"usage": usage(done)}

    def chunk(self, events: list[Event] = (), done: Event | None = None, role: bool = False) -> dict:
        """A stream chunk with these events' text (and logprobs), or the closing one with finish_reason."""
        text = "".join(e.text for e in events)
        finish = done.finish_reason if done is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if events else {})
            lp = chat_logprobs(self.tokenizer, events) if self.logprobs and events else None
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return self.head("chat.completion.chunk", [choice])
        lp = completion_logprobs(self.tokenizer, events, self.sent) if self.logprobs and events else None
        self.sent += len(text)
        return self.head("text_completion", [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}])

    def usage_chunk(self, done: Event) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self.head(obj, []) | {"usage": usage(done)}
