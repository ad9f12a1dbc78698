"""What differs between the two training stages, in one object per stage.

``train()`` asks the stage (``STAGES[cfg.stage]``) for its input files, data, collator and sequence
length instead of testing ``cfg.stage`` or probing the config for stage-specific fields. Importing this
module is cheap (the data functions import ``datasets``/``torch`` only when called).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cllama_deploy.training import data
from cllama_deploy.training.config import PTConfig, SFTConfig, TrainConfig


@dataclass(frozen=True)
class Stage:
    """One training stage: its config class and the functions that differ between stages.

    Attributes:
        name: ``pt`` or ``sft`` (the subcommand, and the prefix of the output names).
        summary: one line for ``cllama-deploy train --help``.
        config: the config dataclass.
        input_files: the training (and validation) files a config names; raises InputError when there are
            none. Cheap: runs before torch is imported.
        load_data: tokenized, cached, split data (:class:`~cllama_deploy.training.data.DataResult`).
        collator: the batch collator for a tokenizer.
        seq_len: tokens per example the config asks for (for ``--auto_batch``).
        has_validation: whether the config provides validation data.
        validation_hint: how to provide validation data (for the ``--do_eval`` error).
    """

    name: str
    summary: str
    config: type[TrainConfig]
    input_files: Callable[[Any], list[Path]]
    load_data: Callable[[Any, data.TextTokenizer], data.DataResult]
    collator: Callable[[data.TextTokenizer], Any]
    seq_len: Callable[[Any], int]
    has_validation: Callable[[Any], bool]
    validation_hint: str

    @property
    def adapter_name(self) -> str:
        """The final adapter's directory in ``--output_dir``."""
        return f"{self.name}_lora_model"

    @property
    def record_name(self) -> str:
        """The training record's file name (read by the merge's adapter-order checks)."""
        return f"{self.name}_training_config.json"


def _sft_files(cfg: SFTConfig) -> list[Path]:
    files = data.sft_files(cfg.dataset_dir)
    return files + ([Path(cfg.validation_file)] if cfg.validation_file else [])


def _sft_collator(tok: data.TextTokenizer) -> data.SFTCollator:
    return data.SFTCollator(tok.pad_id if tok.pad_id is not None else tok.eos_id)


PT = Stage(
    name="pt",
    summary="LoRA incremental pre-training on a directory of .txt files (`train pt --help` lists the flags).",
    config=PTConfig,
    input_files=lambda cfg: data.pt_files(cfg.dataset_dir),
    load_data=data.load_pt_data,
    collator=lambda tok: data.PTCollator(),
    seq_len=lambda cfg: cfg.block_size,
    has_validation=lambda cfg: cfg.validation_split_percentage > 0,
    validation_hint="set --validation_split_percentage > 0",
)

SFT = Stage(
    name="sft",
    summary="LoRA instruction fine-tuning on Alpaca JSON/JSONL (`train sft --help` lists the flags).",
    config=SFTConfig,
    input_files=_sft_files,
    load_data=data.load_sft_data,
    collator=_sft_collator,
    seq_len=lambda cfg: cfg.max_seq_length,
    has_validation=lambda cfg: cfg.validation_split_percentage > 0 or bool(cfg.validation_file),
    validation_hint="set --validation_split_percentage > 0 or --validation_file",
)

STAGES: dict[str, Stage] = {s.name: s for s in (PT, SFT)}


def stage_of(cfg: TrainConfig) -> Stage:
    """The stage a config belongs to."""
    return STAGES[cfg.stage]
