"""The request layer: OpenAI-style requests → engine requests, engine chunks → OpenAI responses.

Transport-neutral: the HTTP server, the LangChain components, ``eval``, ``chat``/``generate`` and the
quickstart all call this module, so what a request *means* is decided once, here: sampling defaults
(per model), stop strings (the caller's and the chat template's), ``response_format`` / JSON schema →
grammar (with size and depth limits), ``n`` and per-choice seeds, prompt normalisation (text, token ids,
lists of either), limits, context checks, and which request fields are known. Failures raise engine
errors (:class:`~cllama_deploy.engine.base.InvalidRequest` with ``param`` and ``code``,
:class:`~cllama_deploy.engine.base.ContextLengthExceeded`, ...) that the server maps to OpenAI error
objects. Results are the OpenAI schema models of :mod:`cllama_deploy.engine.schemas`.

Three ways in, same code underneath:

* blocking: :func:`chat`, :func:`stream_chat`, :func:`complete`, :func:`stream_complete`, :func:`embed`
  (plain scripts, CLI commands, worker threads of a running event loop: the engine's streams iterate
  without an event loop);
* async: :func:`achat`, :func:`astream_chat`, :func:`acomplete`, :func:`astream_complete`,
  :func:`aembed` (in the caller's event loop);
* step by step (the server): :func:`prepare_chat` / :func:`prepare_completion` → :func:`submit` →
  :class:`Run` (``chunks()``/``iter_chunks()`` or ``result()``/``result_sync()``, ``cancel()``).

No FastAPI here; ``llama_cpp`` is imported only to turn a JSON schema into a grammar.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Optional, Sequence, Union

from pydantic import BaseModel, ValidationError

from cllama_deploy import __version__
from cllama_deploy.engine.base import (
    Chunk,
    ContextLengthExceeded,
    Engine,
    EngineError,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    TokenLogprob,
)
from cllama_deploy.engine.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatTokenLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCallDelta,
    PromptTokensDetails,
    ResponseFormat,
    ToolCallDelta,
    TopLogprob,
)
from cllama_deploy import prompts
from cllama_deploy.engine import tools
from cllama_deploy.errors import ConfigError

log = logging.getLogger("cllama_deploy.engine")

FINGERPRINT = f"cllama-deploy-{__version__}"
MAX_SCHEMA_REPEAT = 1000  # largest minItems/maxLength/... a JSON schema may ask for (grammar size)
MAX_SCHEMA_DEPTH = 32
CHOICES_PER_N = 8  # a request may ask for at most max_n * 8 choices in all (prompts × n)
# SamplingParams fields a server may give defaults for (settings key ``sampling``)
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
                         "presence_penalty", "frequency_penalty", "penalty_last_n")


# ---------------------------------------------------------------------------------------------
# Errors: InvalidRequest(message, param=field, code=OpenAI error code) from engine/base.py
# ---------------------------------------------------------------------------------------------


def _unknown(param: str, known: Sequence[str]) -> InvalidRequest:
    name = param.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return InvalidRequest(f"Unrecognized request argument supplied: '{param}'.{hint} (See "
                            "docs/serving.md for the accepted fields.)", param=param,
                            code="unknown_parameter")


# ---------------------------------------------------------------------------------------------
# Which fields a request may carry beyond the ones the schemas declare (data, with provenance)
# ---------------------------------------------------------------------------------------------

# Known fields that change nothing on this server: accepted and ignored. name -> (source, why)
IGNORED_FIELDS: dict[str, str] = {
    "store": "OpenAI: keep the completion for distillation or evals; this server stores nothing",
    "metadata": "OpenAI: tags for stored completions",
    "service_tier": "OpenAI: processing tier; there is one tier here",
    "prompt_cache_key": "OpenAI: prompt-cache routing hint; the prefix cache needs none",
    "safety_identifier": "OpenAI: an end-user id for abuse monitoring",
    "prediction": "OpenAI: predicted output, a speed hint that never changes the output",
    "reasoning_effort": "OpenAI: for reasoning models only",
    "verbosity": "OpenAI: for reasoning models only",
    "cache_prompt": "llama.cpp server: reuse the prompt's KV cache (what the prefix cache does anyway)",
    "id_slot": "llama.cpp server: pin a slot; the scheduler assigns slots here",
    "n_keep": "llama.cpp server: tokens kept on a context shift; the context never shifts here",
    "penalize_nl": "llama.cpp (removed upstream): newlines are penalized like any other token",
    "mirostat_tau": "llama.cpp: Mirostat's target; Mirostat is off (see mirostat)",
    "mirostat_eta": "llama.cpp: Mirostat's learning rate; Mirostat is off (see mirostat)",
    "dynatemp_exponent": "llama.cpp: dynamic temperature's exponent; it is off (see dynatemp_range)",
    "xtc_threshold": "llama.cpp: XTC's threshold; XTC is off (see xtc_probability)",
    "dry_base": "llama.cpp: DRY's parameter; DRY is off (see dry_multiplier)",
    "dry_allowed_length": "llama.cpp: DRY's parameter; DRY is off (see dry_multiplier)",
    "dry_penalty_last_n": "llama.cpp: DRY's parameter; DRY is off (see dry_multiplier)",
    "dry_sequence_breakers": "llama.cpp: DRY's parameter; DRY is off (see dry_multiplier)",
    "min_keep": "llama.cpp: the fewest candidates a sampler keeps; llama.cpp's default (1) here",
}

# Known fields that would change the output and are not implemented: accepted only with a value that
# changes nothing, otherwise a 400 that says why. name -> (values that change nothing, why)
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "mirostat": ((0, None), "llama.cpp's Mirostat sampling is not implemented here; use "
                 "temperature, top_p or min_p"),
    "mirostat_mode": ((0, None), "Mirostat sampling (llama-cpp-python's name) is not implemented "
                      "here; use temperature, top_p or min_p"),
    "tfs_z": ((1.0, None), "tail-free sampling was removed from llama.cpp"),
    "top_n_sigma": ((-1.0, None), "top-n-sigma sampling is not implemented here"),
    "dynatemp_range": ((0.0, None), "dynamic temperature is not implemented here"),
    "xtc_probability": ((0.0, None), "XTC sampling is not implemented here"),
    "dry_multiplier": ((0.0, None), "the DRY repetition penalty is not implemented here; use "
                       "repeat_penalty"),
    "ignore_eos": ((False, None), "ignore_eos is not implemented here; a logit_bias of -100 on the "
                   "EOS token has the same effect"),
    "n_probs": ((0, None), "use logprobs (and top_logprobs on chat) instead of n_probs"),
    "samplers": ((None,), "the sampler order is fixed here (docs/serving.md lists it)"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "web_search_options": ((None,), "web search is not available"),
    "chat_template_kwargs": ((None, {}), "the chat template takes no extra arguments here"),
    "lora": ((None, []), "per-request LoRA adapters are not supported; merge the adapter with "
             "`cllama-deploy merge` or `deploy`"),
    "return_tokens": ((False, None), "llama.cpp server's response fields are not sent here"),
    "timings_per_token": ((False, None), "llama.cpp server's response fields are not sent here"),
    "post_sampling_probs": ((False, None), "llama.cpp server's response fields are not sent here"),
}


# ---------------------------------------------------------------------------------------------
# Policy: what the server decides for every request to one model
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestConfig:
    """Server-side policy for requests to one model.

    Args:
        sampling: defaults for the sampling parameters a request leaves out (keys:
            ``SAMPLING_DEFAULT_KEYS``); the rest are :class:`SamplingParams`' defaults.
        max_n: largest ``n`` (choices per request); a request may ask for ``max_n * 8`` choices in all
            (several prompts × ``n``).
        timeout: seconds a request may take, waiting in the queue included; None = no limit.
        unknown_fields: ``"error"`` refuses a request field this server does not know (400
            ``unknown_parameter`` naming it); ``"warn"`` logs a warning per request and goes on.
    """

    sampling: dict[str, Any] = field(default_factory=dict)
    max_n: int = 8
    timeout: Optional[float] = None
    unknown_fields: str = "error"

    def __post_init__(self) -> None:
        unknown = set(self.sampling) - set(SAMPLING_DEFAULT_KEYS)
        if unknown:
            raise ConfigError(f"unknown sampling default(s) {sorted(unknown)}; allowed: "
                              f"{sorted(SAMPLING_DEFAULT_KEYS)}")
        try:
            SamplingParams(**self.sampling)
        except TypeError as exc:  # pragma: no cover - keys checked above
            raise ConfigError(f"bad sampling defaults: {exc}") from None
        if self.unknown_fields not in ("error", "warn"):
            raise ConfigError(f"unknown_fields must be 'error' or 'warn', got {self.unknown_fields!r}")
        if not isinstance(self.max_n, int) or self.max_n < 1:
            raise ConfigError(f"max_n must be an integer >= 1, got {self.max_n!r}")


_DEFAULT_CONFIG = RequestConfig()


# ---------------------------------------------------------------------------------------------
# Parsing and field checks
# ---------------------------------------------------------------------------------------------

_TYPE_TAG = re.compile(
    r"^((list|dict|tuple|set|function-\w+|literal|json-or-python|union|nullable|is-instance)\[.*\]"
    r"|bool|int|float|str|none|bytes|[A-Z]\w*)$")


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, Optional[str], str]:
    """``(message, param, code)`` for pydantic's error list (the first error, counted with the rest).

    ``body`` and pydantic's union/type tags are dropped from the location so ``param`` reads as the
    field path (``messages.0.role``).
    """
    if not errors:
        return "Invalid request body.", None, "invalid_request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for p in loc if not _TYPE_TAG.match(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. The body must be valid JSON "
                f"({first.get('ctx', {}).get('error', 'syntax error')}).", None, "invalid_json")
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    msg = first.get("msg", "invalid value")
    where = f" for '{param}'" if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid value{where}: {msg}.{more}", param, "invalid_value"


def parse(model: type[BaseModel], data: Union[BaseModel, Mapping[str, Any]]) -> Any:
    """Validate ``data`` (a mapping, or already a ``model``) into ``model``; errors name the field."""
    if isinstance(data, model):
        return data
    if not isinstance(data, Mapping):
        raise InvalidRequest(f"a request must be a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    bias = data.get("logit_bias")
    if isinstance(bias, Mapping):  # Python callers use int token ids; JSON object keys are strings
        data["logit_bias"] = {str(k) if isinstance(k, int) else k: v for k, v in bias.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param, code = describe_validation_errors(exc.errors())
        raise InvalidRequest(message, param=param, code=code) from None


def _extras(obj: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(param path, value)`` for every undeclared field, nested models included."""
    for name, value in (obj.model_extra or {}).items():
        yield prefix + name, value
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            yield from _extras(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _extras(item, f"{prefix}{name}.{i}.")


def _changes_nothing(value: Any, harmless: tuple) -> bool:
    for h in harmless:
        if h is None or isinstance(h, bool):
            if value is h:
                return True
        elif isinstance(h, (int, float)):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == h:
                return True
        elif value == h:
            return True
    return False


def check_fields(body: BaseModel, config: RequestConfig, *, extensions: bool = True) -> None:
    """Apply the field tables to ``body``'s undeclared fields.

    Known-ignored fields pass; a known-unsupported field passes only with a value that changes
    nothing; anything else is unknown: refused (``config.unknown_fields == "error"``) or logged.
    ``extensions=False`` (embeddings) knows no llama.cpp sampling fields.
    """
    unknown = []
    for param, value in _extras(body):
        top = "." not in param and extensions
        if top and param in IGNORED_FIELDS:
            continue
        if top and param in UNSUPPORTED_FIELDS:
            harmless, why = UNSUPPORTED_FIELDS[param]
            if _changes_nothing(value, harmless):
                continue
            raise InvalidRequest(f"'{param}' is not supported by this server: {why}.", param=param,
                                   code="unsupported_parameter")
        unknown.append(param)
    if not unknown:
        return
    if config.unknown_fields == "warn":
        log.warning("ignoring unknown request field(s) %s", ", ".join(unknown))
        return
    known = list(type(body).model_fields) + (list(IGNORED_FIELDS) + list(UNSUPPORTED_FIELDS)
                                             if extensions else [])
    raise _unknown(unknown[0], known)


# ---------------------------------------------------------------------------------------------
# Options → SamplingParams
# ---------------------------------------------------------------------------------------------


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if s]


def sampling_params(body, defaults: Mapping[str, Any], *, max_tokens: Optional[int], stop: list[str],
                    logprobs: Optional[int], grammar: Optional[str]) -> SamplingParams:
    """The request's sampling parameters over the model's defaults over :class:`SamplingParams`'."""
    values = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
                 "presence_penalty", "frequency_penalty", "seed"):
        v = getattr(body, name, None)
        if v is not None:
            values[name] = v
    if getattr(body, "repeat_last_n", None) is not None:
        values["penalty_last_n"] = body.repeat_last_n
    bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    return SamplingParams(**{**defaults, **values, "max_tokens": max_tokens, "stop": stop,
                             "logprobs": logprobs, "logit_bias": bias, "grammar": grammar})


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice ``i`` of a seeded request samples with ``seed + i`` (reproducible and distinct)."""
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + i)


def grammar_for(fmt: Optional[ResponseFormat], *, json_schema: Optional[dict] = None,
                grammar: Optional[str] = None) -> Optional[str]:
    """GBNF grammar text for ``response_format`` (or llama.cpp's ``json_schema`` / ``grammar``)."""
    given = [name for name, v in (("response_format", fmt if fmt is not None and fmt.type != "text"
                                   else None), ("json_schema", json_schema), ("grammar", grammar))
             if v is not None]
    if len(given) > 1:
        raise InvalidRequest(f"give only one of {' and '.join(given)}: each constrains the output",
                               param=given[1])
    if grammar is not None:
        if not grammar.strip():
            raise InvalidRequest("grammar is empty", param="grammar")
        return grammar
    if json_schema is not None:
        return _schema_grammar(json_schema, "json_schema")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format of type json_schema needs json_schema.schema (an "
                               "object)", param="response_format.json_schema")
    return _schema_grammar(schema, "response_format")


def _schema_grammar(schema: dict, param: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    _check_schema(schema, 0, param)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise InvalidRequest("the JSON schema is nested too deeply", param=param) from None
    except Exception as exc:  # the converter raises many types on schemas it does not support
        raise InvalidRequest(f"unsupported JSON schema: {type(exc).__name__}: {exc}"[:500],
                               param=param) from None


def _check_schema(node: Any, depth: int, param: str) -> None:
    """Reject schemas whose grammar would be huge (repetition counts) or too deep."""
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels",
                               param=param)
    if isinstance(node, dict):
        for key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties",
                    "maxProperties"):
            v = node.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0
                                  or v > MAX_SCHEMA_REPEAT):
                raise InvalidRequest(f"JSON schema {key} must be an integer between 0 and "
                                       f"{MAX_SCHEMA_REPEAT}", param=param)
        for v in node.values():
            _check_schema(v, depth + 1, param)
    elif isinstance(node, list):
        for v in node:
            _check_schema(v, depth + 1, param)


def check_n(n: int, n_prompts: int, config: RequestConfig) -> None:
    if n > config.max_n:
        raise InvalidRequest(f"n={n} is more than this server allows (max {config.max_n}); ask for "
                               "fewer choices", param="n")
    if n * n_prompts > config.max_n * CHOICES_PER_N:
        raise InvalidRequest(f"too many choices in one request ({n_prompts} prompts × n={n}; at "
                               f"most {config.max_n * CHOICES_PER_N})", param="n")


def check_context(engine: Engine, prompt: Sequence[int], max_tokens: Optional[int], param: str) -> None:
    """Refuse, before any work, a prompt (+ ``max_tokens``) the context window cannot hold."""
    n_ctx = engine.info.n_ctx
    n_prompt = len(prompt)
    if n_prompt >= n_ctx:
        exc = ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has "
            f"{n_prompt} tokens, which leaves no room for a completion. Shorten the prompt or start "
            "the server with a larger --n-ctx.", n_ctx=n_ctx, prompt_tokens=n_prompt)
    elif max_tokens is not None and n_prompt + max_tokens > n_ctx:
        exc = ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
            "completion). Reduce the prompt or max_tokens.", n_ctx=n_ctx, prompt_tokens=n_prompt,
            requested=max_tokens)
    else:
        return
    exc.param = param
    raise exc


def check_tokens(engine: Engine, ids: Sequence[int], param: str) -> None:
    n_vocab = engine.info.n_vocab
    for t in ids:
        if not 0 <= t < n_vocab:
            raise InvalidRequest(f"token id {t} is out of range: the model's vocabulary has "
                                   f"{n_vocab} tokens (ids 0..{n_vocab - 1})", param=param)


def detokenize(engine: Engine, token_ids: Sequence[int]) -> str:
    """Token ids → text, as the tokenizer decodes a whole sequence (``/detokenize``, echoed prompts).

    ``engine.detokenize`` concatenates the token pieces (what a stream sends, where a continuation's
    leading space is real). A SentencePiece (``llama``) vocabulary also puts a space before the first
    word when it encodes (its "dummy prefix"); decoding removes that one space, as ``sp.decode`` does,
    so text → tokens → text round-trips. Leading BOS/control tokens have empty pieces.
    """
    check_tokens(engine, token_ids, "tokens")
    from cllama_deploy.gguf import keys

    text = engine.detokenize(token_ids)
    meta = engine.info.metadata or {}
    if meta.get(keys.TOKENIZER_MODEL, "llama") == "llama" \
            and meta.get(keys.ADD_SPACE_PREFIX, True) and text.startswith(" "):
        text = text[1:]
    return text


# ---------------------------------------------------------------------------------------------
# Prepared requests and the choices they produce
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A validated request, ready to submit: the engine requests of every choice and how to word them.

    ``indexes[k]`` is the OpenAI choice index of ``requests[k]``; ``prompt_tokens`` counts each
    distinct prompt once; ``prompt_param`` is the field blamed for a prompt the engine refuses.
    """

    kind: str  # "chat" or "completion"
    id: str
    created: int
    model: str
    requests: list[GenerationRequest]
    indexes: list[int]
    prompt_tokens: int
    prompt_param: str
    output: Callable[[], "_Output"]
    stream: bool = False
    include_usage: bool = False
    user: Optional[str] = None
    body: Any = None  # the validated schema object
    n: int = 1  # choices per prompt (requests[k] answers prompt k // n)

    def chunk(self, choices: list, usage: Optional[CompletionUsage] = None):
        cls = ChatCompletionChunk if self.kind == "chat" else CompletionChunk
        return cls(id=self.id, created=self.created, model=self.model,
                   system_fingerprint=FINGERPRINT, choices=choices, usage=usage)

    def response(self, choices: list, usage: CompletionUsage):
        cls = ChatCompletion if self.kind == "chat" else Completion
        return cls(id=self.id, created=self.created, model=self.model,
                   system_fingerprint=FINGERPRINT, choices=choices, usage=usage)


def _deadline(config: RequestConfig) -> Optional[float]:
    return None if config.timeout is None else time.monotonic() + config.timeout


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as the chat template takes them: text content, ``developer`` as ``system``."""
    out = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=f"messages.{i}.content") from None
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    return out


def prepare_chat(engine: Engine, body: Union[ChatCompletionRequest, Mapping[str, Any]],
                 config: Optional[RequestConfig] = None) -> Prepared:
    """Validate a chat request and build its engine requests (nothing is queued yet).

    Raises:
        InvalidRequest: a bad or unsupported field (``param`` names it).
        ContextLengthExceeded: the rendered prompt (+ ``max_tokens``) does not fit the context.
    """
    config = config or _DEFAULT_CONFIG
    body = parse(ChatCompletionRequest, body)
    check_fields(body, config)
    if body.functions or body.function_call is not None:
        raise InvalidRequest("functions/function_call (OpenAI's deprecated form) are not supported; "
                             "use tools and tool_choice", param="functions" if body.functions
                             else "function_call", code="unsupported_parameter")
    # None without tools (engine/tools.py: the template's own tool syntax or our tool prompt, the
    # grammar, parsing)
    native = tools.native_format(engine.info.chat_template)
    tool_plan = tools.plan(body, native)
    n = body.n or 1
    check_n(n, 1, config)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    max_tokens = _max_tokens(body, body.max_completion_tokens if body.max_completion_tokens
                             is not None else body.max_tokens)
    grammar = grammar_for(body.response_format, json_schema=body.json_schema, grammar=body.grammar)
    messages = chat_messages(body)
    render_tools = None
    if native is not None and (tool_plan is not None or tools.has_tool_history(body)):
        grammar = _tool_grammar(tool_plan, grammar)
        messages = tools.native_messages(messages, body)
        render_tools = tools.openai_tools(tool_plan) or None  # (tool_choice none: no tools)
    elif tool_plan is not None or tools.has_tool_history(body):
        grammar = _tool_grammar(tool_plan, grammar)
        fmt = prompts.format_of_template(engine.info.chat_template)
        messages = tools.messages(messages, body, tool_plan, fmt.system if fmt else None)
    prompt = engine.render_chat(messages) if render_tools is None \
        else engine.render_chat(messages, tools=render_tools)
    check_context(engine, prompt, max_tokens, "messages")
    params = sampling_params(body, config.sampling, max_tokens=max_tokens,
                             stop=stop_list(body.stop) + list(engine.info.stop),
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                             grammar=grammar)
    rid = "chatcmpl-" + uuid.uuid4().hex
    deadline = _deadline(config)
    want_lp = bool(body.logprobs)
    return Prepared(
        kind="chat", id=rid, created=int(time.time()), model=engine.info.id,
        requests=[GenerationRequest(prompt, _seeded(params, i), rid, deadline) for i in range(n)],
        indexes=list(range(n)), prompt_tokens=len(prompt), prompt_param="messages",
        output=lambda: _ChatOutput(want_lp, tool_plan), stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user, body=body, n=n)


def _tool_grammar(plan: Optional["tools.ToolPlan"], grammar: Optional[str]) -> Optional[str]:
    """The tools' grammar, unless no call is possible; it cannot be combined with another one."""
    if plan is None or plan.grammar is None:
        return grammar
    if grammar is not None:
        raise InvalidRequest("tools (with tool_choice other than 'none') cannot be combined with "
                             "response_format, json_schema or grammar: each constrains the output",
                             param="tools")
    return plan.grammar


def _max_tokens(body, max_tokens: Optional[int]) -> Optional[int]:
    """``max_tokens``, or llama.cpp's ``n_predict`` when only that is given (-1 = no limit)."""
    if body.n_predict is None or "max_tokens" in body.model_fields_set \
            or "max_completion_tokens" in body.model_fields_set:
        return max_tokens
    if body.n_predict == 0:
        raise InvalidRequest("n_predict must be a positive integer or -1 (no limit)", param="n_predict")
    return None if body.n_predict == -1 else body.n_predict


def completion_prompts(engine: Engine, prompt, echo: bool) -> tuple[list[list[int]], list[str]]:
    """Token ids for each prompt (text, token ids, or a list of either), and its text for ``echo``."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    tokens, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            tokens.append(engine.tokenize(p, add_bos=True, special=True))
            texts.append(p)
        else:
            ids = list(p)
            check_tokens(engine, ids, "prompt")
            tokens.append(ids)
            texts.append(detokenize(engine, ids) if echo else "")
    return tokens, texts


def prepare_completion(engine: Engine, body: Union[CompletionRequest, Mapping[str, Any]],
                       config: Optional[RequestConfig] = None) -> Prepared:
    """Validate a text completion request and build its engine requests (nothing is queued yet).

    Raises:
        InvalidRequest: a bad or unsupported field (``param`` names it).
        ContextLengthExceeded: a prompt (+ ``max_tokens``) does not fit the context.
    """
    config = config or _DEFAULT_CONFIG
    body = parse(CompletionRequest, body)
    check_fields(body, config)
    n = body.n or 1
    check_n(n, 1, config)
    if body.best_of is not None and body.best_of != n:
        raise InvalidRequest("best_of is not supported (it must equal n)", param="best_of",
                               code="unsupported_parameter")
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix",
                               code="unsupported_parameter")
    prompts, texts = completion_prompts(engine, body.prompt, bool(body.echo))
    check_n(n, len(prompts), config)
    max_tokens = _max_tokens(body, body.max_tokens)
    for toks in prompts:
        check_context(engine, toks, max_tokens, "prompt")
    params = sampling_params(body, config.sampling, max_tokens=max_tokens,
                             stop=stop_list(body.stop), logprobs=body.logprobs,
                             grammar=grammar_for(body.response_format, json_schema=body.json_schema,
                                                 grammar=body.grammar))
    # echo + logprobs scores the prompt too (lm-eval's loglikelihood; max_tokens 0: only that)
    scored = bool(body.echo) and body.logprobs is not None
    if scored:
        params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
    rid = "cmpl-" + uuid.uuid4().hex
    deadline = _deadline(config)
    reqs, indexes, echoes, firsts = [], [], [], []
    for pi, toks in enumerate(prompts):
        for j in range(n):
            reqs.append(GenerationRequest(toks, _seeded(params, j), rid, deadline))
            indexes.append(pi * n + j)
            echoes.append(texts[pi] if body.echo else "")
            firsts.append(engine.token_piece(toks[0]) if scored and toks else None)
    want_lp, with_top = body.logprobs is not None, bool(body.logprobs)
    return Prepared(
        kind="completion", id=rid, created=int(time.time()), model=engine.info.id, requests=reqs,
        indexes=indexes, prompt_tokens=sum(len(t) for t in prompts), prompt_param="prompt",
        output=lambda: _CompletionOutput(want_lp, with_top, echoes, firsts), stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user, body=body, n=n)


# ---------------------------------------------------------------------------------------------
# Wording the choices (chat: a message; completion: text after the echo)
# ---------------------------------------------------------------------------------------------


def _tok_str(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def chat_logprobs(items: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(token=_tok_str(lp.token), logprob=lp.logprob, bytes=list(lp.token),
                         top_logprobs=[TopLogprob(token=_tok_str(t.token), logprob=t.logprob,
                                                  bytes=list(t.token)) for t in lp.top])
        for lp in items])


def completion_logprobs(items: list[TokenLogprob], offset: int, with_top: bool) -> CompletionLogprobs:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in items:
        tokens.append(_tok_str(lp.token))
        lps.append(lp.logprob)
        offsets.append(pos)
        pos += len(lp.token.decode("utf-8", errors="ignore"))
        if with_top:
            tops.append({_tok_str(t.token): t.logprob for t in lp.top})
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops if with_top else None,
                              text_offset=offsets)


def echo_logprobs(first: bytes, items: list[TokenLogprob], echo: str, with_top: bool) -> CompletionLogprobs:
    """The echoed prompt's tokens in OpenAI's legacy shape: the first token has no log-probability
    (``null``, as its top alternatives), each later one its log-probability given the tokens before.

    ``text_offset`` indexes the echoed text; a SentencePiece vocabulary's dummy-prefix space, which
    the echo does not show, is not counted.
    """
    pieces = [first] + [lp.token for lp in items]
    text = "".join(p.decode("utf-8", errors="ignore") for p in pieces)
    drop = 1 if text.startswith(" ") and not echo.startswith(" ") else 0
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(max(0, pos - drop))
        pos += len(p.decode("utf-8", errors="ignore"))
    tops = [None] + [{_tok_str(t.token): t.logprob for t in lp.top} for lp in items]
    return CompletionLogprobs(tokens=[_tok_str(p) for p in pieces],
                              token_logprobs=[None] + [lp.logprob for lp in items],
                              top_logprobs=tops if with_top else None, text_offset=offsets)


def _joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=None if a.top_logprobs is None else a.top_logprobs + (b.top_logprobs or []),
        text_offset=a.text_offset + b.text_offset)


@dataclass
class _Choice:
    """One finished choice: its text, token ids, log-probabilities and the engine's final chunk."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    final: Chunk
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # echo + logprobs: the prompt's


class _Output:
    """How an endpoint words its choices, whole and streamed. One instance per run (it may keep
    state across a streamed choice, such as the logprob text offset)."""

    def choice(self, k: int, index: int, c: _Choice) -> Any: ...

    def opening(self, k: int, index: int) -> list: ...

    def piece(self, k: int, index: int, c: Chunk) -> Optional[Any]: ...

    def closing(self, k: int, index: int, final: Chunk) -> Any: ...


class _ChatOutput(_Output):
    """A message; streamed: a role delta, content deltas, an empty delta with the finish reason.

    With tools, an answer that is a tool call becomes ``message.tool_calls`` (finish reason
    ``tool_calls``); streamed, its text is held back and sent as whole tool-call deltas with the finish
    reason (the grammar decides at the first non-blank character, or the native call marker, whether
    the answer is a call)."""

    def __init__(self, want_lp: bool, tool_plan: Optional["tools.ToolPlan"] = None):
        self.want_lp = want_lp
        self.tool_plan = tool_plan if tool_plan is not None and tool_plan.calls_possible else None
        self.splitter: Optional[tools.StreamSplitter] = None

    def choice(self, k, index, c):
        calls = tools.parse(c.text, self.tool_plan) if self.tool_plan is not None else None
        if calls:
            return ChatChoice(index=index, message=ChatCompletionMessage(content=None, tool_calls=calls),
                              logprobs=chat_logprobs(c.logprobs) if self.want_lp else None,
                              finish_reason="tool_calls")
        return ChatChoice(index=index, message=ChatCompletionMessage(content=c.text),
                          logprobs=chat_logprobs(c.logprobs) if self.want_lp else None,
                          finish_reason=c.final.finish_reason)

    def opening(self, k, index):
        if self.tool_plan is not None:
            self.splitter = tools.StreamSplitter(self.tool_plan)
        return [ChatChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))]

    def piece(self, k, index, c):
        text = c.text if self.splitter is None else self.splitter.feed(c.text)
        if not (text or (self.want_lp and c.logprobs)):
            return None
        return ChatChunkChoice(index=index, delta=ChoiceDelta(content=text),
                               logprobs=chat_logprobs(c.logprobs or []) if self.want_lp else None)

    def closing(self, k, index, final):
        if self.splitter is not None:
            calls, rest = self.splitter.finish()
            if calls:
                deltas = [ToolCallDelta(index=i, id=t["id"], type="function",
                                        function=FunctionCallDelta(**t["function"]))
                          for i, t in enumerate(calls)]
                return ChatChunkChoice(index=index, delta=ChoiceDelta(tool_calls=deltas),
                                       finish_reason="tool_calls")
            if rest:  # a call cut short (max_tokens): what was held back is the text
                return ChatChunkChoice(index=index, delta=ChoiceDelta(content=rest),
                                       finish_reason=final.finish_reason)
        return ChatChunkChoice(index=index, delta=ChoiceDelta(), finish_reason=final.finish_reason)


class _CompletionOutput(_Output):
    """Text after the echoed prompt (if any); streamed: the echo, text pieces, an empty text.

    Logprob ``text_offset`` counts from the start of the choice's text, echo included, so while
    streaming the formatter keeps the current choice's offset (choices stream one after another).
    """

    def __init__(self, want_lp: bool, with_top: bool, echoes: list[str],
                 firsts: Optional[list[Optional[bytes]]] = None):
        self.want_lp, self.with_top, self.echoes = want_lp, with_top, echoes
        # the prompt's first token when the prompt is scored (echo + logprobs): its echo waits for them
        self.firsts = firsts or [None] * len(echoes)
        self.offset = 0

    def choice(self, k, index, c):
        echo = self.echoes[k]
        lp = completion_logprobs(c.logprobs, len(echo), self.with_top) if self.want_lp else None
        if lp is not None and self.firsts[k] is not None:
            lp = _joined(echo_logprobs(self.firsts[k], c.prompt_logprobs or [], echo, self.with_top), lp)
        return CompletionChoice(index=index, text=echo + c.text, finish_reason=c.final.finish_reason,
                                logprobs=lp)

    def opening(self, k, index):
        echo = self.echoes[k]
        self.offset = len(echo)
        if self.firsts[k] is not None:
            return []  # sent with the prompt's log-probabilities
        return [CompletionChunkChoice(index=index, text=echo)] if echo else []

    def piece(self, k, index, c):
        if c.prompt_logprobs is not None and self.firsts[k] is not None:
            echo = self.echoes[k]
            return CompletionChunkChoice(index=index, text=echo, logprobs=echo_logprobs(
                self.firsts[k], c.prompt_logprobs, echo, self.with_top))
        if not (c.text or (self.want_lp and c.logprobs)):
            return None
        lp = (completion_logprobs(c.logprobs or [], self.offset, self.with_top) if self.want_lp
              else None)
        self.offset += len(c.text)
        return CompletionChunkChoice(index=index, text=c.text, logprobs=lp)

    def closing(self, k, index, final):
        return CompletionChunkChoice(index=index, text="", finish_reason=final.finish_reason)


# ---------------------------------------------------------------------------------------------
# Running: submit every choice, then stream or collect
# ---------------------------------------------------------------------------------------------


class Run:
    """The submitted choices of one request. Consume it once, either way round: :meth:`chunks` /
    :meth:`iter_chunks` (typed stream chunks, choice after choice, then the usage chunk if asked) or
    :meth:`result` / :meth:`result_sync` (the whole response). Leaving early cancels every choice;
    :meth:`cancel` does it explicitly.

    During and after the run: ``completion_tokens``, ``finish_reason`` (the first finished choice's),
    ``finals`` (the engine's final chunk of each finished choice).
    """

    def __init__(self, prepared: Prepared, streams: list, on_final: Optional[Callable[[Chunk], None]]):
        self.prepared = prepared
        self.streams = streams
        self.on_final = on_final
        self.finals: list[Chunk] = []
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.done = False
        self._cached: dict[int, int] = {}  # prompt number -> its prompt tokens from the prefix cache
        self._out = prepared.output()
        self._choices: list = []
        self._text: list[str] = []
        self._ids: list[int] = []
        self._lps: list[TokenLogprob] = []
        self._plps: Optional[list[TokenLogprob]] = None
        self._final: Optional[Chunk] = None

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    # -- one choice's events; the drivers below only differ in `for` / `async for` --------------
    def _begin(self, k: int, emit: bool) -> list:
        self._text, self._ids, self._lps, self._final, self._plps = [], [], [], None, None
        opening = self._out.opening(k, self.prepared.indexes[k])  # (keeps the output's state too)
        return [self.prepared.chunk([c]) for c in opening] if emit else []

    def _feed(self, k: int, c: Chunk, stream: bool):
        self._text.append(c.text)
        self._ids.extend(c.token_ids)
        if c.logprobs:
            self._lps.extend(c.logprobs)
        if c.prompt_logprobs is not None:
            self._plps = c.prompt_logprobs
        if c.finish_reason:
            self._final = c
        if stream:
            piece = self._out.piece(k, self.prepared.indexes[k], c)
            return None if piece is None else self.prepared.chunk([piece])
        return None

    def _end(self, k: int):
        final = self._final
        if final is None:  # cancelled or failed underneath us: report it rather than end silently
            raise EngineError("generation ended without a result")
        self.finals.append(final)
        if final.usage is not None:
            self.completion_tokens += final.usage.completion_tokens
            cached = getattr(final.usage, "cached_tokens", None)
            if cached is not None:  # each prompt counts once: its first finished choice says
                self._cached.setdefault(k // self.prepared.n, cached)
        if self.finish_reason is None:
            self.finish_reason = final.finish_reason
        if self.on_final is not None:
            self.on_final(final)
        index = self.prepared.indexes[k]
        self._choices.append(self._out.choice(k, index, _Choice("".join(self._text), self._ids,
                                                                self._lps, final, self._plps)))
        return self.prepared.chunk([self._out.closing(k, index, final)])

    def usage(self) -> CompletionUsage:
        p = self.prepared.prompt_tokens
        details = PromptTokensDetails(cached_tokens=sum(self._cached.values())) if self._cached else None
        return CompletionUsage(prompt_tokens=p, completion_tokens=self.completion_tokens,
                               total_tokens=p + self.completion_tokens, prompt_tokens_details=details)

    def _tail(self, emit: bool) -> list:
        self.done = True
        if emit and self.prepared.include_usage:
            return [self.prepared.chunk([], usage=self.usage())]
        return []

    def response(self) -> Union[ChatCompletion, Completion]:
        """The whole response, once the run is done."""
        return self.prepared.response(self._choices, self.usage())

    # -- drivers: the same steps with `async for` or `for`; emit=False only collects -----------
    def chunks(self) -> AsyncIterator[Union[ChatCompletionChunk, CompletionChunk]]:
        return self._achunks(True)

    def iter_chunks(self) -> Iterator[Union[ChatCompletionChunk, CompletionChunk]]:
        return self._chunks(True)

    async def result(self) -> Union[ChatCompletion, Completion]:
        async for _ in self._achunks(False):
            pass
        return self.response()

    def result_sync(self) -> Union[ChatCompletion, Completion]:
        for _ in self._chunks(False):
            pass
        return self.response()

    async def _achunks(self, emit: bool):
        try:
            for k, stream in enumerate(self.streams):
                for x in self._begin(k, emit):
                    yield x
                async for c in stream:
                    x = self._feed(k, c, emit)
                    if x is not None:
                        yield x
                yield self._end(k)
            for x in self._tail(emit):
                yield x
        finally:
            if not self.done:
                self.cancel()

    def _chunks(self, emit: bool):
        try:
            for k, stream in enumerate(self.streams):
                yield from self._begin(k, emit)
                for c in stream:
                    x = self._feed(k, c, emit)
                    if x is not None:
                        yield x
                yield self._end(k)
            yield from self._tail(emit)
        finally:
            if not self.done:
                self.cancel()


def submit(engine: Engine, prepared: Prepared, *,
           on_final: Optional[Callable[[Chunk], None]] = None) -> Run:
    """Queue every choice of ``prepared`` as ONE engine request (all or none) and return the :class:`Run`.

    Works with or without a running event loop. Engine errors raised while queueing (``QueueFull``,
    ``ContextLengthExceeded``, ``InvalidRequest``...) propagate; a prompt error without ``param`` gets
    the prompt's field.
    """
    try:
        streams = engine.submit(list(prepared.requests))
    except (InvalidRequest, ContextLengthExceeded) as exc:
        if getattr(exc, "param", None) is None:
            exc.param = prepared.prompt_param
        raise
    return Run(prepared, streams, on_final)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedEmbeddings:
    """A validated embeddings request: token ids per input, and how to encode the vectors."""

    model: str
    inputs: list[list[int]]
    encoding_format: str
    deadline: Optional[float]

    def response(self, result) -> EmbeddingResponse:
        data = []
        for i, vec in enumerate(result.vectors):
            if self.encoding_format == "base64":
                import numpy as np

                emb: Any = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
            else:
                emb = vec
            data.append(EmbeddingData(index=i, embedding=emb))
        return EmbeddingResponse(data=data, model=self.model,
                                 usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens,
                                                      total_tokens=result.prompt_tokens))


def prepare_embeddings(engine: Engine, body: Union[EmbeddingRequest, Mapping[str, Any]],
                       config: Optional[RequestConfig] = None) -> PreparedEmbeddings:
    """Validate an embeddings request: ``input`` is text, token ids, or a list of either."""
    config = config or _DEFAULT_CONFIG
    body = parse(EmbeddingRequest, body)
    check_fields(body, config, extensions=False)
    if body.dimensions is not None and body.dimensions != engine.info.n_embd:
        raise InvalidRequest(f"this model's embeddings have {engine.info.n_embd} dimensions; "
                             "dimensions cannot be changed", param="dimensions",
                             code="unsupported_parameter")
    inp = body.input
    if isinstance(inp, str):
        inp = [inp]
    if inp and isinstance(inp[0], int):
        inp = [inp]
    tokens = []
    for item in inp:
        if isinstance(item, str):
            tokens.append(engine.tokenize(item, add_bos=True, special=False))
        else:
            check_tokens(engine, item, "input")
            tokens.append(list(item))
    return PreparedEmbeddings(engine.info.id, tokens, body.encoding_format, _deadline(config))


async def create_embeddings(engine: Engine, body: Union[EmbeddingRequest, Mapping[str, Any]],
                            config: Optional[RequestConfig] = None) -> EmbeddingResponse:
    """One vector per input, in the running event loop (what ``/v1/embeddings`` answers)."""
    prep = prepare_embeddings(engine, body, config)
    return prep.response(await engine.embed(prep.inputs, deadline=prep.deadline))


# ---------------------------------------------------------------------------------------------
# Async facade
# ---------------------------------------------------------------------------------------------


def _chat_body(messages, options: dict) -> dict:
    if "messages" in options:
        raise TypeError("pass the messages once, as the second argument")
    return {"messages": list(messages), **options}


def _completion_body(prompt, options: dict) -> dict:
    if "prompt" in options:
        raise TypeError("pass the prompt once, as the second argument")
    return {"prompt": list(prompt) if isinstance(prompt, tuple) else prompt, **options}


async def _result(engine: Engine, prepared: Prepared):
    return await submit(engine, prepared).result()


async def _stream(engine: Engine, prepared: Prepared):
    run = submit(engine, prepared)
    chunks = run.chunks()
    try:
        async for chunk in chunks:
            yield chunk
    finally:  # closed early: stop the generation now, not when the inner generator is collected
        await chunks.aclose()


def _iterate(engine: Engine, prepared: Prepared):
    run = submit(engine, prepared)
    yield from run.iter_chunks()


async def achat(engine: Engine, messages: Sequence[Mapping[str, Any]], *,
                config: Optional[RequestConfig] = None, **options: Any) -> ChatCompletion:
    """Chat completion in the running event loop. ``options``: the OpenAI request fields."""
    return await _result(engine, prepare_chat(engine, _chat_body(messages, options), config))


def astream_chat(engine: Engine, messages: Sequence[Mapping[str, Any]], *,
                 config: Optional[RequestConfig] = None,
                 **options: Any) -> AsyncIterator[ChatCompletionChunk]:
    """Streamed chat completion (an async iterator of chunks); validation errors raise at once."""
    return _stream(engine, prepare_chat(engine, _chat_body(messages, options), config))


async def acomplete(engine: Engine, prompt, *, config: Optional[RequestConfig] = None,
                    **options: Any) -> Completion:
    """Text completion in the running event loop. ``prompt``: text, token ids, or a list of either."""
    return await _result(engine, prepare_completion(engine, _completion_body(prompt, options), config))


def astream_complete(engine: Engine, prompt, *, config: Optional[RequestConfig] = None,
                     **options: Any) -> AsyncIterator[CompletionChunk]:
    """Streamed text completion (an async iterator of chunks); validation errors raise at once."""
    return _stream(engine, prepare_completion(engine, _completion_body(prompt, options), config))


async def aembed(engine: Engine, input, *, config: Optional[RequestConfig] = None,
                 **options: Any) -> EmbeddingResponse:
    """Embeddings in the running event loop: one L2-normalized vector per input."""
    return await create_embeddings(engine, {"input": input, **options}, config)


# ---------------------------------------------------------------------------------------------
# Blocking facade: the engine's streams iterate without an event loop, from any thread
# ---------------------------------------------------------------------------------------------


def chat(engine: Engine, messages: Sequence[Mapping[str, Any]], *,
         config: Optional[RequestConfig] = None, **options: Any) -> ChatCompletion:
    """Blocking chat completion. ``options``: the OpenAI request fields (``max_tokens``, ...)."""
    prepared = prepare_chat(engine, _chat_body(messages, options), config)
    return submit(engine, prepared).result_sync()


def stream_chat(engine: Engine, messages: Sequence[Mapping[str, Any]], *,
                config: Optional[RequestConfig] = None,
                **options: Any) -> Iterator[ChatCompletionChunk]:
    """Blocking iterator of chat completion chunks; validation errors raise at once."""
    prepared = prepare_chat(engine, _chat_body(messages, options), config)
    return _iterate(engine, prepared)


def complete(engine: Engine, prompt, *, config: Optional[RequestConfig] = None,
             **options: Any) -> Completion:
    """Blocking text completion. ``prompt``: text, token ids, or a list of either."""
    prepared = prepare_completion(engine, _completion_body(prompt, options), config)
    return submit(engine, prepared).result_sync()


def stream_complete(engine: Engine, prompt, *, config: Optional[RequestConfig] = None,
                    **options: Any) -> Iterator[CompletionChunk]:
    """Blocking iterator of text completion chunks; validation errors raise at once."""
    prepared = prepare_completion(engine, _completion_body(prompt, options), config)
    return _iterate(engine, prepared)


def embed(engine: Engine, input, *, config: Optional[RequestConfig] = None,
          **options: Any) -> EmbeddingResponse:
    """Blocking embeddings: one L2-normalized vector per input."""
    prep = prepare_embeddings(engine, {"input": input, **options}, config)
    return prep.response(engine.embed_sync(prep.inputs, deadline=prep.deadline))


__all__ = [
    "FINGERPRINT", "IGNORED_FIELDS", "Prepared", "PreparedEmbeddings", "RequestConfig", "Run",
    "SAMPLING_DEFAULT_KEYS", "UNSUPPORTED_FIELDS", "achat", "acomplete", "aembed", "astream_chat",
    "astream_complete", "chat", "check_fields", "complete", "create_embeddings",
    "describe_validation_errors", "detokenize", "embed", "parse", "prepare_chat", "prepare_completion",
    "prepare_embeddings",
    "stream_chat", "stream_complete", "submit",
]
