"""The two models ``chat`` and ``generate`` run on, behind one small interface.

- :class:`GGUFBackend`: a GGUF in the engine (:class:`~cllama_deploy.engine.llamacpp.LlamaCppEngine`,
  continuous batching), reached through the request layer (:mod:`cllama_deploy.engine.requests`): a
  reply here is exactly what the server's ``/v1/chat/completions`` (or ``/v1/completions``) answers to
  the same request. No torch.
- :class:`HFBackend`: an HF directory with PEFT adapters merged in memory
  (:func:`~cllama_deploy.evaluation.models.load_hf_model`), generating with transformers' ``generate``
  and the seed's generation config; the same chat template and stop strings, stop strings cut with the
  engine's :class:`~cllama_deploy.engine.detok.TextAssembler`, left-padded batches for ``generate``.

Both take a prompt as chat messages (rendered with the chat template) or as raw text (tokenized with
BOS), stream one reply (:meth:`stream`), and run many at once (:meth:`run_all`).
"""

from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from cllama_deploy.engine.detok import TextAssembler
from cllama_deploy.errors import InputError
from cllama_deploy.inference.options import InferenceOptions, Sampling

Messages = list[dict]
Prompt = Union[Messages, str]  # chat messages, or raw text (a completion of the text itself)


@dataclass
class Reply:
    """One finished reply: its text, why it ended (``stop``, ``length``, or ``cancelled``), token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ReplyStream:
    """Text pieces of one reply as they are generated; :attr:`reply` once iterated to the end.

    Closing it early (``close()``, or a ``KeyboardInterrupt`` while iterating) stops the generation; the
    reply then keeps the text so far with ``finish_reason`` ``"cancelled"``.
    """

    pieces: Iterator[str]
    prompt_tokens: int
    reply: Optional[Reply] = None
    _text: list[str] = field(default_factory=list)
    _finish: Callable[[], tuple[str, int]] = lambda: ("cancelled", 0)

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self.pieces:
                self._text.append(piece)
                yield piece
        finally:
            self.close()

    def close(self) -> None:
        if self.reply is not None:
            return
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()
        reason, n_out = self._finish()
        self.reply = Reply("".join(self._text), reason, self.prompt_tokens, n_out)


class Backend:
    """What ``chat`` and ``generate`` need from a model (see the module docstring)."""

    kind: str
    name: str
    n_ctx: int
    template_source: str  # where the chat template comes from: gguf, tokenizer, override, default

    def prompt_tokens(self, prompt: Prompt) -> int:
        """How many tokens ``prompt`` takes (messages rendered with the chat template)."""
        raise NotImplementedError

    def stream(self, prompt: Prompt, sampling: Sampling) -> ReplyStream:
        raise NotImplementedError

    def run_all(self, jobs: Sequence[tuple[Prompt, Sampling]],
                on_done: Optional[Callable[[int, Reply], None]] = None) -> list[Reply]:
        """Every job's reply (a job: a prompt and its sampling), in order; ``on_done(i, reply)`` as each
        one finishes."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# GGUF: the engine, through the request layer
# ---------------------------------------------------------------------------------------------


def request_body(prompt: Prompt, sampling: Sampling) -> tuple[str, dict]:
    """``("chat", body)`` or ``("completion", body)``: the OpenAI request a prompt is sent as (the same
    body, POSTed to the server's ``/v1/chat/completions`` or ``/v1/completions``, gets the same reply)."""
    if isinstance(prompt, str):
        return "completion", {"prompt": prompt, **sampling.request_fields()}
    return "chat", {"messages": list(prompt), **sampling.request_fields()}


class GGUFBackend(Backend):
    """A GGUF in :class:`~cllama_deploy.engine.llamacpp.LlamaCppEngine` (``parallel`` slots)."""

    kind = "gguf"

    def __init__(self, opts: InferenceOptions, *, parallel: int = 1):
        from cllama_deploy.engine.llamacpp import LlamaCppConfig, LlamaCppEngine

        self.engine = LlamaCppEngine(LlamaCppConfig(
            model_path=str(opts.model), n_ctx=opts.n_ctx, n_threads=opts.n_threads, chat_template=opts.chat_template,
            parallel=parallel, max_queue=max(64, parallel), embeddings=False, kv_cache_type=opts.kv_cache_type))
        info = self.engine.info
        self.name, self.n_ctx, self.template_source = info.id, info.n_ctx, info.chat_template_source
        self.parallel = parallel

    def prompt_tokens(self, prompt: Prompt) -> int:
        if isinstance(prompt, str):
            return len(self.engine.tokenize(prompt, add_bos=True, special=True))
        return len(self.engine.render_chat(list(prompt)))

    def stream(self, prompt: Prompt, sampling: Sampling) -> ReplyStream:
        from cllama_deploy.engine import requests

        kind, body = request_body(prompt, sampling)
        body.update(stream=True, stream_options={"include_usage": True})
        prepared = (requests.prepare_chat if kind == "chat" else requests.prepare_completion)(self.engine, body)
        run = requests.submit(self.engine, prepared)
        chunks = run.iter_chunks()

        def pieces() -> Iterator[str]:
            try:
                for chunk in chunks:
                    for c in chunk.choices:
                        text = c.delta.content if kind == "chat" else c.text
                        if text:
                            yield text
            finally:
                chunks.close()  # early exit cancels the generation

        def finish() -> tuple[str, int]:
            return (run.finish_reason if run.done else "cancelled") or "cancelled", run.completion_tokens

        return ReplyStream(pieces(), prepared.prompt_tokens, _finish=finish)

    def run_all(self, jobs, on_done=None):
        """Every prompt submitted to the engine (``2 × parallel`` in flight, so the queue never
        overflows), decoded together by its scheduler; blocking."""
        import asyncio

        from cllama_deploy.engine import requests

        replies: list[Optional[Reply]] = [None] * len(jobs)

        async def one(i: int, gate: asyncio.Semaphore) -> None:
            kind, body = request_body(*jobs[i])
            async with gate:
                if kind == "chat":
                    r = await requests.achat(self.engine, body.pop("messages"), **body)
                    text = r.choices[0].message.content or ""
                else:
                    r = await requests.acomplete(self.engine, body.pop("prompt"), **body)
                    text = r.choices[0].text
            replies[i] = Reply(text, r.choices[0].finish_reason or "stop", r.usage.prompt_tokens,
                               r.usage.completion_tokens)
            if on_done is not None:
                on_done(i, replies[i])

        async def main() -> None:
            gate = asyncio.Semaphore(2 * self.parallel)
            await asyncio.gather(*(one(i, gate) for i in range(len(jobs))))

        asyncio.run(main())
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.close(30)


# ---------------------------------------------------------------------------------------------
# HF: transformers generate with the seed's generation config
# ---------------------------------------------------------------------------------------------


def _piece_table(tok) -> list[bytes]:
    """Each token id's bytes as llama.cpp's ``token_to_piece`` gives them (``▁`` → space, ``<0xNN>`` → the
    byte, control and added tokens → nothing), so streamed text is assembled as the engine does."""
    sp = tok.sp_model
    table: list[bytes] = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i):
            table.append(b"")
        elif sp.is_byte(i):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


class HFBackend(Backend):
    """An HF directory with adapters merged in memory (transformers + peft, torch on the CPU)."""

    kind = "hf"

    def __init__(self, opts: InferenceOptions, *, batch_size: int = 8):
        from cllama_deploy import prompts as formats
        from cllama_deploy.evaluation.models import default_tokenizer, load_hf_model
        from cllama_deploy.training.data import load_text_tokenizer

        import torch

        torch.set_num_threads(opts.n_threads)
        # the SentencePiece-exact HF tokenizer, BOS/EOS from the .model when a directory has no HF files
        self.tok = load_text_tokenizer(opts.tokenizer or default_tokenizer(opts.model, opts.lora)).hf
        with warnings.catch_warnings():  # peft's use of a transformers name deprecated for v6: not the user's to fix
            warnings.filterwarnings("ignore", category=FutureWarning)
            self.model = load_hf_model(opts.model, opts.lora, opts.hf_dtype)
        self.name = opts.model.name + "".join(f"+{Path(p).name}" for p in opts.lora)
        n_train = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.n_ctx = opts.n_ctx or n_train or 2048
        if opts.chat_template is not None:
            self.template, self.template_source = formats.load_chat_template(opts.chat_template), "override"
        elif isinstance(getattr(self.tok, "chat_template", None), str) and self.tok.chat_template.strip():
            self.template, self.template_source = self.tok.chat_template, "tokenizer"
        else:
            self.template, self.template_source = formats.FORMATS["alpaca"].chat_template, "default"
        fmt = formats.format_of_template(self.template)
        self.stop = list(fmt.stop) if fmt else []
        self.pieces = _piece_table(self.tok)
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.batch_size = batch_size
        n_rows = int(self.model.get_output_embeddings().weight.shape[0])
        if len(self.tok) > n_rows:
            raise InputError(f"the tokenizer has {len(self.tok)} pieces but the model only {n_rows} output rows; give "
                             "the tokenizer the model was trained with (--tokenizer)")

    def ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; the BOS comes from the template (or is added once), as in the engine."""
        from cllama_deploy import prompts as formats

        if isinstance(prompt, str):
            text = prompt
        else:
            text = formats.render_chat(self.template, list(prompt), bos_token=self.tok.bos_token or "",
                                       eos_token=self.tok.eos_token or "")
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if getattr(self.tok, "add_bos_token", True) and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def prompt_tokens(self, prompt: Prompt) -> int:
        return len(self.ids(prompt))

    def _limit(self, n_prompt: int, sampling: Sampling) -> int:
        room = self.n_ctx - n_prompt
        if room < 1:
            raise InputError(f"the prompt has {n_prompt} tokens, which leaves no room for a reply in the "
                             f"{self.n_ctx}-token context; shorten it or give a larger --n-ctx")
        return min(sampling.max_tokens, room)

    def _piece(self, token: int) -> bytes:
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""

    def _generate(self, rows: list[list[int]], sampling: Sampling, streamer=None,
                  cancel: Optional[threading.Event] = None) -> list[tuple[list[int], str, str]]:
        """One left-padded ``generate`` call; per row: (tokens, text, finish reason), see :meth:`_reply`."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        assemblers = [TextAssembler(self.stop) for _ in rows]
        piece = self._piece

        class StopStrings(StoppingCriteria):
            """Per row: done once its text holds a stop string (or the consumer went away)."""

            def __call__(self, input_ids, scores, **kwargs):
                for a, t in zip(assemblers, input_ids[:, -1].tolist()):
                    a.push(piece(t))
                gone = cancel is not None and cancel.is_set()
                return torch.tensor([a.stopped or gone for a in assemblers], dtype=torch.bool,
                                    device=input_ids.device)

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id, streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([StopStrings()]),
                                      **sampling.hf_kwargs(self._limit(width, sampling)))
        return [self._reply(row) for row in out[:, width:].tolist()]

    def _reply(self, row: list[int]) -> tuple[list[int], str, str]:
        """A generated row up to EOS, or through the token that completes a stop string (what follows is
        padding): (tokens, text cut before the stop string, finish reason)."""
        a = TextAssembler(self.stop)
        tokens: list[int] = []
        text: list[str] = []
        for t in row:
            if t == self.eos_id:
                return tokens, "".join(text) + a.finish(), "stop"
            tokens.append(t)
            text.append(a.push(self._piece(t)))
            if a.stopped:
                return tokens, "".join(text), "stop"
        return tokens, "".join(text) + a.finish(), "length"

    def stream(self, prompt: Prompt, sampling: Sampling) -> ReplyStream:
        """One reply, generated in a worker thread and handed over token by token."""
        ids = self.ids(prompt)
        self._limit(len(ids), sampling)  # refuse at once, before a thread starts
        tokens: "queue.Queue" = queue.Queue()
        cancel = threading.Event()
        outcome: dict = {}

        class Streamer:  # transformers' streamer protocol: put(the prompt) once, then each new token
            first = True

            def put(self, value):
                if self.first:
                    self.first = False
                    return
                for t in value.reshape(-1).tolist():
                    tokens.put(int(t))

            def end(self):
                tokens.put(None)

        def work() -> None:
            try:
                outcome["row"] = self._generate([ids], sampling, streamer=Streamer(), cancel=cancel)[0]
            except BaseException as exc:  # re-raised in the consumer's thread
                outcome["error"] = exc
                tokens.put(None)

        thread = threading.Thread(target=work, daemon=True, name="hf-generate")
        thread.start()
        seen: list[int] = []

        def pieces() -> Iterator[str]:
            a = TextAssembler(self.stop)
            try:
                while not a.stopped:
                    t = tokens.get()
                    if t is None or t == self.eos_id:
                        break
                    seen.append(t)
                    text = a.push(self._piece(t))
                    if text:
                        yield text
                tail = a.finish()  # nothing after a stop string
                if tail:
                    yield tail
                outcome["complete"] = True
            finally:
                cancel.set()  # the worker stops at its next token if it has not already
                thread.join()
            if "error" in outcome:
                raise outcome["error"]

        def finish() -> tuple[str, int]:
            if not outcome.get("complete") or "row" not in outcome:
                return "cancelled", len(seen)
            new, _, reason = outcome["row"]
            return reason, len(new)

        return ReplyStream(pieces(), len(ids), _finish=finish)

    def run_all(self, jobs, on_done=None):
        """``batch_size`` prompts per ``generate`` call, similar lengths together (less padding); a batch
        generates up to its first job's ``max_tokens`` (fewer when its longest prompt leaves less room)."""
        encoded = [self.ids(p) for p, _ in jobs]
        for row, (_, sampling) in zip(encoded, jobs):
            self._limit(len(row), sampling)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        replies: list[Optional[Reply]] = [None] * len(jobs)
        for start in range(0, len(order), self.batch_size):
            part = order[start:start + self.batch_size]
            sampling = jobs[part[0]][1]
            for i, (new, text, reason) in zip(part, self._generate([encoded[i] for i in part], sampling)):
                replies[i] = Reply(text, reason, len(encoded[i]), len(new))
                if on_done is not None:
                    on_done(i, replies[i])
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None


def open_backend(opts: InferenceOptions, *, parallel: int = 1, batch_size: int = 8) -> Backend:
    """The backend for ``opts.model``: :class:`GGUFBackend` for a GGUF, :class:`HFBackend` for an HF directory."""
    if opts.kind == "gguf":
        return GGUFBackend(opts, parallel=parallel)
    return HFBackend(opts, batch_size=batch_size)
