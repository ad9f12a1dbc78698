"""Every GGUF metadata key, file type and token type cllama-deploy reads or writes: one table, on the
``gguf`` package's own constants (``gguf.Keys``, ``gguf.LlamaFileType``, ``gguf.TokenType``).

Writers build ``(key, value, GGUFValueType name)`` rows and hand them to :func:`write_rows`; readers
look keys up here. No other module spells a key.
"""

from __future__ import annotations

from typing import Any, Iterable

import gguf

ARCH = "llama"  # the only architecture we write
_K = gguf.Keys


def arch_key(template: str, arch: str = ARCH) -> str:
    """``{arch}.block_count`` → ``llama.block_count``."""
    return template.format(arch=arch)


# -- general.* ----------------------------------------------------------------------------------------
GENERAL_TYPE = _K.General.TYPE
NAME = _K.General.NAME
ARCHITECTURE = _K.General.ARCHITECTURE
FILE_TYPE = _K.General.FILE_TYPE
QUANTIZATION_VERSION = _K.General.QUANTIZATION_VERSION
# written by llama.cpp's converter only (from the directory name); we compare against them
SIZE_LABEL = _K.General.SIZE_LABEL
BASENAME = _K.General.BASENAME
FINETUNE = _K.General.FINETUNE

# -- {arch}.* hyper-parameters (the LLaMA ones) ---------------------------------------------------
BLOCK_COUNT = arch_key(_K.LLM.BLOCK_COUNT)
CONTEXT_LENGTH = arch_key(_K.LLM.CONTEXT_LENGTH)
EMBEDDING_LENGTH = arch_key(_K.LLM.EMBEDDING_LENGTH)
FEED_FORWARD_LENGTH = arch_key(_K.LLM.FEED_FORWARD_LENGTH)
VOCAB_SIZE = arch_key(_K.LLM.VOCAB_SIZE)
HEAD_COUNT = arch_key(_K.Attention.HEAD_COUNT)
HEAD_COUNT_KV = arch_key(_K.Attention.HEAD_COUNT_KV)
KEY_LENGTH = arch_key(_K.Attention.KEY_LENGTH)
VALUE_LENGTH = arch_key(_K.Attention.VALUE_LENGTH)
RMS_EPS = arch_key(_K.Attention.LAYERNORM_RMS_EPS)
ROPE_DIMENSION_COUNT = arch_key(_K.Rope.DIMENSION_COUNT)
ROPE_FREQ_BASE = arch_key(_K.Rope.FREQ_BASE)
ROPE_SCALING_TYPE = arch_key(_K.Rope.SCALING_TYPE)
ROPE_SCALING_FACTOR = arch_key(_K.Rope.SCALING_FACTOR)
ROPE_SCALING_ORIG_CTX_LEN = arch_key(_K.Rope.SCALING_ORIG_CTX_LEN)
# HF rope_scaling key → GGUF key, for yarn (written when the HF config has them)
ROPE_YARN_KEYS = {
    "extrapolation_factor": arch_key(_K.Rope.SCALING_YARN_EXT_FACTOR),
    "attention_factor": arch_key(_K.Rope.SCALING_YARN_ATTN_FACTOR),
    "beta_fast": arch_key(_K.Rope.SCALING_YARN_BETA_FAST),
    "beta_slow": arch_key(_K.Rope.SCALING_YARN_BETA_SLOW),
}

# -- tokenizer.* --------------------------------------------------------------------------------------
TOKENIZER_MODEL = _K.Tokenizer.MODEL
TOKENIZER_PRE = _K.Tokenizer.PRE
TOKENS = _K.Tokenizer.LIST
SCORES = _K.Tokenizer.SCORES
TOKEN_TYPES = _K.Tokenizer.TOKEN_TYPE
MERGES = _K.Tokenizer.MERGES
ADD_SPACE_PREFIX = _K.Tokenizer.ADD_PREFIX
REMOVE_EXTRA_WHITESPACES = _K.Tokenizer.REMOVE_EXTRA_WS
CHAT_TEMPLATE = _K.Tokenizer.CHAT_TEMPLATE
# special token kind → id key. Only the kinds gguf.GGUFWriter can write: gguf.SpecialVocab (what
# llama.cpp's converter uses) skips the others (e.g. "cls"), and so do we.
SPECIAL_ID_KEYS = {
    "bos": _K.Tokenizer.BOS_ID,
    "eos": _K.Tokenizer.EOS_ID,
    "unk": _K.Tokenizer.UNK_ID,
    "sep": _K.Tokenizer.SEP_ID,  # llama.cpp spells it "seperator_token_id"
    "pad": _K.Tokenizer.PAD_ID,
    "mask": _K.Tokenizer.MASK_ID,
}
ADD_SPECIAL_KEYS = {"bos": _K.Tokenizer.ADD_BOS, "eos": _K.Tokenizer.ADD_EOS}
# arrays too long to print whole (inspect shows their length)
LONG_ARRAYS = (TOKENS, SCORES, TOKEN_TYPES, MERGES)

# -- numbers ------------------------------------------------------------------------------------------
# GGML_QNT_VERSION, what llama.cpp's converter writes as general.quantization_version
QUANT_VERSION = gguf.GGML_QUANT_VERSION

# tokenizer.ggml.token_type values (llama_token_type), by name (0: LLAMA_TOKEN_TYPE_UNDEFINED)
TOKEN_TYPE_NAMES = {0: "undefined", **{int(t): t.name.lower() for t in gguf.TokenType}}


def _ftype_member(name: str) -> str:
    key = str(name).strip().upper()
    return "ALL_F32" if key == "F32" else f"MOSTLY_{key}"


def file_type(name: str) -> int:
    """``general.file_type`` (llama_ftype) of a type name: F32 → 0, F16 → 1, Q4_K_M → 15, ...

    From ``gguf.LlamaFileType``; a type newer than the installed gguf package (Q2_0) comes from the
    installed llama.cpp's ``LLAMA_FTYPE_*`` constant (tests/gguf check that both agree).

    Raises:
        KeyError: a name llama.cpp has no file type for.
    """
    member = _ftype_member(name)
    if member in gguf.LlamaFileType.__members__:
        return int(gguf.LlamaFileType[member])
    value = getattr(_llama_cpp(), f"LLAMA_FTYPE_{member}", None)
    if value is None:
        raise KeyError(name)
    return int(value)


def file_type_name(number: int) -> str | None:
    """The type name of a ``general.file_type`` value (15 → Q4_K_M); None when unknown."""
    number = int(number)
    names = {int(v): k for k, v in gguf.LlamaFileType.__members__.items()}
    member = names.get(number)
    if member is None:
        lc = _llama_cpp()
        member = next((c.removeprefix("LLAMA_FTYPE_") for c in dir(lc) if c.startswith("LLAMA_FTYPE_")
                       and getattr(lc, c) == number), None)
    if member is None or member == "GUESSED":
        return None
    return "F32" if member == "ALL_F32" else member.removeprefix("MOSTLY_")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:  # pragma: no cover - llama-cpp-python is a core dependency
        return None
    return llama_cpp


# -- writing ------------------------------------------------------------------------------------------

def write_rows(writer: "gguf.GGUFWriter", rows: Iterable[tuple[str, Any, str]]) -> None:
    """Add ``(key, value, GGUFValueType name)`` rows to a writer, in order (arrays: element type from
    the values, as ``GGUFWriter.add_array`` decides, which is what llama.cpp's converter does)."""
    for key, value, vtype in rows:
        if vtype == "ARRAY":
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
