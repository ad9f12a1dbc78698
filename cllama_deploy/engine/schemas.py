"""OpenAI request, response and stream-chunk schemas (pydantic), as the OpenAI API reference defines them.

One home for the wire format: the request layer (``engine/requests.py``) validates options with the
request models and returns the response models to in-process callers; the HTTP server parses bodies
with the same request models, sends the same response models, and documents both at ``/docs``.

Requests are validated strictly (a string where a number belongs is an error, not a silent cast). Fields
a model does not declare are kept (``extra="allow"``) so that the request layer can decide what to do
with them (accept a known OpenAI or llama.cpp field, refuse an unknown one by name): see
``engine/requests.py``'s field table. The ranges follow OpenAI's where it states them; integers passed
to llama.cpp are kept within 32 bits.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

INT32 = 2**31 - 1


class RequestModel(BaseModel):
    """Strict types; undeclared fields kept in ``model_extra`` for the request layer to judge."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Shared request pieces
# ---------------------------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class JSONSchemaFormat(RequestModel):
    name: str = Field("response", max_length=256)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, populate_by_name=True)


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class _Sampling(RequestModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = Field(None, description="Model id from /v1/models (default: the first).")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, le=INT32, description="llama.cpp extension; 0 = off.")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="llama.cpp extension.")
    typical_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="llama.cpp extension.")
    repeat_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, description="llama.cpp extension.")
    repeat_last_n: Optional[int] = Field(None, ge=-1, le=INT32, description="llama.cpp extension: "
                                         "tokens the penalties look back over (-1 = the context).")
    n_predict: Optional[int] = Field(None, ge=-1, le=INT32, description="llama.cpp extension: "
                                     "max_tokens under llama.cpp's name (-1 = no limit).")
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 16 stop strings.")
    n: Optional[int] = Field(1, ge=1, le=128, description="Choices to generate (the server's max_n caps it).")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    grammar: Optional[str] = Field(None, max_length=1 << 20, description="llama.cpp extension: a GBNF "
                                   "grammar the output must match.")
    json_schema: Optional[dict[str, Any]] = Field(None, description="llama.cpp extension: the output "
                                                  "matches this JSON schema (as response_format).")
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
# Chat requests
# ---------------------------------------------------------------------------------------------


class ContentPart(RequestModel):
    type: str
    text: Optional[str] = None
    # other OpenAI part types: declared so a request that sends them gets "text only", not "unknown field"
    image_url: Optional[Any] = None
    input_audio: Optional[Any] = None
    file: Optional[Any] = None
    refusal: Optional[str] = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    # OpenAI's assistant / tool message fields (engine/tools.py writes them into the prompt)
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[Any] = None
    refusal: Optional[str] = None
    audio: Optional[Any] = None

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
    function_call: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None

    model_config = ConfigDict(
        strict=True, extra="allow", allow_inf_nan=False,
        json_schema_extra={"examples": [{
            "model": "model", "messages": [{"role": "user", "content": "你好"}], "stream": False,
        }]},
    )


# ---------------------------------------------------------------------------------------------
# Completion requests
# ---------------------------------------------------------------------------------------------


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="A string, a list of strings, token ids, or a list of token-id lists.")
    max_tokens: Optional[int] = Field(16, ge=0, le=INT32, description="Default 16, as OpenAI's; 0 with "
                                      "echo and logprobs scores the prompt only (lm-eval's loglikelihood).")
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = Field(False, description="Prepend the prompt to the text; with logprobs, also "
                                 "its tokens' log-probabilities (the first one's is null).")
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
# Embedding requests
# ---------------------------------------------------------------------------------------------


class EmbeddingRequest(RequestModel):
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


# ---------------------------------------------------------------------------------------------
# Responses and stream chunks (what the server sends, field for field)
# ---------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: the answer is tool calls (issue 10)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens served from the prefix cache.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None

    @model_serializer(mode="wrap")
    def _drop_unset_details(self, handler):
        data = handler(self)
        if data.get("prompt_tokens_details") is None:
            data.pop("prompt_tokens_details", None)
        return data


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="The arguments as a JSON object, in text.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call; ``index`` says which call of the message it belongs to."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[FunctionCallDelta] = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, description="Sent only when the answer is "
                                                 "tool calls (finish_reason tool_calls).")

    @model_serializer(mode="wrap")
    def _tool_calls_when_set(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChoiceDelta(BaseModel):
    """A streamed piece of the assistant message; only the keys it sets are sent."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion. The last one before ``[DONE]`` has
    ``choices: []`` and ``usage`` when ``stream_options.include_usage`` is set; the others then carry
    ``usage: null`` (and no ``usage`` key otherwise)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChunkChoice]
    usage: Optional[CompletionUsage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed text completion (OpenAI calls it a ``text_completion`` too);
    ``usage`` as in :class:`ChatCompletionChunk`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[CompletionChunkChoice]
    usage: Optional[CompletionUsage] = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str] = Field(
        ..., description="The vector, or with encoding_format=base64 its little-endian float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


STREAM_CHUNKS = (ChatCompletionChunk, CompletionChunk)
