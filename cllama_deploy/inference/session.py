"""A chat's history and its token budget, apart from any terminal.

Every request must fit the context: the prompt (system message, kept turns, the new message, rendered with
the chat template) plus room for a whole reply (``max_tokens``). When it does not, the oldest turns go
first, one user + assistant pair at a time, and :class:`Plan` says how many went (the terminal says it on
screen). A message that does not fit even alone gets a shorter reply limit, or is refused when not one
token of reply would fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from cllama_deploy.inference.backends import Backend, Messages, ReplyStream
from cllama_deploy.inference.options import Sampling


@dataclass
class Plan:
    """What one message is sent as: the messages, the reply limit, and what had to give way."""

    messages: Messages
    prompt_tokens: int
    max_tokens: int
    dropped: int = 0  # oldest turns removed from the history for this message to fit
    kept: int = 0  # turns of history sent with it
    shortened: bool = False  # max_tokens was lowered to what the context has left

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.max_tokens


class TooLong(Exception):
    """The message alone (with the system message) leaves no room for a reply."""

    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(f"this message takes {prompt_tokens} tokens with the chat template, which leaves no room "
                         f"for a reply in the {n_ctx}-token context; shorten it (or start with a larger --n-ctx)")
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


@dataclass
class ChatSession:
    """Turns of one conversation with ``backend``; ``history=False`` sends every message alone."""

    backend: Backend
    sampling: Sampling
    system: Optional[str] = None
    history: bool = True
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)

    def messages(self, user: str, turns: Optional[list[tuple[str, str]]] = None) -> Messages:
        out: Messages = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in (self.turns if turns is None else turns):
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return out + [{"role": "user", "content": user}]

    def plan(self, user: str) -> Plan:
        """The request for ``user``: as many of the latest turns as fit with a whole reply.

        Raises:
            TooLong: not even the message alone fits with one token of reply.
        """
        n_ctx, want = self.backend.n_ctx, self.sampling.max_tokens
        turns = list(self.turns) if self.history else []
        dropped = 0
        while True:
            msgs = self.messages(user, turns)
            n = self.backend.prompt_tokens(msgs)
            if n + want <= n_ctx:
                return Plan(msgs, n, want, dropped, len(turns))
            if not turns:
                break
            turns.pop(0)
            dropped += 1
        if n >= n_ctx:
            raise TooLong(n, n_ctx)
        return Plan(msgs, n, n_ctx - n, dropped, 0, shortened=True)

    def send(self, user: str, plan: Optional[Plan] = None) -> ReplyStream:
        """Stream the reply to ``user`` (planned with :meth:`plan` unless given); the turns the plan
        dropped leave the history now, and the turn joins it once :meth:`record` is called."""
        plan = plan or self.plan(user)
        if self.history and plan.dropped:
            del self.turns[:plan.dropped]
        sampling = dataclasses.replace(self.sampling, max_tokens=plan.max_tokens)
        return self.backend.stream(plan.messages, sampling)

    def record(self, user: str, reply: str) -> None:
        """Keep a finished (or interrupted) turn in the history."""
        if self.history:
            self.turns.append((user, reply))

    def reset(self) -> int:
        """Forget every turn; returns how many there were."""
        n = len(self.turns)
        self.turns.clear()
        return n
