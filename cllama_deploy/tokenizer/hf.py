"""Hugging Face tokenizer directories that encode exactly like SentencePiece, for transformers 5 or 4.

Why this module exists: ``LlamaTokenizer``'s fast tokenizer (the default in transformers 4, the only one
in transformers 5) is backed by the ``tokenizers`` library, which rebuilds a BPE with a ranked merge list
from ``tokenizer.model``. SentencePiece's BPE encoder instead merges by piece *score* and breaks ties by
position. After the vocabulary extension 17953 pieces share score 0, and no ranking of merges can break
those ties by position, so the two disagree on a large share of real Chinese lines (measured in
benchmarks/transformers4_compat.py and RESULTS.md). llama.cpp encodes exactly like SentencePiece, so a
model trained on ``tokenizers`` ids and served by llama.cpp would be silently degraded.

Only a slow tokenizer that calls ``sentencepiece`` itself is exact, and the two major versions name it
differently, so one ``tokenizer_config.json`` cannot be exact by default on both (AutoTokenizer reads
the class from that one file): :data:`TARGETS` says what each choice gives.

* ``transformers5`` (the default): ``"tokenizer_class": "SentencePieceBackend"``, a transformers 5
  class that ``AutoTokenizer`` resolves from the top-level namespace. Exact by default wherever it
  loads; transformers 4.x's ``AutoTokenizer`` cannot load it (a loud error, never a silent
  mis-tokenization), its ``LlamaTokenizer.from_pretrained`` (the seed's scripts) can, exactly.
* ``transformers4``: ``"tokenizer_class": "LlamaTokenizer"``: loads on 4.x and 5.x. On 4.x the slow
  class (``use_fast=False``, vLLM's ``--tokenizer-mode slow``, the seed's scripts that call
  ``LlamaTokenizer`` directly) is exact; on 5.x only ``SentencePieceBackend.from_pretrained(DIR)`` is.

Both write ``"legacy": true`` (plain ``sp.encode``, no prefix trick), no ``tokenizer.json`` (other
tools would prefer it and encode with ``tokenizers`` again), ``add_bos_token``/``add_eos_token`` (what
transformers 4 and llama.cpp's converter read) and ``"special_tokens_pattern"`` (what
``SentencePieceBackend`` reads: it ignores ``add_bos_token``), the special tokens of the SentencePiece
model and the chat template. No ``auto_map``: nothing needs ``trust_remote_code``
(:func:`remote_code_references` checks a directory).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cllama_deploy.errors import TokenizerError
from cllama_deploy.gguf.reader import is_gguf
from cllama_deploy.tokenizer.spm import parse_model, processor


@dataclass(frozen=True)
class HFTarget:
    """What one choice of ``--hf-target`` writes, and how each transformers loads it exactly."""

    name: str
    tokenizer_class: str
    note: str  # printed by the commands that write HF directories


TARGETS = {
    "transformers5": HFTarget(
        "transformers5", "SentencePieceBackend",
        "transformers 5: AutoTokenizer encodes exactly like SentencePiece; transformers 4.x's AutoTokenizer "
        "(vLLM < 0.19.1, TGI) cannot load it (its LlamaTokenizer.from_pretrained, which the seed's scripts call, "
        "can): write it with --hf-target transformers4 for those"),
    "transformers4": HFTarget(
        "transformers4", "LlamaTokenizer",
        "transformers 4.x: exact with AutoTokenizer.from_pretrained(DIR, use_fast=False) (vLLM: "
        "--tokenizer-mode slow), its default fast tokenizer is not; transformers 5: exact only with "
        "SentencePieceBackend.from_pretrained(DIR)"),
}
HF_TARGETS = tuple(TARGETS)
DEFAULT_HF_TARGET = "transformers5"
HF_TARGET_HELP = ("Which transformers the HF tokenizer files are for: transformers5 (SentencePieceBackend, exact "
                  "by default; 4.x cannot load it) or transformers4 (LlamaTokenizer; exact with use_fast=False).")

# Files of an HF tokenizer directory that write_hf_tokenizer replaces: a stale one would override ours
# (tokenizer.json: `tokenizers` encoding; chat_template.jinja: another template; added_tokens.json: ids
# that are in tokenizer_config.json's added_tokens_decoder).
STALE_FILES = ("tokenizer.json", "chat_template.jinja", "chat_template.json", "added_tokens.json")


def check_target(target: str, flag: str = "--hf-target") -> str:
    if target not in TARGETS:
        raise TokenizerError(f"{flag} {target!r}: choose one of {', '.join(HF_TARGETS)}")
    return target


def _pattern(add_bos: bool, add_eos: bool) -> str:
    return {(True, True): "bos_eos", (True, False): "bos", (False, True): "eos"}.get((add_bos, add_eos), "none")


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


def hf_tokenizer_config(sp_model, *, target: str = DEFAULT_HF_TARGET, pad_token: str | None = None,
                        chat_template: str | None = "alpaca", add_bos_token: bool = True,
                        add_eos_token: bool = False, added_tokens: dict[str, int] | None = None) -> tuple[dict, dict]:
    """``(tokenizer_config, special_tokens_map)`` for a SentencePiece model (path, bytes or proto).

    Args:
        target: a key of :data:`TARGETS` (the ``tokenizer_class`` written).
        pad_token: a piece of the model, an ``added_tokens`` entry, or None.
        added_tokens: tokens beyond the SentencePiece vocabulary with their ids (``len(model)`` on): the
            rows a model grew for them exist (the seed's Stanford-Alpaca-style ``[PAD]`` = 32000). Never
            invented here: a token HF would add by itself gets an id no embedding row and no GGUF token has.

    Raises:
        TokenizerError: the pad token is neither a piece nor an added token; added ids do not follow the
            vocabulary without gaps.
    """
    check_target(target)
    sp = processor(sp_model)
    size = sp.get_piece_size()
    extra = dict(sorted((added_tokens or {}).items(), key=lambda item: item[1]))
    if sorted(extra.values()) != list(range(size, size + len(extra))):
        raise TokenizerError(
            f"added tokens {extra} must take the ids right after the {size} SentencePiece pieces "
            f"({size}..{size + len(extra) - 1}); fix added_tokens.json / tokenizer_config.json")
    special: dict[str, tuple[str, int]] = {}
    for name, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        if 0 <= idx < size:
            special[name] = (sp.id_to_piece(idx), idx)
    if pad_token is not None:
        pid = extra.get(pad_token, sp.piece_to_id(pad_token))
        if pad_token not in extra and sp.id_to_piece(pid) != pad_token:
            raise TokenizerError(
                f"pad token {pad_token!r} is not a piece of the tokenizer; add it to the SentencePiece model "
                "first (tokenizer merge --pad-token appends [PAD])"
            )
        special["pad_token"] = (pad_token, pid)
    named = {text for text, _ in special.values()}
    entries = {idx: text for text, idx in special.values()} | {idx: text for text, idx in extra.items()}
    decoder = {
        str(idx): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": idx < size or text in named}
        for idx, text in sorted(entries.items())
    }
    config = {
        "tokenizer_class": TARGETS[target].tokenizer_class,
        **({"backend": "sentencepiece"} if target == "transformers5" else {}),
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
                           target: str = DEFAULT_HF_TARGET, pad_token: str | None = None,
                           chat_template: str | None = "alpaca", add_bos_token: bool = True,
                           add_eos_token: bool = False, added_tokens: dict[str, int] | None = None) -> Path:
    """Write an HF tokenizer directory around a SentencePiece model, with settings given explicitly.

    Files: ``tokenizer.model`` (copied unless already there), ``tokenizer_config.json``,
    ``special_tokens_map.json``; :data:`STALE_FILES` are removed. See :data:`TARGETS` for how each
    transformers then loads it exactly. Writes in place: callers that need atomicity write into a
    temporary directory (``files.atomic_dir``). To carry the settings of an existing directory (an
    adapter's, a base's) use :func:`write_hf_tokenizer`.

    Args:
        sp_model_path: the SentencePiece ``.model`` file.
        out_dir: directory to write (created if missing).
        target: ``transformers5`` or ``transformers4`` (:data:`TARGETS`).
        pad_token: a piece of the model to use for padding (``"[PAD]"`` after ``merge --pad-token``),
            an ``added_tokens`` entry, or None for no pad token (LLaMA has none).
        chat_template: ``alpaca``, ``alpaca-2``, a ``.jinja`` path, template text, or None.
        added_tokens: tokens beyond the SentencePiece pieces, ``{text: id}`` (see :func:`hf_tokenizer_config`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(sp_model_path)
    dst = out / "tokenizer.model"
    if not dst.exists() or not os.path.samefile(src, dst):
        shutil.copyfile(src, dst)
    config, special_map = hf_tokenizer_config(
        dst, target=target, pad_token=pad_token, chat_template=chat_template,
        add_bos_token=add_bos_token, add_eos_token=add_eos_token, added_tokens=added_tokens,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in STALE_FILES:
        if (out / name).exists():
            (out / name).unlink()
    return out


@dataclass(frozen=True)
class HFTokenizerInfo:
    """What :func:`write_hf_tokenizer` wrote."""

    out_dir: Path
    target: str
    pieces: int  # SentencePiece pieces
    added_tokens: dict[str, int]  # tokens beyond them, with their ids
    pad_token: str | None
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template_from: str  # "argument", "source" or "alpaca"

    @property
    def tokenizer_class(self) -> str:
        return TARGETS[self.target].tokenizer_class

    @property
    def note(self) -> str:
        """One line for a command's output: how each transformers loads this directory exactly."""
        return TARGETS[self.target].note

    @property
    def vocab_size(self) -> int:
        return self.pieces + len(self.added_tokens)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc}); fix or delete the file") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object; fix or delete the file")
    return data


def _token_text(value) -> str | None:
    """A special token as HF writes it: a string or an AddedToken dict (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _source_template(directory: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template.strip():
        return template
    if (directory / "chat_template.jinja").is_file():  # what transformers 5's save_pretrained writes
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) and template.strip() else None


def tokenizer_settings(source: str | os.PathLike) -> dict:
    """The settings an HF tokenizer directory (or a bare ``tokenizer.model``) carries, as keyword
    arguments of :func:`write_hf_tokenizer_dir` plus ``sp_model`` (the ``.model`` path).

    Kept: pad token, tokens beyond the SentencePiece pieces (``added_tokens.json`` or
    ``added_tokens_decoder``), ``add_bos_token``/``add_eos_token``, the chat template (``chat_template``
    key, ``chat_template.jinja`` or ``.json``; None when there is none). Not kept: ``tokenizer_class``,
    ``legacy``, ``tokenizer.json``, ``auto_map``: those decide how exactly it encodes, which is ours to say.

    Raises:
        TokenizerError: no ``tokenizer.model``, unreadable JSON, or a pad token that is neither a piece
            nor an added token.
    """
    p = Path(source)
    if not p.is_dir():
        if not p.is_file():
            raise TokenizerError(f"{p}: no such tokenizer file or directory")
        return {"sp_model": p, "pad_token": None, "added_tokens": {}, "add_bos_token": True,
                "add_eos_token": False, "chat_template": None}
    model = p / "tokenizer.model"
    if not model.is_file():
        raise TokenizerError(
            f"{p} has no tokenizer.model; the HF tokenizer files are written from the SentencePiece model "
            "(copy tokenizer.model into it, or write the directory with `cllama-deploy tokenizer merge`)")
    size = processor(model).get_piece_size()
    config = _read_json(p / "tokenizer_config.json")
    added = {text: int(i) for text, i in _read_json(p / "added_tokens.json").items() if int(i) >= size}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None and int(key) >= size:
            added[text] = int(key)
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers' from_pretrained
    pad = _token_text(_read_json(p / "special_tokens_map.json").get("pad_token")) or _token_text(config.get("pad_token"))
    if pad is not None and pad not in added:
        sp = processor(model)
        if sp.id_to_piece(sp.piece_to_id(pad)) != pad:
            raise TokenizerError(
                f"{p}: pad token {pad!r} is neither a piece of tokenizer.model nor an added token with an id; "
                "fix pad_token in tokenizer_config.json / special_tokens_map.json")
    return {"sp_model": model, "pad_token": pad, "added_tokens": added,
            "add_bos_token": bool(config.get("add_bos_token", True)),
            "add_eos_token": bool(config.get("add_eos_token", False)),
            "chat_template": _source_template(p, config)}


def write_hf_tokenizer(out_dir: str | os.PathLike, source: str | os.PathLike, *,
                       target: str = DEFAULT_HF_TARGET, chat_template: str | None = None) -> HFTokenizerInfo:
    """Write the complete HF tokenizer files of any directory we write (tokenizer merge output, merged
    model, ``deploy --keep-hf``, adapters and checkpoints), whatever ``source`` carried.

    ``source`` is an HF tokenizer directory (ours, the seed's ``LlamaTokenizer`` one, an adapter with
    only ``tokenizer.model``) or a ``tokenizer.model`` file; it may be ``out_dir`` itself. Its settings
    are kept (:func:`tokenizer_settings`); the class, ``legacy`` and the files are ours, for ``target``
    (:data:`TARGETS`), so the result encodes exactly like SentencePiece the documented way on
    transformers 5 and 4. No transformers import: the deploy path uses this.

    Args:
        chat_template: overrides the source's template (``alpaca``, ``alpaca-2``, a ``.jinja`` path or
            text); without either the Alpaca template is written.

    Raises:
        TokenizerError: see :func:`tokenizer_settings` and :func:`hf_tokenizer_config`.
    """
    check_target(target)
    settings = tokenizer_settings(source)
    model = settings.pop("sp_model")
    if chat_template:
        origin = "argument"
    elif settings["chat_template"]:
        origin, chat_template = "source", settings["chat_template"]
    else:
        origin, chat_template = "alpaca", "alpaca"
    settings["chat_template"] = chat_template
    out = write_hf_tokenizer_dir(model, out_dir, target=target, **settings)
    sp = processor(out / "tokenizer.model")
    added = settings["added_tokens"]
    pad = settings["pad_token"]
    pad_id = None if pad is None else added.get(pad, sp.piece_to_id(pad))
    return HFTokenizerInfo(
        out_dir=out, target=target, pieces=sp.get_piece_size(), added_tokens=dict(added), pad_token=pad,
        pad_token_id=pad_id, bos_token_id=sp.bos_id() if sp.bos_id() >= 0 else None,
        eos_token_id=sp.eos_id() if sp.eos_id() >= 0 else None, chat_template_from=origin)


def remote_code_references(directory: str | os.PathLike) -> list[str]:
    """What in an HF directory would need ``trust_remote_code``: ``auto_map`` keys in its JSON configs and
    Python files. Empty for every directory we write (tested)."""
    d = Path(directory)
    found = []
    for p in sorted(d.glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not a config transformers could read either
        if isinstance(data, dict) and "auto_map" in data:
            found.append(f"{p.name}: auto_map")
    return found + [f"{p.name}: Python code" for p in sorted(d.glob("*.py"))]


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
