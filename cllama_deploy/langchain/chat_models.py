"""ChatCLlama: a LangChain chat model on a GGUF file, in-process, through the request layer.

Everything a request means (the chat template, stop strings, sampling defaults, grammars from JSON
schemas, tool prompts and tool-call parsing, context checks) is decided by
:mod:`cllama_deploy.engine.requests`, the same code the HTTP server runs; this module only maps
LangChain's messages, options and callbacks onto it.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional, Sequence, Union

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field

from cllama_deploy.engine import requests as rl
from cllama_deploy.langchain import _convert
from cllama_deploy.langchain.engines import EngineOptions

# Sampling fields sent with every request when set (OpenAI names, llama.cpp extensions included)
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
             "presence_penalty", "frequency_penalty", "seed", "max_tokens", "logit_bias")


class CLlamaSampling(BaseModel):
    """Request options shared by the chat model and the LLM (None = the request layer's default)."""

    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    typical_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, gt=0.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate.")
    logit_bias: Optional[dict[int, float]] = None
    stop: Optional[list[str]] = Field(None, description=(
        "Stop strings (besides the chat template's); a call's own `stop` replaces them."))
    timeout: Optional[float] = Field(None, gt=0, description=(
        "Seconds a request may take, waiting for a free slot included."))
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "Other OpenAI request fields (checked by the request layer like a server request)."))

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    def _request_options(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> dict[str, Any]:
        opts: dict[str, Any] = {k: getattr(self, k) for k in _SAMPLING if getattr(self, k) is not None}
        opts.update(self.model_kwargs)
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        if model is not None and model != self.model_id:
            raise ValueError(f"this component runs {self.model_id!r}; a call cannot switch it to "
                             f"{model!r} (construct another component with model_path=)")
        opts.update({k: v for k, v in kwargs.items() if v is not None})
        stops = stop if stop is not None else self.stop
        if stops:
            opts["stop"] = list(stops)
        return opts

    def _request_config(self) -> rl.RequestConfig:
        return rl.RequestConfig(timeout=self.timeout)


class ChatCLlama(BaseChatModel, CLlamaSampling, EngineOptions):
    """A chat model on a GGUF file, in this process (``model_path=``), loaded on first use.

    Components built on the same file with the same engine options share one loaded model, whose
    scheduler batches their requests (sync and async, from any thread).

    Example:
        .. code-block:: python

            from cllama_deploy.langchain import ChatCLlama

            llm = ChatCLlama(model_path="chinese-alpaca-7b-q4_k_m.gguf", temperature=0.2)
            llm.invoke("用一句话介绍北京")
    """

    streaming: bool = Field(False, description="invoke() streams underneath (callbacks see tokens).")

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True,
                              protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "cllama-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "model_name": self.model_id,
                **{k: getattr(self, k) for k in _SAMPLING if getattr(self, k) is not None}}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=_convert.PROVIDER,
                                 ls_model_name=kwargs.get("model") or self.model_id,
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """The model's own tokens for ``text`` (no BOS): LangChain's default would count GPT-2
        tokens (and need transformers). Loads the model on first use."""
        return self.get_engine().tokenize(text, add_bos=False, special=False)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Optional[Sequence[Any]] = None) -> int:
        """The prompt tokens these messages (and tools) make: rendered by the chat template with the
        tool prompt, as a request would send them, up to the assistant turn's opening. Exact, also
        for a conversation longer than the context (``trim_messages(..., token_counter=llm)``)."""
        from cllama_deploy.engine.base import ContextLengthExceeded

        body: dict[str, Any] = {"messages": _convert.openai_messages(messages)}
        if tools:  # as bind_tools(tools) sends them (one call per answer by default)
            body["tools"] = [convert_to_openai_tool(t) for t in tools]
            body["parallel_tool_calls"] = False
        try:
            prepared = rl.prepare_chat(self.get_engine(), body, self._request_config())
        except ContextLengthExceeded as exc:
            return exc.prompt_tokens
        return prepared.prompt_tokens

    # -- generation ------------------------------------------------------------------------------
    def _prepare(self, engine, messages: list[BaseMessage], stop, kwargs, *,
                 stream: bool) -> rl.Prepared:
        options = self._request_options(stop, kwargs)
        if stream:
            options["stream_options"] = {"include_usage": True}
        return rl.prepare_chat(engine, {"messages": _convert.openai_messages(messages), **options},
                               self._request_config())

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        engine = self.get_engine()
        prepared = self._prepare(engine, messages, stop, kwargs, stream=False)
        resp = rl.submit(engine, prepared).result_sync()
        return self._result(resp)

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                         **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream

            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        engine = await self.aget_engine()
        prepared = self._prepare(engine, messages, stop, kwargs, stream=False)
        resp = await rl.submit(engine, prepared).result()
        return self._result(resp)

    @staticmethod
    def _result(resp) -> ChatResult:
        message = _convert.ai_message(resp)
        info = {"finish_reason": resp.choices[0].finish_reason}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)],
                          llm_output={"model_name": resp.model,
                                      "token_usage": resp.usage.model_dump()})

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        engine = self.get_engine()
        prepared = self._prepare(engine, messages, stop, kwargs, stream=True)
        conv = _convert.ChunkConverter()
        usage = None
        for chunk in rl.submit(engine, prepared).iter_chunks():
            usage = chunk.usage or usage
            message = conv.feed(chunk)
            if message is not None:
                gen = ChatGenerationChunk(message=message)
                if run_manager:
                    run_manager.on_llm_new_token(message.text, chunk=gen)
                yield gen
        yield self._last(conv, usage)

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        engine = await self.aget_engine()
        prepared = self._prepare(engine, messages, stop, kwargs, stream=True)
        conv = _convert.ChunkConverter()
        usage = None
        chunks = rl.submit(engine, prepared).chunks()
        try:
            async for chunk in chunks:
                usage = chunk.usage or usage
                message = conv.feed(chunk)
                if message is not None:
                    gen = ChatGenerationChunk(message=message)
                    if run_manager:
                        await run_manager.on_llm_new_token(message.text, chunk=gen)
                    yield gen
        finally:
            await chunks.aclose()
        yield self._last(conv, usage)

    @staticmethod
    def _last(conv: _convert.ChunkConverter, usage) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=conv.last(usage),
                                   generation_info={"finish_reason": conv.finish_reason})

    # -- tools and structured output -------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Union[dict[str, Any], type, Callable, BaseTool]], *,
                   tool_choice: Optional[Union[dict, str, bool]] = None,
                   parallel_tool_calls: Optional[bool] = None, strict: Optional[bool] = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, BaseMessage]:
        """Bind tools (OpenAI tool dicts, pydantic models, functions, LangChain tools).

        ``tool_choice``: ``"auto"`` (the model answers in text or calls tools), ``"none"``,
        ``"any"``/``"required"``/True (a call is forced by the grammar), or a tool's name (that tool
        is called). ``parallel_tool_calls`` defaults to False here (one call per answer: small local
        models write a single JSON call far more reliably than a list); pass True to allow a list.
        """
        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        choice = _convert.openai_tool_choice(tool_choice, formatted)
        if choice is not None:
            kwargs["tool_choice"] = choice
        kwargs["parallel_tool_calls"] = bool(parallel_tool_calls)
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: Optional[Union[dict, type]] = None, *,
                               method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
                               include_raw: bool = False, strict: Optional[bool] = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Union[dict, BaseModel]]:
        """A runnable returning ``schema``-shaped output.

        ``method``: ``json_schema`` (default; decoding is constrained by a grammar built from the
        schema, so the output always parses), ``json_mode`` (any JSON object; describe the keys in the
        prompt), ``function_calling`` (a forced call of a tool whose parameters are the schema).
        ``strict`` is accepted for compatibility: the grammar already enforces the schema exactly.
        ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``.
        """
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.output_parsers.openai_tools import (JsonOutputKeyToolsParser,
                                                                 PydanticToolsParser)
        from langchain_core.utils.pydantic import is_basemodel_subclass

        if kwargs:
            raise ValueError(f"unexpected argument(s) {sorted(kwargs)}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        fmt = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            tool = convert_to_openai_tool(schema, strict=strict)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, parallel_tool_calls=False, strict=strict,
                                  ls_structured_output_format=fmt)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_mode":
            fmt["kwargs"] = {"method": method}
            llm = self.bind(response_format={"type": "json_object"},
                            ls_structured_output_format=fmt if schema is not None else None)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        elif method == "json_schema":
            tool = convert_to_openai_tool(schema)["function"]
            json_schema = {"name": tool["name"], "schema": tool.get("parameters", {})}
            if tool.get("description"):
                json_schema["description"] = tool["description"]
            if strict is not None:
                json_schema["strict"] = strict
            llm = self.bind(response_format={"type": "json_schema", "json_schema": json_schema},
                            ls_structured_output_format=fmt)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be json_schema, json_mode or function_calling, got {method!r}")
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                                   parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | with_fallback
