"""The OpenAI request bodies ``btlm serve`` accepts, and its error objects.

Requests are validated by pydantic: a wrong type or an out-of-range value is a 400 naming the field, as the
OpenAI API answers. Fields the API defines but BTLM does not implement (``n`` > 1, penalties, ``logit_bias``,
``suffix``, tools) are accepted only at their neutral value, so a client never gets silently different
behaviour; fields the API does not define are refused.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _unsupported(what: str) -> AfterValidator:
    """A field BTLM accepts only when empty: any other value is refused, naming it (``what``)."""

    def refuse(v):
        if v:
            raise ValueError(f"{what} is not supported")
        return v

    return AfterValidator(refuse)


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt (n > 1 is not supported)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0")
    logit_bias: Annotated[dict[str, float] | None, _unsupported("logit_bias")] = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: Union[str, list[str], list[int], list[list[int]]] = "<|endoftext|>"
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1, description="not supported: only 1")
    suffix: Annotated[str | None, _unsupported("suffix (insertion)")] = None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id … are carried but unused

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
