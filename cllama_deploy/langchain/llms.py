"""CLlamaLLM: plain text completion on a GGUF file, in-process, through the request layer."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, Field

from cllama_deploy.engine import requests as rl
from cllama_deploy.langchain import _convert
from cllama_deploy.langchain.chat_models import _SAMPLING, CLlamaSampling
from cllama_deploy.langchain.engines import EngineOptions


class CLlamaLLM(BaseLLM, CLlamaSampling, EngineOptions):
    """Text completion (no chat template) on a GGUF file, loaded on first use and shared.

    Several prompts in one ``generate``/``batch`` call go to the engine as ONE request, decoded
    together. ``max_tokens`` defaults to 256 (OpenAI's completion default, 16, is too short for a
    LangChain chain).
    """

    max_tokens: Optional[int] = Field(256, ge=1, description="Most tokens to generate per prompt.")
    streaming: bool = Field(False, description="invoke() streams underneath (callbacks see tokens).")

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True,
                              protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "cllama"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "model_name": self.model_id,
                **{k: getattr(self, k) for k in _SAMPLING if getattr(self, k) is not None}}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = _convert.PROVIDER
        params["ls_model_name"] = kwargs.get("model") or self.model_id
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """The model's own tokens for ``text`` (no BOS), not LangChain's default GPT-2 count."""
        return self.get_engine().tokenize(text, add_bos=False, special=False)

    def _prepare(self, engine, prompts, stop, kwargs, *, stream: bool = False) -> rl.Prepared:
        options = self._request_options(stop, kwargs)
        if stream:
            options["stream_options"] = {"include_usage": True}
        return rl.prepare_completion(engine, {"prompt": list(prompts), **options},
                                     self._request_config())

    def _result(self, resp, n_prompts: int) -> LLMResult:
        gens: list[list[Generation]] = [[] for _ in range(n_prompts)]
        for c in sorted(resp.choices, key=lambda c: c.index):
            gens[c.index].append(Generation(text=c.text, generation_info={
                "finish_reason": c.finish_reason}))
        return LLMResult(generations=gens, llm_output={
            "model_name": resp.model, "token_usage": resp.usage.model_dump(),
            "usage_metadata": _convert.usage_metadata(resp.usage)})

    def _generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        if self.streaming and len(prompts) == 1:
            text, info = "", {}
            for chunk in self._stream(prompts[0], stop, run_manager, **kwargs):
                text += chunk.text
                info = chunk.generation_info or info
            return LLMResult(generations=[[Generation(text=text, generation_info=info)]])
        engine = self.get_engine()
        prepared = self._prepare(engine, prompts, stop, kwargs)
        return self._result(rl.submit(engine, prepared).result_sync(), len(prompts))

    async def _agenerate(self, prompts: list[str], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                         **kwargs: Any) -> LLMResult:
        if self.streaming and len(prompts) == 1:
            text, info = "", {}
            async for chunk in self._astream(prompts[0], stop, run_manager, **kwargs):
                text += chunk.text
                info = chunk.generation_info or info
            return LLMResult(generations=[[Generation(text=text, generation_info=info)]])
        engine = await self.aget_engine()
        prepared = self._prepare(engine, prompts, stop, kwargs)
        return self._result(await rl.submit(engine, prepared).result(), len(prompts))

    @staticmethod
    def _piece(chunk, finish: dict) -> Optional[GenerationChunk]:
        if chunk.usage is not None and not chunk.choices:
            return GenerationChunk(text="", generation_info={
                **finish, "model_name": chunk.model,
                "usage_metadata": _convert.usage_metadata(chunk.usage)})
        c = chunk.choices[0]
        if c.finish_reason:
            finish["finish_reason"] = c.finish_reason
        return GenerationChunk(text=c.text) if c.text else None

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        engine = self.get_engine()
        prepared = self._prepare(engine, [prompt], stop, kwargs, stream=True)
        finish: dict = {}
        for chunk in rl.submit(engine, prepared).iter_chunks():
            piece = self._piece(chunk, finish)
            if piece is not None:
                if run_manager and piece.text:
                    run_manager.on_llm_new_token(piece.text, chunk=piece)
                yield piece

    async def _astream(self, prompt: str, stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        engine = await self.aget_engine()
        prepared = self._prepare(engine, [prompt], stop, kwargs, stream=True)
        finish: dict = {}
        chunks = rl.submit(engine, prepared).chunks()
        try:
            async for chunk in chunks:
                piece = self._piece(chunk, finish)
                if piece is not None:
                    if run_manager and piece.text:
                        await run_manager.on_llm_new_token(piece.text, chunk=piece)
                    yield piece
        finally:
            await chunks.aclose()
