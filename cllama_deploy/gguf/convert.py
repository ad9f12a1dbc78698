"""HF LLaMA → GGUF, streaming, on the ``gguf`` package's GGUFWriter.

The output is what llama.cpp's own ``convert_hf_to_gguf.py`` writes for the same LLaMA checkpoint
(``benchmarks/compare_with_llamacpp.py`` checks that tensor by tensor):

* tensor names from :mod:`cllama_deploy.gguf.names`; q/k projection rows permuted into llama.cpp's
  rotary layout (:func:`permute_qk`);
* per-tensor types: 1-D tensors, norms and biases stay F32; every other tensor gets the output type,
  except that Q8_0 falls back to F16 for rows that are not a multiple of 32;
* metadata: architecture hyper-parameters (GQA, rope theta and scaling, RMS eps, context length), the
  SentencePiece vocabulary (``tokenizer.ggml.*``), special ids, add_bos/add_eos, and the Alpaca chat
  template as ``tokenizer.chat_template``.

Streaming: every tensor's GGUF type and byte size are known from the shapes alone, so the header, the
key/values and the tensor-info table are written first, then each tensor is read (memory-mapped),
transformed, quantized and written before the next one is touched. Several output types can be written
in the same pass (``deploy`` uses that), each tensor being read and merged once. Outputs are atomic.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

from cllama_deploy.checkpoint import TensorSource
from cllama_deploy.errors import CheckpointError, ConfigError, ShapeMismatchError
from cllama_deploy.files import atomic_path
from cllama_deploy.gguf import keys
from cllama_deploy.gguf.names import QK_PERMUTED, ROPE_FREQS, gguf_name
from cllama_deploy.options import option

ARCH = keys.ARCH

# --outtype → GGML type name of the quantizable tensors (general.file_type: keys.file_type(outtype))
OUTTYPES: dict[str, str] = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


@dataclass
class ConvertConfig:
    """Options of ``cllama-deploy convert``."""

    model_dir: Path = option(help="Hugging Face LLaMA directory (config.json, safetensors or .bin, "
                                  "tokenizer.model).", argument=True, metavar="MODEL_DIR")
    out: Path = option(help="Output GGUF file (written atomically).", flag=("--out", "-o"))
    outtype: str = option("f16", "f32, f16, bf16 or q8_0 (other types: `cllama-deploy quantize`).",
                          choices=tuple(OUTTYPES))
    chat_template: str = option("alpaca", "alpaca (the seed's v1 prompt), alpaca-2, none, or a path to a "
                                "Jinja file.")
    name: str | None = option(None, "The model name stored in the GGUF.", default_text="the model directory's name")
    tokenizer: Path | None = option(None, "A tokenizer.model to use instead of the one in MODEL_DIR.",
                                    default_text="MODEL_DIR/tokenizer.model")
    show_progress: bool = option(True, "No progress bar on stderr.", flag=("--quiet", "-q"), invert=True)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.out = Path(self.out)
        self.outtype = check_outtype(self.outtype)
        if not self.model_dir.is_dir():
            raise ConfigError(f"MODEL_DIR {self.model_dir}: no such directory; pass a Hugging Face model directory")
        if self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a directory; give the path of the .gguf file to write")
        if self.tokenizer is not None:
            self.tokenizer = Path(self.tokenizer)
            if not self.tokenizer.is_file():
                raise ConfigError(f"--tokenizer {self.tokenizer}: no such file; pass a SentencePiece tokenizer.model")
        resolve_chat_template(self.chat_template)


def check_outtype(outtype: str, flag: str = "--outtype") -> str:
    t = str(outtype).lower()
    if t not in OUTTYPES:
        raise ConfigError(f"{flag} {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)} "
                          "(other types: convert to f16, then `cllama-deploy quantize`)")
    return t


def resolve_chat_template(spec: str | None) -> str | None:
    """Template text for alpaca / alpaca-2 / a file; None for ``none``."""
    from cllama_deploy.prompts import load_chat_template

    if spec is None or str(spec).lower() == "none":
        return None
    return load_chat_template(str(spec))


@dataclass
class GGUFOutput:
    """One written GGUF file."""

    path: Path
    outtype: str
    size_bytes: int
    tensor_types: dict[str, int]  # GGML type name → number of tensors


@dataclass
class ConvertResult:
    """What :func:`convert` / :func:`convert_source` wrote."""

    outputs: list[GGUFOutput]
    n_tensors: int
    n_params: int
    vocab_size: int
    seconds: float
    metadata: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.outputs[0].path


# -- the LLaMA hyper-parameters -----------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaParams:
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    head_dim_given: bool
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    vocab_size: int


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older ones rope_theta plus
    # rope_scaling {type|rope_type, factor, ...}.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in (None, "default"):
        return float(theta), None
    params["rope_type"] = rope_type
    return float(theta), params


def llama_params(config: dict, where: str = "config.json") -> LlamaParams:
    """Read and check the LLaMA hyper-parameters the GGUF needs."""
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    model_type = config.get("model_type", "llama")
    if model_type != "llama" or not any(a in ("LlamaForCausalLM", "LLaMAForCausalLM") for a in archs):
        raise CheckpointError(
            f"{where}: model_type={model_type!r}, architectures={archs}: only LLaMA (LlamaForCausalLM) models "
            "are supported by this converter"
        )

    def need(key: str) -> int:
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{where}: '{key}' must be a positive integer, got {v!r}; fix config.json")
        return v

    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv:
        raise CheckpointError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if head_dim % 2:
        raise CheckpointError(f"{where}: the head size {head_dim} is odd; rotary embeddings need an even size")
    theta, scaling = _rope_settings(config)
    if scaling is not None and scaling["rope_type"] not in ("linear", "yarn", "llama3"):
        raise CheckpointError(
            f"{where}: rope scaling type {scaling['rope_type']!r} is not supported by llama.cpp's LLaMA "
            "architecture; supported: linear, yarn, llama3 (or none)"
        )
    if scaling is not None and scaling["rope_type"] in ("linear", "yarn") and scaling.get("factor") is None:
        raise CheckpointError(f"{where}: rope scaling {scaling['rope_type']!r} has no 'factor'")
    return LlamaParams(
        n_layers=layers, hidden=hidden, intermediate=need("intermediate_size"), n_heads=heads, n_kv_heads=kv,
        head_dim=head_dim, head_dim_given=config.get("head_dim") is not None,
        context_length=int(config.get("max_position_embeddings") or 2048),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        vocab_size=need("vocab_size"),
    )


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to llama.cpp's.

    HF LLaMA rotates the two halves of each head (``rotate_half``); llama.cpp's ``rope`` (normal mode)
    rotates adjacent pairs. Inside each head, row ``2*i + j`` of llama.cpp's layout is row
    ``j*head_dim/2 + i`` of HF's. ``n_heads`` is the number of heads of this projection (KV heads for k).
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(p: LlamaParams) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling (the ``rope_freqs.weight`` llama.cpp reads)."""
    s = p.rope_scaling or {}
    factor = float(s.get("factor", 8.0))
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (p.rope_theta ** (np.arange(0, p.head_dim, 2, dtype=np.float32) / p.head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# -- tensor plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    hf: str | None  # None for generated tensors
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    permute: int = 0  # heads for the q/k permutation, 0: none


def _plan_tensors(source: TensorSource, p: LlamaParams) -> list[_Tensor]:
    plan: list[_Tensor] = []
    seen: set[str] = set()
    for hf in source.names():
        name = gguf_name(hf, p.n_layers)
        shape = tuple(int(d) for d in source.shape(hf))
        heads = 0
        for module, kind in QK_PERMUTED.items():
            if f".{module}." in hf:
                heads = p.n_heads if kind == "q" else p.n_kv_heads
                rows = heads * p.head_dim
                if shape[0] != rows:
                    raise ShapeMismatchError(
                        f"tensor {hf!r} has {shape[0]} rows but config.json implies {rows} "
                        f"({heads} heads × head size {p.head_dim}); fix num_attention_heads/num_key_value_heads"
                    )
        plan.append(_Tensor(hf, name, shape, heads))
        seen.add(name)
    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(p.n_layers):
        required += [f"blk.{i}.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                      "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    missing = [n for n in required if n not in seen]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) a LLaMA model needs (GGUF names: "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); the weights are incomplete"
        )
    embd = next(t for t in plan if t.name == "token_embd.weight")
    if embd.shape[0] != p.vocab_size:
        raise ShapeMismatchError(
            f"config.json vocab_size={p.vocab_size} but model.embed_tokens.weight has {embd.shape[0]} rows; "
            f"set vocab_size to {embd.shape[0]}"
        )
    out = next((t for t in plan if t.name == "output.weight"), None)
    if out is not None and out.shape[0] != embd.shape[0]:
        raise ShapeMismatchError(
            f"lm_head.weight has {out.shape[0]} rows but model.embed_tokens.weight has {embd.shape[0]}; "
            "resize both (model.resize_token_embeddings) and save again"
        )
    if p.rope_scaling is not None and p.rope_scaling["rope_type"] == "llama3":
        plan.insert(0, _Tensor(None, ROPE_FREQS, (p.head_dim // 2,)))
    return plan


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The GGML type llama.cpp's converter gives a tensor for an output type."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    qtype = OUTTYPES[outtype]
    if qtype == "Q8_0" and shape[-1] % 32:
        return "F16"  # Q8_0 blocks are 32 values of one row
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def _encode(data: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == "F16":
        from cllama_deploy.gguf.fastcast import f32_to_f16

        return f32_to_f16(data)
    return gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType[qtype])


# While one tensor is encoded and written, the next one is read (and merged) in a worker thread if its
# float32 form is at most this size; larger ones (the embeddings) are read afterwards, so that at most
# one large tensor is in memory at a time.
PREFETCH_BYTES = 64 << 20


def _load(source: TensorSource, t: _Tensor, p: LlamaParams) -> np.ndarray:
    if t.hf is None:
        return llama3_rope_factors(p)
    data = source.get(t.hf)
    if data.dtype not in (np.float32, np.float16):
        data = data.astype(np.float32)
    if tuple(data.shape) != t.shape:
        raise ShapeMismatchError(f"tensor {t.hf!r}: shape {list(data.shape)} differs from the "
                                 f"announced {list(t.shape)}; the checkpoint is inconsistent")
    if t.permute:
        data = permute_qk(data, t.permute)
    return data


def _tensors(source: TensorSource, plan: list[_Tensor], p: LlamaParams, workers: int = 2):
    """``(tensor, data)`` in plan order. Up to ``workers`` small tensors ahead are read and merged in
    threads while the caller encodes and writes (numpy, BLAS and ggml release the GIL); large ones are
    read in turn, so at most one large tensor is in memory at a time."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def small(t: _Tensor) -> bool:
        return int(np.prod(t.shape)) * 4 <= PREFETCH_BYTES

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gguf-prefetch") as pool:
        ahead: deque = deque()  # futures for plan[i + 1], plan[i + 2], ... (small tensors only)
        nxt = 0  # next plan index not yet submitted
        for i, t in enumerate(plan):
            if ahead and ahead[0][0] == i:
                data = ahead.popleft()[1].result()
            else:
                data = _load(source, t, p)
            nxt = max(nxt, i + 1)
            while nxt < len(plan) and len(ahead) < workers and small(plan[nxt]):
                ahead.append((nxt, pool.submit(_load, source, plan[nxt], p)))
                nxt += 1
            yield t, data
            del data


# Rows are encoded and written this many values at a time, so that a large tensor (the embeddings)
# never exists twice in memory (float32 and its f16/q8_0 encoding).
CHUNK_VALUES = 1 << 22


def _write_tensor(writer, data: np.ndarray, qtype: str) -> None:
    """Append one tensor's data to a writer whose tensor-info table is written, in row chunks.

    GGUFWriter.write_tensor_data takes a whole encoded tensor; to encode chunk by chunk we do what it
    does (pop the next tensor info, align, write, pad) on the writer's open file. GGUF rows are
    independent for every type we write (Q8_0 blocks never span rows), so the bytes are the same.
    """
    fouts, tensors = getattr(writer, "fout", None), getattr(writer, "tensors", None)
    small = data.size <= CHUNK_VALUES or data.ndim < 2
    if small or not (isinstance(fouts, list) and isinstance(tensors, list) and hasattr(writer, "write_padding")):
        writer.write_tensor_data(_encode(data, qtype))  # the public path (any gguf version)
        return
    import gguf

    file_id = next(i for i, t in enumerate(tensors) if t)
    fout = fouts[file_id]
    info = tensors[file_id].pop(next(iter(tensors[file_id])))
    writer.write_padding(fout, fout.tell())
    rows = data.reshape(-1, data.shape[-1])
    step = max(1, CHUNK_VALUES // rows.shape[1])
    written = 0
    for i in range(0, rows.shape[0], step):
        chunk = _encode(rows[i:i + step], qtype)
        chunk.tofile(fout)
        written += chunk.nbytes
    if written != info.nbytes:
        raise RuntimeError(f"wrote {written} bytes for a tensor of {info.nbytes}")  # a bug, not user input
    writer.write_padding(fout, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS


# -- vocabulary ----------------------------------------------------------------------------------------

def load_vocab(tokenizer_dir: Path | None, config: dict, tokenizer_model: Path | None = None):
    """The GGUF vocabulary of a SentencePiece LLaMA tokenizer, as llama.cpp's converter builds it
    (:func:`cllama_deploy.tokenizer.gguf_vocab.gguf_vocab_from_sp`), with the special ids and BOS/EOS
    flags llama.cpp would otherwise assume written explicitly.

    Raises:
        TokenizerError: no tokenizer, or more tokenizer pieces than embedding rows.
    """
    from cllama_deploy.errors import TokenizerError
    from cllama_deploy.tokenizer.gguf_vocab import gguf_vocab_from_sp
    from cllama_deploy.tokenizer.spm import processor

    model = tokenizer_model
    if model is None:
        if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.model").is_file():
            raise TokenizerError(
                "no tokenizer.model next to the model (or in the last adapter); copy the SentencePiece "
                "tokenizer.model into the model directory or pass --tokenizer"
            )
        model = Path(tokenizer_dir) / "tokenizer.model"
    vocab_size = int(config["vocab_size"])
    hf_dir = Path(model).parent if tokenizer_model is None else None
    vocab = gguf_vocab_from_sp(model, vocab_size=vocab_size, hf_dir=hf_dir)
    # what gguf.SpecialVocab would take from the model's config.json (the tokenizer may live in an
    # adapter directory without one), then the SentencePiece model's own ids
    sp = processor(model)
    for typ, sp_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", None)):
        if getattr(vocab, f"{typ}_id") is None:
            tid = config.get(f"{typ}_token_id")
            if not (isinstance(tid, int) and 0 <= tid < vocab_size):
                tid = sp_id if sp_id is not None and 0 <= sp_id < vocab_size else None
            setattr(vocab, f"{typ}_id", tid)
    if vocab.add_bos is None:
        vocab.add_bos = True  # llama.cpp's default for SentencePiece vocabularies
    if vocab.add_eos is None:
        vocab.add_eos = False
    if len(vocab.tokens) != vocab_size:
        raise ShapeMismatchError(
            f"{model}: the tokenizer has {len(vocab.tokens)} tokens but the model's vocabulary has {vocab_size} "
            "rows; use the tokenizer the model was trained with"
        )
    return vocab


# -- metadata ------------------------------------------------------------------------------------------

def _metadata(p: LlamaParams, vocab, ftype: int, name: str, chat_template: str | None) -> list[tuple]:
    """(key, value, GGUFValueType name) rows in the order llama.cpp's converter writes them."""
    import dataclasses

    rows: list[tuple] = [
        (keys.GENERAL_TYPE, "model", "STRING"),
        (keys.NAME, name, "STRING"),
        (keys.BLOCK_COUNT, p.n_layers, "UINT32"),
        (keys.CONTEXT_LENGTH, p.context_length, "UINT32"),
        (keys.EMBEDDING_LENGTH, p.hidden, "UINT32"),
        (keys.FEED_FORWARD_LENGTH, p.intermediate, "UINT32"),
        (keys.HEAD_COUNT, p.n_heads, "UINT32"),
        (keys.HEAD_COUNT_KV, p.n_kv_heads, "UINT32"),
    ]
    s = p.rope_scaling
    if s is not None and s["rope_type"] == "linear":
        rows += [(keys.ROPE_SCALING_TYPE, "linear", "STRING"),
                 (keys.ROPE_SCALING_FACTOR, float(s["factor"]), "FLOAT32")]
    elif s is not None and s["rope_type"] == "yarn":
        rows += [(keys.ROPE_SCALING_TYPE, "yarn", "STRING"),
                 (keys.ROPE_SCALING_FACTOR, float(s["factor"]), "FLOAT32"),
                 (keys.ROPE_SCALING_ORIG_CTX_LEN,
                  int(s.get("original_max_position_embeddings") or p.context_length), "UINT32")]
        for hf_key, key in keys.ROPE_YARN_KEYS.items():
            if s.get(hf_key) is not None:
                rows.append((key, float(s[hf_key]), "FLOAT32"))
    rows += [
        (keys.ROPE_FREQ_BASE, float(p.rope_theta), "FLOAT32"),
        (keys.RMS_EPS, float(p.rms_eps), "FLOAT32"),
    ]
    if p.head_dim_given:
        rows += [(keys.KEY_LENGTH, p.head_dim, "UINT32"),
                 (keys.VALUE_LENGTH, p.head_dim, "UINT32")]
    rows += [
        (keys.FILE_TYPE, ftype, "UINT32"),
        (keys.VOCAB_SIZE, p.vocab_size, "UINT32"),
        (keys.ROPE_DIMENSION_COUNT, p.head_dim, "UINT32"),
        (keys.QUANTIZATION_VERSION, keys.QUANT_VERSION, "UINT32"),
    ]
    # the tokenizer.* rows: the chat template is the one chosen here, not the HF directory's
    return rows + dataclasses.replace(vocab, chat_template=chat_template or None).metadata_rows()


def _new_writer(rows: list[tuple], plan: list[_Tensor], outtype: str):
    import gguf

    w = gguf.GGUFWriter(path=None, arch=keys.ARCH)
    keys.write_rows(w, rows)
    types: dict[str, str] = {}
    for t in plan:
        qtype = tensor_type(t.name, t.shape, outtype)
        types[t.name] = qtype
        # element shape + raw_dtype: the writer stores the shape as is (not a byte shape)
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, qtype),
                          raw_dtype=gguf.GGMLQuantizationType[qtype])
    return w, types


# -- conversion ----------------------------------------------------------------------------------------

def convert_source(source: TensorSource, outputs: Sequence[tuple[str | Path, str]], *, name: str = "model",
                   chat_template: str | None = "alpaca", tokenizer_model: Path | None = None,
                   show_progress: bool = True, scratch: Collection[str | Path] = ()) -> ConvertResult:
    """Write one GGUF per ``(path, outtype)`` from a :class:`TensorSource`, reading each tensor once.

    Args:
        source: the model (an HF checkpoint from ``open_hf`` or ``merged_source``).
        outputs: ``[(path, "f16"), (path2, "q8_0"), ...]``; each path is written atomically.
        name: ``general.name``.
        chat_template: alpaca, alpaca-2, a Jinja file path, or None / "none" to write none.
        tokenizer_model: a ``tokenizer.model`` to use instead of ``source.tokenizer_dir``'s.
        show_progress: draw a progress bar on stderr.
        scratch: output paths that a later step consumes and deletes (deploy's intermediate GGUF):
            renamed into place atomically but not fsynced.

    Raises:
        CheckpointError / ShapeMismatchError / TokenizerError: the model or tokenizer is unusable.
    """
    t0 = time.perf_counter()
    if not outputs:
        raise ConfigError("no output requested")
    outs = [(Path(p), check_outtype(t)) for p, t in outputs]
    template = resolve_chat_template(chat_template)
    p = llama_params(source.config)
    plan = _plan_tensors(source, p)
    vocab = load_vocab(source.tokenizer_dir, source.config, tokenizer_model)

    writers = []
    for path, outtype in outs:
        rows = _metadata(p, vocab, keys.file_type(OUTTYPES[outtype]), name, template)
        writers.append((path, outtype, *_new_writer(rows, plan, outtype)))

    n_params = sum(int(np.prod(t.shape)) for t in plan)
    with contextlib.ExitStack() as stack:
        scratch_paths = {Path(x) for x in scratch}
        tmp_paths = [stack.enter_context(atomic_path(path, durable=path not in scratch_paths))
                     for path, *_ in writers]
        for tmp, (_, _, w, _) in zip(tmp_paths, writers):
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        bar = stack.enter_context(_progress(show_progress))
        task = bar.add_task("convert", total=n_params) if bar else None  # advanced by parameters written
        for t, data in _tensors(source, plan, p):
            for _, _, w, types in writers:
                _write_tensor(w, data, types[t.name])
            del data
            if bar:
                bar.update(task, advance=int(np.prod(t.shape)))
        for _, _, w, _ in writers:
            w.close()

    results = []
    for path, outtype, _, types in writers:
        counts: dict[str, int] = {}
        for q in types.values():
            counts[q] = counts.get(q, 0) + 1
        results.append(GGUFOutput(path=path, outtype=outtype, size_bytes=path.stat().st_size, tensor_types=counts))
    return ConvertResult(outputs=results, n_tensors=len(plan), n_params=n_params, vocab_size=p.vocab_size,
                         seconds=time.perf_counter() - t0)


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from cllama_deploy.progress import progress

    with progress(transient=True) as bar:
        yield bar


def convert(config: ConvertConfig) -> ConvertResult:
    """Convert an HF LLaMA directory to GGUF (``cllama-deploy convert``).

    Raises:
        ConfigError: bad options. CheckpointError / ShapeMismatchError / TokenizerError: unusable input.
    """
    from cllama_deploy.merge import merged_source

    # merged_source with no adapters = the checkpoint itself, after every invariant check
    # (vocab_size = embedding rows = lm_head rows = tokenizer tokens, head counts).
    source = merged_source(config.model_dir, [], check_tokenizer=config.tokenizer is None)
    return convert_source(source, [(config.out, config.outtype)], name=config.name or config.model_dir.name,
                          chat_template=config.chat_template, tokenizer_model=config.tokenizer,
                          show_progress=config.show_progress)
