"""`train pt` / `train sft`: LoRA training with the HF Trainer (no training loop of our own).

The same function runs in one process, under ``torchrun`` (DDP; gloo on CPU) and with ``--deepspeed``;
the Trainer reads the distributed environment. Only the main process writes the final adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.errors import ConfigError, DependencyError, require
from cllama_deploy.files import atomic_dir, write_text_atomic

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

def _make_progress_callback(enabled: bool):
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """Rich bar on the main process: step, loss, tokens/s, elapsed and remaining time."""

        def __init__(self):
            self.bar = None
            self.task = None
            self.t0 = 0.0
            self.tok0 = 0
            self.step0 = 0
            self.loss = float("nan")

        def on_train_begin(self, args, state, control, **kw):
            if not enabled or not state.is_world_process_zero:
                return
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            from cllama_deploy.progress import console

            self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"),
                                TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                          loss=float("nan"), tps=0.0)
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
                self.loss = float(logs["loss"])
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

def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))


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


def _resolve_resume(cfg) -> str | None:
    out = Path(cfg.output_dir)
    existing = _checkpoints(out)
    if cfg.resume == "latest":
        complete = [p for p in existing if _complete(p)]
        if not complete:
            raise ConfigError(f"--resume: no complete checkpoint-* directory in {out} to resume from")
        skipped = [p.name for p in existing if p not in complete and int(p.name.split("-")[-1]) >
                   int(complete[-1].name.split("-")[-1])]
        if skipped and _world()[0] == 0:
            log.warning("skipping incomplete checkpoint(s) %s (interrupted while saving)", ", ".join(skipped))
        return str(complete[-1])
    if cfg.resume:
        if not _complete(Path(cfg.resume)):
            raise ConfigError(f"--resume {cfg.resume}: not a complete Trainer checkpoint (no readable "
                              f"trainer_state.json)")
        return str(Path(cfg.resume))
    if existing and cfg.do_train:
        if not cfg.overwrite_output_dir:
            raise ConfigError(f"--output_dir {out} already has checkpoints ({existing[-1].name}); pass --resume "
                              f"to continue that run or --overwrite_output_dir to start over")
        if _world()[0] == 0:
            for p in existing:
                shutil.rmtree(p)
    return None


def _cuda_free_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _apply_auto_batch(cfg, plan_vocab_rows: int) -> str:
    from cllama_deploy.training.model import estimate_trainable, plan_batch, read_model_config

    mcfg = read_model_config(cfg.model_name_or_path)
    seq = getattr(cfg, "block_size", None) or getattr(cfg, "max_seq_length", 512)
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


def _write_tokenizer(tok, out: Path) -> None:
    """Tokenizer files next to the adapter: complete HF files from the training tokenizer (its pad token, added
    tokens and chat template kept), whatever it carried (:func:`~cllama_deploy.tokenizer.hf.write_hf_tokenizer`)."""
    from cllama_deploy.tokenizer.hf import write_hf_tokenizer

    write_hf_tokenizer(out, tok.path if tok.path.is_dir() else tok.model_file)


def _save_adapter(trainer, cfg, tok) -> Path:
    final = Path(cfg.output_dir) / cfg.adapter_name
    from cllama_deploy.training.config import config_to_dict

    with atomic_dir(final) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        _write_tokenizer(tok, tmp)
    write_text_atomic(Path(cfg.output_dir) / f"{cfg.stage}_training_config.json",
                      json.dumps(config_to_dict(cfg), indent=1, default=str))
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


# ------------------------------------------------------------------------------------ the stage

def train(cfg, callbacks: list | None = None, *, show_summary: bool = True) -> TrainResult:
    """Run LoRA pre-training (:class:`PTConfig`) or instruction fine-tuning (:class:`SFTConfig`).

    Args:
        cfg: a validated PTConfig / SFTConfig.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. to stop early in tests).

    Returns:
        TrainResult with the adapter directory (on the main process), steps, tokens and losses.

    Raises:
        CllamaError subclasses for bad inputs (missing files, vocabulary mismatches, malformed data).
    """
    require("torch", "train")
    require("transformers", "train")
    require("peft", "train")
    require("datasets", "train")
    import torch
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from cllama_deploy.progress import console
    from cllama_deploy.training import data as data_mod
    from cllama_deploy.training.model import load_model, plan_vocab

    _quiet_libraries()
    rank, local_rank, world = _world()
    main = rank == 0
    if world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Share the CPU cores between the local processes instead of oversubscribing them (torchrun
        # normally sets OMP_NUM_THREADS=1 itself; an explicit setting is respected).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    cfg = copy.copy(cfg)  # defaults resolved below (do_eval, --auto_batch) must not leak into the caller's

    tok = data_mod.load_text_tokenizer(cfg.tokenizer_path)
    vplan = plan_vocab(cfg, tok)
    resume_from = _resolve_resume(cfg)
    notes = list(vplan.notes)
    if cfg.auto_batch:
        notes.append(_apply_auto_batch(cfg, vplan.tokenizer_size))
    for n in notes:
        if main:
            console.print(f"[cyan]{n}")

    # The default for --do_eval: evaluate when there is a validation set.
    has_val = cfg.validation_split_percentage > 0 or bool(getattr(cfg, "validation_file", None))
    if cfg.do_eval is None:
        cfg.do_eval = has_val
    elif cfg.do_eval and not has_val:
        raise ConfigError("--do_eval needs validation data: set --validation_split_percentage > 0"
                          + (" or --validation_file" if cfg.stage == "sft" else ""))

    args = build_training_args(cfg)
    with args.main_process_first(desc="tokenizing"):
        if cfg.stage == "pt":
            data = data_mod.load_pt_data(cfg, tok)
            collator = data_mod.PTCollator()
        else:
            data = data_mod.load_sft_data(cfg, tok)
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            collator = data_mod.SFTCollator(pad)
    if main:
        console.print(f"data: {len(data.files)} file(s), {data.examples:,} examples, {data.tokens:,} tokens "
                      f"(cache: {data.cache_hits} hit, {data.cache_misses} built)"
                      + (f", {data.dropped} dropped (prompt longer than --max_seq_length)" if data.dropped else "")
                      + (f"; {len(data.eval):,} held out for validation" if data.eval is not None else ""))

    # LoRA's A matrices are drawn when the adapter is created: seed before, so a run (and the run that
    # resumes it) starts from the same initialization whatever ran earlier in the process.
    from transformers import set_seed

    set_seed(cfg.seed)
    loaded = load_model(cfg, tok, vplan)
    if main:
        console.print(f"trainable parameters: {loaded.trainable_params:,} of {loaded.total_params:,} "
                      f"({100 * loaded.trainable_params / max(loaded.total_params, 1):.2f}%)")
    notes += loaded.notes[len(vplan.notes):]

    progress_cb = _make_progress_callback(cfg.progress_bar)
    trainer = Trainer(model=loaded.model, args=args, train_dataset=data.train if cfg.do_train else None,
                      eval_dataset=data.eval if cfg.do_eval else None, data_collator=collator,
                      callbacks=[progress_cb] + list(callbacks or []))
    trainer.remove_callback(PrinterCallback)

    initial_eval = None
    if cfg.do_eval and cfg.do_train and resume_from is None and cfg.eval_before_train:
        initial_eval = trainer.evaluate(metric_key_prefix="eval").get("eval_loss")

    t0 = time.perf_counter()
    train_loss = None
    if cfg.do_train:
        out = trainer.train(resume_from_checkpoint=resume_from)
        train_loss = out.training_loss
    seconds = time.perf_counter() - t0
    tokens_total = int(trainer.state.num_input_tokens_seen or 0)
    tokens_run = tokens_total
    if resume_from is not None:
        # Tokens done in this process: subtract what the checkpoint had already seen.
        state_file = Path(resume_from) / "trainer_state.json"
        if state_file.is_file():
            tokens_run -= int(json.loads(state_file.read_text()).get("num_input_tokens_seen", 0) or 0)

    eval_loss = None
    if cfg.do_eval:
        eval_loss = trainer.evaluate().get("eval_loss")

    adapter_dir = None
    if cfg.do_train:
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            adapter_dir = _save_adapter(trainer, cfg, tok)
        trainer.accelerator.wait_for_everyone()

    result = TrainResult(
        adapter_dir=adapter_dir, global_step=trainer.state.global_step, tokens=tokens_total,
        train_seconds=seconds, tokens_per_second=tokens_run / seconds if seconds > 0 else 0.0,
        train_loss=train_loss, eval_loss=eval_loss, eval_perplexity=_ppl(eval_loss),
        initial_eval_loss=initial_eval, trainable_params=loaded.trainable_params,
        total_params=loaded.total_params, resumed_from=resume_from, data_cache_hits=data.cache_hits,
        data_cache_misses=data.cache_misses, notes=notes, log_history=list(trainer.state.log_history))
    if main and show_summary:
        print_summary(result)
    return result


def train_pt(cfg, callbacks: list | None = None) -> TrainResult:
    """LoRA incremental pre-training; see :func:`train`."""
    return train(cfg, callbacks)


def train_sft(cfg, callbacks: list | None = None) -> TrainResult:
    """LoRA instruction fine-tuning; see :func:`train`."""
    return train(cfg, callbacks)
