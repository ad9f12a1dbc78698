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


# -- adapter order ---------------------------------------------------------------------------------------
# Adapters are deltas against the model they were trained on, so each must be applied to exactly that
# model: the base plus the adapters merged before its training, in that order. A wrong order still has
# fitting shapes when the adapters save whole embed_tokens/lm_head (modules_to_save, the default of
# `train sft`): the last full copy simply wins. These checks read what the adapters carry (their
# training record, the vocabulary rows they save, their tokenizer, adapter_config.json's
# base_model_name_or_path). Rows of the saved embeddings cannot tell the order: training with weight decay
# moves every row, so no row of a trained copy equals any row of the model it started from.

ORDER_OVERRIDE = "or --no-check-adapter-order to merge anyway"


def check_vocab_grows(adapter_dir: Path, key: str, target: str, rows: int, current_rows: int,
                      grown_by: Path | None) -> None:
    """An adapter that saves ``target`` whole never has fewer vocabulary rows than the model it is applied to
    (training only adds tokens): fewer rows mean it was trained before the adapter that grew them."""
    if rows >= current_rows:
        return
    if grown_by is None:
        raise ShapeMismatchError(
            f"{adapter_dir}: {key} has {rows} vocabulary rows but the base already has {current_rows}: the adapter "
            f"was trained on a smaller model, not on this base; pass the base it was trained on ({ORDER_OVERRIDE})")
    raise ShapeMismatchError(
        f"{adapter_dir}: {key} has {rows} vocabulary rows but {target} already has {current_rows} rows from "
        f"{grown_by}: the vocabulary only grows from one adapter to the next, so the adapters are in the wrong "
        f"order; pass --lora {adapter_dir} before --lora {grown_by} ({ORDER_OVERRIDE})")


def check_adapter_tokenizer(adapter_dir: Path, tokenizer: TokenizerCount, rows_after: int) -> None:
    """An adapter that ships a tokenizer was trained with it: after this adapter the model has as many
    vocabulary rows as that tokenizer has tokens (checked for every adapter, not only the last one)."""
    if tokenizer.total == rows_after:
        return
    raise ShapeMismatchError(
        f"{adapter_dir}: its tokenizer has {tokenizer.total} tokens but after this adapter the model has "
        f"{rows_after} vocabulary rows, so it was not trained on the model it is applied to here: check the "
        f"order of the --lora adapters ({ORDER_OVERRIDE})")


def check_adapter_order(base_dir: Path, adapters: list, rows_before: list[int]) -> None:
    """Every adapter is applied to the model it was trained on (see the section comment).

    Args:
        base_dir: the ``--base`` directory.
        adapters: the opened :class:`~cllama_deploy.checkpoint.peft.LoraAdapter` s, in merge order.
        rows_before: vocabulary rows of the model just before each adapter.

    Raises:
        CheckpointError: an adapter's training record or its claimed base contradicts the order given;
            the message names the order to use and the override.
    """
    from cllama_deploy.checkpoint.provenance import model_vocab, same_adapter, same_model, training_record

    given = [Path(a.path) for a in adapters]
    for i, ad in enumerate(adapters):
        here = given[i]
        rec = training_record(here)
        if rec is None:
            _check_claimed_base(base_dir, here, ad.base_model_name_or_path, i, rows_before[i], given)
            continue
        src = rec.path
        if rec.continued is not None:
            for j, other in enumerate(given):
                if j != i and same_adapter(rec.continued, other):
                    raise CheckpointError(
                        f"{here} continued the training of {other} (--peft_path in {src}), so it already holds "
                        f"that adapter: pass --lora {here} without --lora {other} ({ORDER_OVERRIDE})")
        need = list(rec.earlier)
        shown = rec.earlier_names()
        for want in need:
            later = [g for g in given[i + 1:] if same_adapter(want, g)]
            if later:
                raise CheckpointError(
                    f"{here} was trained on top of {later[0]} ({src} lists it under --lora), so it must come "
                    f"after it: pass --lora {later[0]} before --lora {here} ({ORDER_OVERRIDE})")
        before = given[:i]
        wanted = " ".join(f"--lora {w}" for w in shown)
        if len(before) < len(need):
            missing = [n for w, n in zip(need, shown) if not any(same_adapter(w, g) for g in before)] or shown
            names = ", ".join(missing)
            raise CheckpointError(
                f"{here} was trained on top of {names} ({src} lists it under --lora), which is not given before "
                f"it: pass {wanted} --lora {here} ({ORDER_OVERRIDE})")
        extra = before[:len(before) - len(need)]
        for want, name, got in zip(need, shown, before[len(extra):]):
            if same_adapter(want, got) is False:
                raise CheckpointError(
                    f"{here} was trained on top of {name} ({src} lists it under --lora), but {got} is given "
                    f"before it: pass {wanted} --lora {here} ({ORDER_OVERRIDE})")
        if not extra:
            if same_model(rec.base, base_dir) is False:
                raise CheckpointError(
                    f"{here} was trained on {rec.base} ({src}), not on --base {base_dir}: pass --base {rec.base} "
                    f"({ORDER_OVERRIDE})")
        elif same_model(rec.base, base_dir) is True:
            raise CheckpointError(
                f"{here} was trained on the base with {'only ' + wanted if need else 'no adapter'} merged before "
                f"it ({src}), but {', '.join(str(e) for e in extra)} come(s) before it here: leave "
                f"{'it' if len(extra) == 1 else 'them'} out or train {here.name} on top of {'it' if len(extra) == 1 else 'them'} "
                f"({ORDER_OVERRIDE})")
        elif (v := model_vocab(rec.base)) is not None and v != rows_before[len(extra)]:
            raise CheckpointError(
                f"{here} was trained on {rec.base} ({v} tokens, {src}), but here it is applied to a model with "
                f"{rows_before[len(extra)]} rows: pass --base {rec.base} ({ORDER_OVERRIDE})")


def _check_claimed_base(base_dir: Path, here: Path, claim, i: int, rows: int, given: list[Path]) -> None:
    """Without a training record: the local model PEFT recorded as ``base_model_name_or_path`` (when it
    exists here) must have the vocabulary of the model the adapter is applied to."""
    from cllama_deploy.checkpoint.provenance import model_vocab

    if not claim or not isinstance(claim, str):
        return
    claimed = Path(claim)
    if not (claimed / "config.json").is_file():
        return  # a hub id or a path of another machine: nothing to compare
    if claimed.resolve() == Path(base_dir).resolve():
        return  # trained on --base itself (with the earlier adapters merged in memory, as `train` does)
    v = model_vocab(claimed)
    if v is None or v == rows:
        return
    applied = f"--base {base_dir}" if i == 0 else f"--base {base_dir} with --lora {given[i - 1]}"
    raise CheckpointError(
        f"{here} was trained on {claimed} ({v} tokens; base_model_name_or_path in its adapter_config.json), but "
        f"here it is applied to {applied} ({rows} rows): pass --base {claimed}, or the adapters that turn "
        f"--base into it before this one ({ORDER_OVERRIDE})")
