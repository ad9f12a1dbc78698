"""Lazy reader for PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``).

An adapter is read into a small plan, without loading any tensor data:

* ``lora``: for each base tensor a LoRA pair ``(A, B)`` and its scale (``lora_alpha / r``, or
  ``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module ``rank_pattern``/``alpha_pattern``);
* ``full``: base tensors that the adapter replaces whole (``modules_to_save``, e.g. ``embed_tokens`` and
  ``lm_head`` after the vocabulary was resized).

Adapter kinds whose merge is not ``W += scale * B @ A`` (DoRA, LoRA bias, trainable tokens, non-LoRA
PEFT types, ...) are refused with a message that says what to do instead.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllama_deploy.checkpoint.hf import read_json, torch_to_numpy
from cllama_deploy.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
from cllama_deploy.errors import CheckpointError, require

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

# PeftModel.save_pretrained writes every key under this prefix: PeftModel.base_model (the LoraModel)
# .model (the wrapped LlamaForCausalLM); what follows is the module path in the HF model.
KEY_PREFIX = "base_model.model."

# How a saved key (after KEY_PREFIX) maps to a role and a module of the base model. First match wins,
# so the specific LoRA rows come before the catch-all full-tensor rows. `(?:\.[^.]+)?` accepts an adapter
# name left in the key (a raw state dict); save_pretrained strips it.
KEY_TABLE: list[tuple[re.Pattern, str, str]] = [
    # LoRA on nn.Linear: down-projection A (r, in_features); "q_proj.lora_A.weight"
    (re.compile(r"(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight"), "lora_A", "Linear LoRA A"),
    # LoRA on nn.Linear: up-projection B (out_features, r); "q_proj.lora_B.weight"
    (re.compile(r"(?P<module>.+)\.lora_B(?:\.[^.]+)?\.weight"), "lora_B", "Linear LoRA B"),
    # LoRA on nn.Embedding: A (r, num_embeddings), a bare nn.Parameter, hence no ".weight"
    (re.compile(r"(?P<module>.+)\.lora_embedding_A(?:\.[^.]+)?"), "lora_embedding_A", "Embedding LoRA A"),
    # LoRA on nn.Embedding: B (embedding_dim, r)
    (re.compile(r"(?P<module>.+)\.lora_embedding_B(?:\.[^.]+)?"), "lora_embedding_B", "Embedding LoRA B"),
    # DoRA magnitude vector (use_dora=True): not a plain additive merge
    (re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?"), "refuse:DoRA", "DoRA"),
    # bias on lora_B (lora_bias=True): not supported
    (re.compile(r"(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias"), "refuse:lora_bias", "LoRA bias"),
    # trainable_token_indices (PEFT >= 0.15): sparse token-row deltas
    (re.compile(r"(?P<module>.+)\.token_adapter\.trainable_tokens_\w+(?:\.[^.]+)?"), "refuse:trainable_tokens",
     "trainable tokens"),
    # save_embedding_layers with LoRA on an embedding (PEFT saves it when the vocabulary may have been
    # resized): the base weight the LoRA update is added to
    (re.compile(r"(?P<module>.+)\.base_layer\.(?P<param>weight|bias)"), "base_layer", "LoRA's base weight"),
    # the untrained original kept by a ModulesToSaveWrapper; PEFT saves it for tied-embedding models and
    # merge_and_unload discards it
    (re.compile(r"(?P<module>.+)\.original_module(?:\.[^.]+)?\.(?P<param>weight|bias)"), "ignore",
     "modules_to_save original"),
    # the trained copy inside a ModulesToSaveWrapper; for tied-embedding models PEFT saves it next to the
    # plain key below (same data), a raw state dict has it with the adapter name
    (re.compile(r"(?P<module>.+)\.modules_to_save(?:\.[^.]+)?\.(?P<param>weight|bias)"), "wrapped",
     "modules_to_save copy"),
    # modules_to_save as save_pretrained writes it: "model.embed_tokens.weight", "lm_head.weight", or a
    # bias trained with bias="all"/"lora_only"; replaces the base tensor of the same name
    (re.compile(r"(?P<module>.+)\.(?P<param>weight|bias)"), "full", "modules_to_save / trained bias"),
]

# adapter_config.json options that change what the merge must compute and that we do not implement;
# each is refused when set to anything but off (absent, null, false, empty). (option, message)
REFUSED_OPTIONS: list[tuple[str, str]] = [
    ("use_dora", "DoRA adapters (use_dora=true) are not supported: merge it with "
                 "PeftModel.merge_and_unload() and pass the merged model as --base"),
    ("lora_bias", "adapters with a trained lora_B bias (lora_bias=true) are not supported"),
    ("layer_replication", "adapters with layer_replication change the layer count and are not supported"),
    ("trainable_token_indices", "adapters with trainable_token_indices are not supported; retrain "
                                "with modules_to_save=['embed_tokens', 'lm_head']"),
    ("target_parameters", "adapters with target_parameters (LoRA on nn.Parameter) are not supported"),
    ("use_qalora", "QA-LoRA adapters are not supported"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) cannot be merged"),
    ("kasa_config", "KaSA adapters (kasa_config) are not supported"),
    ("use_bdlora", "block-diagonal LoRA adapters (use_bdlora) are not supported"),
    ("arrow_config", "Arrow-routed adapters (arrow_config) cannot be merged"),
    ("monteclora_config", "MonteCLoRA adapters (monteclora_config) are not supported"),
    # PEFT < 0.3 MergedLinear: one LoRA over a fused qkv projection (GPT-2 style); LLaMA has none
    ("enable_lora", "adapters for fused qkv projections (enable_lora) are not supported"),
]


def pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path ending with it
    (the key may be a regex), e.g. ``"q_proj"`` or ``"layers.0.self_attn.q_proj"``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraPair:
    """One LoRA update ``delta = scale * B @ A`` for the base tensor ``target``.

    ``embedding`` pairs (LoRA on nn.Embedding) store A as (r, vocab) and B as (hidden, r); their delta is
    transposed to the embedding's (vocab, hidden).
    """

    target: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    embedding: bool = False


class LoraAdapter:
    """A PEFT LoRA adapter directory, read lazily.

    Attributes:
        path: the adapter directory.
        config: ``adapter_config.json`` content.
        r, lora_alpha, use_rslora, fan_in_fan_out: the config values (defaults as PEFT's).
        lora: ``{base tensor name: LoraPair}``.
        full: ``{base tensor name: adapter key}`` for tensors the adapter replaces whole; applied before
            the tensor's LoRA pair, if any.
        full_kind: ``{base tensor name: "full" | "base_layer"}``: a trained copy (modules_to_save), or
            the (possibly resized) base weight saved under a LoRA-wrapped embedding.
        tokenizer_dir: the directory when it holds ``tokenizer.model`` (the adapter ships a tokenizer).
        weights_file: ``adapter_model.safetensors`` or ``adapter_model.bin``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: adapter directory not found; pass the directory that "
                                  "PeftModel.save_pretrained wrote")
        cfg_path = self.path / ADAPTER_CONFIG
        self.config = read_json(cfg_path, "adapter config (adapter_config.json)",
                                "pass the directory that PeftModel.save_pretrained wrote")
        self._check_config(cfg_path)
        self.r = int(self.config.get("r", 8))
        self.lora_alpha = float(self.config.get("lora_alpha", 8))
        self.use_rslora = bool(self.config.get("use_rslora", False))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self._fan_warned = False
        self.rank_pattern = dict(self.config.get("rank_pattern") or {})
        self.alpha_pattern = dict(self.config.get("alpha_pattern") or {})
        self.base_model_name_or_path = self.config.get("base_model_name_or_path")
        self.tokenizer_dir = self.path if (self.path / "tokenizer.model").is_file() else None
        self._open_weights()
        self._plan()

    # -- config ------------------------------------------------------------------------------------
    def _check_config(self, cfg_path: Path) -> None:
        peft_type = str(self.config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise CheckpointError(
                f"{cfg_path}: peft_type is {self.config.get('peft_type')!r}; only LoRA adapters can be merged "
                "(for other PEFT types, merge with PeftModel.merge_and_unload() and pass the result as --base)"
            )
        for option, message in REFUSED_OPTIONS:
            value = self.config.get(option)
            if value is None or value is False or value in ({}, [], ""):
                continue
            raise CheckpointError(f"{cfg_path}: {message}")
        for option in ("r", "lora_alpha"):
            value = self.config.get(option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise CheckpointError(f"{cfg_path}: malformed adapter config: '{option}' must be a positive number, "
                                      f"got {value!r}")

    # -- files -------------------------------------------------------------------------------------
    def _open_weights(self) -> None:
        st, pt = self.path / ADAPTER_SAFETENSORS, self.path / ADAPTER_BIN
        self._st: dict[str, TensorInfo] = {}
        self._state: dict | None = None
        if st.is_file():
            self.weights_file = st
            self._st, _ = read_header(st)
            self._keys = list(self._st)
        elif pt.is_file():
            self.weights_file = pt
            torch = require("torch", "train")
            try:
                state = torch.load(pt, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{pt}: cannot load this pickle adapter safely ({type(exc).__name__}: "
                                      f"{exc}); re-save it with save_pretrained(safe_serialization=True)") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{pt}: expected a state dict of tensors; re-save the adapter")
            self._state = state
            self._keys = list(state)
        else:
            raise CheckpointError(f"{self.path}: no adapter weights ({ADAPTER_SAFETENSORS} or {ADAPTER_BIN}); "
                                  "pass the directory that PeftModel.save_pretrained wrote")

    def shape(self, key: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[key].shape)
        return self._st[key].shape

    def tensor(self, key: str) -> np.ndarray:
        """One adapter tensor as float32."""
        if self._state is not None:
            return np.asarray(torch_to_numpy(self._state[key], key, self.weights_file), dtype=np.float32)
        return np.asarray(read_tensor(self.weights_file, self._st[key], key), dtype=np.float32)

    # -- plan --------------------------------------------------------------------------------------
    def _plan(self) -> None:
        halves: dict[str, dict[str, str]] = {}
        self.full: dict[str, str] = {}
        self.full_kind: dict[str, str] = {}  # "full" (modules_to_save) or "base_layer"
        wrapped: dict[str, str] = {}
        for key in self._keys:
            if not key.startswith(KEY_PREFIX):
                raise CheckpointError(
                    f"{self.weights_file}: unknown key {key!r} (PEFT adapters name every tensor "
                    f"'{KEY_PREFIX}...'); this is not a PEFT LoRA adapter saved by save_pretrained"
                )
            rest = key[len(KEY_PREFIX):]
            for pattern, role, _comment in KEY_TABLE:
                m = pattern.fullmatch(rest)
                if m:
                    break
            else:  # pragma: no cover - the catch-all rows match any key ending in .weight/.bias
                raise CheckpointError(f"{self.weights_file}: unknown key {key!r}; not a LoRA adapter tensor")
            if role.startswith("refuse:"):
                what = role.split(":", 1)[1]
                raise CheckpointError(
                    f"{self.weights_file}: key {key!r} belongs to a {what} adapter, which cannot be merged as "
                    "W += scale * B @ A; merge it with PeftModel.merge_and_unload() and pass the result as --base"
                )
            module = m.group("module")
            if role == "ignore":
                continue
            if role in ("full", "base_layer", "wrapped"):
                target = f"{module}.{m.group('param')}"
                if role == "wrapped":
                    wrapped[target] = key
                    continue
                if target in self.full:
                    raise CheckpointError(f"{self.weights_file}: two tensors replace {target!r} "
                                          f"({self.full[target]!r} and {key!r}); re-save the adapter")
                self.full[target] = key
                self.full_kind[target] = role
            else:
                halves.setdefault(module, {})[role] = key
        for target, key in wrapped.items():
            # the plain key, when present, holds the same trained tensor
            if target not in self.full:
                self.full[target] = key
                self.full_kind[target] = "full"
        self.lora: dict[str, LoraPair] = {}
        for module, parts in halves.items():
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            if set(parts) != {a_role, b_role}:
                have = ", ".join(sorted(parts.values()))
                raise CheckpointError(f"{self.weights_file}: module {module!r} has an incomplete LoRA pair "
                                      f"(found only {have}); the adapter file is damaged, re-save it")
            a_key, b_key = parts[a_role], parts[b_role]
            rank = self._pair_rank(module, a_key, b_key, embedding)
            akey = pattern_key(self.alpha_pattern, module)
            alpha = float(self.alpha_pattern[akey]) if akey is not None else self.lora_alpha
            scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
            target = f"{module}.weight"
            self.lora[target] = LoraPair(target, a_key, b_key, rank, alpha, scale, embedding)
        for name in set(self.lora) & set(self.full):
            if self.full_kind[name] != "base_layer":
                raise CheckpointError(f"{self.weights_file}: {name!r} has both LoRA weights and a full saved copy "
                                      f"({self.full[name]!r}); re-save the adapter")

    def _pair_rank(self, module: str, a_key: str, b_key: str, embedding: bool) -> int:
        a_shape, b_shape = self.shape(a_key), self.shape(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"{self.weights_file}: {a_key} {list(a_shape)} and {b_key} {list(b_shape)} do not form a LoRA "
                "pair (expected A (r, in) and B (out, r)); the adapter file is damaged, re-save it"
            )
        rank = a_shape[0]
        rkey = pattern_key(self.rank_pattern, module)
        want = int(self.rank_pattern[rkey]) if rkey is not None else self.r
        if rank != want:
            where = f"rank_pattern[{rkey!r}]" if rkey is not None else "r"
            raise CheckpointError(
                f"{self.weights_file}: {a_key} has rank {rank} but {ADAPTER_CONFIG} says {where}={want}; "
                "the config does not belong to these weights, re-save the adapter"
            )
        return rank

    # -- tensors for the merge ---------------------------------------------------------------------
    def delta_shape(self, target: str) -> tuple[int, int]:
        """The (rows, cols) of ``B @ A`` in base-tensor layout (before any fan_in_fan_out transpose)."""
        pair = self.lora[target]
        a, b = self.shape(pair.a_key), self.shape(pair.b_key)
        if pair.embedding:  # A (r, vocab), B (hidden, r) -> (vocab, hidden)
            return (a[1], b[0])
        return (b[0], a[1])

    def delta(self, target: str, base_shape: tuple[int, ...]) -> np.ndarray:
        """``scale * B @ A`` as float32, in the layout of a base tensor of ``base_shape``."""
        pair = self.lora[target]
        a, b = self.tensor(pair.a_key), self.tensor(pair.b_key)
        # scale the (out, r) factor, not the (out, in) product: one pass over the big matrix fewer
        delta = (b * np.float32(pair.scale)) @ a
        if pair.embedding:
            return delta.T
        if self._transposed(target, base_shape):
            return delta.T
        return delta

    def _transposed(self, target: str, base_shape: tuple[int, ...]) -> bool:
        # PEFT honours fan_in_fan_out only for Conv1D-style weights stored (in, out); on nn.Linear (every
        # LLaMA projection, stored (out, in)) it resets the flag with a warning and merges untransposed.
        # We do the same, recognising the (in, out) layout by shape.
        if not self.fan_in_fan_out:
            return False
        rows, cols = self.delta_shape(target)
        if tuple(base_shape) == (cols, rows) and rows != cols:
            return True
        if not self._fan_warned:
            self._fan_warned = True
            warnings.warn(f"{self.path}: fan_in_fan_out=true ignored for nn.Linear weights such as {target}, "
                          "as PEFT does", stacklevel=2)
        return False

    def full_tensor(self, target: str) -> np.ndarray:
        """The full replacement for base tensor ``target`` (modules_to_save), float32."""
        return self.tensor(self.full[target])

    def full_shape(self, target: str) -> tuple[int, ...]:
        return self.shape(self.full[target])

    def __repr__(self) -> str:
        return (f"LoraAdapter({str(self.path)!r}, r={self.r}, alpha={self.lora_alpha}, "
                f"{len(self.lora)} LoRA pairs, {len(self.full)} full tensors)")


def open_adapter(path: str | Path) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory lazily.

    Raises:
        CheckpointError: files missing or malformed, an unsupported adapter kind (DoRA, non-LoRA PEFT
            types, LoRA bias, ...), or an unknown tensor key (named in the message).
        DependencyError: the weights are ``adapter_model.bin`` and torch is not installed.
    """
    return LoraAdapter(path)
