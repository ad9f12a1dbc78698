"""Typed configs for `train pt` and `train sft`, and the flag parser shared by the CLI and torchrun.

Flags keep the seed's names (``--model_name_or_path``, ``--lora_rank``, ...) so the seed's launch
recipes port by changing only the command; each flag is also accepted with dashes
(``--model-name-or-path``). Every option can come from a YAML file given with ``--config``; a flag on
the command line wins over the file, which wins over the defaults.

This module imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cllama_deploy.errors import ConfigError
from cllama_deploy.prompts import FORMATS
from cllama_deploy.tokenizer.hf import DEFAULT_HF_TARGET, HF_TARGET_HELP, HF_TARGETS

SEED_TARGETS = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
SEED_MODULES_TO_SAVE = "embed_tokens,lm_head"

# Flags of the seed's scripts (or of HF TrainingArguments) that we deliberately do not support, with
# what to do instead. Everything else that is unknown gets a "did you mean" error.
UNSUPPORTED_FLAGS = {
    "load_in_kbits": "k-bit (QLoRA) loading is not supported; drop the flag (16-bit is the default)",
    "load_in_8bit": "8-bit loading is not supported; drop the flag",
    "load_in_4bit": "4-bit loading is not supported; drop the flag",
    "flash_attn": "attention uses PyTorch SDPA automatically; drop the flag",
    "use_flash_attention_2": "attention uses PyTorch SDPA automatically; drop the flag",
    "full_finetuning": "only LoRA training is supported; drop the flag",
    "save_safetensors": "adapters are always saved as safetensors; drop the flag",
    "resume_from_checkpoint": "use --resume (latest checkpoint) or --resume DIR",
    "train_file": "use --dataset_dir (a directory of .json/.jsonl files)",
    "max_train_samples": "not supported; cut the input files instead",
    "max_eval_samples": "not supported; use --validation_split_percentage",
    "tokenizer_name": "use --tokenizer_name_or_path",
    "streaming": "streaming datasets are not supported; the data is tokenized once and cached",
}


def flag(default: Any = None, help: str = "", *, choices: tuple | None = None,
         seed_compat: bool = False, path: bool = False, **kw) -> Any:
    """A dataclass field with help text (shown by ``--help``) and optional choices. ``path``: the value is a
    file or directory (recorded as an absolute path in the training record)."""
    meta = {"help": help, "choices": choices, "seed_compat": seed_compat, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _csv(value: str | None) -> list[str]:
    if value is None:
        return []
    items = [x.strip() for x in str(value).split(",")]
    return [x for x in items if x and x.lower() != "none"]


@dataclass
class TrainConfig:
    """Options shared by pre-training (pt) and instruction fine-tuning (sft)."""

    # --- model and tokenizer
    model_name_or_path: Optional[str] = flag(None, "Base LLaMA in HF format (a directory with config.json "
                                              "and safetensors/bin weights). Required.", path=True)
    tokenizer_name_or_path: Optional[str] = flag(None, "Tokenizer: a directory with tokenizer.model (and HF "
                                                 "tokenizer files) or a SentencePiece .model file. "
                                                 "Default: the model directory.", path=True)
    base_tokenizer_path: Optional[str] = flag(None, "The base model's own tokenizer.model, used to "
                                              "initialize new embedding rows. Default: "
                                              "<model_name_or_path>/tokenizer.model, or the "
                                              "tokenizer.model of the last --lora adapter that "
                                              "grew the vocabulary.", path=True)
    init_new_embeddings: str = flag("mean_of_pieces", "How to initialize rows added when the tokenizer is "
                                    "larger than the model: mean_of_pieces (mean of the base embeddings of "
                                    "the pieces the base tokenizer splits the new piece into) or default "
                                    "(transformers' resize).", choices=("mean_of_pieces", "default"))
    torch_dtype: str = flag("auto", "dtype to load the base weights in: auto (float16/bfloat16 when "
                            "--fp16/--bf16, else float32), float32, float16, bfloat16.",
                            choices=("auto", "float32", "float16", "bfloat16"))
    # --- data
    dataset_dir: Optional[str] = flag(None, "Directory of training files. Required.", path=True)
    data_cache_dir: Optional[str] = flag(None, "Where tokenized data is cached (keyed by file content, "
                                         "tokenizer and options). Default: <output_dir>/data_cache.", path=True)
    validation_split_percentage: float = flag(1.0, "Percent (0-100) of examples held out for evaluation; "
                                              "at least one example when > 0. Note: a real percentage "
                                              "(the seed's 0.001 was a fraction).")
    preprocessing_num_workers: Optional[int] = flag(None, "Processes used to tokenize the data.")
    # --- LoRA
    lora_rank: int = flag(8, "LoRA rank r.")
    lora_alpha: float = flag(32.0, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = flag(0.05, "Dropout on the LoRA input.")
    trainable: str = flag(SEED_TARGETS, "Comma-separated module names that get LoRA.")
    modules_to_save: Optional[str] = flag(SEED_MODULES_TO_SAVE, "Comma-separated modules trained fully and "
                                          "saved whole in the adapter ('none' for none).")
    peft_path: Optional[str] = flag(None, "Continue training this existing PEFT adapter instead of creating "
                                    "a new LoRA.", path=True)
    lora: list = flag([], "An earlier adapter to merge into the base in memory before training "
                      "(repeatable, applied in order; the 'Plus' recipe: PT adapter then SFT).", path=True)
    # --- optimisation
    output_dir: Optional[str] = flag(None, "Output directory: checkpoints and the final adapter. Required.",
                                     path=True)
    max_steps: int = flag(-1, "Total optimizer steps (overrides --num_train_epochs when > 0).")
    num_train_epochs: float = flag(1.0, "Epochs, when --max_steps is not set.")
    per_device_train_batch_size: int = flag(1, "Micro-batch size per device.")
    per_device_eval_batch_size: Optional[int] = flag(None, "Eval batch size (default: train batch size).")
    gradient_accumulation_steps: int = flag(1, "Micro-batches per optimizer step.")
    learning_rate: float = flag(2e-4, "Peak learning rate.")
    lr_scheduler_type: str = flag("cosine", "Learning-rate schedule (any transformers SchedulerType, e.g. "
                                  "cosine, linear, constant, constant_with_warmup).")
    warmup_ratio: float = flag(0.05, "Fraction of steps used for linear warmup.")
    warmup_steps: int = flag(0, "Warmup steps (overrides --warmup_ratio when > 0).")
    weight_decay: float = flag(0.01, "AdamW weight decay.")
    max_grad_norm: float = flag(1.0, "Gradient clipping norm.")
    seed: int = flag(42, "Random seed (model init of LoRA, data order, dropout).")
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass (less memory, "
                                        "slower).")
    fp16: bool = flag(False, "float16 mixed precision (CUDA only).")
    bf16: bool = flag(False, "bfloat16 mixed precision.")
    auto_batch: bool = flag(False, "Choose the micro-batch size and gradient checkpointing from the free GPU "
                            "memory (keeps the effective batch when it can) and say what was chosen.")
    # --- bookkeeping
    logging_steps: int = flag(10, "Log loss / learning rate every N steps.")
    save_steps: int = flag(500, "Save a checkpoint every N steps.")
    save_total_limit: Optional[int] = flag(3, "Keep at most N checkpoints.")
    eval_steps: Optional[int] = flag(None, "Evaluate every N steps (default: only at the end).")
    do_train: bool = flag(True, "Train (the seed required --do_train; here it is the default).")
    do_eval: Optional[bool] = flag(None, "Evaluate on the validation split (default: when there is one).")
    eval_before_train: bool = flag(False, "Also evaluate once before training, so the summary shows the "
                                   "eval loss before and after.")
    resume: Optional[str] = flag(None, "Resume from the latest complete checkpoint in --output_dir (bare flag; an "
                                 "error when there is none) or from the given checkpoint directory. Without "
                                 "the flag a run resumes anyway when --output_dir has a complete checkpoint.",
                                 path=True)
    overwrite_output_dir: bool = flag(False, "Delete the checkpoints in --output_dir and start over (instead of "
                                      "resuming from the latest one).")
    dataloader_num_workers: int = flag(0, "DataLoader worker processes.")
    deepspeed: Optional[str] = flag(None, "DeepSpeed JSON config (needs the deepspeed package).", path=True)
    ddp_find_unused_parameters: Optional[bool] = flag(None, "DDP find_unused_parameters (default False under "
                                                      "torchrun).")
    ddp_timeout: int = flag(1800, "Seconds before a distributed collective times out.")
    logging_first_step: bool = flag(True, "Also log the first step (so the progress bar has a loss from step 1).",
                                    seed_compat=True)
    report_to: str = flag("none", "Experiment trackers for transformers (none, tensorboard, wandb, ...).")
    config: Optional[str] = flag(None, "YAML file with any of these options (flags given on the command line "
                                 "win).", path=True)
    progress_bar: bool = flag(True, "Show the Rich progress bar.")
    hf_target: str = flag(DEFAULT_HF_TARGET, HF_TARGET_HELP + " Written with the adapter and every checkpoint.",
                          choices=HF_TARGETS)
    check: bool = flag(False, "Only check the options, files, tokenizer, vocabulary and checkpoints (before torch "
                       "is imported), print what training would do, and exit. The recipes run this before "
                       "torchrun.")

    # The seed's scripts accepted these TrainingArguments; they are fixed here and accepted for
    # compatibility (validated so a different value is not silently ignored).
    logging_strategy: str = flag("steps", "Accepted for seed compatibility; only 'steps'.",
                                 choices=("steps",), seed_compat=True)
    save_strategy: str = flag("steps", "Accepted for seed compatibility; only 'steps'.",
                              choices=("steps",), seed_compat=True)
    evaluation_strategy: Optional[str] = flag(None, "Accepted for seed compatibility (use --eval_steps).",
                                              choices=("steps", "no"), seed_compat=True)

    stage = "train"

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError("--model_name_or_path is required (a base LLaMA directory in HF format)")
        if not self.dataset_dir:
            raise ConfigError("--dataset_dir is required (a directory of training files)")
        if not self.output_dir:
            raise ConfigError("--output_dir is required")
        if not Path(self.model_name_or_path).is_dir():
            raise ConfigError(f"--model_name_or_path {self.model_name_or_path}: not a directory (downloads are "
                              f"not supported; give a local HF model directory)")
        if not Path(self.dataset_dir).is_dir():
            raise ConfigError(f"--dataset_dir {self.dataset_dir}: not a directory")
        if self.tokenizer_name_or_path and not Path(self.tokenizer_name_or_path).exists():
            raise ConfigError(f"--tokenizer_name_or_path {self.tokenizer_name_or_path}: no such file or directory")
        if not 0.0 <= self.validation_split_percentage < 100.0:
            raise ConfigError(f"--validation_split_percentage must be in [0, 100) (a percentage), got "
                              f"{self.validation_split_percentage}")
        for name in ("lora_rank", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "per_device_eval_batch_size", "preprocessing_num_workers",
                     "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max_steps must be > 0 (or -1 to use --num_train_epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError("--num_train_epochs must be > 0 when --max_steps is not set")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are mutually exclusive; pick one")
        if not self.trainable_modules:
            raise ConfigError("--trainable must name at least one module (e.g. q_proj,v_proj)")
        for path in self.lora:
            if not Path(path).is_dir():
                raise ConfigError(f"--lora {path}: not a directory (expected a PEFT adapter directory)")
        if self.peft_path and not Path(self.peft_path).is_dir():
            raise ConfigError(f"--peft_path {self.peft_path}: not a directory")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ConfigError(f"--deepspeed {self.deepspeed}: no such file")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            raise ConfigError(f"--resume {self.resume}: not a checkpoint directory")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("--resume and --overwrite_output_dir contradict each other; pick one")
        if not self.do_train and not self.do_eval:
            raise ConfigError("nothing to do: both --do_train and --do_eval are off")
        if self.hf_target not in HF_TARGETS:
            raise ConfigError(f"--hf_target {self.hf_target!r}: choose one of {', '.join(HF_TARGETS)}")

    # --- derived values
    @property
    def trainable_modules(self) -> list[str]:
        return _csv(self.trainable)

    @property
    def modules_to_save_list(self) -> list[str]:
        return _csv(self.modules_to_save)

    @property
    def cache_dir(self) -> Path:
        return Path(self.data_cache_dir) if self.data_cache_dir else Path(self.output_dir) / "data_cache"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_name_or_path or self.model_name_or_path


@dataclass
class PTConfig(TrainConfig):
    """`train pt`: LoRA incremental pre-training on raw text (a directory of .txt files)."""

    block_size: int = flag(512, "Tokens per training block (the concatenated text is cut into blocks).")
    add_eos: bool = flag(False, "Append EOS to every line (the -2 recipe's behaviour) besides the BOS.")

    stage = "pt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 2:
            raise ConfigError(f"--block_size must be >= 2, got {self.block_size}")


@dataclass
class SFTConfig(TrainConfig):
    """`train sft`: LoRA instruction fine-tuning on Alpaca JSON / JSONL files."""

    max_seq_length: int = flag(512, "Prompt + response tokens are truncated to this length.")
    prompt_template: str = flag("alpaca", "Prompt template: alpaca (the seed's v1 training prompt) or "
                                "alpaca-2 (LLaMA-2 chat format with a system prompt).",
                                choices=tuple(FORMATS))
    system_prompt: Optional[str] = flag(None, "System prompt for --prompt_template alpaca-2.")
    validation_file: Optional[str] = flag(None, "A separate Alpaca JSON/JSONL file for evaluation (instead "
                                          "of splitting --validation_split_percentage off the data).",
                                          path=True)
    learning_rate: float = flag(1e-4, "Peak learning rate.")

    stage = "sft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_seq_length < 2:
            raise ConfigError(f"--max_seq_length must be >= 2, got {self.max_seq_length}")
        if self.prompt_template not in FORMATS:
            raise ConfigError(f"--prompt_template {self.prompt_template!r}: choose one of {', '.join(FORMATS)}")
        if self.validation_file and not Path(self.validation_file).is_file():
            raise ConfigError(f"--validation_file {self.validation_file}: no such file")


CONFIGS = {"pt": PTConfig, "sft": SFTConfig}


# ----------------------------------------------------------------------------------------- parsing

class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise ConfigError(message)


def _parse_bool(flag_name: str):
    def convert(text: str) -> bool:
        low = str(text).strip().lower()
        if low in ("1", "true", "yes", "y", "on"):
            return True
        if low in ("0", "false", "no", "n", "off"):
            return False
        raise ConfigError(f"--{flag_name} takes true/false, got {text!r}")
    return convert


def _base_type(tp):
    """(python type, is_list) for a field annotation (Optional[...] unwrapped)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if tp is list or origin is list:
        return str, True
    return tp, False


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(stage: str) -> argparse.ArgumentParser:
    """The argparse parser for ``stage`` ('pt' or 'sft'); every flag with underscores and dashes."""
    cls = CONFIGS[stage]
    parser = _Parser(prog=f"cllama-deploy train {stage}", description=cls.__doc__, add_help=False,
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true", help="Show this message and exit.")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        tp, is_list = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, [], "") and not is_list:
            help_text += f" [default: {default}]"
        choices = f.metadata.get("choices")
        if is_list:
            parser.add_argument(*names, dest=f.name, action="append", metavar="DIR", help=help_text)
        elif tp is bool:
            # Seed style: `--fp16` alone means true; `--ddp_find_unused_parameters False` also works.
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=_parse_bool(f.name),
                                metavar="BOOL", help=help_text)
            parser.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", dest=f.name,
                                action="store_false", help=argparse.SUPPRESS)
        elif f.name == "resume":
            parser.add_argument(*names, dest=f.name, nargs="?", const="latest", metavar="CHECKPOINT",
                                help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=tp, choices=choices, metavar=tp.__name__.upper(),
                                help=help_text)
    return parser


def _unknown_flag_error(stage: str, token: str, parser: argparse.ArgumentParser) -> ConfigError:
    name = token.split("=", 1)[0].lstrip("-").replace("-", "_")
    if name in UNSUPPORTED_FLAGS:
        return ConfigError(f"--{name} is not supported by `train {stage}`: {UNSUPPORTED_FLAGS[name]}")
    known = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
    close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; see `cllama-deploy train {stage} --help`"
    return ConfigError(f"unknown option {token.split('=', 1)[0]} for `train {stage}`{hint}")


def load_yaml_config(path: str | Path, stage: str) -> dict[str, Any]:
    """Read a YAML option file: keys are flag names (underscores or dashes, no leading --)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    cls = CONFIGS[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in UNSUPPORTED_FLAGS:
            raise ConfigError(f"--config {path}: option '{key}' is not supported: {UNSUPPORTED_FLAGS[name]}")
        if name not in names or name == "config":
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--config {path}: unknown option '{key}' for `train {stage}`{hint}")
        tp, is_list = _base_type(hints[name])
        if value is not None:
            if is_list:
                value = [str(v) for v in (value if isinstance(value, list) else [value])]
            elif tp is bool and not isinstance(value, bool):
                value = _parse_bool(name)(str(value))
            elif tp in (int, float) and not isinstance(value, bool):
                try:
                    value = tp(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"--config {path}: option '{key}' must be {tp.__name__}, got {value!r}")
            elif tp is str and isinstance(value, list):
                value = ",".join(str(v) for v in value)  # trainable: [q_proj, v_proj] reads naturally
            elif tp is str:
                value = str(value)
        out[name] = value
    return out


def parse_args(stage: str, argv: list[str]) -> TrainConfig | None:
    """Build the stage's config from command-line flags (and ``--config FILE.yaml``).

    Returns None after printing help for ``-h/--help``.

    Raises:
        ConfigError: unknown or unsupported flag, bad value, failed validation.
    """
    if stage not in CONFIGS:
        raise ConfigError(f"unknown training stage {stage!r}; use 'pt' or 'sft'")
    parser = build_parser(stage)
    ns, unknown = parser.parse_known_args(argv)
    if getattr(ns, "help", False):
        parser.print_help(sys.stdout)
        return None
    if unknown:
        token = next((u for u in unknown if u.startswith("-")), unknown[0])
        if not token.startswith("-"):
            raise ConfigError(f"unexpected argument {token!r} for `train {stage}` (options start with --)")
        raise _unknown_flag_error(stage, token, parser)
    given = {k: v for k, v in vars(ns).items() if k != "help"}
    values: dict[str, Any] = {}
    if given.get("config"):
        values.update(load_yaml_config(given["config"], stage))
    values.update(given)
    return CONFIGS[stage](**values)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Options as a plain dict."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The options as ``{stage}_training_config.json`` records them: paths made absolute, so the record still
    says which base and adapters were used when the adapter is copied elsewhere (the merge reads it)."""
    out = config_to_dict(cfg)
    for f in dataclasses.fields(cfg):
        value = out[f.name]
        if not f.metadata.get("path") or value in (None, "", "latest"):
            continue
        out[f.name] = [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
    return out
