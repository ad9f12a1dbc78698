"""Server settings: one dataclass, filled from a YAML/JSON file (``--config``) and command-line flags.

Flags given on the command line win over the file. Every field is checked in ``__post_init__`` and an
error names the flag (or settings key) to fix. See ``server/settings.example.yaml`` for a full file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from cllama_deploy.engine.llamacpp import DEFAULT_PARALLEL, DEFAULT_PREFILL_CHUNK, LlamaCppConfig
from cllama_deploy.engine.requests import SAMPLING_DEFAULT_KEYS, RequestConfig
from cllama_deploy.errors import ConfigError

_SAMPLING_KEYS = set(SAMPLING_DEFAULT_KEYS)


def _engine_option(name: str) -> dict:
    """The help and flag of an engine option, from :class:`LlamaCppConfig` (one place for both)."""
    return dict(next(f for f in fields(LlamaCppConfig) if f.name == name).metadata)


@dataclass
class ModelSettings:
    """One served model.

    Args:
        path: GGUF file.
        id: name clients select with ``model`` (default: file name without ``.gguf``).
        chat_template: ``alpaca``, ``alpaca-2`` or a ``.jinja`` file; default: the GGUF's own template.
        n_ctx: context window; None uses the server-wide ``n_ctx`` (0 = the model's trained context).
        n_threads: llama.cpp threads; None uses the server-wide ``threads``.
        embeddings: serve /v1/embeddings for this model.
        parallel: slots of this model; None uses the server-wide ``parallel``.
        prefix_cache: prefix cache of this model; None uses the server-wide ``prefix_cache``.
        sampling: this model's sampling defaults, over the server-wide ``sampling``.
    """

    path: str = field(metadata={"help": "GGUF file (relative to the settings file)."})
    id: Optional[str] = field(default=None, metadata={
        "help": "Name clients put in `model`.", "default_text": "the file name without .gguf"})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "alpaca, alpaca-2 or a .jinja file.", "default_text": "the GGUF's own template"})
    n_ctx: Optional[int] = field(default=None, metadata={
        "help": "Context window of this model.", "default_text": "the server-wide n_ctx"})
    n_threads: Optional[int] = field(default=None, metadata={
        "help": "llama.cpp threads of this model.", "default_text": "the server-wide threads"})
    embeddings: bool = field(default=True, metadata={
        "help": "Serve /v1/embeddings for this model (on for every model unless set to false)."})
    parallel: Optional[int] = field(default=None, metadata={
        "help": "Slots of this model (sequences decoded together).",
        "default_text": "the server-wide parallel"})
    prefix_cache: Optional[bool] = field(default=None, metadata={
        "help": "Prefix cache of this model.", "default_text": "the server-wide prefix_cache"})
    sampling: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "This model's sampling defaults, over the server-wide sampling (e.g. {temperature: 0.2})."})

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("each model needs a 'path' to a .gguf file")
        if self.id is not None and (not isinstance(self.id, str) or not self.id.strip()):
            raise ConfigError(f"model id for {self.path!r} must be a non-empty string")
        if self.parallel is not None:
            _check_int(f"models[{self.path}].parallel", self.parallel, 1)
        if self.prefix_cache is not None and not isinstance(self.prefix_cache, bool):
            raise ConfigError(f"models[{self.path}].prefix_cache must be true or false")
        _check_sampling(f"models[{self.path}].sampling", self.sampling)


@dataclass
class Settings:
    """Everything ``cllama-deploy serve`` needs.

    Args:
        models: models to serve (``MODEL.gguf`` or ``NAME=MODEL.gguf`` arguments).
        host: address to listen on (``--host``); 127.0.0.1 keeps the server local.
        port: TCP port (``--port``); 0 picks a free port and logs it.
        api_keys: accepted bearer tokens (``--api-key``, repeatable); empty disables authentication.
        api_key_file: file with one API key per line (``--api-key-file``; ``#`` starts a comment).
        cors_origins: browser origins allowed to call the API (``--cors-origin``, repeatable; ``*``).
        max_body_bytes: largest request body accepted (``--max-body-bytes``); larger gets 413.
        max_queue: requests that may wait while the model is busy (``--max-queue``); more get 429.
        request_timeout: seconds a request may take, waiting in the queue included (``--timeout``).
        graceful_timeout: seconds in-flight requests get to finish on shutdown (``--graceful-timeout``).
        n_ctx: context window for every model (``--n-ctx``); 0 = each model's trained context.
        threads: llama.cpp threads (``--threads``); None = half the CPUs (see docs/serving.md).
        n_batch: prompt tokens per llama.cpp decode call (``--n-batch``).
        chat_template: override every model's chat template (``--chat-template``).
        max_n: largest ``n`` (choices per request) accepted.
        access_log: write one JSON line per request to the ``cllama_deploy.access`` logger.
        log_level: ``debug``, ``info``, ``warning`` or ``error`` (``--log-level``).
        sampling: defaults for sampling parameters a request leaves out (temperature, top_p, ...).
        parallel: slots per model: sequences decoded together in each llama.cpp step (``--parallel``).
        prefix_cache: reuse the KV of shared prompt prefixes (``--prefix-cache/--no-prefix-cache``).
        prefill_chunk: most prompt tokens per step while others generate (``--prefill-chunk``).
        kv_cache_type: KV cache element type, ``f16`` or ``f32`` (``--kv-cache-type``).
        flash_attn: llama.cpp's flash attention, ``off``, ``on`` or ``auto`` (``--flash-attn``).
        unknown_fields: ``error`` (400 naming an unknown request field) or ``warn`` (log and go on).
    """

    # Field metadata (help, flag, default_text) makes the `serve` options: see cllama_deploy/options.py.
    models: list[ModelSettings] = field(default_factory=list, metadata={
        "help": "GGUF files to serve; clients pick one with the `model` field (NAME, or the file name "
                "without .gguf).", "argument": True, "metavar": "[MODEL.gguf | NAME=MODEL.gguf]..."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Listen address (0.0.0.0: every interface; put TLS in front)."})
    port: int = field(default=8000, metadata={"help": "TCP port; 0 picks a free one (and logs it)."})
    api_keys: list[str] = field(default_factory=list, metadata={
        "help": "Accepted API key (repeat for several); none: no authentication.", "flag": "--api-key"})
    api_key_file: Optional[str] = field(default=None, metadata={
        "help": "File with one API key per line ('#' starts a comment).", "default_text": "none"})
    cors_origins: list[str] = field(default_factory=list, metadata={
        "help": "Browser origin allowed to call the API (repeat; '*' = any).", "flag": "--cors-origin"})
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata={
        "help": "Largest request body in bytes; larger gets 413."})
    max_queue: int = field(default=64, metadata={
        "help": "Requests that may wait while the model is busy; more get 429."})
    request_timeout: float = field(default=600.0, metadata={
        "help": "Seconds a request may take, queue wait included.", "flag": "--timeout"})
    graceful_timeout: float = field(default=30.0, metadata={
        "help": "Seconds in-flight requests get to finish on shutdown."})
    n_ctx: int = field(default=0, metadata={"help": "Context window; 0 = each model's trained context."})
    threads: Optional[int] = field(default=None, metadata={
        "help": "llama.cpp threads (see docs/serving.md).", "default_text": "half the CPUs"})
    n_batch: int = field(default=512, metadata={"help": "Prompt tokens per llama.cpp decode call."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "Chat template for every model: alpaca, alpaca-2 or FILE.jinja.",
        "default_text": "each GGUF's own template"})
    max_n: int = field(default=8, metadata={"help": "Largest `n` (choices per request) accepted."})
    access_log: bool = field(default=True, metadata={
        "help": "Log one JSON line per request (logger cllama_deploy.access).",
        "flag": "--access-log/--no-access-log"})
    log_level: str = field(default="info", metadata={
        "help": "debug, info, warning or error.", "choices": ("debug", "info", "warning", "error")})
    sampling: dict[str, Any] = field(default_factory=lambda: default_sampling(), metadata={
        "help": "Defaults for the sampling parameters a request leaves out (a key left out here keeps "
                "the engine's default shown).", "cli": False})
    parallel: int = field(default=DEFAULT_PARALLEL, metadata=_engine_option("parallel"))
    prefix_cache: bool = field(default=True, metadata=_engine_option("prefix_cache"))
    prefill_chunk: int = field(default=DEFAULT_PREFILL_CHUNK, metadata=_engine_option("prefill_chunk"))
    kv_cache_type: str = field(default="f16", metadata=_engine_option("kv_cache_type"))
    flash_attn: str = field(default="off", metadata=_engine_option("flash_attn"))
    unknown_fields: str = field(default="error", metadata={
        "help": "A request field the server does not know: error (400 naming it) or warn (log it, "
                "go on).", "choices": ("error", "warn")})

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelSettings) else _model_from(m) for m in self.models]
        if not isinstance(self.port, int) or not (0 <= self.port <= 65535):
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("--host must be a non-empty address such as 127.0.0.1")
        if isinstance(self.api_keys, str):
            self.api_keys = [self.api_keys]
        if self.api_key_file:
            self.api_keys = list(self.api_keys) + read_api_key_file(self.api_key_file)
        for key in self.api_keys:
            if not isinstance(key, str) or not key.strip() or any(c.isspace() for c in key):
                raise ConfigError("--api-key values must be non-empty strings without spaces")
        if isinstance(self.cors_origins, str):
            self.cors_origins = [self.cors_origins]
        _check_int("--max-body-bytes", self.max_body_bytes, 1)
        _check_int("--max-queue", self.max_queue, 0)
        _check_int("--n-ctx", self.n_ctx, 0)
        _check_int("--n-batch", self.n_batch, 1)
        _check_int("max_n", self.max_n, 1)
        if self.threads is not None:
            _check_int("--threads", self.threads, 1)
        for name in ("request_timeout", "graceful_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                flag = "--timeout" if name == "request_timeout" else "--graceful-timeout"
                raise ConfigError(f"{flag} must be a positive number of seconds, got {value!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"--log-level must be debug, info, warning or error, got {self.log_level!r}")
        _check_sampling("sampling", self.sampling)
        _check_int("--parallel", self.parallel, 1)
        _check_int("--prefill-chunk", self.prefill_chunk, 1)
        if not isinstance(self.prefix_cache, bool):
            raise ConfigError("--prefix-cache must be true or false")
        if self.kv_cache_type not in ("f16", "f32"):
            raise ConfigError(f"--kv-cache-type must be f16 or f32, got {self.kv_cache_type!r}")
        if isinstance(self.flash_attn, bool):  # YAML 1.1 reads a bare on/off as a boolean
            self.flash_attn = "on" if self.flash_attn else "off"
        if self.flash_attn not in ("auto", "on", "off"):
            raise ConfigError(f"--flash-attn must be auto, on or off, got {self.flash_attn!r}")
        if self.unknown_fields not in ("error", "warn"):
            raise ConfigError(f"--unknown-fields must be error or warn, got {self.unknown_fields!r}")
        ids = [m.id or _default_id(m.path) for m in self.models]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ConfigError(f"several models share the id(s) {sorted(dupes)}; name them with "
                              "NAME=MODEL.gguf")

    def engine_configs(self):
        """One :class:`~cllama_deploy.engine.llamacpp.LlamaCppConfig` per model."""
        from cllama_deploy.engine.llamacpp import LlamaCppConfig

        if not self.models:
            raise ConfigError("no model to serve: pass a .gguf file (cllama-deploy serve MODEL.gguf)")
        return [
            LlamaCppConfig(
                model_path=m.path, model_id=m.id, n_ctx=self.n_ctx if m.n_ctx is None else m.n_ctx,
                n_threads=m.n_threads or self.threads, n_batch=self.n_batch,
                chat_template=m.chat_template or self.chat_template, max_queue=self.max_queue,
                embeddings=m.embeddings, parallel=m.parallel or self.parallel,
                prefix_cache=self.prefix_cache if m.prefix_cache is None else m.prefix_cache,
                prefill_chunk=self.prefill_chunk, kv_cache_type=self.kv_cache_type,
                flash_attn=self.flash_attn,
            )
            for m in self.models
        ]

    def request_config(self, model_id: Optional[str] = None) -> RequestConfig:
        """The request layer's policy for ``model_id``: its sampling defaults over the server's."""
        sampling = dict(self.sampling)
        for m in self.models:
            if (m.id or _default_id(m.path)) == model_id:
                sampling.update(m.sampling)
        return RequestConfig(sampling=sampling, max_n=self.max_n, timeout=self.request_timeout,
                             unknown_fields=self.unknown_fields)


def default_sampling() -> dict[str, Any]:
    """The engine's defaults for every sampling key a settings file may set (``sampling:``)."""
    from cllama_deploy.engine.base import SamplingParams

    defaults = SamplingParams()
    return {name: getattr(defaults, name) for name in sorted(_SAMPLING_KEYS)}


def _check_sampling(key: str, sampling: Any) -> None:
    if not isinstance(sampling, dict):
        raise ConfigError(f"settings key '{key}' must be a mapping such as {{temperature: 0.7}}")
    unknown = set(sampling) - _SAMPLING_KEYS
    if unknown:
        raise ConfigError(f"unknown {key} default(s) {sorted(unknown)}; allowed: {sorted(_SAMPLING_KEYS)}")


def _check_int(flag: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _default_id(path: str) -> str:
    name = Path(path).name
    return name[:-5] if name.endswith(".gguf") else name


def _model_from(spec: Any) -> ModelSettings:
    if isinstance(spec, str):
        return parse_model_arg(spec)
    if isinstance(spec, dict):
        allowed = {f.name for f in fields(ModelSettings)}
        unknown = set(spec) - allowed
        if unknown:
            raise ConfigError(f"unknown model setting(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return ModelSettings(**spec)
    raise ConfigError(f"a model entry must be a path or a mapping with 'path', got {spec!r}")


def parse_model_arg(arg: str) -> ModelSettings:
    """``MODEL.gguf`` or ``NAME=MODEL.gguf``."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
        return ModelSettings(path=path, id=name or None)
    return ModelSettings(path=arg)


def read_api_key_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--api-key-file {path!r} cannot be read: {exc.strerror}") from exc
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [k for k in keys if k]
    if not keys:
        raise ConfigError(f"--api-key-file {path!r} holds no key (one key per line)")
    return keys


def load_settings(config_file: Optional[str] = None, **overrides: Any) -> Settings:
    """Settings from ``config_file`` (YAML or JSON), then ``overrides`` that are not None."""
    data: dict[str, Any] = {}
    if config_file:
        data = read_settings_file(config_file)
    allowed = {f.name for f in fields(Settings)}
    for key, value in overrides.items():
        if key not in allowed:
            raise ConfigError(f"unknown setting {key!r}")
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        data[key] = list(value) if isinstance(value, tuple) else value
    return Settings(**data)


def read_settings_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path!r} cannot be read: {exc.strerror}") from exc
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of settings at the top level")
    allowed = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"--config {path!r} has unknown setting(s) {sorted(unknown)}; allowed: "
                          f"{sorted(allowed)}")
    # relative model paths are relative to the settings file
    base = p.resolve().parent
    models = []
    for m in data.get("models") or []:
        if isinstance(m, str):
            m = {"path": m} if "=" not in m or Path(m).exists() else {
                "id": m.split("=", 1)[0], "path": m.split("=", 1)[1]}
        if isinstance(m, dict) and isinstance(m.get("path"), str) and not Path(m["path"]).is_absolute():
            m = {**m, "path": str(base / m["path"])}
        models.append(m)
    if models:
        data["models"] = models
    return data
