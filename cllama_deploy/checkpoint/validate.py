"""Invariant checks run before any heavy work, in one place (DESIGN habit 4).

Every check reads shapes and small files only, never tensor data. Each failure is one
:class:`CheckpointError` / :class:`ShapeMismatchError` naming the file, the tensor and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cllama_deploy.errors import CheckpointError, ShapeMismatchError, TokenizerError

# The tensors whose rows are the vocabulary, in HF LLaMA naming.
EMBED = "model.embed_tokens.weight"  # input embeddings: (vocab, hidden)
LM_HEAD = "lm_head.weight"  # output projection: (vocab, hidden); absent when tie_word_embeddings
VOCAB_TENSORS = (EMBED, LM_HEAD)


def check_config(config: dict, where: Path | str) -> None:
    """Head counts must divide: ``hidden_size % num_attention_heads == 0`` and
    ``num_attention_heads % num_key_value_heads == 0``."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    if hidden % heads:
        raise CheckpointError(
            f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
            "fix config.json (the head size must be a whole number)"
        )
    if heads % kv:
        raise CheckpointError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; "
            "fix config.json (grouped-query attention shares each KV head among a whole number of heads)"
        )


@dataclass(frozen=True)
class TokenizerCount:
    """Size of a tokenizer directory: SentencePiece pieces plus added tokens beyond them."""

    path: Path
    pieces: int
    added: dict[int, str]

    @property
    def total(self) -> int:
        return max([self.pieces] + [i + 1 for i in self.added])


def count_tokenizer(tokenizer_dir: Path) -> TokenizerCount:
    """Count ``tokenizer.model`` pieces (sentencepiece) and the HF added tokens whose ids lie beyond them
    (``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``), e.g. Alpaca's ``[PAD]``."""
    import sentencepiece as spm

    model = tokenizer_dir / "tokenizer.model"
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{model}: not a readable SentencePiece model ({exc}); copy the right tokenizer.model") from exc
    pieces = sp.get_piece_size()
    added: dict[int, str] = {}
    for name in ("added_tokens.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{path}: malformed JSON ({exc}); fix or delete it") from exc
        if name == "added_tokens.json" and isinstance(data, dict):
            items = [(v, k) for k, v in data.items() if isinstance(v, int)]
        else:
            dec = data.get("added_tokens_decoder") if isinstance(data, dict) else None
            items = [(int(k), v.get("content", "")) for k, v in (dec or {}).items()
                     if str(k).isdigit() and isinstance(v, dict)]
        for idx, content in items:
            if idx >= pieces:
                added[idx] = content
    return TokenizerCount(tokenizer_dir, pieces, added)


def check_base_vocab(config: dict, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """In one checkpoint: config ``vocab_size`` = embedding rows = lm_head rows, and the output exists."""
    if EMBED not in shapes:
        raise CheckpointError(f"{where}: the model has no {EMBED}; this is not a LLaMA-family HF checkpoint")
    rows = shapes[EMBED][0]
    if config["vocab_size"] != rows:
        raise ShapeMismatchError(
            f"{where / 'config.json'}: vocab_size={config['vocab_size']} but {EMBED} has {rows} rows; "
            f"set vocab_size to {rows} in config.json"
        )
    if LM_HEAD in shapes:
        if shapes[LM_HEAD][0] != rows:
            raise ShapeMismatchError(
                f"{where}: {EMBED} has {rows} rows but {LM_HEAD} has {shapes[LM_HEAD][0]}; the checkpoint is "
                "inconsistent (resize both with model.resize_token_embeddings and save again)"
            )
    elif not config.get("tie_word_embeddings", False):
        raise CheckpointError(
            f"{where}: no {LM_HEAD} and config.json has tie_word_embeddings=false; the output layer is missing "
            "(set tie_word_embeddings to true if the model shares its embeddings, or re-download the weights)"
        )


def check_full_shape(adapter_file: Path, key: str, target: str, shape: tuple[int, ...],
                     current: tuple[int, ...] | None, origin: str) -> None:
    """A tensor an adapter replaces whole must keep the base's shape, except the vocabulary rows of
    embed_tokens / lm_head (that is how the vocabulary grows)."""
    if current is None:
        raise CheckpointError(
            f"{adapter_file}: unknown key {key!r}: it replaces {target!r}, which the base model does not have; "
            "the adapter was trained on another architecture"
        )
    if target in VOCAB_TENSORS:
        if len(shape) != 2 or shape[1] != current[1]:
            raise ShapeMismatchError(
                f"{adapter_file}: {key} has shape {list(shape)} but {target} is {list(current)} in {origin}; "
                "the hidden sizes differ, so the adapter was trained on another base model"
            )
        return
    if tuple(shape) != tuple(current):
        raise ShapeMismatchError(
            f"{adapter_file}: {key} has shape {list(shape)} but {target} is {list(current)} in {origin}; "
            "the adapter was trained on another base model"
        )


def check_lora_shape(adapter_file: Path, a_key: str, b_key: str, target: str, delta: tuple[int, int],
                     current: tuple[int, ...] | None, origin: str, transposed_ok: bool) -> None:
    """LoRA A (r, in) and B (out, r) must give an update of the current base tensor's shape."""
    if current is None:
        raise CheckpointError(
            f"{adapter_file}: unknown key {a_key!r}: the base model has no tensor {target!r}; "
            "the adapter was trained on another architecture"
        )
    current = tuple(current)
    if current == tuple(delta) or (transposed_ok and current == (delta[1], delta[0])):
        return
    if target in VOCAB_TENSORS and len(current) == 2 and delta[1] == current[1] and delta[0] != current[0]:
        raise ShapeMismatchError(
            f"{adapter_file}: {a_key}/{b_key} update {target} with {delta[0]} vocabulary rows but it has "
            f"{current[0]} rows in {origin}: pass the adapter that resized the vocabulary (the pre-training "
            "LoRA, which saves embed_tokens/lm_head) before this one"
        )
    raise ShapeMismatchError(
        f"{adapter_file}: {a_key} and {b_key} give a {list(delta)} update but {target} is {list(current)} in "
        f"{origin}; the adapter was trained on another base model (or the adapters are in the wrong order)"
    )


@dataclass(frozen=True)
class VocabReport:
    """The vocabulary sizes that must agree, as found before the merge (for the CLI to print)."""

    tokenizer: TokenizerCount | None
    config_vocab_size: int
    embed_rows: int
    lm_head_rows: int | None  # None: tied to the embeddings
    embed_from: str
    lm_head_from: str

    def lines(self) -> list[str]:
        tok = ("no tokenizer.model (not checked)" if self.tokenizer is None else
               f"{self.tokenizer.total} tokens ({self.tokenizer.pieces} SentencePiece pieces"
               + (f" + {len(self.tokenizer.added)} added" if self.tokenizer.added else "")
               + f") from {self.tokenizer.path}")
        head = "tied to embed_tokens" if self.lm_head_rows is None else f"{self.lm_head_rows} rows ({self.lm_head_from})"
        return [f"tokenizer: {tok}", f"embed_tokens: {self.embed_rows} rows ({self.embed_from})",
                f"lm_head: {head}", f"config vocab_size: {self.config_vocab_size}"]


def check_merged_vocab(report: VocabReport) -> None:
    """After merging: embedding rows = lm_head rows = tokenizer tokens."""
    if report.lm_head_rows is not None and report.lm_head_rows != report.embed_rows:
        raise ShapeMismatchError(
            f"{report.embed_rows} rows in embed_tokens ({report.embed_from}) but {report.lm_head_rows} in lm_head "
            f"({report.lm_head_from}): an adapter resized one without the other; train with "
            "modules_to_save=['embed_tokens', 'lm_head'] so both are saved"
        )
    tok = report.tokenizer
    if tok is None or tok.total == report.embed_rows:
        return
    if tok.total > report.embed_rows:
        fix = ("pass the pre-training LoRA (which saves embed_tokens/lm_head with the resized vocabulary) "
               "before the SFT LoRA")
    else:
        fix = ("the tokenizer is older than the embeddings: put the tokenizer the adapter was trained with "
               "(tokenizer.model and its HF files) into the last adapter's directory")
    pieces = f"{tok.total} tokens" if tok.added else f"{tok.pieces} pieces"
    raise ShapeMismatchError(
        f"{report.embed_rows} rows in embed_tokens ({report.embed_from}) but the tokenizer "
        f"{tok.path / 'tokenizer.model'} has {pieces}: {fix}"
    )
