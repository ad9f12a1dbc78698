"""The one module that talks to llama-cpp-python's low-level API (``llama_cpp.llama_cpp`` ctypes).

Everything the engine needs from llama.cpp goes through the small classes here: :class:`Model`
(weights, vocabulary, metadata), :class:`Context` (KV memory, ``llama_decode``, logits and
embeddings per output row, per-sequence KV operations), :class:`Batch` (a ``llama_batch`` whose
arrays are numpy buffers we own, so filling a step is a few vector writes) and :class:`Sampler` (a
llama.cpp sampler chain). Nothing else in the package touches ``llama_cpp`` handles, ``Llama`` or
``_internals``; when llama-cpp-python changes, this is the file to update.

Pitfalls this module deals with (learned from the API and llama-cpp-python's example server):
- ``llama_get_logits_ith`` takes the token's index in the batch (not the output row number).
- In a unified KV cache (``kv_unified``) ``llama_memory_seq_cp`` of a position range makes the
  destination share the source's cells: copying a prefix costs no memory and no compute. But every
  token then attends over every occupied cell of every sequence (masked), which makes a step of 8
  sequences ~1.3x slower than with one stream per sequence (measured, TinyLlama shape, 2 threads).
  So generation uses one stream per sequence (``kv_unified=False``, as llama.cpp's ``llama-server
  --parallel N`` does): seq id ``i`` lives in stream ``i`` (ids must be ``< n_seq_max``), a copy
  between streams is a whole-stream buffer copy (:meth:`Context.seq_copy_prefix` copies it all, then
  drops the tail), and ``llama_decode`` splits a step into micro-batches of consecutive seq ids with
  equal token counts: fill a batch in seq-id order and keep ids low, or a step costs several passes
  over the weights.
- ``llama_decode`` returns 1 when no KV slot is free; the memory is restored then, so the caller may
  retry after freeing cells. We never get there because admission reserves cells (see scheduler).
- A ``llama_sampler_init_grammar`` that fails to parse returns NULL (and logs); check before use.
- Mean-pooled embeddings need each sequence wholly inside one micro-batch, so the embedding context
  has ``n_ubatch == n_batch == n_ctx``.
"""

from __future__ import annotations

import ctypes
import logging
import random
import threading
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger("cllama_deploy.engine")

_backend_lock = threading.Lock()
_backend_ready = False


def _lib():
    import llama_cpp

    return llama_cpp


_C_LOG = logging.getLogger("cllama_deploy.llama_cpp")
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_C_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_c_log_state = {"level": logging.DEBUG, "line": ""}
_c_log_callback = None  # kept referenced: llama.cpp calls it from C


def _install_log_callback() -> None:
    """llama.cpp's C-side messages go to the ``cllama_deploy.llama_cpp`` logger: errors as errors,
    the rest (context sizes, warnings about our deliberate n_ctx_seq > n_ctx_train) at debug."""
    global _c_log_callback
    lc = _lib()

    @lc.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        state = _c_log_state
        if level != 5:
            state["level"] = _C_LEVELS.get(level, logging.DEBUG)
        state["line"] += text.decode("utf-8", errors="replace")
        if state["line"].endswith("\n"):
            line, state["line"] = state["line"].rstrip(), ""
            if line and _C_LOG.isEnabledFor(state["level"]):
                _C_LOG.log(state["level"], "%s", line)

    _c_log_callback = callback
    lc.llama_log_set(callback, ctypes.c_void_p(0))


def _init_backend() -> None:
    """Initialise ggml once per process, with llama.cpp's logging routed to Python."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        _install_log_callback()
        _lib().llama_backend_init()
        _backend_ready = True


def max_sequences() -> int:
    """The largest number of sequence ids one llama.cpp context can hold (LLAMA_MAX_SEQ)."""
    return int(_lib().llama_max_parallel_sequences())


class ModelLoadError(Exception):
    pass


class Model:
    """A GGUF model's weights (memory-mapped) and vocabulary."""

    def __init__(self, path: str):
        _init_backend()
        lc = _lib()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        ptr = lc.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not ptr:
            raise ModelLoadError("llama.cpp failed to load the model")
        self.ptr = ptr
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(ptr))
        self.n_embd = int(lc.llama_model_n_embd(ptr))
        self.bos_id = int(lc.llama_vocab_bos(self.vocab))
        self.eos_id = int(lc.llama_vocab_eos(self.vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab)) and self.bos_id >= 0
        self.pieces: list[bytes] = [self._piece(i) for i in range(self.n_vocab)]
        self.eog = np.array([bool(lc.llama_vocab_is_eog(self.vocab, i)) for i in range(self.n_vocab)])
        self.metadata = self._metadata()
        self._closed = False

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        """Bytes one KV cell takes (K and V of every layer)."""
        lc = _lib()
        n_layer = int(lc.llama_model_n_layer(self.ptr))
        n_head = max(1, int(lc.llama_model_n_head(self.ptr)))
        n_head_kv = int(lc.llama_model_n_head_kv(self.ptr))
        head_dim = self.n_embd // n_head
        return 2 * (4 if kv_type == "f32" else 2) * n_layer * n_head_kv * head_dim

    def _piece(self, token_id: int, special: bool = False) -> bytes:
        lc = _lib()
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_token_to_piece(self.vocab, token_id, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return _lib().llama_vocab_get_text(self.vocab, token_id).decode("utf-8", errors="replace")

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        lc = _lib()
        cap = max(16, len(text) + 8)
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, text, len(text), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, text, len(text), buf, cap, add_bos, special)
            if n < 0:  # pragma: no cover
                raise RuntimeError("llama.cpp could not tokenize the text")
        return list(buf[:n])

    def _metadata(self) -> dict[str, str]:
        lc = _lib()
        out: dict[str, str] = {}
        size = 1024
        buf = ctypes.create_string_buffer(size)

        def read(fn, i: int) -> str:
            nonlocal buf, size
            n = fn(self.ptr, i, buf, size)
            if n >= size:
                size = n + 1
                buf = ctypes.create_string_buffer(size)
                fn(self.ptr, i, buf, size)
            return buf.value.decode("utf-8", errors="replace")

        for i in range(int(lc.llama_model_meta_count(self.ptr))):
            out[read(lc.llama_model_meta_key_by_index, i)] = read(lc.llama_model_meta_val_str_by_index, i)
        return out

    def grammar_is_valid(self, grammar: str) -> bool:
        lc = _lib()
        g = lc.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not g:
            return False
        lc.llama_sampler_free(g)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _lib().llama_model_free(self.ptr)


class Batch:
    """A ``llama_batch`` over numpy arrays we own (one sequence id per token).

    ``add_run`` writes a run of consecutive positions of one sequence with vector assignments, so a
    step costs O(sequences) Python work, not O(tokens).
    """

    def __init__(self, capacity: int):
        lc = _lib()
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_ids = np.zeros((capacity, 1), dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        row_ptrs = (ctypes.POINTER(lc.llama_seq_id) * capacity)()
        base = self.seq_ids.ctypes.data
        for i in range(capacity):
            row_ptrs[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(lc.llama_seq_id))
        self._row_ptrs = row_ptrs
        self.n = 0
        self.struct = lc.llama_batch()
        self.struct.token = self.tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token))
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(row_ptrs, ctypes.POINTER(ctypes.POINTER(lc.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def clear(self) -> None:
        self.n = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def add_run(self, seq_id: int, tokens: Sequence[int], start_pos: int, *,
                logits_last: bool = False, logits_all: bool = False) -> int:
        """Append ``tokens`` of ``seq_id`` at positions ``start_pos...``; returns the batch index of
        the last one (where its logits will be read)."""
        k = len(tokens)
        i = self.n
        if k == 0 or i + k > self.capacity:
            raise ValueError(f"batch overflow: {i} + {k} > {self.capacity}")
        self.tokens[i:i + k] = tokens
        self.pos[i:i + k] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq_ids[i:i + k, 0] = seq_id
        self.logits[i:i + k] = 1 if logits_all else 0
        if logits_last:
            self.logits[i + k - 1] = 1
        self.n = i + k
        return i + k - 1


class DecodeError(RuntimeError):
    pass


# K/V cache element types (ggml_type ids). f16 is llama.cpp's default; f32 doubles the cache's
# memory and matches an f32 model's reference logits to ~1e-5 instead of ~1e-2 on small models.
KV_TYPES = {"f32": 0, "f16": 1}


class Context:
    """A llama.cpp context: the KV memory all sequences share, decoding, and per-row outputs.

    ``flash_attn``: llama.cpp's flash attention on (True), off (False, the default) or llama.cpp's
    choice (None, "auto": on where the backend supports it, as on CPUs). It skips the cells masked
    out for a token, which plain attention multiplies through; but its results depend on how the
    prompt was split into batches (see LlamaCppConfig). ``kv_unified``: one KV buffer for all
    sequences (True) or one stream per sequence (False; see the module docstring).

    ``decode_hook``, when set, is called as ``decode_hook(n_tokens)`` on the calling (worker) thread
    right before every ``llama_decode``: the one seam tests use to slow or observe the real decode
    path.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_ubatch: Optional[int] = None,
                 n_seq_max: int = 1, n_threads: int = 1, embeddings: bool = False,
                 kv_type: str = "f16", flash_attn: Optional[bool] = False, kv_unified: bool = True):
        lc = _lib()
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch or n_batch
        p.n_seq_max = n_seq_max
        p.n_threads = n_threads
        p.n_threads_batch = n_threads
        p.kv_unified = kv_unified
        p.type_k = p.type_v = KV_TYPES[kv_type]
        p.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else
                             lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else
                             lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        p.no_perf = True
        if embeddings:
            p.embeddings = True
            p.pooling_type = lc.LLAMA_POOLING_TYPE_MEAN
        ptr = lc.llama_init_from_model(model.ptr, p)
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens "
                                 f"({n_seq_max} sequences)")
        self.ptr = ptr
        self.model = model
        self.mem = lc.llama_get_memory(ptr)
        self.n_ctx = int(lc.llama_n_ctx(ptr))
        self.n_batch = int(lc.llama_n_batch(ptr))
        self.n_seq_max = int(lc.llama_n_seq_max(ptr))
        self.unified = kv_unified
        self.n_vocab = model.n_vocab
        self.decode_hook: Optional[Callable[[int], None]] = None
        self._closed = False

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, batch: Batch) -> None:
        if self.decode_hook is not None:
            self.decode_hook(batch.n)
        self.decode_raw(batch)

    def decode_raw(self, batch: Batch) -> None:
        """``llama_decode`` without the hook (the GIL is released for the call)."""
        batch.struct.n_tokens = batch.n
        rc = _lib().llama_decode(self.ptr, batch.struct)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}"
                              + (" (no free KV cell)" if rc == 1 else ""))

    def logits(self, index: int) -> np.ndarray:
        """The logits of batch token ``index`` of the last decode (a view; copy to keep it)."""
        ptr = _lib().llama_get_logits_ith(self.ptr, index)
        if not ptr:
            raise DecodeError(f"no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def embedding(self, seq_id: int, n_embd: int) -> np.ndarray:
        ptr = _lib().llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise DecodeError(f"no pooled embedding for sequence {seq_id}")
        return np.ctypeslib.as_array(ptr, shape=(n_embd,))

    def logits_all(self, tokens: Sequence[int], seq_id: int = 0) -> np.ndarray:
        """Logits at every position of ``tokens`` decoded from an empty sequence (teacher forcing);
        the sequence's KV is removed afterwards. Shape ``(len(tokens), n_vocab)``."""
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        batch = Batch(min(self.n_batch, max(1, len(tokens))))
        self.seq_rm(seq_id)
        try:
            for start in range(0, len(tokens), batch.capacity):
                part = tokens[start:start + batch.capacity]
                batch.clear()
                batch.add_run(seq_id, part, start, logits_all=True)
                self.decode(batch)
                for j in range(len(part)):
                    out[start + j] = self.logits(j)
        finally:
            self.seq_rm(seq_id)
        return out

    # -- KV memory per sequence ----------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(_lib().llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        _lib().llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_copy_prefix(self, src: int, dst: int, n: int) -> None:
        """``dst`` (empty) gets ``src``'s first ``n`` cells: shared in a unified cache; between
        streams llama.cpp copies the whole stream (at the next decode), so the tail is dropped."""
        if self.unified:
            self.seq_cp(src, dst, 0, n)
        else:
            self.seq_cp(src, dst, -1, -1)
            self.seq_rm(dst, n, -1)

    def seq_keep(self, seq_id: int) -> None:
        _lib().llama_memory_seq_keep(self.mem, seq_id)

    def seq_save(self, seq_id: int) -> bytes:
        """The sequence's KV cells (positions and K/V rows) as llama.cpp's state bytes."""
        lc = _lib()
        size = int(lc.llama_state_seq_get_size(self.ptr, seq_id))
        buf = (ctypes.c_uint8 * size)()
        written = int(lc.llama_state_seq_get_data(self.ptr, buf, size, seq_id))
        return bytes(memoryview(buf)[:written])

    def seq_restore(self, data: bytes, seq_id: int) -> bool:
        """Put saved cells back as ``seq_id`` (replacing what it held); False when llama.cpp could
        not (no free cells), with the sequence left empty."""
        lc = _lib()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if int(lc.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id)) == 0:
            self.seq_rm(seq_id)
            return False
        return True

    def seq_pos_max(self, seq_id: int) -> int:
        return int(_lib().llama_memory_seq_pos_max(self.mem, seq_id))

    def clear(self) -> None:
        _lib().llama_memory_clear(self.mem, True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _lib().llama_free(self.ptr)


class GrammarError(ValueError):
    pass


class Sampler:
    """A llama.cpp sampler chain for one sequence.

    Order: logit bias → penalties → grammar → (greedy | top-k → typical → top-p → min-p →
    temperature → seeded distribution). The grammar comes before any truncation so that it always
    sees every allowed token and can never be left without one.
    """

    def __init__(self, model: Model, *, temperature: float, top_k: int, top_p: float, min_p: float,
                 typical_p: float, repeat_penalty: float, presence_penalty: float,
                 frequency_penalty: float, penalty_last_n: int, seed: Optional[int],
                 logit_bias: dict[int, float], grammar: Optional[str]):
        lc = _lib()
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        try:
            add = lambda s: lc.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
            if logit_bias:
                arr = (lc.llama_logit_bias * len(logit_bias))()
                for i, (t, b) in enumerate(logit_bias.items()):
                    arr[i].token, arr[i].bias = int(t), float(b)
                add(lc.llama_sampler_init_logit_bias(model.n_vocab, len(logit_bias), arr))
            if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
                add(lc.llama_sampler_init_penalties(model.n_vocab, penalty_last_n, repeat_penalty,
                                                    frequency_penalty, presence_penalty))
            if grammar is not None:
                g = lc.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
                if not g:
                    raise GrammarError("invalid grammar")
                add(g)
            if temperature <= 0.0:
                add(lc.llama_sampler_init_greedy())
            else:
                if top_k > 0:
                    add(lc.llama_sampler_init_top_k(top_k))
                if typical_p < 1.0:
                    add(lc.llama_sampler_init_typical(typical_p, 1))
                if top_p < 1.0:
                    add(lc.llama_sampler_init_top_p(top_p, 1))
                if min_p > 0.0:
                    add(lc.llama_sampler_init_min_p(min_p, 1))
                add(lc.llama_sampler_init_temp(temperature))
                add(lc.llama_sampler_init_dist(random.getrandbits(32) if seed is None
                                               else seed % 0xFFFFFFFF))
        except BaseException:
            self.close()
            raise

    def sample(self, ctx: Context, index: int) -> int:
        """Pick the next token from batch token ``index``'s logits (and accept it into the chain)."""
        return int(_lib().llama_sampler_sample(self.ptr, ctx.ptr, index))

    def close(self) -> None:
        if self.ptr:
            _lib().llama_sampler_free(self.ptr)
            self.ptr = None


def l2_normalised(vec: np.ndarray) -> list[float]:
    v = vec.astype(np.float64)
    norm = np.linalg.norm(v)
    if norm > 0:
        v = v / norm
    return v.astype(np.float32).tolist()


def embed_batches(ctx: Context, inputs: Iterable[list[int]], n_embd: int,
                  cancelled: Callable[[], bool] = lambda: False) -> Optional[list[list[float]]]:
    """Mean-pooled, L2-normalised embeddings of ``inputs``, several inputs per ``llama_decode``.

    Inputs are packed in order into decode calls of at most ``ctx.n_batch`` tokens and
    ``ctx.n_seq_max`` sequences (each input is one sequence, wholly inside one call). Returns None
    if ``cancelled()`` turns true between calls.
    """
    inputs = list(inputs)
    out: list[list[float]] = []
    batch = Batch(ctx.n_batch)
    i = 0
    while i < len(inputs):
        if cancelled():
            return None
        ctx.clear()
        batch.clear()
        seqs = 0
        while i < len(inputs) and seqs < ctx.n_seq_max and len(inputs[i]) <= batch.room:
            batch.add_run(seqs, inputs[i], 0, logits_all=True)
            seqs += 1
            i += 1
        if seqs == 0:  # pragma: no cover - callers check lengths against n_ctx
            raise DecodeError(f"input of {len(inputs[i])} tokens does not fit {ctx.n_batch}")
        ctx.decode(batch)
        for s in range(seqs):
            out.append(l2_normalised(ctx.embedding(s, n_embd)))
    ctx.clear()
    return out
