"""Tokenizer routes (llama.cpp server style): /tokenize and /detokenize."""

from __future__ import annotations

from fastapi import APIRouter, Request

from cllama_deploy.engine import requests as rl
from cllama_deploy.server.handlers import request_config
from cllama_deploy.server.protocol import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["Tokenizer"], responses=ERROR_RESPONSES)


@router.post("/tokenize", response_model=TokenizeResponse, summary="Text → token ids")
async def tokenize(body: TokenizeRequest, request: Request):
    engine = request.app.state.registry.get(body.model)
    rl.check_fields(body, request_config(request, engine), extensions=False)
    tokens = engine.tokenize(body.content, add_bos=body.add_special, special=body.parse_special)
    if body.with_pieces:
        out = [{"id": t, "piece": engine.token_piece(t).decode("utf-8", errors="replace")}
               for t in tokens]
        return {"tokens": out, "model": engine.info.id}
    return {"tokens": tokens, "model": engine.info.id}


@router.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids → text")
async def detokenize(body: DetokenizeRequest, request: Request):
    engine = request.app.state.registry.get(body.model)
    rl.check_fields(body, request_config(request, engine), extensions=False)
    return {"content": rl.detokenize(engine, body.tokens), "model": engine.info.id}
