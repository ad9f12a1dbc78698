"""Options shared by ``chat`` and ``generate``: which model (a GGUF, or an HF directory with adapters), its
context and chat template, and the sampling, whose defaults are the seed's.

The seed (Chinese-LLaMA-Alpaca ``scripts/inference/inference_hf.py``) generated with
``temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1, repetition_penalty=1.1,
max_new_tokens=400``; :data:`SEED_SAMPLING` is that table, and the options below take their defaults
from it. This module imports nothing heavy (the CLI builds its options from it at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cllama_deploy.errors import ConfigError
from cllama_deploy.evaluation.models import ModelOptions, model_kind
from cllama_deploy.options import option

# name -> (value, where it comes from): the seed's generation_config, under our (llama.cpp's) names
SEED_SAMPLING: dict[str, tuple[Any, str]] = {
    "temperature": (0.2, "inference_hf.py generation_config temperature=0.2"),
    "top_k": (40, "inference_hf.py top_k=40"),
    "top_p": (0.9, "inference_hf.py top_p=0.9"),
    "repeat_penalty": (1.1, "inference_hf.py repetition_penalty=1.1 (1.3 in its first versions)"),
    "max_tokens": (400, "inference_hf.py max_new_tokens=400"),
    "min_p": (0.0, "HF generate has no min-p filter; llama.cpp's 0.05 would cut more than the seed did"),
}


def _seed(name: str) -> Any:
    return SEED_SAMPLING[name][0]


@dataclass
class Sampling:
    """How replies are sampled (temperature 0 = greedy), in one object both backends read."""

    temperature: float = _seed("temperature")
    top_k: int = _seed("top_k")
    top_p: float = _seed("top_p")
    min_p: float = _seed("min_p")
    repeat_penalty: float = _seed("repeat_penalty")
    max_tokens: int = _seed("max_tokens")
    seed: int | None = None

    def request_fields(self) -> dict[str, Any]:
        """The OpenAI request fields (with llama.cpp's extensions) the request layer and the server take."""
        fields: dict[str, Any] = {"temperature": float(self.temperature), "top_k": int(self.top_k),
                                  "top_p": float(self.top_p), "min_p": float(self.min_p),
                                  "repeat_penalty": float(self.repeat_penalty), "max_tokens": int(self.max_tokens)}
        if self.seed is not None:
            fields["seed"] = int(self.seed)
        return fields

    def hf_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """``model.generate`` keyword arguments: the seed's ``generation_config`` with these values."""
        if self.temperature <= 0:  # greedy; the penalty still applies, as in llama.cpp
            kw: dict[str, Any] = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        else:
            kw = {"do_sample": True, "temperature": float(self.temperature), "top_k": int(self.top_k),
                  "top_p": float(self.top_p)}
            if self.min_p > 0:
                kw["min_p"] = float(self.min_p)
        return {**kw, "num_beams": 1, "repetition_penalty": float(self.repeat_penalty),
                "max_new_tokens": int(max_new_tokens)}


@dataclass(kw_only=True)
class InferenceOptions(ModelOptions):
    """The model to run and how to sample from it (``chat`` and ``generate``)."""

    model: Path | None = option(None, "GGUF file, or an HF model directory (with --lora adapters).",
                                argument=True, metavar="MODEL", default_text="--base")
    base: Path | None = option(None, "HF base model directory (the seed's base_model); the same as giving it as "
                               "MODEL.", default_text="MODEL")
    n_ctx: int = option(0, "Context window in tokens (prompt + reply); 0 = the model's trained context.")
    chat_template: str | None = option(None, "alpaca, alpaca-2 or a .jinja file.",
                                       default_text="the model's own, else alpaca")
    system: str | None = option(None, "System message (replaces the chat template's default system text).",
                                default_text="the template's")
    temperature: float = option(_seed("temperature"), "Sampling temperature; 0 = greedy (the seed's).")
    top_k: int = option(_seed("top_k"), "Keep the k most likely tokens; 0 = off (the seed's).")
    top_p: float = option(_seed("top_p"), "Nucleus sampling: keep the most likely tokens up to this mass (the seed's).")
    min_p: float = option(_seed("min_p"), "llama.cpp's min-p filter; 0 = off, as in the seed's HF generate.")
    repeat_penalty: float = option(_seed("repeat_penalty"), "Repetition penalty; 1 = off (the seed's "
                                   "repetition_penalty).")
    max_tokens: int = option(_seed("max_tokens"), "Most tokens of one reply (the seed's max_new_tokens).")
    seed: int | None = option(None, "Sampling seed, for reproducible replies.", default_text="random")

    def _check_inference_options(self) -> None:
        if self.model is not None and self.base is not None:
            raise ConfigError("give the model once: as MODEL or as --base, not both")
        if self.model is None and self.base is None:
            raise ConfigError("give a model: MODEL.gguf, or an HF directory as MODEL or --base (with --lora)")
        self.model = Path(self.model if self.model is not None else self.base)
        self.kind = model_kind(self.model, "--base" if self.base is not None else "MODEL")
        self.base = None
        self._check_model_options()
        if self.kind == "gguf":
            if self.lora:
                raise ConfigError(f"--lora applies to HF models; {self.model} is a GGUF. Merge the adapters into "
                                  "one with `cllama-deploy deploy --base BASE --lora ADAPTER`, or chat with the HF "
                                  "base and --lora")
            if self.tokenizer is not None:
                raise ConfigError(f"--tokenizer applies to HF models; {self.model} is a GGUF and carries its own "
                                  "vocabulary")
        if self.n_ctx < 0:
            raise ConfigError(f"--n-ctx must be >= 0 (0 = the model's trained context), got {self.n_ctx}")
        if self.chat_template is not None:
            from cllama_deploy import prompts

            prompts.load_chat_template(self.chat_template)  # raises naming --chat-template
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"--temperature must be between 0 and 2, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"--min-p must be between 0 and 1, got {self.min_p}")
        if not 0.0 < self.repeat_penalty <= 10.0:
            raise ConfigError(f"--repeat-penalty must be in (0, 10], got {self.repeat_penalty}")
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1, got {self.max_tokens}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                        repeat_penalty=self.repeat_penalty, max_tokens=self.max_tokens, seed=self.seed)
