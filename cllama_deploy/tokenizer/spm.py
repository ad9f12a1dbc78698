"""SentencePiece model files: parse, inspect and serialize the protobuf, with clear errors.

SentencePiece ships its own protobuf classes (``sentencepiece.sentencepiece_model_pb2``); merging,
rebuilding from GGUF and the HF directory all work on that ``ModelProto``. Serialization must stay
byte-identical to what SentencePiece's own scripts produce (the seed's published SHA256 depend on it),
so nothing here re-encodes a model that was only read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from cllama_deploy.errors import TokenizerError

# SentencePiece's ModelProto.SentencePiece.Type values (sentencepiece_model.proto).
PIECE_TYPE_NAMES = {
    1: "NORMAL",
    2: "UNKNOWN",
    3: "CONTROL",
    4: "USER_DEFINED",
    5: "UNUSED",
    6: "BYTE",
}
# TrainerSpec.ModelType values.
MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

SPACE = "\u2581"  # "▁", SentencePiece's escaped whitespace

# a path, serialized bytes, or a ModelProto
ModelSource = Union[str, os.PathLike, bytes, Any]


def pb2():
    """The protobuf module bundled with sentencepiece."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def parse_model(data: bytes, origin: str = "<bytes>"):
    """Parse serialized SentencePiece model bytes into a ``ModelProto``.

    Raises:
        TokenizerError: the bytes are not a SentencePiece model (the message names ``origin``).
    """
    from google.protobuf.message import DecodeError

    proto = pb2().ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise TokenizerError(f"{origin} is not a SentencePiece model ({exc}); pass a tokenizer.model file") from exc
    if not proto.pieces:
        raise TokenizerError(f"{origin} is not a SentencePiece model (it has no pieces); pass a tokenizer.model file")
    return proto


def load_model(source: ModelSource):
    """A ``ModelProto`` from a path, serialized bytes or an existing ``ModelProto`` (returned as is)."""
    if isinstance(source, (bytes, bytearray)):
        return parse_model(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such SentencePiece model file")
        return parse_model(path.read_bytes(), str(path))
    if hasattr(source, "pieces") and hasattr(source, "SerializeToString"):
        return source
    raise TypeError(f"cannot load a SentencePiece model from {type(source).__name__}")


def model_bytes(source: ModelSource) -> bytes:
    """Serialized bytes of a model; files are read verbatim (never re-serialized)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such SentencePiece model file")
        return path.read_bytes()
    return load_model(source).SerializeToString()


def processor(source: ModelSource):
    """A ``SentencePieceProcessor`` for a path, bytes or ``ModelProto``."""
    import sentencepiece as spm

    data = model_bytes(source)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(f"SentencePiece refused the model: {exc}") from exc
    return sp


def model_type_name(proto) -> str:
    return MODEL_TYPE_NAMES.get(proto.trainer_spec.model_type, str(proto.trainer_spec.model_type))


def piece_type_name(value: int) -> str:
    return PIECE_TYPE_NAMES.get(value, str(value))
