"""SentencePiece ⇄ GGUF vocabulary, both directions.

``gguf_vocab_from_sp`` computes the ``tokenizer.ggml.*`` metadata that llama.cpp's
``convert_hf_to_gguf.py`` writes for a SentencePiece LLaMA vocabulary (its
``_create_vocab_sentencepiece`` + ``gguf.SpecialVocab``), so our converter writes the same
vocabulary without that script. ``sp_model_from_gguf`` goes back: it rebuilds a SentencePiece
``ModelProto`` that encodes like llama.cpp's SPM tokenizer (a BPE model over the GGUF's tokens and
scores, identity normalizer, space prefix and whitespace handling from the GGUF keys).

Facts about the format (from llama.cpp's converter and ``src/llama-vocab.cpp``, used as reference):

* token types are llama.cpp's ``llama_token_type`` / ``gguf.TokenType`` numbers, which happen to equal
  SentencePiece's piece type numbers; the converter decides the type with
  ``IsUnknown/IsControl/IsUnused/IsByte`` only, so a SentencePiece USER_DEFINED piece becomes NORMAL;
* ids beyond the SentencePiece model up to the config's ``vocab_size`` are ``[PAD{id}]``, score
  -10000, UNUSED; tokens from ``added_tokens.json`` are USER_DEFINED with score -1000; entries of
  ``tokenizer_config.json``'s ``added_tokens_decoder`` become CONTROL (``special``) or USER_DEFINED,
  score -1000;
* special ids: names in ``tokenizer_config.json`` resolve to ids only through ``tokenizer.json``'s
  ``added_tokens``; ``config.json``'s ``*_token_id`` fill the rest; ``add_bos_token``/``add_eos_token``
  and ``chat_template`` come from ``tokenizer_config.json``; llama.cpp's SPM defaults for missing keys
  are bos 1, eos 2, unk 0, add_bos true, add_eos false, add_space_prefix true,
  remove_extra_whitespaces false.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cllama_deploy.errors import ConfigError, TokenizerError
from cllama_deploy.options import option
from cllama_deploy.tokenizer.spm import load_model, pb2, processor

# gguf.TokenType / llama_token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# SentencePiece piece type -> GGUF token type, as convert_hf_to_gguf.py decides it.
SP_TO_GGUF_TOKEN_TYPE = {
    1: NORMAL,        # NORMAL: ordinary piece
    2: UNKNOWN,       # UNKNOWN: IsUnknown()
    3: CONTROL,       # CONTROL: IsControl() (<s>, </s>)
    4: NORMAL,        # USER_DEFINED: none of IsUnknown/IsControl/IsUnused/IsByte, so NORMAL
    5: UNUSED,        # UNUSED: IsUnused()
    6: BYTE,          # BYTE: IsByte() (<0x00>..<0xFF> byte-fallback pieces)
}
# GGUF token type -> SentencePiece piece type when rebuilding a model (same numbering).
GGUF_TO_SP_PIECE_TYPE = {
    NORMAL: 1,
    UNKNOWN: 2,
    CONTROL: 3,
    USER_DEFINED: 4,  # llama.cpp matches these in raw text before SPM, as SentencePiece does
    UNUSED: 5,
    BYTE: 6,
}
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
PAD_FILL_SCORE = -10000.0    # ids past the SentencePiece model, up to config vocab_size
ADDED_TOKEN_SCORE = -1000.0  # added_tokens.json / added_tokens_decoder entries
@dataclass
class GGUFVocab:
    """The ``tokenizer.*`` metadata of a SentencePiece (llama.cpp "llama"/SPM) GGUF."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_bos: Optional[bool] = None
    add_eos: Optional[bool] = None
    chat_template: Optional[str] = None
    add_space_prefix: Optional[bool] = None
    remove_extra_whitespaces: Optional[bool] = None
    other_special_ids: dict = field(default_factory=dict)  # sep / cls / mask when present
    model: str = "llama"
    pre: str = "default"

    @property
    def special_ids(self) -> dict:
        ids = {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}
        ids.update(self.other_special_ids)
        return {k: v for k, v in ids.items() if v is not None}

    def metadata_rows(self) -> list[tuple]:
        """``(key, value, GGUFValueType name)`` rows, in the order and with the types llama.cpp's
        converter writes them (``tokenizer.*``; the chat template when set)."""
        from cllama_deploy.gguf import keys

        rows: list[tuple] = [
            (keys.TOKENIZER_MODEL, self.model, "STRING"),
            (keys.TOKENIZER_PRE, self.pre, "STRING"),
            (keys.TOKENS, list(self.tokens), "ARRAY"),
            (keys.SCORES, [float(x) for x in self.scores], "ARRAY"),
            (keys.TOKEN_TYPES, [int(x) for x in self.token_types], "ARRAY"),
        ]
        if self.add_space_prefix is not None:
            rows.append((keys.ADD_SPACE_PREFIX, bool(self.add_space_prefix), "BOOL"))
        if self.remove_extra_whitespaces is not None:
            rows.append((keys.REMOVE_EXTRA_WHITESPACES, bool(self.remove_extra_whitespaces), "BOOL"))
        for kind, tid in self.special_ids.items():
            if kind in keys.SPECIAL_ID_KEYS and tid >= 0:
                rows.append((keys.SPECIAL_ID_KEYS[kind], int(tid), "UINT32"))
        for kind in ("bos", "eos"):
            flag = getattr(self, f"add_{kind}")
            if flag is not None:
                rows.append((keys.ADD_SPECIAL_KEYS[kind], bool(flag), "BOOL"))
        if self.chat_template is not None:
            rows.append((keys.CHAT_TEMPLATE, self.chat_template, "STRING"))
        return rows

    def write_to(self, writer) -> None:
        """Add the metadata to a ``gguf.GGUFWriter`` (same keys, order and types as llama.cpp's converter)."""
        from cllama_deploy.gguf.keys import write_rows

        write_rows(writer, self.metadata_rows())


def _looks_special(text: str) -> bool:
    # The converter treats these added tokens as control even when not flagged special.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc})") from exc


def gguf_vocab_from_sp(model, *, vocab_size: Optional[int] = None, hf_dir: str | os.PathLike | None = None) -> GGUFVocab:
    """GGUF vocabulary metadata for a SentencePiece model.

    Args:
        model: ``tokenizer.model`` path, its bytes, or a ``ModelProto``.
        vocab_size: the model config's ``vocab_size`` (embedding rows); ids past the tokenizer are
            filled with ``[PAD{id}]`` as llama.cpp does. Smaller than the tokenizer is an error.
        hf_dir: the HF directory the model comes from; its ``tokenizer_config.json``,
            ``added_tokens.json``, ``tokenizer.json`` and ``config.json`` are read exactly as
            llama.cpp's converter reads them. Without it, special ids and BOS/EOS flags come from
            the SentencePiece model itself (llama.cpp's SPM defaults, written explicitly).

    Raises:
        TokenizerError: ``vocab_size`` below the tokenizer size, or an added token out of range.
    """
    proto = load_model(model)
    sp = processor(proto)
    n_sp = sp.get_piece_size()
    n = n_sp if vocab_size is None else int(vocab_size)
    if n < n_sp:
        raise TokenizerError(
            f"the model's vocab_size ({n}) is smaller than its tokenizer ({n_sp} pieces); tokens past row {n} "
            "would have no embedding. Resize the embeddings or use the matching tokenizer"
        )
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [PAD_FILL_SCORE] * n
    types = [UNUSED] * n
    for i, piece in enumerate(proto.pieces):
        tokens[i] = piece.piece
        scores[i] = piece.score
        types[i] = SP_TO_GGUF_TOKEN_TYPE[piece.type]
    ns = proto.normalizer_spec
    vocab = GGUFVocab(tokens=tokens, scores=scores, token_types=types)
    # llama.cpp assumes a space prefix and no whitespace folding for SPM; say so only when the
    # SentencePiece model differs, otherwise llama.cpp would encode unlike SentencePiece.
    if not ns.add_dummy_prefix:
        vocab.add_space_prefix = False
    if ns.remove_extra_whitespaces:
        vocab.remove_extra_whitespaces = True
    if hf_dir is None:
        ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
        for typ, tid in ids.items():
            if 0 <= tid < n:
                setattr(vocab, f"{typ}_id", tid)
        vocab.add_bos, vocab.add_eos = True, False
        return vocab
    _apply_hf_dir(vocab, Path(hf_dir), n)
    return vocab


def _apply_hf_dir(vocab: GGUFVocab, d: Path, n: int) -> None:
    tokens, scores, types = vocab.tokens, vocab.scores, vocab.token_types
    added = _read_json(d / "added_tokens.json") or {}
    for text, tid in added.items():
        if not 0 <= tid < n:
            raise TokenizerError(f"{d / 'added_tokens.json'}: token {text!r} has id {tid}, outside the vocabulary of {n}")
        tokens[tid], scores[tid], types[tid] = text, ADDED_TOKEN_SCORE, USER_DEFINED
    tok_config = _read_json(d / "tokenizer_config.json")
    for key, data in ((tok_config or {}).get("added_tokens_decoder") or {}).items():
        tid, text = int(key), data["content"]
        if not 0 <= tid < n:
            raise TokenizerError(f"{d / 'tokenizer_config.json'}: added token {text!r} has id {tid}, outside the vocabulary of {n}")
        if data.get("special") or _looks_special(text):
            types[tid] = CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[tid] = USER_DEFINED
        scores[tid] = ADDED_TOKEN_SCORE
        tokens[tid] = text

    # gguf.SpecialVocab: ids from tokenizer.json's added_tokens, then config.json; first match wins.
    ids: dict[str, int] = {}
    add_flags: dict[str, bool] = {}

    def set_id(typ: str, tid) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n and typ not in ids:
            ids[typ] = tid

    tok_json = _read_json(d / "tokenizer.json")
    added_list = (tok_json or {}).get("added_tokens") or []
    if tok_json is not None and tok_config is not None:
        post = tok_json.get("post_processor") or {}
        for proc in post.get("processors", [post]) if post else []:
            if proc.get("type") == "TemplateProcessing":
                single = proc.get("single") or []
                if len(single) > 1:
                    first = single[0].get("SpecialToken", {}).get("id")
                    last = single[-1].get("SpecialToken", {}).get("id")
                    if first:
                        add_flags["bos"] = first == _token_text(tok_config.get("bos_token"))
                    if last:
                        add_flags["eos"] = last == _token_text(tok_config.get("eos_token"))
    if tok_config is not None:
        template = tok_config.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, str):
            vocab.chat_template = template
        for typ in SPECIAL_TYPES:
            flag = tok_config.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in add_flags:
                add_flags[typ] = flag
            text = _token_text(tok_config.get(f"{typ}_token"))
            if text is not None:
                set_id(typ, next((a.get("id") for a in added_list if a.get("content") == text), None))
        if isinstance(tok_config.get("add_prefix_space"), bool):
            vocab.add_space_prefix = tok_config["add_prefix_space"]
    config = _read_json(d / "config.json") or {}
    for typ in SPECIAL_TYPES:
        tid = config.get(f"{typ}_token_id")
        if tid is None and isinstance(config.get("text_config"), dict):
            tid = config["text_config"].get(f"{typ}_token_id")
        set_id(typ, tid)
    for typ in ("bos", "eos", "unk", "pad"):
        if typ in ids:
            setattr(vocab, f"{typ}_id", ids.pop(typ))
    vocab.other_special_ids = ids
    vocab.add_bos = add_flags.get("bos")
    vocab.add_eos = add_flags.get("eos")


def _token_text(entry) -> Optional[str]:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def gguf_vocab_from_hf_dir(model_dir: str | os.PathLike, vocab_size: Optional[int] = None) -> GGUFVocab:
    """Vocabulary for an HF model directory (``tokenizer.model`` + JSON files), as llama.cpp converts it.

    ``vocab_size`` defaults to ``config.json``'s ``vocab_size`` when present.
    """
    d = Path(model_dir)
    if not (d / "tokenizer.model").is_file():
        raise TokenizerError(f"{d} has no tokenizer.model; a SentencePiece vocabulary is needed")
    if vocab_size is None:
        vocab_size = (_read_json(d / "config.json") or {}).get("vocab_size")
    return gguf_vocab_from_sp(d / "tokenizer.model", vocab_size=vocab_size, hf_dir=d)


# --- GGUF -> SentencePiece -------------------------------------------------------------------


def read_gguf_vocab(path_or_reader) -> GGUFVocab:
    """The ``tokenizer.*`` metadata of a GGUF file (or an open ``gguf.GGUFReader``).

    Raises:
        InputError: the file is missing or not a readable GGUF. TokenizerError: it has no vocabulary.
    """
    from cllama_deploy.gguf import keys
    from cllama_deploy.gguf.reader import get_field, open_gguf

    if isinstance(path_or_reader, (str, os.PathLike)):
        reader, origin = open_gguf(path_or_reader, None), str(path_or_reader)
    else:
        reader, origin = path_or_reader, "the GGUF"

    def get(key, default=None):
        # surrogateescape: a token that is not valid UTF-8 keeps its bytes
        return get_field(reader, key, default, errors="surrogateescape")

    model = get(keys.TOKENIZER_MODEL)
    if model is None or keys.TOKENS not in reader.fields:
        raise TokenizerError(f"{origin} has no tokenizer vocabulary ({keys.TOKENIZER_MODEL} / {keys.TOKENS} "
                             "missing)")
    tokens = get(keys.TOKENS)
    n = len(tokens)
    vocab = GGUFVocab(
        tokens=tokens,
        scores=[float(s) for s in get(keys.SCORES, [0.0] * n)],
        token_types=[int(t) for t in get(keys.TOKEN_TYPES, [NORMAL] * n)],
        model=model, pre=get(keys.TOKENIZER_PRE, "default"),
        add_bos=get(keys.ADD_SPECIAL_KEYS["bos"]), add_eos=get(keys.ADD_SPECIAL_KEYS["eos"]),
        chat_template=get(keys.CHAT_TEMPLATE),
        add_space_prefix=get(keys.ADD_SPACE_PREFIX), remove_extra_whitespaces=get(keys.REMOVE_EXTRA_WHITESPACES),
    )
    for typ, key in keys.SPECIAL_ID_KEYS.items():
        tid = get(key)
        if tid is None:
            continue
        if typ in ("bos", "eos", "unk", "pad"):
            setattr(vocab, f"{typ}_id", int(tid))
        else:
            vocab.other_special_ids[typ] = int(tid)
    return vocab


def sp_model_from_gguf(path_or_reader):
    """Rebuild a SentencePiece ``ModelProto`` from a GGUF vocabulary (llama.cpp "llama"/SPM models).

    The model is BPE (llama.cpp's SPM tokenizer merges bigrams by score, as SentencePiece's BPE does),
    with an identity normalizer, the GGUF's space-prefix and whitespace settings (llama.cpp's
    defaults when absent), byte fallback when byte tokens exist, and llama.cpp's default special ids
    (unk 0, bos 1, eos 2) unless the GGUF names others.

    Raises:
        TokenizerError: the GGUF has no vocabulary, is not a SentencePiece ("llama") vocabulary, or
            its tokens cannot form a SentencePiece model (empty/duplicate tokens, no unknown token).
    """
    vocab = path_or_reader if isinstance(path_or_reader, GGUFVocab) else read_gguf_vocab(path_or_reader)
    if vocab.model != "llama":
        raise TokenizerError(
            f"the GGUF's tokenizer is '{vocab.model}', not a SentencePiece ('llama') vocabulary; "
            "only SentencePiece vocabularies can be rebuilt as tokenizer.model"
        )
    n = len(vocab.tokens)
    if not (len(vocab.scores) == len(vocab.token_types) == n):
        raise TokenizerError("the GGUF's token, score and token type lists differ in length")
    types = list(vocab.token_types)
    unk_id = vocab.unk_id if vocab.unk_id is not None else 0
    bos_id = vocab.bos_id if vocab.bos_id is not None else 1
    eos_id = vocab.eos_id if vocab.eos_id is not None else 2
    unknown = [i for i, t in enumerate(types) if t == UNKNOWN]
    if not unknown:
        if not 0 <= unk_id < n:
            raise TokenizerError("the GGUF vocabulary has no unknown token, which SentencePiece requires")
        types[unk_id] = UNKNOWN  # e.g. a converter that marked <unk> CONTROL
    else:
        if unk_id not in unknown:
            unk_id = unknown[0]
        for i in unknown:
            if i != unk_id:
                # SentencePiece allows one unknown piece; extra UNKNOWN-typed tokens (placeholders in
                # some vocabularies) are never produced from text by llama.cpp either, like CONTROL.
                types[i] = CONTROL
    seen: dict[str, int] = {}
    m = pb2().ModelProto()
    for i, (text, score, ttype) in enumerate(zip(vocab.tokens, vocab.scores, types)):
        if not text:
            raise TokenizerError(f"the GGUF vocabulary has an empty token at id {i}")
        if text in seen:
            raise TokenizerError(f"the GGUF vocabulary has the token {text!r} twice (ids {seen[text]} and {i})")
        seen[text] = i
        if ttype not in GGUF_TO_SP_PIECE_TYPE:
            raise TokenizerError(f"the GGUF token {i} ({text!r}) has unknown token type {ttype}")
        piece = m.pieces.add()
        piece.piece = text
        piece.score = score
        piece.type = GGUF_TO_SP_PIECE_TYPE[ttype]
    ts = m.trainer_spec
    ts.model_type = pb2().TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = any(t == BYTE for t in types)
    ts.unk_id = unk_id
    ts.bos_id = bos_id if 0 <= bos_id < n else -1
    ts.eos_id = eos_id if 0 <= eos_id < n else -1
    ts.pad_id = vocab.pad_id if vocab.pad_id is not None and 0 <= vocab.pad_id < n else -1
    ts.unk_piece = vocab.tokens[unk_id]
    if ts.bos_id >= 0:
        ts.bos_piece = vocab.tokens[ts.bos_id]
    if ts.eos_id >= 0:
        ts.eos_piece = vocab.tokens[ts.eos_id]
    if ts.pad_id >= 0:
        ts.pad_piece = vocab.tokens[ts.pad_id]
    ts.unk_surface = " \u2047 "
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True if vocab.add_space_prefix is None else bool(vocab.add_space_prefix)
    ns.remove_extra_whitespaces = bool(vocab.remove_extra_whitespaces)
    ns.escape_whitespaces = True
    processor(m)  # SentencePiece must accept it
    return m


@dataclass
class FromGGUFConfig:
    """Options of ``cllama-deploy tokenizer from-gguf``."""

    gguf_file: Path = option(help="GGUF file with a SentencePiece ('llama') vocabulary.", argument=True,
                             metavar="GGUF_FILE")
    out: Path = option(Path("tokenizer.model"), "Output SentencePiece .model file.", flag=("--out", "-o"))

    def __post_init__(self) -> None:
        from cllama_deploy.gguf.reader import check_gguf_file

        self.gguf_file, self.out = check_gguf_file(self.gguf_file, "GGUF_FILE"), Path(self.out)
        if self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a directory; give the path of the .model file to write")


def write_sp_model_from_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """``tokenizer from-gguf``: rebuild and atomically write ``tokenizer.model``; returns a summary."""
    from cllama_deploy.files import atomic_path, sha256_file

    model = sp_model_from_gguf(gguf_path)
    with atomic_path(out) as tmp:
        tmp.write_bytes(model.SerializeToString())
    ts = model.trainer_spec
    return {"out": str(out), "pieces": len(model.pieces), "unk_id": ts.unk_id, "bos_id": ts.bos_id,
            "eos_id": ts.eos_id, "pad_id": ts.pad_id, "byte_fallback": ts.byte_fallback,
            "add_dummy_prefix": model.normalizer_spec.add_dummy_prefix, "sha256": sha256_file(out)}


def write_vocab_only_gguf(vocab: GGUFVocab, path: str | os.PathLike, name: str = "vocab-only") -> Path:
    """A GGUF with only a vocabulary (like llama.cpp's ``models/ggml-vocab-*.gguf`` test files).

    llama.cpp loads it with ``vocab_only=True``; the small LLaMA hyper-parameters it also reads are
    placeholders. Used by tests and the parity benchmarks.
    """
    import gguf

    from cllama_deploy.files import atomic_path

    out = Path(path)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name)
        writer.add_block_count(1)
        writer.add_context_length(2048)
        writer.add_embedding_length(64)
        writer.add_feed_forward_length(128)
        writer.add_head_count(1)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(vocab.tokens))
        vocab.write_to(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
