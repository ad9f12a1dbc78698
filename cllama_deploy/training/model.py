"""The model side of training: load the base, pre-merge earlier adapters, resize the vocabulary, add LoRA.

Vocabulary rules (checked before any weight is loaded):

* tokenizer pieces == model rows: nothing to do (49953/49953, 49954/49954, any consistent pair);
* tokenizer larger than the model (32000 base with the 49953 merged tokenizer): the first rows must be
  the base tokenizer's pieces in the same order; ``embed_tokens`` and ``lm_head`` grow, and each new row
  starts as the mean of the base rows of the pieces the *base* tokenizer splits the new piece into;
* tokenizer smaller than the model: an error (ids past the tokenizer would never be trained or produced
  consistently; use the tokenizer the model was trained with).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.checkpoint.hf import load_config
from cllama_deploy.checkpoint.peft import open_adapter
from cllama_deploy.checkpoint.validate import VOCAB_TENSORS
from cllama_deploy.errors import CheckpointError, ConfigError, ShapeMismatchError, TokenizerError
from cllama_deploy.tokenizer import spm

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# ------------------------------------------------------------------------------------ vocabulary plan

def read_model_config(model_dir: str | Path) -> dict:
    """The base model's ``config.json``, checked by the checkpoint reader (no weights are read)."""
    return load_config(Path(model_dir), flag="--model_name_or_path")


def adapter_vocab_rows(adapter_dir: str | Path, flag: str = "--lora") -> int | None:
    """Rows of the embed_tokens/lm_head an adapter saves whole (None when it saves neither), from the PEFT
    reader's plan of the adapter (no tensor data is read)."""
    try:
        adapter = open_adapter(adapter_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag}: {exc}") from exc
    rows = [adapter.full_shape(t)[0] for t in VOCAB_TENSORS if t in adapter.full]
    return max(rows) if rows else None


@dataclass
class VocabPlan:
    """What happens to the vocabulary: ``model_rows`` (after pre-merged adapters) → ``tokenizer_size``."""

    model_rows: int
    tokenizer_size: int
    base_tokenizer: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def added(self) -> int:
        return self.tokenizer_size - self.model_rows


def _sp_pieces(model_file: Path) -> list[str]:
    sp = spm.processor(model_file)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def plan_vocab(cfg, tok) -> VocabPlan:
    """Validate tokenizer vs model vocabulary (and pre-merged adapters) before loading weights.

    Raises:
        ShapeMismatchError: tokenizer smaller than the model, base tokenizer inconsistent with the model,
            merged tokenizer not an extension of the base tokenizer.
        ConfigError: a resize is needed but embed_tokens/lm_head would not be trained and saved.
    """
    rows = read_model_config(cfg.model_name_or_path)["vocab_size"]
    notes = []
    # The tokenizer that matches the current rows: the model's own, or that of the last adapter that grew
    # the vocabulary (the "Plus" recipe: SFT on top of a PT adapter that saved 49953-row embeddings).
    rows_tokenizer = Path(cfg.model_name_or_path) / "tokenizer.model"
    adapters = [(a, "--lora") for a in cfg.lora] + ([(cfg.peft_path, "--peft_path")] if cfg.peft_path else [])
    for adapter, flag in adapters:
        a_rows = adapter_vocab_rows(adapter, flag)
        if a_rows and a_rows != rows:
            if a_rows < rows:
                raise ShapeMismatchError(f"adapter {adapter} saved embed_tokens/lm_head with {a_rows} rows but the "
                                         f"model has {rows}; it was trained on another base")
            notes.append(f"adapter {adapter} grows the vocabulary {rows} → {a_rows}")
            rows = a_rows
            rows_tokenizer = Path(adapter) / "tokenizer.model"
    n_tok = len(tok)
    plan = VocabPlan(model_rows=rows, tokenizer_size=n_tok, notes=notes)
    if n_tok < rows:
        raise ShapeMismatchError(
            f"the tokenizer ({tok.path}) has {n_tok} pieces but the model has {rows} embedding rows; the "
            f"tokenizer must match the model or extend it (e.g. a 49953-piece merged tokenizer on a 32000 "
            f"base): pass the tokenizer the model was trained with via --tokenizer_name_or_path")
    if n_tok == rows:
        return plan
    # Growing: the merged tokenizer must keep the base pieces first, in order.
    base = Path(cfg.base_tokenizer_path) if cfg.base_tokenizer_path else rows_tokenizer
    if base.is_dir():
        base = base / "tokenizer.model"
    if not base.is_file():
        if cfg.init_new_embeddings == "mean_of_pieces":
            raise ConfigError(
                f"the tokenizer adds {n_tok - rows} pieces to the model's {rows}; initializing them needs the "
                f"base model's tokenizer.model ({base} not found): pass --base_tokenizer_path, or "
                f"--init_new_embeddings default")
    else:
        base_pieces = _sp_pieces(base)
        if len(base_pieces) != rows:
            raise ShapeMismatchError(f"the base tokenizer {base} has {len(base_pieces)} pieces but the model has "
                                     f"{rows} embedding rows; pass the model's own tokenizer via "
                                     f"--base_tokenizer_path")
        new_pieces = tok.pieces()
        for i, (a, b) in enumerate(zip(base_pieces, new_pieces)):
            if a != b:
                raise TokenizerError(
                    f"the tokenizer {tok.path} is not an extension of the base tokenizer {base}: piece {i} is "
                    f"{b!r} but the base has {a!r}; merge the Chinese pieces after the base pieces "
                    f"(`cllama-deploy tokenizer merge`)")
        plan.base_tokenizer = base
    mts = set(cfg.modules_to_save_list)
    if not {"embed_tokens", "lm_head"} <= mts:
        raise ConfigError(f"the tokenizer adds {n_tok - rows} pieces to the model's {rows}: --modules_to_save "
                          f"must include embed_tokens,lm_head so the new rows are trained and saved "
                          f"(got {cfg.modules_to_save!r})")
    plan.notes.append(f"vocabulary {rows} → {n_tok} ({n_tok - rows} new rows, init: {cfg.init_new_embeddings})")
    return plan


# ------------------------------------------------------------------------------------ init of new rows

def _base_encoder(base_model_file: Path):
    """The base SentencePiece model with no dummy prefix and whitespace kept, so a piece's text (with
    '▁' turned back into a space) is split exactly into base pieces."""
    proto = spm.load_model(base_model_file)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.processor(proto)


def pieces_decomposition(new_pieces: list[str], old_rows: int, base_model_file: Path,
                         special_ids: set[int]) -> list[list[int]]:
    """For each piece with id >= old_rows: the base ids it splits into ([] = no text: use the mean row)."""
    sp = _base_encoder(base_model_file)
    unk = sp.unk_id()
    out = []
    for i in range(old_rows, len(new_pieces)):
        piece = new_pieces[i]
        if i in special_ids or not piece:
            out.append([])
            continue
        if _BYTE_PIECE.fullmatch(piece):
            pid = sp.piece_to_id(piece)
            out.append([pid] if pid != unk else [])
            continue
        ids = [j for j in sp.encode(piece.replace("\u2581", " ")) if j != unk and j < old_rows]
        out.append(ids)
    return out


def init_new_rows(model, old_rows: int, decomposition: list[list[int]]) -> None:
    """Set rows old_rows.. of embed_tokens (and an untied lm_head) to the mean of the base rows listed."""
    import torch

    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None and head_mod.weight is not emb else None
    n_new = len(decomposition)
    rows, cols, vals = [], [], []
    empty = []
    for k, ids in enumerate(decomposition):
        if not ids:
            empty.append(k)
            continue
        for j in ids:
            rows.append(k)
            cols.append(j)
            vals.append(1.0 / len(ids))
    rows_t = torch.tensor(rows, dtype=torch.long)
    cols_t = torch.tensor(cols, dtype=torch.long)
    vals_t = torch.tensor(vals, dtype=torch.float32)
    chunk = 8192  # bounded memory: chunk × hidden floats at a time (a dense new×old matrix would be GBs)
    with torch.no_grad():
        for w in [emb] + ([head] if head is not None else []):
            base = w[:old_rows]
            new = torch.zeros(n_new, w.shape[1], dtype=torch.float32)
            for i in range(0, len(rows), chunk):
                part = base[cols_t[i:i + chunk]].float() * vals_t[i:i + chunk, None]
                new.index_add_(0, rows_t[i:i + chunk], part)
            if empty:
                new[torch.tensor(empty)] = base.float().mean(0)
            w[old_rows:old_rows + n_new] = new.to(w.dtype)


def resize_vocab(model, plan: VocabPlan, tok, how: str = "mean_of_pieces") -> None:
    """Grow embed_tokens / lm_head to the tokenizer's size and initialize the new rows."""
    old = model.get_input_embeddings().weight.shape[0]
    if plan.tokenizer_size == old:
        return
    if how == "default" or plan.base_tokenizer is None:
        model.resize_token_embeddings(plan.tokenizer_size)
        return
    model.resize_token_embeddings(plan.tokenizer_size, mean_resizing=False)
    deco = pieces_decomposition(tok.pieces(), old, plan.base_tokenizer, tok.special_ids())
    init_new_rows(model, old, deco)


# ------------------------------------------------------------------------------------ loading

def torch_dtype(cfg):
    import torch

    name = cfg.torch_dtype
    if name == "auto":
        name = "float16" if cfg.fp16 else "bfloat16" if cfg.bf16 else "float32"
    return getattr(torch, name)


def _resize_for_adapter(model, adapter_dir: str, flag: str) -> None:
    rows = adapter_vocab_rows(adapter_dir, flag)
    if rows and rows > model.get_input_embeddings().weight.shape[0]:
        # The adapter's saved embed_tokens/lm_head replace these rows wholesale.
        model.resize_token_embeddings(rows, mean_resizing=False)


def check_module_names(model, names: list[str], flag: str) -> None:
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(f"{flag}: no module named {', '.join(missing)} in the model (LLaMA has q_proj, k_proj, "
                          f"v_proj, o_proj, gate_proj, up_proj, down_proj, embed_tokens, lm_head)")


@dataclass
class LoadedModel:
    model: object
    trainable_params: int
    total_params: int
    notes: list[str]


def load_model(cfg, tok, plan: VocabPlan) -> LoadedModel:
    """Base model → pre-merged ``--lora`` adapters → resized vocabulary → trainable LoRA (or --peft_path)."""
    import torch
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=dtype)
    except OSError as exc:
        raise CheckpointError(f"--model_name_or_path {cfg.model_name_or_path}: cannot load the model ({exc})") from exc
    notes = list(plan.notes)
    for adapter in cfg.lora:
        _resize_for_adapter(model, adapter, "--lora")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        notes.append(f"merged {adapter} into the base in memory")
    resize_vocab(model, plan, tok, cfg.init_new_embeddings)
    model.config.vocab_size = plan.tokenizer_size
    if tok.pad_id is not None:
        model.config.pad_token_id = tok.pad_id
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.peft_path:
        _resize_for_adapter(model, cfg.peft_path, "--peft_path")
        model = PeftModel.from_pretrained(model, cfg.peft_path, is_trainable=True)
        notes.append(f"continuing adapter {cfg.peft_path}")
    else:
        check_module_names(model, cfg.trainable_modules, "--trainable")
        check_module_names(model, cfg.modules_to_save_list, "--modules_to_save")
        lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=cfg.trainable_modules,
                          modules_to_save=cfg.modules_to_save_list or None, inference_mode=False)
        model = get_peft_model(model, lcfg)
    # Mixed precision trains fp32 master weights: trainable tensors loaded in 16-bit are upcast.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model, trainable_params=trainable, total_params=total, notes=notes)


# ------------------------------------------------------------------------------------ auto batch

@dataclass
class BatchPlan:
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    message: str
    estimated_bytes: int = 0


def estimate_train_bytes(mcfg: dict, vocab: int, trainable: int, seq_len: int, batch: int,
                         checkpointing: bool, weight_bytes: int = 2) -> int:
    """Rough peak memory of one LoRA training step on one GPU (weights, trainable states, activations)."""
    h = int(mcfg.get("hidden_size", 4096))
    inter = int(mcfg.get("intermediate_size", 11008))
    layers = int(mcfg.get("num_hidden_layers", 32))
    heads = int(mcfg.get("num_attention_heads", 32))
    kv = int(mcfg.get("num_key_value_heads", heads))
    head_dim = h // heads
    per_layer_params = h * (h + 2 * kv * head_dim) + h * h + 3 * h * inter
    n_params = layers * per_layer_params + 2 * vocab * h
    weights = n_params * weight_bytes
    states = trainable * 16  # fp32 master copy, grad, Adam m and v
    tokens = seq_len * batch
    # Saved activations per token and layer (SDPA, no attention matrix): about 18 h-sized and
    # 4 intermediate-sized tensors, plus LoRA dropout inputs; checkpointing keeps only the layer input.
    per_tok_layer = weight_bytes * (18 * h + 4 * inter + 7 * h)
    act = tokens * (layers * 2 * h * weight_bytes + per_tok_layer if checkpointing else layers * per_tok_layer)
    logits = tokens * vocab * 4 * 3  # fp32 logits, their softmax and the gradient
    return int((weights + states + act + logits) * 1.15)


def plan_batch(free_bytes: int | None, mcfg: dict, vocab: int, trainable: int, seq_len: int,
               batch: int, accum: int, checkpointing: bool, weight_bytes: int = 2,
               max_batch: int = 16) -> BatchPlan:
    """Pick the micro-batch and checkpointing for ``free_bytes`` of GPU memory (None: no GPU).

    Prefers no checkpointing with the largest micro-batch that fits (up to ``max_batch``); keeps the
    effective batch (batch × accumulation) when the chosen micro-batch divides it, else grows it to the
    micro-batch and says so.
    """
    eff = batch * accum
    if free_bytes is None:
        return BatchPlan(batch, accum, checkpointing,
                         f"--auto_batch: no CUDA GPU, keeping batch {batch} × accumulation {accum}, "
                         f"gradient checkpointing {'on' if checkpointing else 'off'}")
    budget = int(free_bytes * 0.9)
    cands = [b for b in (64, 32, 16, 8, 4, 2, 1) if b <= max_batch]
    for gc in (False, True):
        for b in cands:
            need = estimate_train_bytes(mcfg, vocab, trainable, seq_len, b, gc, weight_bytes)
            if need <= budget:
                if eff >= b and eff % b == 0:
                    acc, how = eff // b, f"effective batch {eff} kept"
                else:
                    acc, how = 1, f"effective batch grows {eff} → {b}"
                return BatchPlan(b, acc, gc, (
                    f"--auto_batch: {free_bytes / 2**30:.1f} GiB free, estimated {need / 2**30:.1f} GiB → batch "
                    f"{b} × accumulation {acc}, gradient checkpointing {'on' if gc else 'off'} ({how})"), need)
    need = estimate_train_bytes(mcfg, vocab, trainable, seq_len, 1, True, weight_bytes)
    return BatchPlan(1, eff, True, (
        f"--auto_batch: even batch 1 with checkpointing is estimated at {need / 2**30:.1f} GiB > "
        f"{free_bytes / 2**30:.1f} GiB free; trying batch 1 × accumulation {eff} with checkpointing"), need)


def estimate_trainable(mcfg: dict, vocab: int, cfg) -> int:
    """LoRA + modules_to_save parameter count, from config.json alone (before loading the model)."""
    h = int(mcfg.get("hidden_size", 4096))
    inter = int(mcfg.get("intermediate_size", 11008))
    layers = int(mcfg.get("num_hidden_layers", 32))
    heads = int(mcfg.get("num_attention_heads", 32))
    kv = int(mcfg.get("num_key_value_heads", heads))
    kvd = kv * (h // heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    r = cfg.lora_rank
    n = sum(layers * r * (i + o) for name, (i, o) in shapes.items() if name in cfg.trainable_modules)
    n += sum(vocab * h for m in ("embed_tokens", "lm_head") if m in cfg.modules_to_save_list)
    return n
