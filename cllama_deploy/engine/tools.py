"""Tool calling in the request layer: OpenAI ``tools`` / ``tool_choice`` → a tool prompt + a grammar,
and the generated text → ``message.tool_calls``.

The models this project builds (Chinese-LLaMA/Alpaca) have no tool syntax in their chat templates,
so the request layer gives them one, documented here and in docs/serving.md:

* **The tool prompt** (:data:`TOOL_PROMPT`) is added to the system text (after the template's default
  system text, or the request's own system message). It lists each tool's name, description and JSON
  schema of its parameters, and says how to call: answer with only a JSON object
  ``{"name": <tool>, "arguments": {...}}`` (with ``parallel_tool_calls``, a JSON list of them).
* **The grammar** (GBNF, enforced while sampling) lets the answer be either such a call, whose
  ``arguments`` match that tool's JSON schema exactly, or plain text that does not start with ``{``
  (or ``[`` when parallel calls are allowed). ``tool_choice`` ``required`` or a named function leaves
  only the call (of that function); ``none`` removes the prompt and the grammar.
* **History**: an assistant message's ``tool_calls`` are written back in the same JSON form the
  model answers with; a ``tool`` message becomes a user turn ``[tool result] <name>: <content>``. So a
  conversation of calls and results renders with any chat template.

A chat template that handles tools itself (it reads a ``tools`` variable, as HF tool-use templates do)
is not used for tools yet: the tool prompt above is used for every template (see the issue note).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from cllama_deploy.engine.base import InvalidRequest

TOOL_PROMPT = (
    "You can call these tools (你可以调用以下工具):\n"
    "{tools}\n\n"
    "To call a tool, answer with only a JSON object, nothing before or after it: "
    '{{"name": "<tool name>", "arguments": {{<the arguments, matching its parameters>}}}}.'
    "{parallel} When no tool is needed, answer in plain text. "
    "After a call, the tool's result comes back in a message starting with [tool result]."
)
PARALLEL_NOTE = " To call several tools at once, answer with a JSON list of such objects."
TOOL_RESULT = "[tool result] {name}: {content}"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass
class ToolPlan:
    """What a request's tools mean for this generation."""

    tools: list[Tool]
    choice: str  # "auto", "required", "none" or "named"
    named: Optional[str] = None
    parallel: bool = True
    grammar: Optional[str] = None
    names: list[str] = field(default_factory=list)

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none"

    def starts_call(self, first_char: str) -> bool:
        return first_char == "{" or (self.parallel and first_char == "[")


# ---------------------------------------------------------------------------------------------
# Request side
# ---------------------------------------------------------------------------------------------


def _tool(i: int, t: Any) -> Tool:
    param = f"tools.{i}"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}} "
                             "(only function tools are supported)", param="tools")
    fn = t["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest("a function name must be 1-64 letters, digits, '_', '.' or '-'",
                             param=f"{param}.function.name")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidRequest("function parameters must be a JSON schema object",
                             param=f"{param}.function.parameters")
    # the same bounds as response_format's schemas (depth, repetition counts): a huge maxItems
    # would make a huge grammar
    from cllama_deploy.engine.requests import _check_schema

    _check_schema(params, 0, f"{param}.function.parameters")
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise InvalidRequest("a function description must be a string",
                             param=f"{param}.function.description")
    return Tool(name, desc, params)


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, Optional[str]]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("auto", "none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise InvalidRequest(f"tool_choice names the function {name!r}, which is not in tools "
                                 f"({', '.join(names)})", param="tool_choice")
        return "named", name
    raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}", param="tool_choice")


def plan(body: Any) -> Optional[ToolPlan]:
    """The request's tool plan (None without ``tools``). Raises InvalidRequest naming the field."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    if len(body.tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools", param="tools")
    tools = [_tool(i, t) for i, t in enumerate(body.tools)]
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("two tools share a name", param="tools")
    choice, named = _choice(body.tool_choice, names)
    parallel = body.parallel_tool_calls is not False
    p = ToolPlan(tools, choice, named, parallel, names=names)
    if p.calls_possible:
        p.grammar = grammar(p)
    return p


def _call_schema(t: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def grammar(p: ToolPlan) -> str:
    """GBNF: a call (or, when parallel, a list of calls) of the allowed tools, or (``auto``) plain
    text that does not start like a call."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    tools = [t for t in p.tools if p.choice != "named" or t.name == p.named]
    one = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools]}
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]} if p.parallel else one
    try:
        call = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises many types on schemas it does not support
        raise InvalidRequest(f"a tool's parameters are an unsupported JSON schema: "
                             f"{type(exc).__name__}: {exc}"[:500], param="tools") from None
    call = re.sub(r"^root ::=", "cllama-call ::=", call, count=1, flags=re.M)
    if p.choice in ("required", "named"):
        return 'root ::= " "? cllama-call\n' + call
    first = "{[" if p.parallel else "{"
    # plain text: a first non-blank character that cannot start a call, then anything
    return (f'root ::= " "? cllama-call | cllama-text\n'
            f'cllama-text ::= [ \\t\\n]* [^{first} \\t\\n] cllama-any*\n'
            'cllama-any ::= [^\\x00]\n' + call)


def _system_text(tools: list[Tool], parallel: bool) -> str:
    lines = []
    for t in tools:
        line = f"- {t.name}"
        if t.description:
            line += f": {t.description}"
        line += "\n  parameters: " + json.dumps(t.parameters, ensure_ascii=False, sort_keys=True)
        lines.append(line)
    return TOOL_PROMPT.format(tools="\n".join(lines), parallel=PARALLEL_NOTE if parallel else "")


def call_text(calls: Sequence[dict]) -> str:
    """Tool calls in the form the model answers with (one object, or a list of them)."""
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise InvalidRequest("an assistant tool call must be {\"id\", \"type\": \"function\", "
                                 "\"function\": {\"name\", \"arguments\"}}", param="messages")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise InvalidRequest("a tool call's arguments are not valid JSON",
                                     param="messages") from None
        out.append({"name": fn.get("name"), "arguments": args if args is not None else {}})
    obj: Any = out[0] if len(out) == 1 else out
    return json.dumps(obj, ensure_ascii=False)


def has_tool_history(body: Any) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in body.messages)


def messages(rendered: list[dict], body: Any, p: Optional[ToolPlan],
             default_system: Optional[str]) -> list[dict]:
    """The template's messages with tools written in: ``rendered[i]`` is ``body.messages[i]`` as the
    template takes it (role and text). Adds the tool prompt to the system text when calls are
    possible; writes assistant tool calls and tool results as text."""
    names = {}  # tool_call_id -> function name, for results that do not repeat it
    out = []
    for m, r in zip(body.messages, rendered):
        if m.role == "assistant" and m.tool_calls:
            text = call_text(m.tool_calls)
            for c in m.tool_calls:
                if isinstance(c, dict) and c.get("id"):
                    names[c["id"]] = (c.get("function") or {}).get("name")
            out.append({"role": "assistant",
                        "content": f"{r['content']}\n{text}" if r["content"] else text})
        elif m.role == "tool":
            name = m.name or names.get(m.tool_call_id) or "tool"
            out.append({"role": "user", "content": TOOL_RESULT.format(name=name, content=r["content"])})
        else:
            out.append(r)
    if p is not None and p.calls_possible:
        tools = [t for t in p.tools if p.choice != "named" or t.name == p.named]
        prompt = _system_text(tools, p.parallel)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            head = f"{default_system}\n\n{prompt}" if default_system else prompt
            out.insert(0, {"role": "system", "content": head})
    return out


# ---------------------------------------------------------------------------------------------
# Output side
# ---------------------------------------------------------------------------------------------


def parse(text: str, p: ToolPlan) -> Optional[list[dict]]:
    """The tool calls in a finished answer (OpenAI ``tool_calls`` dicts), or None when the answer is
    text (or a call cut short by ``max_tokens``)."""
    s = text.strip()
    if not s or not p.calls_possible or not p.starts_call(s[0]):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in p.names \
                or not isinstance(item.get("arguments"), dict):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": json.dumps(item["arguments"], ensure_ascii=False)}})
    return calls or None


class StreamSplitter:
    """Decides, as text streams in, whether the answer is text (passed on at once) or a tool call
    (held back and parsed whole at the end). The grammar makes the first non-blank character decide."""

    def __init__(self, p: ToolPlan):
        self.plan = p
        self.pending = ""
        self.mode: Optional[str] = None  # None (undecided), "text" or "call"

    def feed(self, text: str) -> str:
        """Text to send now."""
        if self.mode == "text":
            return text
        self.pending += text
        if self.mode == "call":
            return ""
        s = self.pending.lstrip()
        if not s:
            return ""
        if self.plan.starts_call(s[0]):
            self.mode = "call"
            return ""
        self.mode, out, self.pending = "text", self.pending, ""
        return out

    def finish(self) -> tuple[Optional[list[dict]], str]:
        """(tool calls, or None; text still to send)."""
        if self.mode == "call":
            calls = parse(self.pending, self.plan)
            if calls:
                return calls, ""
        out, self.pending = self.pending, ""
        return None, out
