"""The two sides every evaluation runs on: a GGUF through llama.cpp, or an HF directory (with PEFT adapters)
through transformers. Both offer the same small interface, so perplexity, KL divergence and multiple choice
are computed by one piece of code on identical token ids.

A scorer gives next-token logits as float32 arrays, one row per position:

- :meth:`window_logits` evaluates a token list from an empty cache and returns the rows from ``first`` on
  (llama.cpp's perplexity windows);
- :meth:`last_logits` returns only the last row and reuses the longest prefix shared with the previous
  call (k-shot prompts share their examples).

The GGUF side uses llama-cpp-python's public ``Llama`` API (``logits_all=True``, ``eval``, ``scores``);
the HF side loads the base with transformers, merges each adapter in order in memory (``PeftModel``
``merge_and_unload``, growing the embeddings first when an adapter saved more rows, as the seed's merge did)
and tokenizes with the project's SentencePiece-exact HF tokenizer.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cllama_deploy.errors import ConfigError, InputError, require
from cllama_deploy.options import option
from cllama_deploy.tokenizer.hf import is_gguf

HF_DTYPES = ("float32", "bfloat16", "float16")
KV_TYPES = ("f16", "f32")


def model_kind(path: Path, flag: str = "MODEL") -> str:
    """``"gguf"`` for a GGUF file, ``"hf"`` for a transformers directory.

    Raises:
        InputError: neither.
    """
    path = Path(path)
    if path.is_file():
        if is_gguf(path):
            return "gguf"
        raise InputError(f"{flag} {path}: not a GGUF file (it does not start with 'GGUF'); give a .gguf file or "
                         "an HF model directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise InputError(f"{flag} {path}: a directory without config.json; give an HF model directory or a .gguf file")
    raise InputError(f"{flag} {path}: no such file or directory")


@dataclass
class Timing:
    """Tokens evaluated and the seconds it took, per call (prompt processing speed of a scorer)."""

    calls: list = field(default_factory=list)  # (tokens, seconds)

    def add(self, tokens: int, seconds: float) -> None:
        self.calls.append((int(tokens), float(seconds)))

    @property
    def tokens(self) -> int:
        return sum(n for n, _ in self.calls)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.calls)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def rates(self) -> list[float]:
        """tokens/s of every call."""
        return [n / s for n, s in self.calls if s > 0]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LlamaCppModel:
    """A GGUF loaded through the engine's llama.cpp adapter (``cllama_deploy.engine.llama_api``, the one module
    that talks to llama-cpp-python's low-level API): the weights, one context and one batch buffer.

    ``n_ctx`` 0 means the model's trained context; ``n_seq`` sequences share the (unified) KV cache.
    """

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, n_batch: int | None = None, n_seq: int = 1,
                 kv_type: str = "f16"):
        require("llama_cpp", "all")
        from cllama_deploy.engine import llama_api

        self.path = Path(path)
        try:
            self.model = llama_api.Model(str(self.path))
        except llama_api.ModelLoadError as exc:
            raise InputError(f"llama.cpp could not load {self.path} ({exc}); is it a GGUF written by "
                             "`cllama-deploy convert` or llama.cpp?") from exc
        n_ctx = n_ctx or self.model.n_ctx_train
        n_batch = min(n_batch or n_ctx, n_ctx)
        try:
            self.ctx = llama_api.Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512),
                                         n_seq_max=n_seq, n_threads=n_threads, kv_type=kv_type)
        except llama_api.ModelLoadError as exc:
            self.model.close()
            raise InputError(f"{self.path}: {exc}; lower the context size") from exc
        self.batch = llama_api.Batch(max(n_batch, n_seq))
        self.n_threads = n_threads
        self.n_ctx = self.ctx.n_ctx
        self.n_batch = self.ctx.n_batch
        self.n_vocab = self.model.n_vocab
        self.bos_id = self.model.bos_id
        self.add_bos = self.model.add_bos

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos and self.add_bos, special=False)

    def decode_run(self, tokens: Sequence[int], start: int, seq_id: int = 0, logits_last: bool = True) -> int:
        """Decode ``tokens`` of one sequence from position ``start`` in batches; returns the batch index of the
        last token (whose logits ``ctx.logits`` then reads)."""
        idx = -1
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i:i + self.n_batch]
            self.batch.clear()
            idx = self.batch.add_run(seq_id, part, start + i, logits_last=logits_last)
            self.ctx.decode(self.batch)
        return idx

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx is not None:
            ctx.close()
        model, self.model = getattr(self, "model", None), None
        if model is not None:
            model.close()


class LlamaCppScorer:
    """A GGUF model in llama.cpp: teacher-forced logits of every position, or the next-token logits."""

    kind = "gguf"

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, n_batch: int | None = None, kv_type: str = "f16"):
        self.lm = LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, kv_type=kv_type)
        self.path = Path(path)
        self.name = self.path.name
        self.n_threads = n_threads
        self.n_ctx = self.lm.n_ctx
        self.n_ctx_train = self.lm.model.n_ctx_train
        self.n_vocab = self.lm.n_vocab
        self.bos_id = self.lm.bos_id
        self.add_bos = self.lm.add_bos
        self.timing = Timing()
        self._cached: list[int] = []  # tokens whose KV sequence 0 holds

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.lm.tokenize(text, add_bos)

    def _check(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")

    def window_logits(self, tokens: Sequence[int], first: int = 0) -> np.ndarray:
        self._check(tokens)
        self._cached = []
        t0 = time.perf_counter()
        out = self.lm.ctx.logits_all(list(tokens))
        self.timing.add(len(tokens), time.perf_counter() - t0)
        return out[first:]

    def last_logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._check(tokens)
        keep = min(_common_prefix(self._cached, tokens), len(tokens) - 1)
        t0 = time.perf_counter()
        self.lm.ctx.seq_rm(0, keep, -1)
        self._cached = []
        idx = self.lm.decode_run(list(tokens[keep:]), keep)
        logits = self.lm.ctx.logits(idx).copy()
        self._cached = list(tokens)
        self.timing.add(len(tokens) - keep, time.perf_counter() - t0)
        return logits

    def close(self) -> None:
        lm, self.lm = getattr(self, "lm", None), None
        if lm is not None:
            lm.close()


def default_tokenizer(model_dir: Path, loras: Sequence[Path]) -> Path:
    """The tokenizer an adapted HF model uses: the last adapter's own tokenizer.model (a PT adapter that grew
    the vocabulary ships it), else the base directory's."""
    for adapter in reversed(list(loras)):
        if (Path(adapter) / "tokenizer.model").is_file():
            return Path(adapter)
    return Path(model_dir)


def load_hf_model(model_dir: Path, loras: Sequence[Path] = (), dtype: str = "float32"):
    """transformers model with every adapter merged in order (in memory), in eval mode."""
    require("torch", "train")
    require("transformers", "train")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from cllama_deploy.training.model import adapter_vocab_rows

    transformers.utils.logging.disable_progress_bar()  # our own progress bar covers the evaluation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise InputError(f"MODEL {model_dir}: transformers cannot load it ({exc})") from exc
    for adapter in loras:
        require("peft", "train")
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise InputError(f"--lora {adapter}: no adapter_config.json (expected a PEFT adapter directory)")
        rows = adapter_vocab_rows(adapter)
        if rows and rows > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)  # the adapter's saved rows replace these
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


class HFScorer:
    """An HF LLaMA directory (optionally with PEFT adapters) in transformers."""

    kind = "hf"

    def __init__(self, model_dir: Path, *, loras: Sequence[Path] = (), tokenizer: Path | None = None,
                 dtype: str = "float32", n_threads: int | None = None):
        import torch

        from cllama_deploy.training.data import load_text_tokenizer

        if n_threads:
            torch.set_num_threads(n_threads)
        self.path = Path(model_dir)
        self.loras = [Path(p) for p in loras]
        self.name = self.path.name + "".join(f"+{p.name}" for p in self.loras)
        self.tok = load_text_tokenizer(tokenizer or default_tokenizer(self.path, self.loras))
        self.model = load_hf_model(self.path, self.loras, dtype)
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.bos_id = self.tok.bos_id
        hf = self.tok.hf
        self.add_bos = bool(getattr(hf, "add_bos_token", True)) if hf is not None else True
        self.n_ctx_train = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.timing = Timing()
        self._cache = None
        self._cached: list[int] = []
        # transformers 5.x renamed forward's past_key_values to cache (the old name warns until 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if len(self.tok) > self.n_vocab:
            raise InputError(f"tokenizer {self.tok.path} has {len(self.tok)} pieces but the model only {self.n_vocab} "
                             "output rows; give the tokenizer the model was trained with (--tokenizer)")

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.tok.encode([text])[0])
        return ([self.bos_id] if add_bos and self.add_bos else []) + ids

    def window_logits(self, tokens: Sequence[int], first: int = 0) -> np.ndarray:
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(torch.tensor([list(tokens)]), use_cache=False, logits_to_keep=len(tokens) - first)
        self.timing.add(len(tokens), time.perf_counter() - t0)
        return out.logits[0].float().numpy()

    def last_logits(self, tokens: Sequence[int]) -> np.ndarray:
        import torch

        keep = min(_common_prefix(self._cached, tokens), len(tokens) - 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if keep and self._cache is not None:
                drop = len(self._cached) - keep
                if drop:
                    self._cache.crop(-drop)  # negative: remove that many (the same in transformers 4.x and 5.x)
                out = self.model(torch.tensor([list(tokens[keep:])]), use_cache=True, logits_to_keep=1,
                                 **{self._cache_kw: self._cache})
            else:
                keep = 0
                out = self.model(torch.tensor([list(tokens)]), use_cache=True, logits_to_keep=1)
        self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        self._cached = list(tokens)
        self.timing.add(len(tokens) - keep, time.perf_counter() - t0)
        return out.logits[0, -1].float().numpy()

    def close(self) -> None:
        self.model = None
        self._cache = None


@dataclass(kw_only=True)
class ModelOptions:
    """How a model is loaded, shared by every ``eval`` command."""

    lora: list[Path] = option([], "PEFT LoRA adapter applied to an HF MODEL; repeat for several, merged in order "
                              "in memory (PT first, then SFT). Not for GGUF files (merge with `deploy` first).",
                              flag="--lora")
    tokenizer: Path | None = option(None, "Tokenizer of an HF MODEL: a directory with tokenizer.model, or the file.",
                                    default_text="the last --lora that has one, else MODEL")
    threads: int | None = option(None, "CPU threads for llama.cpp and torch.",
                                 default_text="$CLLAMA_N_THREADS or half the CPUs")
    kv_cache_type: str = option("f16", "llama.cpp KV cache type of GGUF models (f16 is llama.cpp's default; f32 "
                                "takes twice the memory and moves logits less).", choices=KV_TYPES)
    hf_dtype: str = option("float32", "dtype an HF MODEL is loaded in.", choices=HF_DTYPES)

    def _check_model_options(self) -> None:
        self.lora = [Path(p) for p in (self.lora or [])]
        for p in self.lora:
            if not Path(p).is_dir():
                raise ConfigError(f"--lora {p}: not a directory (expected a PEFT adapter directory)")
        if self.tokenizer is not None:
            self.tokenizer = Path(self.tokenizer)
            if not self.tokenizer.exists():
                raise ConfigError(f"--tokenizer {self.tokenizer}: no such file or directory")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.kv_cache_type not in KV_TYPES:
            raise ConfigError(f"--kv-cache-type {self.kv_cache_type!r}: choose one of {', '.join(KV_TYPES)}")
        if self.hf_dtype not in HF_DTYPES:
            raise ConfigError(f"--hf-dtype {self.hf_dtype!r}: choose one of {', '.join(HF_DTYPES)}")

    @property
    def n_threads(self) -> int:
        from cllama_deploy.engine.threads import default_n_threads

        return self.threads or default_n_threads()


def open_scorer(model: Path, opts: ModelOptions, *, n_ctx: int, flag: str = "MODEL"):
    """A :class:`LlamaCppScorer` or :class:`HFScorer` for ``model`` with ``opts``."""
    kind = model_kind(model, flag)
    if kind == "gguf":
        if opts.lora:
            raise ConfigError(f"--lora applies to HF models; {model} is a GGUF. Merge the adapters into it with "
                              "`cllama-deploy deploy --base BASE --lora ADAPTER`, or evaluate the HF base with --lora")
        if opts.tokenizer is not None:
            raise ConfigError(f"--tokenizer applies to HF models; {model} is a GGUF and carries its own vocabulary")
        return LlamaCppScorer(model, n_ctx=n_ctx, n_threads=opts.n_threads, kv_type=opts.kv_cache_type)
    return HFScorer(model, loras=opts.lora, tokenizer=opts.tokenizer, dtype=opts.hf_dtype, n_threads=opts.n_threads)
