"""Tool calling in the request layer: OpenAI ``tools`` / ``tool_choice`` → a tool prompt (or the chat
template's own tool rendering) + a grammar, and the generated text → ``message.tool_calls``.

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

**Native tool templates.** A chat template that handles tools itself (HF tool-use templates read a
``tools`` variable) and shows a call syntax this module knows is used instead (:func:`native_format`):
the template gets the tools (``tools=``, OpenAI form) and the history in HF form (assistant
``tool_calls`` with ``arguments`` as a dict, ``tool`` messages with ``tool_call_id`` and ``name``), no
tool prompt is added, and the grammar and parsing follow the model's own syntax:

* ``hermes`` (Hermes-2-Pro, Qwen2/2.5 and their fine-tunes): the template mentions ``<tool_call>``
  and ``</tool_call>``; a call is ``<tool_call>``, a newline, ``{"name": ..., "arguments": {...}}``,
  a newline, ``</tool_call>``; parallel calls are several such blocks, a newline between them.
* ``llama3`` (Llama-3.1/3.2/3.3): the template shows ``"parameters":`` with ``<|eom_id|>`` or
  ``<|python_tag|>``; a call is the bare object ``{"name": ..., "parameters": {...}}``, one per answer.

Plain text (``auto``) may not start like a call: the grammar forbids its first non-blank characters
from spelling the call marker (for ``llama3``, a ``{``). Any other template, tools or not, gets the
text tool prompt above.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
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


@dataclass(frozen=True)
class NativeFormat:
    """A model's own tool-call syntax, read from its chat template (:func:`native_format`).

    A call is ``open`` + ``{"name": <tool>, <key>: {...}}`` + ``close``; parallel calls (when
    ``parallel``) are several of them separated by ``between``. ``lead`` is how an answer that is a
    call starts (the marker, or ``{`` for a bare object).
    """

    name: str
    open: str
    close: str
    key: str  # "arguments" or "parameters"
    parallel: bool
    between: str = "\n"

    @property
    def lead(self) -> str:
        return self.open.strip() or "{"


HERMES = NativeFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", parallel=True)
LLAMA3 = NativeFormat("llama3", "", "", "parameters", parallel=False)


@lru_cache(maxsize=16)
def native_format(chat_template: Optional[str]) -> Optional[NativeFormat]:
    """The tool syntax of a chat template that renders tools itself, or None (use the tool prompt).

    Native means: the template reads a ``tools`` variable it does not set itself (jinja2's
    ``meta.find_undeclared_variables``) and shows a known call syntax (see the module docstring).
    A template that does not parse is not native (rendering it reports the error).
    """
    if not chat_template or "tools" not in chat_template:
        return None
    from jinja2 import TemplateSyntaxError, meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ast = ImmutableSandboxedEnvironment().parse(chat_template)
    except TemplateSyntaxError:
        return None
    if "tools" not in meta.find_undeclared_variables(ast):
        return None
    if "<tool_call>" in chat_template and "</tool_call>" in chat_template:
        return HERMES
    if '"parameters"' in chat_template and ("<|eom_id|>" in chat_template
                                            or "<|python_tag|>" in chat_template):
        return LLAMA3
    return None


@dataclass
class ToolPlan:
    """What a request's tools mean for this generation (``native``: the template's own syntax)."""

    tools: list[Tool]
    choice: str  # "auto", "required", "none" or "named"
    named: Optional[str] = None
    parallel: bool = True
    grammar: Optional[str] = None
    names: list[str] = field(default_factory=list)
    native: Optional[NativeFormat] = None

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none"

    @property
    def offered(self) -> list[Tool]:
        """The tools the model may call: all of them, or the named one."""
        return [t for t in self.tools if self.choice != "named" or t.name == self.named]

    def starts_call(self, text: str) -> Optional[bool]:
        """Whether an answer beginning with ``text`` (leading blanks stripped, non-empty) is a call:
        True, False, or None while ``text`` is still a beginning of the call marker."""
        if self.native is None:
            return text[0] == "{" or (self.parallel and text[0] == "[")
        lead = self.native.lead
        if text.startswith(lead):
            return True
        return None if lead.startswith(text) else False


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


def plan(body: Any, native: Optional[NativeFormat] = None) -> Optional[ToolPlan]:
    """The request's tool plan (None without ``tools``); ``native``: the chat template's own tool
    syntax (:func:`native_format`), else the tool prompt's. Raises InvalidRequest naming the field."""
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
    parallel = body.parallel_tool_calls is not False and (native is None or native.parallel)
    p = ToolPlan(tools, choice, named, parallel, names=names, native=native)
    if p.calls_possible:
        p.grammar = grammar(p) if native is None else native_grammar(p)
    return p


def _call_schema(t: Tool, key: str = "arguments") -> dict:
    return {"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
            "required": ["name", key], "additionalProperties": False}


def _call_gbnf(schema: dict) -> str:
    """The GBNF of a call's JSON, its root renamed ``cllama-call``."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        call = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises many types on schemas it does not support
        raise InvalidRequest(f"a tool's parameters are an unsupported JSON schema: "
                             f"{type(exc).__name__}: {exc}"[:500], param="tools") from None
    return re.sub(r"^root ::=", "cllama-call ::=", call, count=1, flags=re.M)


def _one_call_schema(tools: list[Tool], key: str = "arguments") -> dict:
    return _call_schema(tools[0], key) if len(tools) == 1 \
        else {"anyOf": [_call_schema(t, key) for t in tools]}


def grammar(p: ToolPlan) -> str:
    """GBNF: a call (or, when parallel, a list of calls) of the allowed tools, or (``auto``) plain
    text that does not start like a call."""
    one = _one_call_schema(p.offered)
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]} if p.parallel else one
    call = _call_gbnf(schema)
    if p.choice in ("required", "named"):
        return 'root ::= " "? cllama-call\n' + call
    first = "{[" if p.parallel else "{"
    # plain text: a first non-blank character that cannot start a call, then anything
    return (f'root ::= " "? cllama-call | cllama-text\n'
            f'cllama-text ::= [ \\t\\n]* [^{first} \\t\\n] cllama-any*\n'
            'cllama-any ::= [^\\x00]\n' + call)


def _gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid GBNF literal


def _gbnf_char(c: str) -> str:
    """A character inside a GBNF ``[...]`` class."""
    return {"\\": "\\\\", "]": "\\]", "^": "\\^", "-": "\\-", "\n": "\\n", "\t": "\\t",
            "\r": "\\r"}.get(c, c)


def _not_starting_with(lead: str) -> str:
    """GBNF for non-blank-led text whose beginning is not ``lead`` (which starts with a non-blank):
    for each k, the first k characters of ``lead`` then a different character and anything, or
    exactly those k characters (k >= 1); the first character is no blank either."""
    alts = []
    for k, c in enumerate(lead):
        if k == 0:
            alts.append(f"[^{_gbnf_char(c)} \\t\\n] cllama-any*")
            continue
        alts.append(f"{_gbnf_literal(lead[:k])} [^{_gbnf_char(c)}] cllama-any*")
        alts.append(_gbnf_literal(lead[:k]))
    return " | ".join(alts)


def native_grammar(p: ToolPlan) -> str:
    """GBNF for a native tool syntax: ``open`` call ``close`` (repeated with ``between`` when
    parallel), or (``auto``) plain text whose first non-blank characters are not the call's lead."""
    fmt = p.native
    assert fmt is not None
    call = _call_gbnf(_one_call_schema(p.offered, fmt.key))
    parts = ([_gbnf_literal(fmt.open)] if fmt.open else []) + ["cllama-call"] \
        + ([_gbnf_literal(fmt.close)] if fmt.close else [])
    rules = f"cllama-block ::= {' '.join(parts)}\n"
    # (one optional space first, as in grammar(): a SentencePiece model's first token often has one)
    calls = '" "? cllama-block'
    if p.parallel:
        calls += f" ({_gbnf_literal(fmt.between)} cllama-block)*"
    if p.choice in ("required", "named"):
        return f"root ::= {calls}\n" + rules + call
    return (f"root ::= {calls} | cllama-text\n" + rules
            + "cllama-text ::= [ \\t\\n]* cllama-start\n"
            + f"cllama-start ::= {_not_starting_with(fmt.lead)}\n"
            + "cllama-any ::= [^\\x00]\n" + call)


def _system_text(tools: list[Tool], parallel: bool) -> str:
    lines = []
    for t in tools:
        line = f"- {t.name}"
        if t.description:
            line += f": {t.description}"
        line += "\n  parameters: " + json.dumps(t.parameters, ensure_ascii=False, sort_keys=True)
        lines.append(line)
    return TOOL_PROMPT.format(tools="\n".join(lines), parallel=PARALLEL_NOTE if parallel else "")


def history_calls(calls: Sequence[dict]) -> list[dict]:
    """An assistant message's ``tool_calls`` as ``{"id", "name", "arguments": <dict>}``; raises
    InvalidRequest on a malformed call or arguments that are not JSON."""
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
        out.append({"id": c.get("id"), "name": fn.get("name"),
                    "arguments": args if args is not None else {}})
    return out


def call_text(calls: Sequence[dict]) -> str:
    """Tool calls in the form the model answers with (one object, or a list of them)."""
    out = [{"name": c["name"], "arguments": c["arguments"]} for c in history_calls(calls)]
    obj: Any = out[0] if len(out) == 1 else out
    return json.dumps(obj, ensure_ascii=False)


def openai_tools(p: Optional[ToolPlan]) -> list[dict]:
    """The tools a native template is given (OpenAI form): the offered ones, none when no call is
    possible."""
    if p is None or not p.calls_possible:
        return []
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in p.offered]


def native_messages(rendered: list[dict], body: Any) -> list[dict]:
    """The messages for a template that renders tools itself, in HF form: an assistant message's
    ``tool_calls`` as ``{"id", "type": "function", "function": {"name", "arguments": <dict>}}``, a
    ``tool`` message with its ``tool_call_id`` and ``name`` (from the call it answers when not given)."""
    names = {}
    out = []
    for m, r in zip(body.messages, rendered):
        if m.role == "assistant" and m.tool_calls:
            calls = history_calls(m.tool_calls)
            names.update({c["id"]: c["name"] for c in calls if c["id"]})
            out.append({**r, "tool_calls": [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]})
        elif m.role == "tool":
            out.append({**r, "tool_call_id": m.tool_call_id,
                        "name": m.name or names.get(m.tool_call_id) or "tool"})
        else:
            out.append(r)
    return out


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
        prompt = _system_text(p.offered, p.parallel)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            head = f"{default_system}\n\n{prompt}" if default_system else prompt
            out.insert(0, {"role": "system", "content": head})
    return out


# ---------------------------------------------------------------------------------------------
# Output side
# ---------------------------------------------------------------------------------------------


def _call(item: Any, p: ToolPlan, key: str) -> Optional[dict]:
    """One parsed call object as an OpenAI tool call (None: not a call of an offered tool)."""
    if not isinstance(item, dict) or item.get("name") not in p.names \
            or not isinstance(item.get(key), dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": item["name"], "arguments": json.dumps(item[key], ensure_ascii=False)}}


def _native_items(s: str, fmt: NativeFormat) -> Optional[list]:
    """The call objects of a native answer (``s`` stripped), or None when it is not only calls:
    each is the marker, one JSON value (read as JSON, so a ``</tool_call>`` inside an argument string
    is no end), the end marker; blanks may come between."""
    decoder = json.JSONDecoder()
    start, end = fmt.open.strip(), fmt.close.strip()
    items, i = [], 0
    while i < len(s):
        if not s.startswith(start, i):
            return None
        i += len(start)
        while i < len(s) and s[i].isspace():
            i += 1
        try:
            obj, i = decoder.raw_decode(s, i)
        except ValueError:
            return None  # a cut-off call, say
        while i < len(s) and s[i].isspace():
            i += 1
        if not s.startswith(end, i):
            return None
        i += len(end)
        items.append(obj)
        while i < len(s) and s[i].isspace():
            i += 1
        if not fmt.parallel:
            break
    return items if items and i == len(s) else None


def parse(text: str, p: ToolPlan) -> Optional[list[dict]]:
    """The tool calls in a finished answer (OpenAI ``tool_calls`` dicts), or None when the answer is
    text (or a call cut short by ``max_tokens``)."""
    s = text.strip()
    if not s or not p.calls_possible or not p.starts_call(s):
        return None
    if p.native is not None:
        items, key = _native_items(s, p.native), p.native.key
        if items is None:
            return None
    else:
        try:
            obj = json.loads(s)
        except ValueError:
            return None
        items, key = (obj if isinstance(obj, list) else [obj]), "arguments"
    calls = [_call(item, p, key) for item in items]
    if not calls or None in calls:
        return None
    return calls


class StreamSplitter:
    """Decides, as text streams in, whether the answer is text (passed on at once) or a tool call
    (held back and parsed whole at the end). The grammar makes the first non-blank character decide
    (with a native template, the first characters: text waits while it could still be the marker)."""

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
        decided = self.plan.starts_call(s)
        if decided is None:
            return ""
        if decided:
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
