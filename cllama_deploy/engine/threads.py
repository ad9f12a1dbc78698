"""Default llama.cpp thread count.

llama.cpp's worker threads spin at barriers between operations; when one of them is preempted (by
the HTTP server, the tokenizer, another process) all of them wait. On a 2-core machine with
``n_threads=2``, generation fell from ~41 tok/s alone to ~0.5 tok/s while another process kept one
core busy, whereas ``n_threads=1`` kept ~28 tok/s (see benchmarks/RESULTS.md). So the default leaves
headroom: half of the CPUs this process may use (at least 1). ``CLLAMA_N_THREADS`` overrides it.
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_n_threads() -> int:
    """``CLLAMA_N_THREADS`` if set, else half of the usable CPUs (at least 1)."""
    env = os.environ.get("CLLAMA_N_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value >= 1:
            return value
    return max(1, available_cpus() // 2)
