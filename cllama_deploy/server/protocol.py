"""OpenAI request and response schemas (pydantic), as the OpenAI API reference defines them.

Requests are validated strictly (a string where a number belongs is a 400, not a silent cast);
unknown fields are ignored, as OpenAI clients send fields we do not use. The ranges follow OpenAI's
where it states them; integers passed to llama.cpp are kept within 32 bits.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT32 = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class JSONSchemaFormat(_Strict):
    name: str = Field("response", max_length=256)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class _Sampling(_Strict):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = Field(None, description="Model id from /v1/models (default: the first).")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, le=INT32, description="llama.cpp extension; 0 = off.")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="llama.cpp extension.")
    typical_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="llama.cpp extension.")
    repeat_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, description="llama.cpp extension.")
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 16 stop strings.")
    n: Optional[int] = Field(1, ge=1, le=128, description="Choices to generate (the server's max_n caps it).")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = Field(None, max_length=512)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for key, bias in v.items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            if token < 0 or token > INT32:
                raise ValueError(f"logit_bias key {key} is not a valid token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return v


# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------


class ContentPart(_Strict):
    type: str
    text: Optional[str] = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=INT32, description="Deprecated by OpenAI; "
                                      "use max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT32)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    parallel_tool_calls: Optional[bool] = None

    model_config = ConfigDict(
        strict=True, extra="ignore", allow_inf_nan=False,
        json_schema_extra={"examples": [{
            "model": "model", "messages": [{"role": "user", "content": "你好"}], "stream": False,
        }]},
    )


# ---------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="A string, a list of strings, token ids, or a list of token-id lists.")
    max_tokens: Optional[int] = Field(16, ge=1, le=INT32, description="Default 16, as OpenAI's.")
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=128)
    response_format: Optional[ResponseFormat] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > 64:
                raise ValueError("at most 64 prompts per request")
            for item in v:
                if isinstance(item, list) and not item:
                    raise ValueError("a token-id prompt must not be empty")
        return v


# ---------------------------------------------------------------------------------------------
# Embeddings, tokenizer
# ---------------------------------------------------------------------------------------------


class EmbeddingRequest(_Strict):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, le=INT32)
    user: Optional[str] = Field(None, max_length=512)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("input must not be an empty list")
            if len(v) > 2048:
                raise ValueError("at most 2048 inputs per request")
        return v


class TokenizeRequest(_Strict):
    content: str = Field(..., description="Text to tokenize.")
    model: Optional[str] = None
    add_special: bool = Field(True, description="Add BOS as the model does for a prompt.")
    with_pieces: bool = Field(False, description="Also return each token's text.")


class TokenizeResponse(BaseModel):
    tokens: list[Any]
    model: str


class DetokenizeRequest(_Strict):
    tokens: list[int] = Field(..., max_length=1_000_000)
    model: Optional[str] = None


class DetokenizeResponse(BaseModel):
    content: str
    model: str


# ---------------------------------------------------------------------------------------------
# Responses (documentation in /docs; handlers build plain dicts with these shapes)
# ---------------------------------------------------------------------------------------------


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: UsageOut


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[Literal["stop", "length"]]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[CompletionChoice]
    usage: UsageOut


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cllama-deploy"
    meta: dict[str, Any] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request (OpenAI error object)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {"model": ErrorResponse, "description": "Queue full"},
    503: {"model": ErrorResponse, "description": "Model loading or server shutting down"},
    504: {"model": ErrorResponse, "description": "Request timed out"},
}
