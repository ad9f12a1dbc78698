"""Hugging Face tokenizer directories that encode exactly like SentencePiece.

Why this module exists: in transformers 5, ``LlamaTokenizer`` is backed by the ``tokenizers``
library, which rebuilds a BPE with a ranked merge list from ``tokenizer.model``. SentencePiece's BPE
encoder instead merges by piece *score* and breaks ties by position. After the vocabulary extension
17953 pieces share score 0, and the two algorithms disagree on a large share of real Chinese lines
(measured in ``benchmarks/hf_tokenizer_parity.py``). llama.cpp encodes exactly like SentencePiece, so
a model trained on ``tokenizers`` ids and served by llama.cpp would be silently degraded.

transformers 5 ships ``SentencePieceBackend`` (``transformers.tokenization_utils_sentencepiece``),
a slow tokenizer that calls ``sentencepiece`` itself, and ``AutoTokenizer`` resolves a
``tokenizer_class`` it finds in the top-level ``transformers`` namespace. So the directory we write
says ``"tokenizer_class": "SentencePieceBackend"`` and ``"legacy": true`` (plain
``sp.encode``, no prefix trick), carries no ``tokenizer.json`` (other tools would prefer it and
encode with ``tokenizers`` again) and sets ``"special_tokens_pattern": "bos"`` because that class
adds BOS through that key (it ignores ``add_bos_token``, which we still write for llama.cpp's
converter and for readers). No ``trust_remote_code`` is involved.

Two weaknesses of plain ``SentencePieceBackend`` are fixed in :func:`load_tokenizer`'s class (our
subclass; use it in our own code): its ``decode`` joins pieces as text (byte-fallback pieces come
out as ``<0xE4>``, surrounding spaces are stripped), and its ``save_pretrained`` drops
``special_tokens_pattern`` (a re-saved directory would stop adding BOS). The subclass decodes with
SentencePiece and saves through :func:`write_hf_tokenizer_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from cllama_deploy.errors import TokenizerError
from cllama_deploy.tokenizer.spm import parse_model, processor

HF_TOKENIZER_CLASS = "SentencePieceBackend"
GGUF_MAGIC = b"GGUF"


def _pattern(add_bos: bool, add_eos: bool) -> str:
    return {(True, True): "bos_eos", (True, False): "bos", (False, True): "eos"}.get((add_bos, add_eos), "none")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_sp_model(path: str | os.PathLike) -> bytes:
    """SentencePiece model bytes from a ``tokenizer.model`` file, an HF tokenizer dir or a GGUF file.

    A ``.model`` file is returned verbatim (so hashes of derived files stay reproducible); a GGUF's
    vocabulary is rebuilt with :func:`cllama_deploy.tokenizer.gguf_vocab.sp_model_from_gguf`.

    Raises:
        TokenizerError: the path is none of the three, or the directory has no ``tokenizer.model``.
    """
    p = Path(path)
    if p.is_dir():
        model = p / "tokenizer.model"
        if not model.is_file():
            hint = " (it has only tokenizer.json, which is not a SentencePiece model)" if (p / "tokenizer.json").exists() else ""
            raise TokenizerError(
                f"{p} has no tokenizer.model{hint}; pass a SentencePiece tokenizer.model, an HF directory that "
                "contains one, or a GGUF file"
            )
        p = model
    if not p.is_file():
        raise TokenizerError(f"{p}: no such tokenizer file or directory")
    if is_gguf(p):
        from cllama_deploy.tokenizer.gguf_vocab import sp_model_from_gguf

        return sp_model_from_gguf(p).SerializeToString()
    data = p.read_bytes()
    parse_model(data, str(p))  # validate; the bytes are returned untouched
    return data


def _template_text(spec: str) -> str:
    """A built-in name (alpaca, alpaca-2), a path to a .jinja file, or Jinja text itself."""
    from cllama_deploy.prompts import TEMPLATES, load_chat_template

    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{" in spec or "\n" in spec:
        return spec
    return load_chat_template(spec)


def hf_tokenizer_config(sp_model, *, pad_token: str | None = None, chat_template: str | None = "alpaca",
                        add_bos_token: bool = True, add_eos_token: bool = False) -> tuple[dict, dict]:
    """``(tokenizer_config, special_tokens_map)`` for a SentencePiece model (path, bytes or proto).

    Special tokens must be pieces of the model: a token HF would add beyond the SentencePiece
    vocabulary gets an id no embedding row and no GGUF token has.
    """
    sp = processor(sp_model)
    size = sp.get_piece_size()
    special: dict[str, tuple[str, int]] = {}
    for name, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        if 0 <= idx < size:
            special[name] = (sp.id_to_piece(idx), idx)
    if pad_token is not None:
        pid = sp.piece_to_id(pad_token)
        if sp.id_to_piece(pid) != pad_token:
            raise TokenizerError(
                f"pad token {pad_token!r} is not a piece of the tokenizer; add it to the SentencePiece model "
                "first (tokenizer merge --pad-token appends [PAD])"
            )
        special["pad_token"] = (pad_token, pid)
    decoder = {
        str(idx): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}
        for text, idx in sorted(special.values(), key=lambda item: item[1])
    }
    config = {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        "backend": "sentencepiece",
        "legacy": True,
        "add_bos_token": add_bos_token,
        "add_eos_token": add_eos_token,
        "special_tokens_pattern": _pattern(add_bos_token, add_eos_token),
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
        "added_tokens_decoder": decoder,
        **{name: text for name, (text, _) in special.items()},
    }
    if pad_token is None:
        config["pad_token"] = None
    if chat_template:
        config["chat_template"] = _template_text(chat_template)
    special_map = {name: text for name, (text, _) in special.items()}
    return config, special_map


def write_hf_tokenizer_dir(sp_model_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                           pad_token: str | None = None, chat_template: str | None = "alpaca",
                           add_bos_token: bool = True, add_eos_token: bool = False) -> Path:
    """Write an HF tokenizer directory around a SentencePiece model.

    Files: ``tokenizer.model`` (copied unless already there), ``tokenizer_config.json``,
    ``special_tokens_map.json``. ``AutoTokenizer.from_pretrained(out_dir)`` then encodes exactly like
    ``sentencepiece`` (see the module docstring). Writes in place: callers that need atomicity
    write into a temporary directory (``files.atomic_dir``).

    Args:
        sp_model_path: the SentencePiece ``.model`` file.
        out_dir: directory to write (created if missing).
        pad_token: a piece of the model to use for padding (``"[PAD]"`` after ``merge --pad-token``),
            or None for no pad token (LLaMA has none).
        chat_template: ``alpaca``, ``alpaca-2``, a ``.jinja`` path, template text, or None.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(sp_model_path)
    dst = out / "tokenizer.model"
    if not dst.exists() or not os.path.samefile(src, dst):
        shutil.copyfile(src, dst)
    config, special_map = hf_tokenizer_config(
        dst, pad_token=pad_token, chat_template=chat_template,
        add_bos_token=add_bos_token, add_eos_token=add_eos_token,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # A tokenizer.json left from an earlier tool would make other loaders use `tokenizers` again.
    stale = out / "tokenizer.json"
    if stale.exists():
        stale.unlink()
    return out


_CLASS = None


def sentencepiece_tokenizer_class():
    """Our ``SentencePieceBackend`` subclass (built on first use: transformers is a heavy import)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from cllama_deploy.errors import require

    require("transformers", "train")
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class CllamaSentencePieceTokenizer(SentencePieceBackend):
        """SentencePiece-exact encoding and decoding; BOS/EOS from ``add_bos_token``/``add_eos_token``."""

        def __init__(self, vocab_file=None, add_bos_token: bool = True, add_eos_token: bool = False, **kwargs):
            kwargs["legacy"] = True  # plain sp.encode: anything else diverges from SentencePiece
            kwargs["special_tokens_pattern"] = _pattern(bool(add_bos_token), bool(add_eos_token))
            kwargs.setdefault("clean_up_tokenization_spaces", False)
            self.add_bos_token = bool(add_bos_token)
            self.add_eos_token = bool(add_eos_token)
            super().__init__(vocab_file=vocab_file, **kwargs)

        def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                    **kwargs) -> str:
            ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
            special = set(self.all_special_ids) | {i for i in self._added_tokens_decoder}
            size = self.sp_model.get_piece_size()
            parts: list[str] = []
            run: list[int] = []
            for idx in ids:
                if idx in special or idx >= size:
                    if run:
                        parts.append(self.sp_model.decode(run))
                        run = []
                    if not skip_special_tokens:
                        parts.append(self.convert_ids_to_tokens(idx))
                else:
                    run.append(idx)
            if run:
                parts.append(self.sp_model.decode(run))
            return "".join(parts)

        def save_pretrained(self, save_directory, *args, **kwargs):
            """Write our directory format (``SentencePieceBackend`` config), never this class's name."""
            template = self.chat_template if isinstance(self.chat_template, str) else None
            write_hf_tokenizer_dir(self.vocab_file, save_directory, pad_token=self.pad_token,
                                   chat_template=template, add_bos_token=self.add_bos_token,
                                   add_eos_token=self.add_eos_token)
            out = Path(save_directory)
            return tuple(str(out / n) for n in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"))

    _CLASS = CllamaSentencePieceTokenizer
    return _CLASS


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """The HF tokenizer that encodes exactly like SentencePiece, for training and evaluation code.

    ``path`` is an HF tokenizer/model directory with a ``tokenizer.model`` (ours or any LLaMA-style
    one: its special tokens, ``add_bos_token``/``add_eos_token`` and chat template are honoured, its
    ``tokenizer_class`` is not) or a bare ``tokenizer.model`` (BOS added, no EOS, no pad token).

    Raises:
        TokenizerError: no ``tokenizer.model`` at ``path``.
    """
    cls = sentencepiece_tokenizer_class()
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.model").is_file():
            raise TokenizerError(
                f"{p} has no tokenizer.model; SentencePiece-exact encoding needs the SentencePiece model "
                "(write the directory with `cllama-deploy tokenizer merge` or copy tokenizer.model into it)"
            )
        return cls.from_pretrained(str(p), **kwargs)
    if not p.is_file():
        raise TokenizerError(f"{p}: no such tokenizer file or directory")
    sp = processor(p)
    specials = {}
    for name, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        if idx >= 0:
            specials[name] = sp.id_to_piece(idx)
    specials.update(kwargs)
    return cls(vocab_file=str(p), **specials)


def compare_with_sentencepiece(tokenizer, sp_model, lines: Iterable[str], add_bos: bool = True,
                               max_examples: int = 3) -> dict:
    """Count lines whose HF ids differ from SentencePiece's (``[bos] + sp.encode(line)``)."""
    sp = processor(sp_model)
    bos = [sp.bos_id()] if add_bos and sp.bos_id() >= 0 else []
    total = mismatches = 0
    examples: list[dict] = []
    for line in lines:
        total += 1
        want = bos + sp.encode(line)
        got = list(tokenizer(line)["input_ids"])
        if got != want:
            mismatches += 1
            if len(examples) < max_examples:
                examples.append({"line": line[:80], "sentencepiece": want[:16], "hf": got[:16]})
    return {"lines": total, "mismatches": mismatches,
            "rate": (mismatches / total) if total else 0.0, "examples": examples}
