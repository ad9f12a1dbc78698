"""`train pt` / `train sft`: LoRA training with the HF Trainer (no training loop of our own).

The same function runs in one process, under ``torchrun`` (DDP; gloo on CPU) and with ``--deepspeed``;
the Trainer reads the distributed environment. Only the main process writes the final adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.checkpoint.provenance import RECORD_SUFFIX
from cllama_deploy.errors import ConfigError, DependencyError, require
from cllama_deploy.files import atomic_dir, write_text_atomic
from cllama_deploy.training.config import _csv, config_record
from cllama_deploy.training.data import TextTokenizer, load_text_tokenizer
from cllama_deploy.training.model import VocabPlan, plan_vocab
from cllama_deploy.training.stages import Stage, stage_of

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    adapter_dir: Path | None
    global_step: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    initial_eval_loss: float | None
    trainable_params: int
    total_params: int
    resumed_from: str | None
    data_cache_hits: int
    data_cache_misses: int
    notes: list[str] = field(default_factory=list)
    log_history: list[dict] = field(default_factory=list)


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ------------------------------------------------------------------------------------ progress

NO_LOSS = "–"  # shown until the Trainer has reported a loss


def _make_progress_callback(enabled: bool):
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """Rich bar on the main process: step, loss, tokens/s, elapsed and remaining time.

        The loss is the last one the Trainer logged (every --logging_steps, and step 1 with
        --logging_first_step); a run that ends before its first log shows its train_loss.
        """

        def __init__(self):
            self.bar = None
            self.task = None
            self.t0 = 0.0
            self.tok0 = 0
            self.step0 = 0
            self.loss = NO_LOSS

        def on_train_begin(self, args, state, control, **kw):
            if not enabled or not state.is_world_process_zero:
                return
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            from cllama_deploy.progress import console

            self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"),
                                TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                          loss=self.loss, tps=0.0)
            self.t0 = time.perf_counter()
            self.tok0 = state.num_input_tokens_seen or 0
            self.step0 = state.global_step

        def on_step_end(self, args, state, control, **kw):
            if self.bar is None:
                return
            dt = max(time.perf_counter() - self.t0, 1e-9)
            tps = ((state.num_input_tokens_seen or 0) - self.tok0) / dt
            self.bar.update(self.task, completed=state.global_step, tps=tps, loss=self.loss)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs:
                return
            if "loss" in logs:
                self.loss = f"{float(logs['loss']):.4f}"
            elif "train_loss" in logs and self.loss == NO_LOSS:
                self.loss = f"{float(logs['train_loss']):.4f}"
            self.bar.update(self.task, loss=self.loss)
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()
                     if k in ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch")]
            if any(k in logs for k in ("loss", "eval_loss")):
                self.bar.console.log(f"step {state.global_step}: " + ", ".join(parts))

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()


def print_summary(result: TrainResult) -> None:
    from rich.table import Table

    from cllama_deploy.progress import console

    t = Table(title="training summary", show_header=False)
    t.add_row("steps", str(result.global_step))
    t.add_row("tokens", f"{result.tokens:,}")
    t.add_row("time", f"{result.train_seconds:.1f} s")
    t.add_row("tokens/s", f"{result.tokens_per_second:,.0f}")
    t.add_row("trainable params", f"{result.trainable_params:,} of {result.total_params:,}")
    if result.train_loss is not None:
        t.add_row("train loss", f"{result.train_loss:.4f}")
    if result.initial_eval_loss is not None:
        t.add_row("eval loss before", f"{result.initial_eval_loss:.4f} (ppl {_ppl(result.initial_eval_loss):.2f})")
    if result.eval_loss is not None:
        t.add_row("eval loss", f"{result.eval_loss:.4f}")
        t.add_row("eval perplexity", f"{result.eval_perplexity:.2f}")
    if result.adapter_dir:
        t.add_row("adapter", str(result.adapter_dir))
    console.print(t)


# ------------------------------------------------------------------------------------ helpers

def _step(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[-1])


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=_step)


def _complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


# Options a resumed run must share with the run that wrote the checkpoint: they define the model being
# trained or its data. (The seed is taken from the checkpoint: it fixes the data order being resumed.)
SAME_RUN_OPTIONS = ("model_name_or_path", "tokenizer_name_or_path", "lora", "peft_path", "lora_rank", "lora_alpha",
                    "trainable", "modules_to_save", "dataset_dir", "validation_split_percentage", "block_size",
                    "add_eos", "max_seq_length", "prompt_template", "system_prompt")
# Options a resumed run may change (say, a longer run or a lower learning rate), named in a note because they
# change the course of the run being continued.
NOTED_ON_RESUME = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                   "warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "fp16", "bf16", "torch_dtype")


def _run_option(name: str, value):
    if name in ("trainable", "modules_to_save"):
        return _csv(value)
    return value


def _check_same_run(cfg, stage: Stage, ckpt: Path, notes: list[str]) -> None:
    """Refuse to resume a checkpoint of another run (its record differs in :data:`SAME_RUN_OPTIONS`); take the
    checkpoint's seed. Checkpoints written before records existed are resumed unchecked."""
    records = sorted(ckpt.glob(f"*{RECORD_SUFFIX}"))
    if not records:
        return
    if records[0].name != stage.record_name:
        raise ConfigError(f"{ckpt} is a checkpoint of `train {records[0].name[:-len(RECORD_SUFFIX)]}`, not `train "
                          f"{stage.name}`: use another --output_dir, or --overwrite_output_dir to start over")
    try:
        recorded = json.loads(records[0].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    now = config_record(cfg)
    for name in SAME_RUN_OPTIONS:
        if name in recorded and name in now and _run_option(name, recorded[name]) != _run_option(name, now[name]):
            raise ConfigError(
                f"{ckpt} was trained with --{name} {recorded[name]!r}, this run has {now[name]!r}: pass the same "
                f"value to resume it, or --overwrite_output_dir to start over (or use another --output_dir)")
    changed = [f"--{name} {recorded[name]} → {now[name]}" for name in NOTED_ON_RESUME
               if name in recorded and name in now and recorded[name] != now[name]]
    if changed:
        notes.append(f"options changed since {ckpt.name} was written: {', '.join(changed)}")
    seed = recorded.get("seed")
    if isinstance(seed, int) and seed != cfg.seed:
        notes.append(f"--seed: using {seed}, the seed of the run being resumed (given: {cfg.seed}), so the data "
                     f"order continues")
        cfg.seed = seed


@dataclass
class CheckpointPlan:
    """What a run does with the checkpoints of its ``--output_dir`` (:func:`resolve_checkpoints`)."""

    resume_from: Path | None = None
    to_delete: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    finished: bool = False  # resume_from is the run's last step: nothing left to train


def _finished(cfg, state: dict, step: int) -> tuple[bool, int | None]:
    """Whether a checkpoint at ``step`` ends the run: the Trainer would train one step more when resumed
    there (transformers 5.24), so such a run is not resumed but finished from the checkpoint."""
    end = cfg.max_steps if cfg.max_steps > 0 else None
    if end is None and state.get("num_train_epochs") == cfg.num_train_epochs:
        end = state.get("max_steps")  # the Trainer's count for --num_train_epochs, recorded in the state
    return (isinstance(end, int) and step >= end), end


def resolve_checkpoints(cfg, stage: Stage) -> CheckpointPlan:
    """What to do with ``--output_dir``'s checkpoints.

    A run resumes from the latest complete checkpoint when there is one (``--resume`` insists on it,
    ``--resume DIR`` names it), unless ``--overwrite_output_dir`` asks to delete them and start over.
    Nothing is deleted here: :func:`train` deletes ``to_delete`` once every check has passed.

    Raises:
        ConfigError: ``--resume`` without a complete checkpoint; a checkpoint of another run.
    """
    out = Path(cfg.output_dir)
    existing = _checkpoints(out)
    plan = CheckpointPlan()
    notes = plan.notes
    if not cfg.do_train:
        return plan
    if cfg.overwrite_output_dir:
        if existing:
            notes.append(f"--overwrite_output_dir: deleting {', '.join(p.name for p in existing)} in {out} and "
                         f"starting over")
        plan.to_delete = existing
        return plan
    if cfg.resume not in (None, "latest"):
        ckpt = Path(cfg.resume)
        if not _complete(ckpt):
            raise ConfigError(f"--resume {cfg.resume}: not a complete Trainer checkpoint (no readable "
                              f"trainer_state.json)")
        how = "--resume"
    else:
        complete = [p for p in existing if _complete(p)]
        if not complete:
            if cfg.resume == "latest":
                raise ConfigError(f"--resume: no complete checkpoint-* directory in {out} to resume from")
            if existing:
                notes.append(f"ignoring {', '.join(p.name for p in existing)} in {out}: cut short while saving "
                             f"(no trainer_state.json); starting from step 0")
            return plan
        ckpt = complete[-1]
        skipped = [p.name for p in existing if p not in complete and _step(p) > _step(ckpt)]
        if skipped:
            notes.append(f"skipping {', '.join(skipped)}: cut short while saving (no trainer_state.json)")
        how = "--resume" if cfg.resume else "found in --output_dir; --overwrite_output_dir starts over instead"
    _check_same_run(cfg, stage, ckpt, notes)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    step = state.get("global_step", _step(ckpt))
    plan.finished, end = _finished(cfg, state, step)
    notes.append(f"resuming from {ckpt} (step {step}{f' of {end}' if end else ''}; {how})")
    if plan.finished:
        notes.append(f"{ckpt.name} is the last step of the run: nothing left to train; the adapter is written "
                     f"from it")
    plan.resume_from = ckpt
    return plan


@dataclass
class RunPlan:
    """Everything :func:`prepare` checked and decided before torch is imported."""

    stage: Stage
    cfg: object  # a copy of the caller's config with run-time defaults resolved (do_eval, seed on resume)
    tok: TextTokenizer
    vocab: VocabPlan
    files: list[Path]
    resume_from: Path | None
    to_delete: list[Path]
    notes: list[str]
    finished: bool = False  # resume_from is the last step of the run: train nothing, write the adapter


def prepare(cfg) -> RunPlan:
    """The checks that need no torch, transformers or datasets, in the order of their cost: input files,
    validation data, deepspeed, the tokenizer and the vocabulary plan (config.json and the adapters' shapes),
    the checkpoints to resume or delete. A mistake here costs well under a second instead of the heavy
    imports' several seconds.

    Raises:
        CllamaError subclasses, each one line naming the flag.
    """
    stage = stage_of(cfg)
    cfg = copy.copy(cfg)  # defaults resolved here (do_eval, seed) must not leak into the caller's config
    files = stage.input_files(cfg)
    if cfg.do_eval is None:
        cfg.do_eval = stage.has_validation(cfg)
    elif cfg.do_eval and not stage.has_validation(cfg):
        raise ConfigError(f"--do_eval needs validation data: {stage.validation_hint}")
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise DependencyError("--deepspeed needs the deepspeed package: pip install deepspeed (on a machine with a "
                              "CUDA GPU), or drop --deepspeed")
    tok = load_text_tokenizer(cfg.tokenizer_path)
    vplan = plan_vocab(cfg, tok)
    ckpts = resolve_checkpoints(cfg, stage)
    return RunPlan(stage=stage, cfg=cfg, tok=tok, vocab=vplan, files=files, resume_from=ckpts.resume_from,
                   to_delete=ckpts.to_delete, notes=list(vplan.notes) + ckpts.notes, finished=ckpts.finished)


def _cuda_free_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _apply_auto_batch(cfg, stage: Stage, plan_vocab_rows: int) -> str:
    from cllama_deploy.training.model import estimate_trainable, plan_batch, read_model_config

    mcfg = read_model_config(cfg.model_name_or_path)
    seq = stage.seq_len(cfg)
    trainable = estimate_trainable(mcfg, plan_vocab_rows, cfg)
    wbytes = 4 if not (cfg.fp16 or cfg.bf16 or cfg.torch_dtype in ("float16", "bfloat16")) else 2
    bp = plan_batch(_cuda_free_bytes(), mcfg, plan_vocab_rows, trainable, seq, cfg.per_device_train_batch_size,
                    cfg.gradient_accumulation_steps, cfg.gradient_checkpointing, wbytes)
    cfg.per_device_train_batch_size = bp.per_device_train_batch_size
    cfg.gradient_accumulation_steps = bp.gradient_accumulation_steps
    cfg.gradient_checkpointing = bp.gradient_checkpointing
    return bp.message


def build_training_args(cfg):
    """HF TrainingArguments from our config (the distributed environment is read here)."""
    import torch
    from transformers import TrainingArguments

    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA GPU; on CPU use --bf16 or neither")
    if cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:  # ImportError, or its own errors when no accelerator is usable
            raise DependencyError(f"--deepspeed needs the deepspeed package (pip install deepspeed) and a "
                                  f"usable accelerator: {exc}") from exc
    _, _, world = _world()
    do_eval = bool(cfg.do_eval)
    kwargs = dict(
        output_dir=str(cfg.output_dir),
        do_train=cfg.do_train,
        do_eval=do_eval,
        eval_strategy="steps" if do_eval and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        logging_steps=cfg.logging_steps,
        logging_first_step=cfg.logging_first_step,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        fp16=cfg.fp16,
        bf16=cfg.bf16,
        deepspeed=cfg.deepspeed,
        ddp_find_unused_parameters=(cfg.ddp_find_unused_parameters if cfg.ddp_find_unused_parameters is not None
                                    else False if world > 1 else None),
        ddp_timeout=cfg.ddp_timeout,
        dataloader_num_workers=cfg.dataloader_num_workers,
        report_to=[] if cfg.report_to in ("none", "", None) else cfg.report_to.split(","),
        remove_unused_columns=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
    )
    if world > 1 and not torch.cuda.is_available():
        kwargs["ddp_backend"] = "gloo"
    if not torch.cuda.is_available():
        kwargs["dataloader_pin_memory"] = False
        # Without use_cpu, accelerate leaves a multi-process CPU run as DistributedType.NO: every process
        # would train its own copy with no gradient all-reduce. use_cpu makes it MULTI_CPU (DDP over gloo).
        kwargs["use_cpu"] = True
    # transformers 5 renamed gradient checkpointing to activation checkpointing (old names deprecated).
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[ckpt] = cfg.gradient_checkpointing
    kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"invalid training options: {exc}") from exc


def _write_adapter_extras(plan: RunPlan, out: Path) -> None:
    """What makes an adapter directory deployable on its own, written next to the adapter weights (the final
    ``{stage}_lora_model/`` and every ``checkpoint-N/``): the complete HF tokenizer files of the training
    tokenizer (pad token, added tokens, chat template kept;
    :func:`~cllama_deploy.tokenizer.hf.write_hf_tokenizer`) and the training record the merge reads to check
    the adapter order."""
    from cllama_deploy.tokenizer.hf import write_hf_tokenizer

    tok = plan.tok
    write_hf_tokenizer(out, tok.path if tok.path.is_dir() else tok.model_file, target=plan.cfg.hf_target)
    # inside a directory that is itself made complete later (atomic_dir, or trainer_state.json written last)
    (out / plan.stage.record_name).write_text(_record_json(plan.cfg), encoding="utf-8")


def _record_json(cfg) -> str:
    return json.dumps(config_record(cfg), indent=1, default=str)


def _trainer_class():
    """The HF Trainer, with one addition: each checkpoint also gets :func:`_write_adapter_extras`, written
    before the Trainer writes trainer_state.json (so a checkpoint that counts as complete has them)."""
    from transformers import Trainer

    class CllamaTrainer(Trainer):
        def __init__(self, *args, checkpoint_extras=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._checkpoint_extras = checkpoint_extras

        def save_model(self, output_dir=None, _internal_call=False):
            super().save_model(output_dir, _internal_call)
            if _internal_call and self.args.should_save and self._checkpoint_extras is not None:
                self._checkpoint_extras(Path(output_dir or self.args.output_dir))

    return CllamaTrainer


def _save_adapter(trainer, plan: RunPlan) -> Path:
    cfg = plan.cfg
    final = Path(cfg.output_dir) / plan.stage.adapter_name
    with atomic_dir(final) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        _write_adapter_extras(plan, tmp)
    write_text_atomic(Path(cfg.output_dir) / plan.stage.record_name, _record_json(cfg))
    return final


def _quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    # Deprecation notices raised inside transformers/peft themselves, not by our calls.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.utils.logging.set_verbosity_warning()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


def _note(text: str) -> None:
    """One decision of the run, on one line (paths may hold brackets: no markup; no wrapping)."""
    from cllama_deploy.progress import console

    console.print(text, style="cyan", markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------ the stage

def train(cfg, callbacks: list | None = None, *, show_summary: bool = True) -> TrainResult | None:
    """Run LoRA pre-training (:class:`PTConfig`) or instruction fine-tuning (:class:`SFTConfig`).

    Everything that needs no torch is checked first (:func:`prepare`); with ``cfg.check`` that is all
    that runs.

    Args:
        cfg: a validated PTConfig / SFTConfig.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. to stop early in tests).

    Returns:
        TrainResult with the adapter directory (on the main process), steps, tokens and losses; None with
        ``cfg.check``.

    Raises:
        CllamaError subclasses for bad inputs (missing files, vocabulary mismatches, malformed data).
    """
    from cllama_deploy.progress import console

    plan = prepare(cfg)
    cfg, stage, tok, vplan = plan.cfg, plan.stage, plan.tok, plan.vocab
    rank, _local_rank, world = _world()
    main = rank == 0
    if main:
        for n in plan.notes:
            _note(n)
    if cfg.check:
        if main:
            console.print(f"check passed: `train {stage.name}` would read {len(plan.files)} file(s) and write "
                          f"{Path(cfg.output_dir) / stage.adapter_name}", markup=False, highlight=False,
                          soft_wrap=True)
        return None

    require("torch", "train")
    require("transformers", "train")
    require("peft", "train")
    require("datasets", "train")
    import torch
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    from cllama_deploy.training.model import load_model

    _quiet_libraries()
    if world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Share the CPU cores between the local processes instead of oversubscribing them (torchrun
        # normally sets OMP_NUM_THREADS=1 itself; an explicit setting is respected).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    notes = list(plan.notes)
    if cfg.auto_batch:
        notes.append(_apply_auto_batch(cfg, stage, vplan.tokenizer_size))
        if main:
            _note(notes[-1])

    args = build_training_args(cfg)
    with args.main_process_first(desc="tokenizing"):
        data = stage.load_data(cfg, tok)
    collator = stage.collator(tok)
    if main:
        console.print(f"data: {len(data.files)} file(s), {data.examples:,} examples, {data.tokens:,} tokens "
                      f"(cache: {data.cache_hits} hit, {data.cache_misses} built)"
                      + (f", {data.dropped} dropped (prompt longer than --max_seq_length)" if data.dropped else "")
                      + (f"; {len(data.eval):,} held out for validation" if data.eval is not None else ""))

    # LoRA's A matrices are drawn when the adapter is created: seed before, so a run (and the run that
    # resumes it) starts from the same initialization whatever ran earlier in the process.
    set_seed(cfg.seed)
    loaded = load_model(cfg, tok, vplan)
    if main:
        console.print(f"trainable parameters: {loaded.trainable_params:,} of {loaded.total_params:,} "
                      f"({100 * loaded.trainable_params / max(loaded.total_params, 1):.2f}%)")
    notes += loaded.notes[len(vplan.notes):]

    if main:  # --overwrite_output_dir: only now that every input has been read
        for ckpt in plan.to_delete:
            shutil.rmtree(ckpt)
    progress_cb = _make_progress_callback(cfg.progress_bar)
    trainer = _trainer_class()(
        model=loaded.model, args=args, train_dataset=data.train if cfg.do_train else None,
        eval_dataset=data.eval if cfg.do_eval else None, data_collator=collator,
        callbacks=[progress_cb] + list(callbacks or []),
        checkpoint_extras=lambda d: _write_adapter_extras(plan, d))
    trainer.remove_callback(PrinterCallback)

    resume_from = plan.resume_from
    initial_eval = None
    if cfg.do_eval and cfg.do_train and resume_from is None and cfg.eval_before_train:
        initial_eval = trainer.evaluate(metric_key_prefix="eval").get("eval_loss")

    t0 = time.perf_counter()
    train_loss = None
    if plan.finished:
        from transformers import TrainerState

        # what trainer.train would load before its one extra step
        trainer.model.load_adapter(str(resume_from), trainer.model.active_adapter, is_trainable=True)
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    elif cfg.do_train:
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_loss = out.training_loss
    seconds = time.perf_counter() - t0
    tokens_total = int(trainer.state.num_input_tokens_seen or 0)
    tokens_run = tokens_total
    if resume_from is not None:
        # Tokens done in this process: subtract what the checkpoint had already seen.
        state_file = resume_from / "trainer_state.json"
        if state_file.is_file():
            tokens_run -= int(json.loads(state_file.read_text()).get("num_input_tokens_seen", 0) or 0)

    eval_loss = None
    if cfg.do_eval:
        eval_loss = trainer.evaluate().get("eval_loss")

    adapter_dir = None
    if cfg.do_train:
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            adapter_dir = _save_adapter(trainer, plan)
        trainer.accelerator.wait_for_everyone()

    result = TrainResult(
        adapter_dir=adapter_dir, global_step=trainer.state.global_step, tokens=tokens_total,
        train_seconds=seconds, tokens_per_second=tokens_run / seconds if seconds > 0 else 0.0,
        train_loss=train_loss, eval_loss=eval_loss, eval_perplexity=_ppl(eval_loss),
        initial_eval_loss=initial_eval, trainable_params=loaded.trainable_params,
        total_params=loaded.total_params, resumed_from=str(resume_from) if resume_from else None,
        data_cache_hits=data.cache_hits, data_cache_misses=data.cache_misses, notes=notes,
        log_history=list(trainer.state.log_history))
    if main and show_summary:
        print_summary(result)
    return result


def train_pt(cfg, callbacks: list | None = None) -> TrainResult:
    """LoRA incremental pre-training; see :func:`train`."""
    return train(cfg, callbacks)


def train_sft(cfg, callbacks: list | None = None) -> TrainResult:
    """LoRA instruction fine-tuning; see :func:`train`."""
    return train(cfg, callbacks)
