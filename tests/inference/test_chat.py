"""`cllama-deploy chat`: through a real pseudo-terminal (two turns, /reset, /exit), through plain stdin/stdout
(history trimming at a small --n-ctx: said on screen, every request fits), and on the HF model with its adapter
(the same greedy replies as its GGUF). Expected replies come from the request layer, as the server answers."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time

import pytest

from cllama_deploy.cli import main
from cllama_deploy.engine import requests
from cllama_deploy.inference.backends import GGUFBackend, HFBackend
from cllama_deploy.inference.chat import ChatConfig, run_chat
from cllama_deploy.inference.options import InferenceOptions, Sampling

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[=>]")
GREEDY = ["--temperature", "0", "--max-tokens", "8", "--threads", "1"]


def _options(model, **kw) -> InferenceOptions:
    opts = InferenceOptions(model=model, threads=1, **kw)
    opts._check_inference_options()
    return opts


@pytest.fixture(scope="module")
def engine(tiny):
    """The reference: the same GGUF in the engine, answered through the request layer (what the server does)."""
    backend = GGUFBackend(_options(tiny.gguf, n_ctx=1024))
    yield backend.engine
    backend.close()


def reference(engine, messages, max_tokens: int = 8) -> str:
    fields = Sampling(temperature=0.0, max_tokens=max_tokens).request_fields()
    return requests.chat(engine, messages, **fields).choices[0].message.content


def turns(*pairs) -> list[dict]:
    out = []
    for user, assistant in pairs:
        out.append({"role": "user", "content": user})
        if assistant is not None:
            out.append({"role": "assistant", "content": assistant})
    return out


class Pty:
    """A child process on a pseudo-terminal: write lines, read until the prompt comes back."""

    def __init__(self, argv: list[str]):
        import pty

        self.master, slave = pty.openpty()
        env = {**os.environ, "CLLAMA_N_THREADS": "1", "TERM": "dumb", "CLLAMA_DEBUG": ""}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until_prompt(self, timeout: float = 300) -> str:
        """Everything up to the next "> " prompt (ANSI codes removed, CRLF as LF)."""
        raw = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                raw += data
                text = ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\r\n", "\n")
                if text.endswith("> "):
                    self.seen += text
                    return text
            elif self.proc.poll() is not None:
                break
        text = ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\r\n", "\n")
        self.seen += text
        return text

    def send(self, line: str) -> str:
        os.write(self.master, (line + "\n").encode("utf-8"))
        return self.read_until_prompt()

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=120)
        finally:
            os.close(self.master)


def test_chat_in_a_pseudo_terminal(tiny, engine):
    """Two turns (the second answered with the first in its prompt), /reset (the next answer is the lone
    turn's), /exit; replies stream onto the terminal."""
    term = Pty([sys.executable, "-m", "cllama_deploy", "chat", str(tiny.gguf), "--n-ctx", "1024", *GREEDY])
    try:
        head = term.read_until_prompt()
        assert "context 1024 tokens" in head and "chat template from gguf" in head, head
        assert "sampling: greedy, repeat_penalty 1.1, max_tokens 8" in head, head

        first = reference(engine, turns(("Hello there", None)))
        out = term.send("Hello there")
        assert first in out, (first, out)

        second = reference(engine, turns(("Hello there", first), ("Tell me more", None)))
        alone = reference(engine, turns(("Tell me more", None)))
        assert second != alone  # so the next check shows that the history was sent
        out = term.send("Tell me more")
        assert second in out, (second, out)

        out = term.send("/reset")
        assert "conversation reset: 2 turn(s) forgotten" in out, out
        out = term.send("Tell me more")
        assert alone in out, (alone, out)

        os.write(term.master, b"/exit\n")
    finally:
        rc = term.close()
    assert rc == 0, term.seen[-2000:]


class Recording:
    """A backend wrapper that records every request chat sends (messages, reply limit)."""

    def __init__(self, backend):
        self.inner = backend
        self.kind, self.name, self.n_ctx = backend.kind, backend.name, backend.n_ctx
        self.template_source = backend.template_source
        self.sent: list[tuple[list, int, int]] = []  # messages, prompt tokens, max_tokens

    def prompt_tokens(self, prompt):
        return self.inner.prompt_tokens(prompt)

    def stream(self, prompt, sampling):
        self.sent.append((prompt, self.inner.prompt_tokens(prompt), sampling.max_tokens))
        return self.inner.stream(prompt, sampling)

    def close(self):
        pass


def _chat(backend, lines: list[str], **kw) -> tuple[str, object]:
    config = ChatConfig(model=backend.inner.engine.info.path if backend.kind == "gguf" else None, threads=1, **kw)
    out = io.StringIO()
    stats = run_chat(config, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out, backend=backend)
    return out.getvalue(), stats


@pytest.fixture(scope="module")
def small(tiny):
    backend = GGUFBackend(_options(tiny.gguf, n_ctx=200))
    yield backend
    backend.close()


def test_history_is_trimmed_oldest_first_to_fit_a_small_context(small):
    rec = Recording(small)
    messages = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    out, stats = _chat(rec, messages + ["/exit"], n_ctx=200, temperature=0.0, max_tokens=8)
    assert stats.turns == 8 and stats.dropped > 0, out
    assert "(history trimmed: the oldest" in out and "to fit the 200-token context" in out, out
    users = []
    for (msgs, n_prompt, max_tokens), question in zip(rec.sent, messages):
        assert n_prompt + max_tokens <= 200  # every request fits the context
        assert max_tokens == 8
        sent_users = [m["content"] for m in msgs if m["role"] == "user"]
        assert sent_users[-1] == question
        users.append(sent_users)
    # the kept turns are always the latest ones, and as many as fit: one more would overflow
    for k, sent_users in enumerate(users):
        assert sent_users[:-1] == messages[k - len(sent_users) + 1:k]
    trimmed = [k for k, u in enumerate(users) if len(u) - 1 < k]
    assert trimmed, users
    k = trimmed[0]
    msgs = rec.sent[k][0]
    with_one_more = [{"role": "user", "content": messages[k - len(users[k])]}, {"role": "assistant", "content": "x"}]
    assert small.prompt_tokens(with_one_more + msgs) + 8 > 200


def test_a_message_too_long_for_the_context_is_refused_and_a_long_one_gets_a_shorter_reply(small):
    rec = Recording(small)
    long = "hello"
    while small.prompt_tokens([{"role": "user", "content": long}]) + 64 <= 200:  # until a whole reply cannot fit
        long += " hello"
    assert small.prompt_tokens([{"role": "user", "content": long}]) < 200
    huge = "hello " * 400
    out, stats = _chat(rec, [huge, long, "/exit"], n_ctx=200, temperature=0.0, max_tokens=64)
    assert "leaves no room for a reply in the 200-token context" in out, out
    assert "the reply is limited to" in out, out
    assert len(rec.sent) == 1 and stats.turns == 1
    _, n_prompt, max_tokens = rec.sent[0]
    assert max_tokens < 64 and n_prompt + max_tokens == 200


def test_no_history_sends_every_message_alone(small):
    rec = Recording(small)
    out, stats = _chat(rec, ["one", "two", "three", "/exit"], n_ctx=200, temperature=0.0, max_tokens=4,
                       history=False, system="Answer briefly.")
    assert stats.turns == 3 and "history: off" in out
    for (msgs, _, _), text in zip(rec.sent, ["one", "two", "three"]):
        assert msgs == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]


def test_end_of_input_leaves_and_commands_are_not_sent(small):
    rec = Recording(small)
    out, stats = _chat(rec, ["/help", "", "hi"], n_ctx=200, temperature=0.0, max_tokens=2)  # no /exit: EOF
    assert "/reset: forget the conversation so far" in out
    assert [m[0][-1]["content"] for m in rec.sent] == ["hi"] and stats.turns == 1


def test_hf_model_with_adapter_answers_like_its_gguf(tiny, capsys, monkeypatch):
    """`chat --base DIR --lora A`: the same greedy replies, turn after turn, as the GGUF `deploy` made of
    them (f32 KV cache, so the only difference left is float rounding). No repetition penalty: transformers
    (like the seed) penalizes the prompt's tokens too, llama.cpp only the reply's."""
    lines = "Hello there\nTell me more\n/exit\n"
    greedy = GREEDY + ["--repeat-penalty", "1"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["chat", "--base", str(tiny.base), "--lora", str(tiny.lora), "--n-ctx", "512", *greedy]) == 0
    hf_out = capsys.readouterr().out
    assert "(hf): context 512 tokens, chat template from default" in hf_out
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["chat", str(tiny.gguf), "--n-ctx", "512", "--kv-cache-type", "f32", *greedy]) == 0
    gguf_out = capsys.readouterr().out
    after_banner = lambda text: text.split("commands:", 1)[1]  # noqa: E731
    assert after_banner(hf_out) == after_banner(gguf_out), (hf_out, gguf_out)
    assert after_banner(hf_out).count("(reply cut at 8 tokens: --max-tokens)") == 2


def test_hf_stream_can_be_stopped_half_way(tiny):
    backend = HFBackend(_options(tiny.base, lora=[tiny.lora], n_ctx=512))
    stream = backend.stream([{"role": "user", "content": "Hello"}], Sampling(temperature=0.0, max_tokens=50))
    for _ in stream:
        break
    stream.close()
    assert stream.reply.finish_reason == "cancelled" and stream.reply.text


@pytest.mark.parametrize("argv, message", [
    (["chat"], "give a model"),
    (["chat", "GGUF", "--lora", "LORA"], "--lora applies to HF models"),
    (["chat", "GGUF", "--base", "BASE"], "give the model once"),
    (["chat", "GGUF", "--chat-template", "nope"], "--chat-template 'nope'"),
    (["chat", "GGUF", "--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_user_errors_are_one_line_exit_2(tiny, capsys, argv, message):
    argv = [{"GGUF": str(tiny.gguf), "LORA": str(tiny.lora), "BASE": str(tiny.base)}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
