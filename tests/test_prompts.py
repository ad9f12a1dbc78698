"""The prompt-format registry: every form of a format (training text, Jinja, Ollama TEMPLATE, stops)
comes from one PromptFormat, and every writer uses it."""

from __future__ import annotations

import re

import pytest

from cllama_deploy import prompts
from cllama_deploy.errors import ConfigError


@pytest.mark.parametrize("name", sorted(prompts.FORMATS))
def test_a_single_turn_renders_like_the_training_prompt(name):
    fmt = prompts.FORMATS[name]
    for system in (None, "你是一个助手。"):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "介绍一下北京\n详细一点"}]
        text = prompts.render_chat(fmt.chat_template, messages, bos_token="<s>", eos_token="</s>")
        assert text == "<s>" + fmt.build("介绍一下北京", "详细一点", system_prompt=system)
    assert prompts.build_prompt("a", "b", variant=name) == fmt.build("a", "b")
    assert prompts.build_prompt("a") == prompts.ALPACA_V1.format(instruction="a")  # the seed's exact text


@pytest.mark.parametrize("name", sorted(prompts.FORMATS))
def test_the_ollama_modelfile_uses_the_registry(name):
    from cllama_deploy.pipeline import ollama_modelfile

    fmt = prompts.FORMATS[name]
    text = ollama_modelfile("m-Q4_K_M.gguf", name)
    assert text == prompts.ollama_modelfile("m-Q4_K_M.gguf", name)
    assert f'TEMPLATE """{fmt.ollama_template}"""' in text and "FROM ./m-Q4_K_M.gguf" in text
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    assert stops == list(fmt.ollama_stops) + ["</s>"]
    assert set(fmt.ollama_stops) <= set(fmt.stop) and fmt.ollama_stops
    # the Go template writes the same prompt text as the training format
    assert fmt.system in fmt.ollama_template
    for piece in re.split(r"\{[a-z_]+\}", fmt.prompt.replace("{system_prompt}", "")):
        for line in piece.strip().splitlines():
            assert line.strip() in fmt.ollama_template, line


def test_custom_templates_get_no_ollama_template_and_no_stops():
    assert "No Ollama TEMPLATE" in prompts.ollama_modelfile("m.gguf", "my.jinja")
    assert prompts.format_of_template("{{ messages }}") is None
    for name, fmt in prompts.FORMATS.items():
        assert prompts.format_of_template(fmt.chat_template) is fmt
        assert prompts.STOPS[name] == list(fmt.stop) and prompts.TEMPLATES[name] == fmt.chat_template
    with pytest.raises(ConfigError, match="--chat-template 'chatml' is neither a built-in template"):
        prompts.load_chat_template("chatml")
