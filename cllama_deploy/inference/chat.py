"""``cllama-deploy chat``: a multi-turn chat in the terminal (the seed's ``inference_hf.py --interactive``,
llama.cpp's ``-ins``), with replies streamed as they are generated.

One line is one message (a line ending with ``\\`` continues on the next). ``/reset`` forgets the
conversation, ``/exit`` (or ``/quit``, Ctrl-D) leaves; Ctrl-C stops a reply half-way and keeps what was
said. The history is trimmed to the context, oldest turns first, and the screen says when
(:mod:`cllama_deploy.inference.session`). Works on a terminal and on plain pipes alike.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, TextIO

from cllama_deploy.errors import CllamaError
from cllama_deploy.inference.backends import Backend, open_backend
from cllama_deploy.inference.options import InferenceOptions
from cllama_deploy.inference.session import ChatSession, TooLong
from cllama_deploy.options import option

COMMANDS = {
    "/reset": "forget the conversation so far",
    "/exit": "leave (also /quit or Ctrl-D)",
    "/help": "show these commands",
}
PROMPT = "> "


@dataclass(kw_only=True)
class ChatConfig(InferenceOptions):
    """Options of ``cllama-deploy chat``."""

    history: bool = option(True, "Send each message with the earlier turns (trimmed to fit --n-ctx); --no-history "
                           "answers every message alone, like the seed's interactive mode.",
                           flag="--history/--no-history")

    def __post_init__(self) -> None:
        self._check_inference_options()


@dataclass
class ChatStats:
    """What a chat did, for the caller (and the tests)."""

    turns: int = 0
    dropped: int = 0  # turns trimmed from the history to fit the context
    resets: int = 0


class Screen:
    """Reads messages and writes replies; notes in dim text on a terminal, plain text elsewhere."""

    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.inp, self.out = stdin, stdout
        self.tty = _isatty(stdin) and _isatty(stdout)
        self.use_input = self.tty and stdin is sys.stdin and stdout is sys.stdout
        if self.use_input:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:  # pragma: no cover - not on every platform
                pass

    def note(self, text: str) -> None:
        self.write(f"\x1b[2m{text}\x1b[0m\n" if self.tty else f"{text}\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def read(self) -> str:
        """One message (continued lines joined); raises EOFError at the end of the input."""
        parts: list[str] = []
        prompt = PROMPT
        while True:
            if self.use_input:
                line = input(prompt)
            else:
                self.write(prompt)
                line = self.inp.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\r\n")
            if line.endswith("\\"):
                parts.append(line[:-1])
                prompt = ". "
                continue
            parts.append(line)
            return "\n".join(parts)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def banner(backend: Backend, config: ChatConfig) -> list[str]:
    s = config.sampling
    greedy = "greedy" if s.temperature <= 0 else f"temperature {s.temperature:g}, top_k {s.top_k}, top_p {s.top_p:g}"
    lines = [f"{backend.name} ({backend.kind}): context {backend.n_ctx} tokens, chat template from "
             f"{backend.template_source}",
             f"sampling: {greedy}, repeat_penalty {s.repeat_penalty:g}, max_tokens {s.max_tokens}"
             + (f", min_p {s.min_p:g}" if s.min_p else "") + (f", seed {s.seed}" if s.seed is not None else "")]
    if config.history:
        lines.append("history: on (the oldest turns are dropped when the context is full)")
    else:
        lines.append("history: off (every message is answered alone)")
    lines.append("commands: " + ", ".join(COMMANDS) + "; end a line with \\ to continue it")
    return lines


def run_chat(config: ChatConfig, *, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
             backend: Optional[Backend] = None) -> ChatStats:
    """Chat until ``/exit`` or the end of the input. ``backend`` (default: opened from ``config`` and closed
    at the end) lets a caller reuse a loaded model."""
    screen = Screen(stdin or sys.stdin, stdout or sys.stdout)
    own = backend is None
    if own:
        screen.note(f"loading {config.model} ...")
        backend = open_backend(config)
    stats = ChatStats()
    try:
        session = ChatSession(backend, config.sampling, system=config.system, history=config.history)
        for line in banner(backend, config):
            screen.note(line)
        while True:
            try:
                text = screen.read()
            except EOFError:
                screen.write("\n")
                break
            except KeyboardInterrupt:
                screen.write("\n")
                break
            command = text.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                n = session.reset()
                stats.resets += 1
                screen.note(f"(conversation reset: {n} turn(s) forgotten)")
                continue
            if command == "/help":
                for name, what in COMMANDS.items():
                    screen.note(f"{name}: {what}")
                continue
            _turn(screen, session, text, stats)
    finally:
        if own:
            backend.close()
    return stats


def _turn(screen: Screen, session: ChatSession, text: str, stats: ChatStats) -> None:
    try:
        plan = session.plan(text)
    except TooLong as exc:
        screen.note(f"({exc})")
        return
    except CllamaError as exc:
        screen.note(f"(error: {exc})")
        return
    n_ctx = session.backend.n_ctx
    if plan.dropped:
        stats.dropped += plan.dropped
        screen.note(f"(history trimmed: the oldest {plan.dropped} turn(s) dropped to fit the {n_ctx}-token "
                    f"context; {plan.kept} kept, prompt {plan.prompt_tokens} + reply up to {plan.max_tokens} "
                    "tokens)")
    if plan.shortened:
        screen.note(f"(this message takes {plan.prompt_tokens} tokens: the reply is limited to {plan.max_tokens} "
                    f"to fit the {n_ctx}-token context)")
    try:
        stream = session.send(text, plan)
    except CllamaError as exc:
        screen.note(f"(error: {exc})")
        return
    try:
        for piece in stream:
            screen.write(piece)
    except KeyboardInterrupt:
        pass
    except CllamaError as exc:
        screen.write("\n")
        screen.note(f"(error: {exc})")
        return
    stream.close()
    reply = stream.reply
    screen.write("\n")
    if reply.finish_reason == "cancelled":
        screen.note("(interrupted)")
    elif reply.finish_reason == "length":
        why = "the context is full" if plan.shortened else "--max-tokens"
        screen.note(f"(reply cut at {reply.completion_tokens} tokens: {why})")
    session.record(text, reply.text)
    stats.turns += 1
