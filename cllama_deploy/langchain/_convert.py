"""LangChain messages/tools ↔ the OpenAI request and response models of the request layer."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from cllama_deploy.engine.schemas import ChatCompletion, ChatCompletionChunk, CompletionUsage

PROVIDER = "cllama"


def openai_messages(messages: Sequence[Any]) -> list[dict]:
    """LangChain messages → OpenAI chat messages (text content; tool calls and tool results kept)."""
    from langchain_core.messages import convert_to_openai_messages

    out = []
    for m in convert_to_openai_messages(list(messages), text_format="string"):
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("content"), list):  # non-text blocks left over: keep the text parts
            m["content"] = "".join(p.get("text", "") for p in m["content"]
                                   if isinstance(p, dict) and p.get("type") == "text")
        if m.get("role") == "tool":
            m.pop("status", None)
        out.append(m)
    return out


def usage_metadata(usage: Optional[CompletionUsage]):
    """OpenAI usage → LangChain ``UsageMetadata`` (prefix-cache hits as ``cache_read``)."""
    from langchain_core.messages.ai import UsageMetadata

    if usage is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                         total_tokens=usage.total_tokens,
                         input_token_details={"cache_read": cached})


def tool_calls_of(raw_calls) -> tuple[list, list]:
    """OpenAI ``message.tool_calls`` → (LangChain tool_calls, invalid_tool_calls)."""
    from langchain_core.messages.tool import invalid_tool_call, tool_call

    calls, invalid = [], []
    for c in raw_calls or []:
        fn = c.function
        try:
            args = json.loads(fn.arguments) if fn.arguments else {}
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            calls.append(tool_call(name=fn.name, args=args, id=c.id))
        except ValueError as exc:
            invalid.append(invalid_tool_call(name=fn.name, args=fn.arguments, id=c.id, error=str(exc)))
    return calls, invalid


def response_metadata(model: str, finish_reason: Optional[str], fingerprint: Optional[str]) -> dict:
    return {"model_name": model, "finish_reason": finish_reason, "system_fingerprint": fingerprint,
            "model_provider": PROVIDER}


def ai_message(resp: ChatCompletion):
    from langchain_core.messages import AIMessage

    choice = resp.choices[0]
    msg = choice.message
    calls, invalid = tool_calls_of(getattr(msg, "tool_calls", None))
    return AIMessage(content=msg.content or "", tool_calls=calls, invalid_tool_calls=invalid,
                     usage_metadata=usage_metadata(resp.usage), id=resp.id,
                     response_metadata=response_metadata(resp.model, choice.finish_reason,
                                                         resp.system_fingerprint))


class ChunkConverter:
    """Streamed chat chunks → ``AIMessageChunk``s: text as it comes, tool-call deltas as
    ``tool_call_chunks``, and ONE last chunk with the finish reason, model name and usage (so
    ``input_tokens`` is set on exactly one chunk)."""

    def __init__(self) -> None:
        self.finish_reason: Optional[str] = None
        self.model: Optional[str] = None
        self.fingerprint: Optional[str] = None
        self.id: Optional[str] = None

    def feed(self, chunk: ChatCompletionChunk):
        """The message chunk for one stream chunk, or None (nothing to say yet)."""
        from langchain_core.messages import AIMessageChunk

        self.model, self.fingerprint, self.id = chunk.model, chunk.system_fingerprint, chunk.id
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        delta = choice.delta
        tcs = []
        for tc in getattr(delta, "tool_calls", None) or []:
            fn = tc.function
            tcs.append({"name": fn.name if fn else None, "args": fn.arguments if fn else None,
                        "id": tc.id, "index": tc.index, "type": "tool_call_chunk"})
        if not delta.content and not tcs:
            return None
        return AIMessageChunk(content=delta.content or "", tool_call_chunks=tcs, id=chunk.id)

    def last(self, usage: Optional[CompletionUsage]):
        from langchain_core.messages import AIMessageChunk

        return AIMessageChunk(content="", id=self.id, chunk_position="last",
                              usage_metadata=usage_metadata(usage),
                              response_metadata=response_metadata(self.model, self.finish_reason,
                                                                  self.fingerprint))


def openai_tool_choice(tool_choice: Any, tools: list[dict]) -> Any:
    """LangChain's ``tool_choice`` spellings → OpenAI's (``any``/True → ``required``, a name → that
    function)."""
    if tool_choice is None:
        return None
    if tool_choice is True or tool_choice == "any":
        return "required"
    if tool_choice is False:
        return "none"
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none", "required"):
            return tool_choice
        names = [t["function"]["name"] for t in tools]
        if tool_choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} names no bound tool; bound: {names}")
        return {"type": "function", "function": {"name": tool_choice}}
    if isinstance(tool_choice, dict):
        return tool_choice
    raise ValueError(f"unsupported tool_choice {tool_choice!r}: use 'auto', 'none', 'any', "
                     "'required', a tool name or an OpenAI tool_choice object")
