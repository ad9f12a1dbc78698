"""OpenAI-compatible routes under /v1."""

from __future__ import annotations

from fastapi import APIRouter, Request

from cllama_deploy.server import handlers
from cllama_deploy.server.protocol import (
    ERROR_RESPONSES,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["OpenAI"], responses=ERROR_RESPONSES)


def _streamed(chunk_model: str) -> dict:
    """The 200 response's second media type: the SSE stream of ``chunk_model`` events (the schema is
    added to the OpenAPI components by ``app._openapi``)."""
    return {200: {"content": {"text/event-stream": {
        "schema": {"$ref": f"#/components/schemas/{chunk_model}"},
        "example": f"data: {{...{chunk_model}...}}\n\ndata: [DONE]\n\n"}},
        "description": "JSON, or with `stream: true` server-sent events: one `data: {chunk}` per "
                       f"{chunk_model}, then `data: [DONE]`."}}


def _card(engine) -> dict:
    info = engine.info
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": "cllama-deploy",
            "meta": {"n_ctx": info.n_ctx, "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
                     "n_embd": info.n_embd, "chat_template": info.chat_template_source}}


@router.get("/models", response_model=ModelList, summary="List the served models")
async def list_models(request: Request):
    registry = request.app.state.registry
    if not registry.ready:
        registry.get(None)  # raises: 503 while loading
    return {"object": "list", "data": [_card(e) for e in registry.engines()]}


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="Describe one model")
async def get_model(model_id: str, request: Request):
    return _card(request.app.state.registry.get(model_id))


@router.post("/chat/completions", response_model=ChatCompletion,
             responses=_streamed("ChatCompletionChunk"),
             summary="Chat completion (stream: true for server-sent events)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    request.state.endpoint = "/v1/chat/completions"
    return await handlers.chat_completion(request, body)


@router.post("/completions", response_model=Completion, responses=_streamed("CompletionChunk"),
             summary="Text completion (stream: true for server-sent events)")
async def completions(body: CompletionRequest, request: Request):
    request.state.endpoint = "/v1/completions"
    return await handlers.completion(request, body)


@router.post("/embeddings", response_model=EmbeddingResponse,
             summary="One mean-pooled, L2-normalized vector per input")
async def embeddings(body: EmbeddingRequest, request: Request):
    request.state.endpoint = "/v1/embeddings"
    return await handlers.embeddings(request, body)
