"""Continuous batching: the decode loop over every running sequence, slots, the waiting queue, and
the prefix cache.

One worker thread owns the llama.cpp context. Each step is ONE ``llama_decode`` carrying the next
token of every generating sequence plus chunks of prompts being prefilled; logits are read per
sequence (its batch index) and each sequence samples with its own sampler chain. New requests join at
the next step, finished ones leave. llama.cpp releases the GIL while it decodes, so the event loop
keeps serving HTTP meanwhile.

Slots and the queue: ``parallel`` sequences run at once. A request (all of its choices) that finds
no free slot waits in a FIFO queue of at most ``max_queue`` WAITING requests; running ones and the
choices of a request that already has a slot do not count. ``max_queue=0`` means nothing may wait,
but a free slot still serves at once.

Prefill is chunked: while other sequences generate, a step carries only as many prompt tokens as keep
it within ``STEP_SLOWDOWN`` times a decode-only step (from running estimates of both costs, corrected
by what the steps with a chunk really took: a chunk's micro-batch has a fixed cost that a per-token
estimate misses; at least ``MIN_PREFILL_CHUNK``, at most ``prefill_chunk``), so a long prompt joining slows the running streams'
next tokens by a bounded factor instead of freezing them for the whole prompt, on a GPU (where prompt
tokens are cheap: large chunks) as on one CPU core (where each costs nearly a decode step: small
chunks). A short prompt (at most ``WHOLE_PROMPT`` tokens to compute) joins whole instead, one per
step: in small chunks it would cost several passes over the weights (with one KV stream per
sequence, a prompt's chunk is a micro-batch of its own). With nobody generating, a step takes up to
``n_batch``.

KV budget (see docs/serving.md): the context holds ``parallel × n_ctx`` cells, one stream of
``n_ctx`` per slot (the seq id is the stream; the lowest free id is taken, and each step's batch is
in seq-id order, so that llama.cpp decodes the step in as few micro-batches as it can). A sequence
needs ``prompt + limit ≤ n_ctx`` cells, so every admitted sequence can always finish. Only running
sequences live in the KV: a step attends over every cell a stream holds, so a finished sequence's
KV goes to the prefix cache in host memory (``llama_state_seq_get_data``; bounded, least recently
used evicted first). A prompt that shares a prefix with a running sequence gets those cells copied
(llama.cpp's stream copy; shared by ``seq_cp`` in a unified cache); one that shares more with a
cached sequence gets its cells copied back (``llama_state_seq_set_data``); either way a memcpy, and
it computes only the rest. Choices of one request share the prompt's prefill.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from cllama_deploy.engine.base import EngineClosed, EngineError, Embeddings, QueueFull, RequestTimeout
from cllama_deploy.engine.kvcache import KVTree, PrefixCache
from cllama_deploy.engine.sequence import Group, Sequence, State
from cllama_deploy.engine.stream import ChunkStream

log = logging.getLogger("cllama_deploy.engine")

# a concurrently prefilling prompt is worth waiting for when it computes at least this many more
# prompt tokens we share than the KV already holds
MIN_FOLLOW_TOKENS = 32
# a step that carries prompt chunks beside generating sequences may take this many times as long as a
# step of the generating sequences alone (the running streams' inter-token latency while a prompt joins)
STEP_SLOWDOWN = 1.8
MIN_PREFILL_CHUNK = 1
# a prompt with at most this many tokens to compute joins in one step (one at a time), beyond the
# budget: on CPUs a micro-batch under ~16 tokens costs ~2x more per token than a larger one, and
# with one KV stream per sequence a prompt's chunk is a micro-batch of its own
WHOLE_PROMPT = 64
# with llama.cpp threads on every core, after a step the worker waits (at most this share of a decode
# step, and this many seconds) for the streams' consumers to take their chunks: their work (SSE
# writes, JSON) would otherwise run during the next llama_decode and stall its threads
YIELD_SHARE = 0.25
YIELD_MAX = 0.010
EMA = 0.3
CHUNK_SCALE = (0.1, 8.0)  # bounds of the correction of the cost model's chunk size
HISTOGRAM_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(eq=False)
class EmbedJob:
    """Several inputs to embed, as one queued request (needs no slot, runs between steps)."""

    inputs: list[list[int]]
    stream: ChunkStream
    started: bool = False


class Histogram:
    """Cumulative bucket counts, for Prometheus."""

    def __init__(self, bounds=HISTOGRAM_BOUNDS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.count += 1

    def snapshot(self) -> dict:
        cum, out = 0, []
        for b, c in zip(self.bounds + (float("inf"),), self.counts):
            cum += c
            out.append((b, cum))
        return {"buckets": out, "sum": self.sum, "count": self.count}


class BatchScheduler:
    """The decode loop and admission; see the module docstring.

    Args:
        runner: what the loop needs from llama.cpp (an :class:`~cllama_deploy.engine.llamacpp.Runner`:
            ``context``, ``model``, ``make_sampler(params)``, ``embed(inputs, cancelled)``).
        parallel: slots (sequences decoding together).
        max_queue: requests that may wait for a slot.
        n_ctx: the per-sequence window; the KV budget is ``parallel * n_ctx`` cells.
        n_batch: most tokens in one ``llama_decode``.
        prefill_chunk: most prompt tokens per step while other sequences generate (the cost model
            usually allows fewer on CPUs).
        prefix_cache: keep finished sequences' KV (in host memory) and reuse shared prefixes
            across requests.
        cache_entries: most finished sequences kept for reuse.
        cache_bytes: most host memory those hold.
        yield_cpu: let consumers run between steps (llama.cpp uses every core; see YIELD_SHARE).
    """

    def __init__(self, runner, *, parallel: int, max_queue: int, n_ctx: int, n_batch: int,
                 prefill_chunk: int, prefix_cache: bool = True, cache_entries: int = 16,
                 cache_bytes: int = 1 << 30, yield_cpu: bool = False, name: str = "engine"):
        from cllama_deploy.engine.llama_api import Batch

        self.runner = runner
        self.ctx = runner.context
        self.parallel = parallel
        self.max_queue = max_queue
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.prefill_chunk = max(1, prefill_chunk)
        self.prefix_cache_enabled = prefix_cache
        self.yield_cpu = yield_cpu
        self.kv_cells_total = parallel * n_ctx
        self._batch = Batch(n_batch)
        self._tree = KVTree()
        self._cache = PrefixCache(cache_entries if prefix_cache else 0, cache_bytes)
        self._free_ids = list(range(self.ctx.n_seq_max))  # a heap: the lowest free id goes first
        self._cond = threading.Condition()
        self._waiting: deque[Union[Group, EmbedJob]] = deque()
        self._admitted: list[Sequence] = []
        self._embed_ready: list[EmbedJob] = []
        self._running: list[Sequence] = []  # worker thread only
        self._slots_taken = 0
        self._paused = 0
        self._closed = False
        # statistics
        self.cancelled = 0
        self.prompt_tokens_cached = 0
        self.prompt_tokens_computed = 0
        self.completion_tokens = 0
        self.steps = 0
        self.step_sequences = Histogram()
        self.step_tokens = Histogram()
        self.decode_seconds = 0.0
        self.step_seconds = 0.0
        self._t_decode_step: Optional[float] = None  # seconds of a decode-only step (running mean)
        self._t_prompt_token: Optional[float] = None  # seconds per prompt token in a step
        self._chunk_scale = 1.0  # correction of the cost model's chunk, from the chunked steps' times
        self._thread = threading.Thread(target=self._loop, name=f"cllama-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------
    # Any thread: submission, cancellation, stats
    # ------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return sum(1 for item in self._waiting if not item.started)

    @property
    def slots_used(self) -> int:
        return self._slots_taken

    def _free_slots(self) -> int:
        return 0 if self._paused else self.parallel - self._slots_taken

    def _queue_full(self) -> QueueFull:
        if self.max_queue == 0:
            return QueueFull(f"all {self.parallel} slots are busy and no request may wait "
                             "(--max-queue 0); retry later")
        return QueueFull(f"the server's queue is full: {self.queue_depth} requests are waiting for "
                         f"one of {self.parallel} slots (--max-queue {self.max_queue}); retry later")

    def submit(self, group: Group) -> None:
        """Admit the request's choices to free slots, or queue it; raises QueueFull/EngineClosed."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down and takes no new requests")
            if not self._waiting and self._free_slots() > 0:
                self._admit_locked(group)
            elif self.queue_depth >= self.max_queue:
                raise self._queue_full()
            if group.waiting:
                self._waiting.append(group)
            for seq in group.sequences:
                seq.stream.on_cancel(lambda s=seq: self._cancel_waiting(s))
            self._cond.notify_all()

    def submit_embed(self, job: EmbedJob) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down and takes no new requests")
            if not self._waiting and not self._paused:
                job.started = True
                self._embed_ready.append(job)
            elif self.queue_depth >= self.max_queue:
                raise self._queue_full()
            else:
                self._waiting.append(job)
            job.stream.on_cancel(lambda: self._cancel_embed(job))
            self._cond.notify_all()

    def _admit_locked(self, group: Group) -> None:
        for seq in group.waiting:
            if self._free_slots() <= 0:
                break
            seq.state = State.ADMITTED
            self._slots_taken += 1
            self._admitted.append(seq)
            group.started = True

    def _admit_from_queue_locked(self) -> None:
        while self._waiting and not self._paused:
            head = self._waiting[0]
            if isinstance(head, EmbedJob):
                head.started = True
                self._embed_ready.append(head)
                self._waiting.popleft()
                continue
            self._admit_locked(head)
            if head.waiting:
                return
            self._waiting.popleft()

    def _cancel_waiting(self, seq: Sequence) -> None:
        with self._cond:
            if seq.state is not State.WAITING:
                self._cond.notify_all()  # running: the worker frees it at the next step
                return
            seq.state = State.DONE
            group = seq.group
            if not group.waiting:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(group)
            self._cond.notify_all()
        seq.stream.end()

    def _cancel_embed(self, job: EmbedJob) -> None:
        with self._cond:
            if job.started:
                return
            with contextlib.suppress(ValueError):
                self._waiting.remove(job)
        job.stream.end()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Admit nothing and count every slot as busy, as if the engine were fully loaded: requests
        queue (and ``max_queue`` applies) until the block ends. Running sequences carry on."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {
                "slots_total": self.parallel, "slots_used": self._slots_taken,
                "running": self._slots_taken, "queue_depth": self.queue_depth,
                "cancelled": self.cancelled, "prompt_tokens_cached": self.prompt_tokens_cached,
                "prompt_tokens_computed": self.prompt_tokens_computed,
                "completion_tokens": self.completion_tokens, "steps": self.steps,
                "kv_cells_used": self._tree.used_cells, "kv_cells_total": self.kv_cells_total,
                "prefix_cache_entries": len(self._cache), "prefix_cache_bytes": self._cache.nbytes,
                "step_sequences": self.step_sequences.snapshot(),
                "step_tokens": self.step_tokens.snapshot(),
                "decode_seconds": self.decode_seconds, "step_seconds": self.step_seconds,
            }

    def close(self, timeout: Optional[float] = None) -> bool:
        """Take no new requests; let queued and running ones finish (up to ``timeout`` seconds).
        Returns whether the worker stopped (then the context may be freed)."""
        with self._cond:
            self._closed = True
            self._paused = 0
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------------------------------
    # Worker thread
    # ------------------------------------------------------------------------------------------
    def _has_work_locked(self) -> bool:
        return bool(self._running or self._admitted or self._embed_ready
                    or (self._waiting and not self._paused and (
                        isinstance(self._waiting[0], EmbedJob) or self._free_slots() > 0)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._has_work_locked():
                    if self._closed and not self._waiting:
                        return
                    self._cond.wait()
                self._admit_from_queue_locked()
                new, self._admitted = self._admitted, []
                jobs, self._embed_ready = self._embed_ready, []
            try:
                for job in jobs:
                    self._run_embed(job)
                for seq in new:
                    self._start(seq)
                if self._running:
                    self._step()
            except BaseException as exc:  # a bug must not kill the worker: fail what runs
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._fail(seq, EngineError(f"generation failed inside the engine: {exc}"))

    # -- embeddings -----------------------------------------------------------------------------
    def _run_embed(self, job: EmbedJob) -> None:
        job.stream.started.set()
        if job.stream.cancelled.is_set():
            job.stream.end()
            return
        try:
            vectors = self.runner.embed(job.inputs, job.stream.cancelled.is_set)
        except Exception as exc:
            log.exception("embedding failed")
            job.stream.put(EngineError(f"embedding failed inside llama.cpp: {exc}"))
            return
        if vectors is not None:
            job.stream.put(Embeddings(vectors, sum(len(t) for t in job.inputs)))
        job.stream.end()

    # -- starting a sequence --------------------------------------------------------------------
    def _start(self, seq: Sequence) -> None:
        seq.stream.started.set()
        seq.t_admitted = time.monotonic()
        if seq.cancelled:
            self._release(seq, cancelled=True)
            return
        if seq.expired(seq.t_admitted):
            self._fail(seq, RequestTimeout("the request waited in the queue past the per-request "
                                           "timeout"))
            return
        try:
            seq.sampler = self.runner.make_sampler(seq.request.params)
        except Exception as exc:
            self._fail(seq, EngineError(f"could not build the sampler: {exc}"))
            return
        seq.seq_id = heapq.heappop(self._free_ids)  # one id per slot: never empty while one is free
        self._running.append(seq)
        if seq.scores_prompt:  # every prompt position's logits are needed: compute it all
            seq.state = State.PREFILL
            return
        if seq.limit <= 0:
            seq._finish("length")
            self._release(seq)
            return
        leader = self._leader_for(seq)
        if leader is not None:
            seq.state, seq.leader = State.FOLLOWING, leader
        else:
            sibling = None if self.prefix_cache_enabled else next(
                (o for o in self._running if o is not seq and o.group is seq.group
                 and o.prompt == seq.prompt and o.state is State.DECODE), None)
            self._reuse_prefix(seq, only=sibling)  # a sibling choice's prompt KV even without the cache
            seq.state = State.PREFILL

    def _leader_for(self, seq: Sequence) -> Optional[Sequence]:
        """A prefilling sequence that will compute (part of) this prompt: choices of the same request
        always share; with the prefix cache, other prompts sharing enough of a prefix wait too."""
        best, best_len = None, 0
        resident = max(self._tree.match(seq.prompt[:-1])[1], self._cache.match(seq.prompt[:-1])[1]) \
            if self.prefix_cache_enabled else 0
        for other in self._running:
            if other is seq or other.state is not State.PREFILL:
                continue
            if other.group is seq.group and other.prompt == seq.prompt:
                seq.follow_len = seq.n_prompt
                return other
            if not self.prefix_cache_enabled:
                continue
            n = _common(seq.prompt, other.prompt, seq.n_prompt - 1)
            if n > best_len and n >= resident + MIN_FOLLOW_TOKENS and n > other.n_past:
                best, best_len = other, n
        seq.follow_len = best_len
        return best

    def _reuse_prefix(self, seq: Sequence, *, only: Optional[Sequence] = None) -> None:
        """Reuse the longest prefix of the prompt that a running sequence (``only``: that one) or the
        prefix cache holds; leave ≥ 1 token to compute."""
        if only is None and not self.prefix_cache_enabled:
            return
        among = {only.seq_id} if only is not None else None
        head = seq.prompt[:seq.n_prompt - 1]
        src, n = self._tree.match(head, among)
        entry, m = self._cache.match(head) if only is None else (None, 0)
        if entry is not None and m > n:
            if self.ctx.seq_restore(entry.data, seq.seq_id):
                self.ctx.seq_rm(seq.seq_id, m, -1)
                self._tree.extend(seq.seq_id, entry.tokens[:m].tolist())
                seq.n_past = seq.cached_tokens = m
                self._count_cached(m)
                return
            log.warning("could not restore a cached prefix of %d tokens; computing it", m)
        if src is None or n <= 0:
            return
        self._copy_prefix(src, seq.seq_id, n)
        seq.n_past = seq.cached_tokens = n
        self._count_cached(n)

    def _copy_prefix(self, src: int, dst: int, n: int) -> None:
        """``dst`` gets ``src``'s first ``n`` cells: shared in a unified cache, copied between
        per-sequence streams (then they are ``dst``'s own cells)."""
        self.ctx.seq_copy_prefix(src, dst, n)
        if self.ctx.unified:
            self._tree.fork(dst, src, n)
        else:
            self._tree.extend(dst, self._tree.tokens(src)[:n])

    def _count_cached(self, n: int) -> None:
        with self._cond:
            self.prompt_tokens_cached += n

    # -- one step -------------------------------------------------------------------------------
    def _step(self) -> None:
        t0 = time.monotonic()
        for seq in list(self._running):
            if seq.cancelled:
                self._release(seq, cancelled=True)
            elif seq.expired(t0):
                self._fail(seq, RequestTimeout("generation ran past the per-request timeout"))
        for seq in list(self._running):
            if seq.state is State.FOLLOWING:
                self._maybe_unfollow(seq)
        batch = self._batch
        batch.clear()
        decoding = [s for s in self._running if s.state is State.DECODE and s.pending is not None]
        chunks, whole_joined = self._prefill_chunks(len(decoding))
        rows: list[tuple[Sequence, int, Optional[int]]] = []  # (seq, tokens added, logits index)
        scored: list[tuple[Sequence, int, int, int]] = []  # (seq, first batch index, position, tokens)
        # the batch in seq-id order: llama.cpp decodes consecutive ids of per-sequence streams in one
        # micro-batch (see llama_api)
        for seq in sorted(self._running, key=lambda s: s.seq_id):
            if seq.state is State.DECODE and seq.pending is not None:
                idx = batch.add_run(seq.seq_id, (seq.pending,), seq.n_past, logits_last=True)
                rows.append((seq, 1, idx))
            elif id(seq) in chunks:
                k = chunks[id(seq)]
                last = k == seq.prompt_left
                idx = batch.add_run(seq.seq_id, seq.prompt[seq.n_past:seq.n_past + k], seq.n_past,
                                    logits_last=last, logits_all=seq.scores_prompt)
                rows.append((seq, k, idx if last else None))
                if seq.scores_prompt:
                    scored.append((seq, idx - k + 1, seq.n_past, k))
        if not rows:
            return
        n_prefill = batch.n - len(decoding)
        t1 = time.monotonic()
        try:
            self.ctx.decode(batch)
        except Exception as exc:
            log.exception("llama_decode failed")
            for seq, _, _ in rows:
                self._fail(seq, EngineError(f"generation failed inside llama.cpp: {exc}"))
            return
        t2 = time.monotonic()
        if not whole_joined:  # a whole short prompt's step says little about a chunk's cost
            self._learn_costs(t2 - t1, len(decoding), n_prefill)
            if decoding and n_prefill:
                self._correct_chunk(t2 - t1, n_prefill)
        for seq, k, _ in rows:
            start = seq.n_past
            self._tree.extend(seq.seq_id, seq.prompt[start:start + k] if seq.state is State.PREFILL
                              else (seq.pending,))
            seq.n_past += k
        model = self.runner.model
        for seq, first, start, k in scored:
            seq.score_prompt(start, k, lambda j, b=first: self.ctx.logits(b + j), model.pieces)
        generated = 0
        fed = []
        for seq, k, idx in rows:
            if idx is None:
                continue
            fed.append(seq.stream)
            if seq.state is State.PREFILL:
                seq.state = State.DECODE
                self._serve_followers(seq, idx)
                if seq.scores_prompt:
                    seq.send_prompt_logprobs()
                    if seq.limit <= 0:  # max_tokens 0: the prompt's scores were the whole answer
                        seq._finish("length")
                        self._release(seq)
                        continue
            generated += self._sample(seq, idx, model)
        with self._cond:
            self.steps += 1
            self.prompt_tokens_computed += n_prefill
            self.completion_tokens += generated
            self.decode_seconds += t2 - t1
            self.step_seconds += time.monotonic() - t0
        self.step_sequences.observe(len(rows))
        self.step_tokens.observe(batch.n)
        if self.yield_cpu and fed:
            self._let_consumers_run(fed)

    def _prefill_chunks(self, n_decoding: int) -> tuple[dict[int, int], bool]:
        """Prompt tokens for each prefilling sequence this step (by ``id(seq)``), given out in
        arrival order, and whether a short prompt joined whole beyond the budget."""
        room = self.n_batch - n_decoding
        budget = room if not n_decoding else min(room, self._prefill_budget())
        whole_joined = False  # at most one short prompt joins whole per step
        chunks: dict[int, int] = {}
        for seq in self._running:
            if seq.state is not State.PREFILL or room <= 0:
                continue
            if (not whole_joined and seq.prompt_left <= room
                    and seq.n_prompt - seq.cached_tokens <= WHOLE_PROMPT):
                # a short prompt joins whole: cut in small chunks, each would cost a pass over
                # the weights in the slow small-batch regime
                k = seq.prompt_left
                whole_joined = True
            elif budget > 0:
                k = min(seq.prompt_left, budget)
            else:
                continue
            chunks[id(seq)] = k
            room -= k
            budget -= k
        return chunks, whole_joined

    def _let_consumers_run(self, streams: list) -> None:
        """Wait, bounded, until the streams fed this step have consumers waiting for more."""
        step = self._t_decode_step if self._t_decode_step is not None else YIELD_MAX
        deadline = time.monotonic() + min(YIELD_MAX, YIELD_SHARE * step)
        while streams and time.monotonic() < deadline:
            streams = [s for s in streams if not s.consumer_idle()]
            if streams:
                time.sleep(0.0002)

    def _prefill_budget(self) -> int:
        """Prompt tokens a step may carry beside the generating sequences (see STEP_SLOWDOWN)."""
        if self._t_decode_step is None or self._t_prompt_token is None:
            return min(self.prefill_chunk, MIN_PREFILL_CHUNK)
        k = round(self._chunk_scale * (STEP_SLOWDOWN - 1.0) * self._t_decode_step
                  / max(self._t_prompt_token, 1e-9))
        return max(min(MIN_PREFILL_CHUNK, self.prefill_chunk), min(k, self.prefill_chunk))

    def _correct_chunk(self, seconds: float, n_prompt: int) -> None:
        """A step with a prompt chunk beside generating sequences took ``seconds``: move the
        chunks' scale toward what would have made it STEP_SLOWDOWN times a decode-only step (by the
        square root of the ratio, at most -20 % / +10 % a step; growing only after a full chunk)."""
        if self._t_decode_step is None or seconds <= 0:
            return
        ratio = STEP_SLOWDOWN * self._t_decode_step / seconds
        if ratio >= 1.0 and n_prompt < self._prefill_budget():
            return  # the prompt's last, short chunk: says nothing about a full one
        factor = min(1.1, max(0.8, ratio ** 0.5))
        self._chunk_scale = min(CHUNK_SCALE[1], max(CHUNK_SCALE[0], self._chunk_scale * factor))

    def _learn_costs(self, seconds: float, n_decode: int, n_prompt: int) -> None:
        """Running means of a decode-only step's time and of one prompt token's time."""
        def mean(old: Optional[float], new: float) -> float:
            return new if old is None else (1 - EMA) * old + EMA * new

        if n_prompt == 0:
            self._t_decode_step = mean(self._t_decode_step, seconds)
        elif n_decode == 0:
            self._t_prompt_token = mean(self._t_prompt_token, seconds / n_prompt)
        elif self._t_decode_step is not None:
            extra = seconds - self._t_decode_step
            if extra > 0:
                self._t_prompt_token = mean(self._t_prompt_token, extra / n_prompt)

    def _sample(self, seq: Sequence, idx: int, model) -> int:
        token = seq.sampler.sample(self.ctx, idx)
        bad = token < 0 or token >= model.n_vocab
        go_on = seq.accept(token, bad or bool(model.eog[token]),
                           b"" if bad else model.pieces[token], lambda: self.ctx.logits(idx),
                           model.pieces)
        if not go_on:
            self._release(seq)
        return 0 if bad or model.eog[token] else 1

    def _serve_followers(self, leader: Sequence, idx: int) -> None:
        """Choices waiting on ``leader``'s whole prompt share its KV and its last logits row."""
        model = self.runner.model
        for f in list(self._running):
            if f.state is State.FOLLOWING and f.leader is leader and f.follow_len >= f.n_prompt:
                self._copy_prefix(leader.seq_id, f.seq_id, leader.n_prompt)
                f.n_past = f.cached_tokens = f.n_prompt
                self._count_cached(f.n_prompt)
                f.state, f.leader = State.DECODE, None
                with self._cond:
                    self.completion_tokens += self._sample(f, idx, model)

    def _maybe_unfollow(self, seq: Sequence) -> None:
        leader = seq.leader
        if leader.state is State.PREFILL and leader.n_past < seq.follow_len:
            return  # still computing what we share
        seq.leader = None
        seq.state = State.PREFILL
        if leader.state is not State.DONE:  # still resident: share what it computed
            self._reuse_prefix(seq, only=None if self.prefix_cache_enabled else leader)
        else:  # gone (its KV is in the prefix cache, if that is on)
            self._reuse_prefix(seq)

    # -- leaving --------------------------------------------------------------------------------
    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.stream.put(exc)
        self._release(seq, keep=False)

    def _release(self, seq: Sequence, *, cancelled: bool = False, keep: bool = True) -> None:
        """The sequence leaves: its slot frees; its KV joins the prefix cache or is dropped."""
        if seq in self._running:
            self._running.remove(seq)
        if cancelled:
            seq.stream.end()
            with self._cond:
                self.cancelled += 1
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        if seq.seq_id >= 0:
            if keep and self.prefix_cache_enabled and self._tree.length(seq.seq_id) > 0:
                self._cache.add(self._tree.tokens(seq.seq_id), self.ctx.seq_save(seq.seq_id))
            self.ctx.seq_rm(seq.seq_id)
            self._tree.remove(seq.seq_id)
            heapq.heappush(self._free_ids, seq.seq_id)
        seq.state = State.DONE
        with self._cond:
            self._slots_taken -= 1
            self._cond.notify_all()


def _common(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
