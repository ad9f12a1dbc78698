"""The prompt formats (Alpaca v1 and -2): ONE registry used by training, the GGUF converter, the
Ollama Modelfile writer and the server.

Each :class:`PromptFormat` holds every form of one format: the Python text of a single instruction
(what training sees), the Jinja chat template (HF / GGUF ``tokenizer.chat_template`` convention:
``messages`` with ``role``/``content``, ``bos_token``, ``eos_token``, ``add_generation_prompt``) that
renders a single user turn exactly like the training prompt, the Ollama Go ``TEMPLATE`` that does the
same, and the stop strings a server adds besides EOS.

``alpaca`` is the seed's (Chinese-LLaMA-Alpaca) training prompt, note the trailing space after
"### Response:". ``alpaca-2`` is the Chinese-LLaMA-Alpaca-2 variant with a system prompt in LLaMA-2
chat format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

ALPACA_V1_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_V1 = ALPACA_V1_SYSTEM + "\n\n### Instruction:\n{instruction}\n\n### Response: "

ALPACA_2_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
ALPACA_2 = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]"

# Stop strings a server adds for these formats (besides EOS).
ALPACA_V1_STOP = ["### Instruction:", "\n\n### "]
ALPACA_2_STOP = ["[INST]"]

# Multi-turn v1: earlier turns are "### Instruction:\n{q}\n\n### Response: {a}" joined by a blank
# line; the system text (default: the seed's) heads the prompt. A single user turn renders exactly
# ALPACA_V1 with a leading BOS.
ALPACA_V1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + ALPACA_V1_SYSTEM + "') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '\\n\\n### Instruction:\\n' + m['content'] + '\\n\\n### Response: ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Multi-turn -2: LLaMA-2 chat format; a single user turn renders exactly ALPACA_2 with a leading BOS.
ALPACA_2_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + ALPACA_2_SYSTEM + "') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set first = namespace(done=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if not first.done -%}"
    "{{- bos_token + '[INST] <<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + m['content'] + ' [/INST]' -}}"
    "{%- set first.done = true -%}"
    "{%- else -%}{{- bos_token + '[INST] ' + m['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Ollama Go templates: the same text as the Jinja templates (Ollama adds BOS itself); a SYSTEM message
# replaces the default system text.
ALPACA_V1_OLLAMA_TEMPLATE = (
    '{{- if .System }}{{ .System }}{{ else }}' + ALPACA_V1_SYSTEM + '{{ end }}\n'
    '{{- range .Messages }}\n'
    '{{- if eq .Role "user" }}\n\n### Instruction:\n{{ .Content }}\n\n### Response: '
    '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}\n'
    '{{- end }}'
)
ALPACA_2_OLLAMA_TEMPLATE = (
    '{{- $first := true }}\n'
    '{{- range .Messages }}\n'
    '{{- if eq .Role "user" }}{{ if $first }}[INST] <<SYS>>\n'
    '{{ if $.System }}{{ $.System }}{{ else }}' + ALPACA_2_SYSTEM + '{{ end }}\n'
    '<</SYS>>\n\n{{ .Content }} [/INST]{{ $first = false }}'
    '{{- else }}<s>[INST] {{ .Content }} [/INST]{{ end }}'
    '{{- else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}\n'
    '{{- end }}'
)


@dataclass(frozen=True)
class PromptFormat:
    """Every form of one prompt format (see the module docstring)."""

    name: str
    system: str                   # the default system text
    prompt: str                   # one instruction, as trained (no BOS): str.format fields below
    chat_template: str            # Jinja
    ollama_template: str          # Ollama Go TEMPLATE
    stop: tuple[str, ...]         # stop strings besides EOS (server, Modelfile)

    def build(self, instruction: str, input: str = "", system_prompt: str | None = None) -> str:
        """The training/inference text of one instruction (no BOS); a non-empty ``input`` follows the
        instruction after a newline, as the seed built it."""
        if input:
            instruction = f"{instruction}\n{input}"
        return self.prompt.format(instruction=instruction, system_prompt=system_prompt or self.system)

    @property
    def ollama_stops(self) -> tuple[str, ...]:
        # a Modelfile's quoted PARAMETER value is one line; "### Instruction:" ends the same turns
        return tuple(s for s in self.stop if "\n" not in s)


FORMATS: dict[str, PromptFormat] = {
    "alpaca": PromptFormat("alpaca", ALPACA_V1_SYSTEM,
                           "{system_prompt}" + ALPACA_V1[len(ALPACA_V1_SYSTEM):], ALPACA_V1_CHAT_TEMPLATE,
                           ALPACA_V1_OLLAMA_TEMPLATE, tuple(ALPACA_V1_STOP)),
    "alpaca-2": PromptFormat("alpaca-2", ALPACA_2_SYSTEM, ALPACA_2, ALPACA_2_CHAT_TEMPLATE,
                             ALPACA_2_OLLAMA_TEMPLATE, tuple(ALPACA_2_STOP)),
}

# Views kept for callers of the earlier names.
TEMPLATES = {name: f.chat_template for name, f in FORMATS.items()}
STOPS = {name: list(f.stop) for name, f in FORMATS.items()}


def format_of_template(template: str | None) -> PromptFormat | None:
    """The registered format whose Jinja chat template is exactly ``template`` (None for custom ones)."""
    return next((f for f in FORMATS.values() if f.chat_template == template), None)


def ollama_modelfile(gguf_name: str, chat_template: str | None) -> str:
    """An Ollama Modelfile for a GGUF next to it: the format's Go TEMPLATE and stop strings (+ EOS).

    ``chat_template`` is a format name; anything else (a custom Jinja file, none) gets no TEMPLATE and
    a comment saying so.
    """
    stem = Path(gguf_name).stem
    head = (f"# Ollama Modelfile written by cllama-deploy. Create the model with:\n"
            f"#   ollama create {stem} -f {stem}.Modelfile\n"
            f"FROM ./{gguf_name}\n")
    fmt = FORMATS.get(str(chat_template).lower())
    if fmt is None:
        return head + ("# No Ollama TEMPLATE: the GGUF carries a custom chat template "
                       "(tokenizer.chat_template); write a Go TEMPLATE for it here.\n")
    stops = list(fmt.ollama_stops) + ["</s>"]  # LLaMA's EOS text, in case a model writes it out
    lines = [head, f'TEMPLATE """{fmt.ollama_template}"""\n']
    lines += [f'PARAMETER stop "{s}"\n' for s in stops]
    return "".join(lines)


def build_prompt(instruction: str, input: str = "", *, variant: str = "alpaca",
                 system_prompt: str | None = None) -> str:
    """Training/inference prompt for one instruction (no BOS): ``FORMATS[variant].build(...)``."""
    if variant not in FORMATS:
        raise ValueError(f"unknown prompt template {variant!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[variant].build(instruction, input, system_prompt)


def load_chat_template(spec: str) -> str:
    """Resolve ``alpaca``, ``alpaca-2`` or a path to a ``.jinja`` file into template text."""
    from cllama_deploy.errors import ConfigError

    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ConfigError(
        f"--chat-template {spec!r} is neither a built-in template (alpaca, alpaca-2) nor a readable file"
    )


def render_chat(template: str, messages: list[dict], bos_token: str = "<s>", eos_token: str = "</s>",
                add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """Render a chat template with Jinja2 in a sandbox, as HF and llama.cpp do.

    ``tools`` (OpenAI / HF form: ``[{"type": "function", "function": {...}}]``) is passed to the
    template only when given, so a template testing ``tools is defined`` sees no tools otherwise.
    As in HF's renderer, ``tojson`` writes plain JSON (not HTML-escaped) and ``raise_exception(msg)``
    raises a TemplateError, which tool-use templates call on messages they cannot render.
    """
    extra = {} if tools is None else {"tools": tools}
    return _compiled(template).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token,
        add_generation_prompt=add_generation_prompt, **extra,
    )


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once (every chat request of a model renders the same one)."""
    import json

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
        return json.dumps(x, indent=indent, separators=separators, sort_keys=sort_keys,
                          ensure_ascii=ensure_ascii)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
