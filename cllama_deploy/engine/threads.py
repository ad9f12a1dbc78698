"""Default llama.cpp thread counts: the ONE place that reads ``CLLAMA_N_THREADS``.

Generation: llama.cpp's worker threads spin at barriers between operations; when one of them is
preempted (by the HTTP server, the tokenizer, another process) all of them wait. On a 2-core machine with
``n_threads=2``, generation fell from ~41 tok/s alone to ~0.5 tok/s while another process kept one
core busy, whereas ``n_threads=1`` kept ~28 tok/s (see benchmarks/RESULTS.md). So the default leaves
headroom: half of the CPUs this process may use (at least 1).

Quantization: ``llama_model_quantize`` splits each tensor's rows among plain worker threads with no
barriers, so it uses every usable CPU.

``CLLAMA_N_THREADS`` (a positive integer) overrides both.
"""

from __future__ import annotations

import os

ENV = "CLLAMA_N_THREADS"
KINDS = ("generate", "quantize")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def env_threads() -> int | None:
    """``CLLAMA_N_THREADS`` as a positive integer; None when unset or empty.

    Raises:
        ConfigError: set to something that is not a positive integer.
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        from cllama_deploy.errors import ConfigError

        raise ConfigError(f"{ENV}={text!r}: must be a positive integer (a thread count); unset it for the default")
    return value


def default_n_threads(kind: str = "generate") -> int:
    """``CLLAMA_N_THREADS`` if set, else: ``generate`` → half the usable CPUs (at least 1),
    ``quantize`` → every usable CPU."""
    if kind not in KINDS:
        raise ValueError(f"unknown thread kind {kind!r}; one of {KINDS}")
    value = env_threads()
    if value is not None:
        return value
    cpus = available_cpus()
    return cpus if kind == "quantize" else max(1, cpus // 2)
