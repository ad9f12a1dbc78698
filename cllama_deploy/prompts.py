"""Alpaca prompt templates: the single source used by training, the GGUF converter and the server.

``ALPACA_V1`` is the seed's (Chinese-LLaMA-Alpaca) training prompt, note the trailing space after
"### Response:". ``ALPACA_2`` is the Chinese-LLaMA-Alpaca-2 variant with a system prompt in
LLaMA-2 chat format. Each also exists as a Jinja chat template (HF / GGUF
``tokenizer.chat_template`` convention: ``messages`` with ``role``/``content``, ``bos_token``,
``eos_token``, ``add_generation_prompt``) that renders a single user turn exactly like the training
prompt, so a chat request to the server sees the text the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

ALPACA_V1_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_V1 = ALPACA_V1_SYSTEM + "\n\n### Instruction:\n{instruction}\n\n### Response: "

ALPACA_2_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
ALPACA_2 = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]"

# Stop strings a server should add for these formats (besides EOS).
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

TEMPLATES = {"alpaca": ALPACA_V1_CHAT_TEMPLATE, "alpaca-2": ALPACA_2_CHAT_TEMPLATE}
STOPS = {"alpaca": ALPACA_V1_STOP, "alpaca-2": ALPACA_2_STOP}


def build_prompt(instruction: str, input: str = "", *, variant: str = "alpaca",
                 system_prompt: str | None = None) -> str:
    """Training/inference prompt for one instruction (no BOS), as the seed built it.

    A non-empty ``input`` is appended to the instruction after a newline.
    """
    if input:
        instruction = f"{instruction}\n{input}"
    if variant == "alpaca":
        return ALPACA_V1.format(instruction=instruction)
    if variant == "alpaca-2":
        return ALPACA_2.format(instruction=instruction, system_prompt=system_prompt or ALPACA_2_SYSTEM)
    raise ValueError(f"unknown prompt template {variant!r}; choose 'alpaca' or 'alpaca-2'")


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
                add_generation_prompt: bool = True) -> str:
    """Render a chat template with Jinja2 in a sandbox, as HF and llama.cpp do."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )
