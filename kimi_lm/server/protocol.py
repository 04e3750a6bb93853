"""Request bodies of the OpenAI API (pydantic), and the OpenAI error body every bad request gets.

Unknown fields are ignored (as vLLM does), so clients sending newer fields keep working. Types are not coerced
across kinds (pydantic v2 never turns 5 into "5"), so a wrong content type is an error naming the field.

References: OpenAI API reference (chat/completions, completions, error object); vLLM
``entrypoints/openai/protocol.py``; mlx-lm ``server.py``.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal", "function-after", "function-plain"}


def error_param(loc: tuple) -> str | None:
    """pydantic's error location ("body", "messages", 0, "content", "str") -> "messages[0].content"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.lower() in _TYPE_TAGS or "[" in part or not re.fullmatch(r"\w+", part):
            break  # pydantic names union members and validators after the field: not part of the field path
        else:
            out += f".{part}" if out else part
    return out or None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict


class ToolCallIn(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier reply's thinking (SGLang / older vLLM name)
    reasoning: str | None = None  # the same (vLLM's current name)


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule; ":" would break Kimi's call ids
    description: str | None = None
    parameters: dict | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v):
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON schema of type 'object'")
        return v


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict

    @field_validator("function")
    @classmethod
    def _has_name(cls, v):
        if not isinstance(v.get("name"), str):
            raise ValueError("tool_choice.function needs a 'name'")
        return v


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints (sampling, stopping, streaming)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 = off
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=16)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    chat_template_kwargs: dict | None = None  # e.g. {"thinking": false}, {"thinking_effort": "low"}
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    response_format: dict | None = None  # rendered by Kimi K3's format; the Kimi templates have no place for it


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
