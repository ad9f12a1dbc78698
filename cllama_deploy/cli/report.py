"""Small formatting helpers shared by the command modules (sizes, type counts)."""

from __future__ import annotations

from typing import Mapping


def mib(n: int) -> str:
    """A byte count as ``12.3 MiB``."""
    return f"{n / 2**20:.1f} MiB"


def type_counts(counts: Mapping[str, int]) -> str:
    """``F16×9, F32×5`` from a type → count mapping."""
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
