"""The HTTP API's schemas: the OpenAI request/response/chunk models (one home:
:mod:`cllama_deploy.engine.schemas`, re-exported here), plus what only the server has: llama.cpp-style
tokenizer routes, model cards, error objects and the error responses /docs lists.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from cllama_deploy.engine.schemas import (  # noqa: F401  (re-exported: the wire format)
    INT32,
    STREAM_CHUNKS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    ContentPart,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    JSONSchemaFormat,
    ResponseFormat,
    StreamOptions,
    RequestModel,
)

# ---------------------------------------------------------------------------------------------
# Tokenizer (llama.cpp server style)
# ---------------------------------------------------------------------------------------------


class TokenizeRequest(RequestModel):
    content: str = Field(..., description="Text to tokenize.")
    model: Optional[str] = None
    add_special: bool = Field(True, description="Add BOS as the model does for a prompt.")
    parse_special: bool = Field(True, description="Read special-token text (`<s>`) as that token "
                                "(llama.cpp server's field).")
    with_pieces: bool = Field(False, description="Also return each token's text.")


class TokenPiece(BaseModel):
    id: int
    piece: str


class TokenizeResponse(BaseModel):
    tokens: Union[list[int], list[TokenPiece]] = Field(
        ..., description="Token ids, or with with_pieces {id, piece} objects.")
    model: str


class DetokenizeRequest(RequestModel):
    tokens: list[int] = Field(..., max_length=1_000_000)
    model: Optional[str] = None


class DetokenizeResponse(BaseModel):
    content: str
    model: str


# ---------------------------------------------------------------------------------------------
# Models, errors
# ---------------------------------------------------------------------------------------------


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
    500: {"model": ErrorResponse, "description": "Models failed to load, or a server error"},
    503: {"model": ErrorResponse, "description": "Model loading or server shutting down"},
    504: {"model": ErrorResponse, "description": "Request timed out"},
}
