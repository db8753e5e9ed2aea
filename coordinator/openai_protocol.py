"""The OpenAI request bodies this server accepts, as pydantic models, and OpenAI's error body.

    JSON body -> FastAPI validates it against CompletionRequest | ChatCompletionRequest
              -> a RequestValidationError becomes ApiError 400 {"error": {message, type, param, code}}
              -> .sampling(), .prompt_fields(): what Coordinator.generate takes

Types are strict, as the API's JSON types are: "9" is not an integer, 1 is not true. Fields this
server does not know are ignored (OpenAI's clients send many: user, presence_penalty, ...). Every
string that reaches a worker must be encodable as UTF-8 (a lone surrogate such as "\\ud800" is
valid JSON, not valid text).
"""

from __future__ import annotations

import json
import random
from typing import Annotated, Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from wire.messages import Sampling

RETRY_AFTER_S = 1
MAX_INT = 2**63 - 1  # what a wire message carries; the decode worker bounds max_tokens by its context


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "service_unavailable_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# --- field types -------------------------------------------------------------------------------


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_value", "must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]
Int64 = Annotated[int, Field(ge=-MAX_INT - 1, le=MAX_INT)]


def _only(*defaults):
    """A parameter this server does not support: accepted only when it asks for the default."""

    def check(v):
        if v not in defaults:
            raise PydanticCustomError("unsupported", "is not supported")
        return v

    return check


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = None


class _Body(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    default_max_tokens: ClassVar[int]
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    n: Count | None = None
    stop: list[Text] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Int64 | None = None
    ignore_eos: bool = False
    echo: Annotated[Any, AfterValidator(_only(None, False))] = None
    logprobs: Annotated[Any, AfterValidator(_only(None, False))] = None
    best_of: Annotated[Any, AfterValidator(_only(None, 1))] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise PydanticCustomError("unsupported", "only n=1 is supported")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise PydanticCustomError("invalid_type", "must be a non-empty string or a list of them")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and bool(self.stream_options.include_usage)

    def sampling(self) -> Sampling:
        temperature = self.temperature or 0.0  # greedy unless asked (llama.cpp and vLLM differ here)
        return Sampling(
            max_tokens=self.max_tokens or self.max_completion_tokens or self.default_max_tokens,
            temperature=temperature, top_k=max(0, self.top_k or 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed if self.seed is not None else (random.getrandbits(31) if temperature > 0 else 0),
            stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Body):
    """POST /v1/completions: one prompt, a string or token ids (a batch of exactly one is unwrapped)."""

    default_max_tokens: ClassVar[int] = 16  # OpenAI's and vLLM's
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, p):
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) and p:
            return _utf8(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t <= MAX_INT for t in p):
                raise PydanticCustomError("invalid_value", "token ids must be >= 0")
            return p
        if isinstance(p, list) and len(p) > 1:
            raise PydanticCustomError("unsupported", "one prompt per request is supported (send a batch as separate requests)")
        raise PydanticCustomError("invalid_type", "must be a non-empty string or a list of token ids")

    def prompt_fields(self) -> dict:
        """Coordinator.generate's prompt arguments."""
        return {"prompt": self.prompt} if isinstance(self.prompt, str) else {"token_ids": list(self.prompt)}


class ChatMessage(BaseModel):
    """One message; content is text, or text parts (joined). Null content only from the assistant
    (a message that carried tool calls: this server has no tools, it is read as empty)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content):
        if isinstance(content, list):
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise PydanticCustomError("unsupported", "only text parts are supported")
            if not all(isinstance(c.get("text", ""), str) for c in content):
                raise PydanticCustomError("invalid_type", "a text part's text must be a string")
            return "".join(c.get("text", "") for c in content)
        return content

    @field_validator("content")
    @classmethod
    def _null_from_assistant_only(cls, content: str | None, info: ValidationInfo) -> str | None:
        if content is None and info.data.get("role") != "assistant":
            raise PydanticCustomError("invalid_type", "must be a string or a list of text parts (null only from the assistant)")
        return content


class ChatCompletionRequest(_Body):
    """POST /v1/chat/completions, rendered with the GGUF's chat template on the decode worker."""

    default_max_tokens: ClassVar[int] = 512
    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    def prompt_fields(self) -> dict:
        """Coordinator.generate's prompt arguments."""
        return {"messages": [{"role": m.role, "content": m.content or ""} for m in self.messages]}


# --- validation errors -> 400 ----------------------------------------------------------------

# pydantic's error type -> (our code, how the sentence about the field ends)
_PHRASES = {
    "int_type": ("invalid_type", "must be an integer"),
    "float_type": ("invalid_type", "must be a number"),
    "bool_type": ("invalid_type", "must be true or false"),
    "string_type": ("invalid_type", "must be a string"),
    "list_type": ("invalid_type", "must be a list"),
    "model_type": ("invalid_type", "must be an object"),
    "model_attributes_type": ("invalid_type", "must be an object"),
    "dict_type": ("invalid_type", "must be an object"),
    "missing": ("invalid_type", "is required"),
    "too_short": ("invalid_value", "must not be empty"),
    "literal_error": ("invalid_value", "must be {expected}"),
    "greater_than_equal": ("invalid_value", "must be >= {ge}"),
    "less_than_equal": ("invalid_value", "must be <= {le}"),
}


def api_error_from_validation(errors: list[dict]) -> ApiError:
    """pydantic's (or FastAPI's) validation errors -> one 400 naming the first, e.g.
    `messages[0].role must be 'system', 'user', 'assistant' or 'tool', got "wizard"`."""
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err["type"] == "json_invalid":
        why = (err.get("ctx") or {}).get("error", err.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {why}", None, "invalid_json")
    if not loc or isinstance(loc[0], int):  # the body itself (FastAPI puts a JSON parse position in loc)
        return ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    where = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if err["type"] in _PHRASES:
        code, phrase = _PHRASES[err["type"]]
        phrase = phrase.format(**(err.get("ctx") or {}))
    else:  # ours (a PydanticCustomError), or a pydantic type with no sentence here: its own message
        code = err["type"] if err["type"] in ("unsupported", "invalid_type", "invalid_value") else "invalid_value"
        phrase = err.get("msg", "is not valid")
    message = f"{where} {phrase}" if phrase.startswith(("must", "is ")) else f"{where}: {phrase}"
    if "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
        message += f", got {_shown(err['input'])}"
    return ApiError(400, message, str(loc[0]), code)


def _shown(value) -> str:
    text = json.dumps(value, default=str)  # ASCII: a lone surrogate shows as its escape
    return text if len(text) <= 60 else text[:57] + "..."
