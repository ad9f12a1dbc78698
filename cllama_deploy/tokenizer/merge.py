"""Extend a LLaMA SentencePiece vocabulary with the pieces of another model (the seed's recipe).

The recipe, reproduced byte for byte (the seed's published SHA256 depend on every detail): parse
LLaMA's ``ModelProto``; for every piece of the added model, in its order, that the base does not
already hold, append a new piece with only ``piece`` and ``score = 0`` set (the type is left unset,
which means NORMAL, and is therefore not serialized); with ``--pad-token`` append ``[PAD]`` the same
way. Nothing else in the proto changes (not even ``trainer_spec.vocab_size``).

Score 0 is above every score of LLaMA's BPE merges (all negative), so SentencePiece's BPE encoder
merges the new pieces first. That is exactly what the ``tokenizers`` library does not reproduce (see
:mod:`cllama_deploy.tokenizer.hf`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.errors import ConfigError, TokenizerError
from cllama_deploy.tokenizer.hf import DEFAULT_HF_TARGET, HF_TARGET_HELP, HF_TARGETS, TARGETS
from cllama_deploy.tokenizer.spm import (
    SPACE,
    model_type_name,
    parse_model,
    pb2,
    piece_type_name,
    processor,
)

PAD_PIECE = "[PAD]"
# Files this stage writes into --out; an existing directory holding anything else is not replaced.
OUTPUT_FILES = {
    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "added_tokens.json", "tokenizer.json", "merge_report.json",
}


@dataclass
class TokenizerMergeConfig:
    """Settings of ``cllama-deploy tokenizer merge``."""

    base: Path = field(metadata={"help": "base tokenizer: tokenizer.model, HF tokenizer dir or GGUF"})
    add: Path = field(metadata={"help": "model whose pieces are appended: .model file, HF dir or GGUF"})
    out: Path = field(metadata={"help": "output directory (tokenizer.model + HF tokenizer files)",
                                "flag": ("--out", "-o")})
    pad_token: bool = field(default=False, metadata={"help": "append [PAD] and use it as pad token"})
    chat_template: str = field(default="alpaca", metadata={"help": "alpaca, alpaca-2 or a .jinja file"})
    hf_target: str = field(default=DEFAULT_HF_TARGET, metadata={"help": HF_TARGET_HELP, "choices": HF_TARGETS})

    def __post_init__(self) -> None:
        self.base, self.add, self.out = Path(self.base), Path(self.add), Path(self.out)
        if self.hf_target not in HF_TARGETS:
            raise ConfigError(f"--hf-target {self.hf_target!r}: choose one of {', '.join(HF_TARGETS)}")
        if not self.base.exists():
            raise ConfigError(f"--base {self.base}: no such file or directory")
        if not self.add.exists():
            raise ConfigError(f"--add {self.add}: no such SentencePiece model file or directory")
        from cllama_deploy.files import check_replaceable_dir

        check_replaceable_dir(self.out, "--out", OUTPUT_FILES.__contains__, what="tokenizer merge")


@dataclass
class TokenizerMergeResult:
    out_dir: Path
    model_path: Path
    base_pieces: int
    added_pieces: int
    skipped_pieces: int
    total_pieces: int
    first_added_id: int
    pad_id: int | None
    sha256: str
    hf_target: str = DEFAULT_HF_TARGET
    seconds: float = 0.0

    @property
    def hf_note(self) -> str:
        """How each transformers loads the HF tokenizer dir exactly (printed by the command)."""
        return TARGETS[self.hf_target].note

    def summary(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "tokenizer_model": str(self.model_path),
            "base_pieces": self.base_pieces, "added_pieces": self.added_pieces,
            "already_in_base": self.skipped_pieces, "total_pieces": self.total_pieces,
            "first_added_id": self.first_added_id, "pad_id": self.pad_id, "sha256": self.sha256,
            "hf_target": self.hf_target, "hf_tokenizer_class": TARGETS[self.hf_target].tokenizer_class,
        }


def check_mergeable(base, add) -> None:
    """Refuse merges that would produce a broken or silently degraded vocabulary.

    What is unsafe, and why:

    * base ``char``/``word`` models never join characters into longer pieces (``char``) or only
      split on whitespace (``word``): the appended pieces could never be produced.
    * a ``unigram`` base: its scores are log-probabilities, so score 0 (probability 1) makes every
      appended piece beat every base piece and ties between segmentations are arbitrary; the recipe
      is defined for BPE, where score 0 just means "merge first".
    * whitespace on different sides (``treat_whitespace_as_suffix``): ``▁`` in the appended pieces
      would sit on the wrong side, so no word-initial piece could match.
    * a base normalizer that rewrites a piece (case folding, NFKC on full-width forms): that piece
      can never match normalized text.
    * empty or duplicate pieces, and appended pieces that are not ordinary text (byte, control,
      unknown, unused, user-defined) but are missing from the base: they would become ordinary text
      pieces with different meaning.
    """
    kind = model_type_name(base)
    if kind in ("char", "word"):
        raise TokenizerError(
            f"the base tokenizer is a SentencePiece '{kind}' model, which never produces multi-character "
            "pieces from merges; appended pieces would be unreachable. Merge into a BPE model such as LLaMA's"
        )
    if kind == "unigram":
        raise TokenizerError(
            "the base tokenizer is a unigram model: appended pieces get score 0, which in a unigram model is "
            "log-probability 0 and would beat every base piece (and tie with each other arbitrarily). "
            "The merge recipe is for a BPE base such as LLaMA's tokenizer.model"
        )
    if base.trainer_spec.treat_whitespace_as_suffix != add.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerError(
            "the two models put the whitespace marker on different sides (treat_whitespace_as_suffix differs); "
            "retrain the added model with the base's setting"
        )
    _check_pieces(base, "base")
    _check_pieces(add, "added")
    have = {p.piece: p for p in base.pieces}
    odd = [(p.piece, piece_type_name(p.type)) for p in add.pieces if p.piece not in have and p.type != 1]
    if odd:
        sample = ", ".join(f"{piece!r} ({kind})" for piece, kind in odd[:5])
        raise TokenizerError(
            f"the added model has {len(odd)} special piece(s) the base lacks: {sample}; appended as ordinary "
            "pieces they would change meaning. Retrain the added model without them (user_defined_symbols, "
            "byte_fallback, control_symbols) or add them to the base first"
        )
    _check_normalizer(base, [p.piece for p in add.pieces if p.piece not in have])


def _check_pieces(proto, which: str) -> None:
    seen: set[str] = set()
    for index, p in enumerate(proto.pieces):
        if not p.piece:
            raise TokenizerError(f"the {which} model has an empty piece at id {index}; the model file is corrupt")
        if p.piece in seen:
            raise TokenizerError(f"the {which} model has the piece {p.piece!r} twice (id {index}); the model file is corrupt")
        seen.add(p.piece)


def _check_normalizer(base, pieces: list[str]) -> None:
    spec = base.normalizer_spec
    if spec.name == "identity" and not spec.precompiled_charsmap and not spec.normalization_rule_tsv:
        return
    import sentencepiece as spm

    norm = spm.SentencePieceNormalizer(
        model_proto=base.SerializeToString(), add_dummy_prefix=False, escape_whitespaces=True,
        remove_extra_whitespaces=False,
    )
    rewritten = [p for p in pieces if norm.normalize(p.replace(SPACE, " ")) != p]
    if rewritten:
        sample = ", ".join(repr(p) for p in rewritten[:5])
        raise TokenizerError(
            f"the base normalizer ({spec.name or 'custom'}) rewrites {len(rewritten)} of the pieces to add "
            f"(e.g. {sample}), so they could never be produced; train the added model with the base's "
            "normalization rule"
        )


def merge_models(base, add, pad_token: bool = False):
    """The seed's merge on ``ModelProto`` objects (the inputs are not modified).

    Returns:
        ``(merged_proto, added_pieces, skipped, pad_id)``; ``added_pieces`` lists appended pieces in
        id order (``[PAD]`` included), ``skipped`` counts pieces of ``add`` the base already had.
    """
    check_mergeable(base, add)
    merged = pb2().ModelProto()
    merged.CopyFrom(base)
    have = {p.piece for p in merged.pieces}
    added: list[str] = []
    skipped = 0
    for p in add.pieces:
        if p.piece in have:
            skipped += 1
            continue
        new = merged.pieces.add()
        new.piece = p.piece
        new.score = 0  # set explicitly: the field is serialized, as in the seed's script
        have.add(p.piece)
        added.append(p.piece)
    pad_id = None
    if pad_token:
        if PAD_PIECE in have:
            pad_id = next(i for i, p in enumerate(merged.pieces) if p.piece == PAD_PIECE)
        else:
            new = merged.pieces.add()
            new.piece = PAD_PIECE
            new.score = 0
            pad_id = len(merged.pieces) - 1
            added.append(PAD_PIECE)
    return merged, added, skipped, pad_id


def verify_merged(data: bytes, base_size: int, added: list[str]) -> None:
    """Invariants of the written model: SentencePiece loads it and the added ids run on without gaps."""
    sp = processor(data)
    if sp.get_piece_size() != base_size + len(added):
        raise TokenizerError(
            f"merged model has {sp.get_piece_size()} pieces, expected {base_size} + {len(added)}"
        )
    for offset, piece in enumerate(added):
        got = sp.piece_to_id(piece)
        if got != base_size + offset:
            raise TokenizerError(
                f"added piece {piece!r} has id {got}, expected {base_size + offset}: added ids must follow "
                "the base vocabulary without gaps"
            )


def merge_tokenizers(config: TokenizerMergeConfig) -> TokenizerMergeResult:
    """Merge ``config.add`` into ``config.base`` and write ``tokenizer.model`` + an HF tokenizer dir.

    Raises:
        TokenizerError: an input is not a SentencePiece model or the merge is unsafe (see
            :func:`check_mergeable`).
    """
    import json

    from cllama_deploy.files import atomic_dir, sha256_file
    from cllama_deploy.tokenizer.hf import resolve_sp_model, write_hf_tokenizer_dir

    start = time.perf_counter()
    base = parse_model(resolve_sp_model(config.base), str(config.base))
    add = parse_model(resolve_sp_model(config.add), str(config.add))
    merged, added, skipped, pad_id = merge_models(base, add, pad_token=config.pad_token)
    data = merged.SerializeToString()
    verify_merged(data, len(base.pieces), added)
    with atomic_dir(config.out) as tmp:
        model_path = tmp / "tokenizer.model"
        model_path.write_bytes(data)
        write_hf_tokenizer_dir(model_path, tmp, target=config.hf_target,
                               pad_token=PAD_PIECE if pad_id is not None else None,
                               chat_template=config.chat_template)
        result = TokenizerMergeResult(
            out_dir=config.out, model_path=config.out / "tokenizer.model", base_pieces=len(base.pieces),
            added_pieces=len(added), skipped_pieces=skipped, total_pieces=len(merged.pieces),
            first_added_id=len(base.pieces), pad_id=pad_id, sha256=sha256_file(model_path),
            hf_target=config.hf_target,
        )
        report = result.summary() | {"base": str(config.base), "add": str(config.add)}
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    result.seconds = time.perf_counter() - start
    return result
