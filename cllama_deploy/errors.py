"""Exception hierarchy.

Every error a user can cause derives from :class:`CllamaError`; its message says what is wrong and
how to fix it. The CLI turns these into one line on stderr and exit code 2 (``--debug`` shows the
traceback). Anything else that escapes is a bug in cllama-deploy.
"""

from __future__ import annotations


class CllamaError(Exception):
    """Base class for errors caused by user input or environment (exit code 2 in the CLI)."""

    exit_code = 2


class InputError(CllamaError):
    """A file or argument the user gave is missing, unreadable or malformed."""


class ConfigError(InputError):
    """An option value is invalid; the message names the flag."""


class TokenizerError(InputError):
    """A tokenizer is malformed, unsafe to merge, or inconsistent with a model."""


class CheckpointError(InputError):
    """A model or adapter checkpoint is missing files, malformed or unsupported."""


class ShapeMismatchError(CheckpointError):
    """Tensor shapes or vocabulary sizes disagree between files that must match."""


class DependencyError(CllamaError):
    """An optional dependency is missing; the message names the extra to install."""


def require(module: str, extra: str):
    """Import ``module`` or raise a DependencyError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            f"this step needs the Python package '{module.split('.')[0]}', which is not installed; "
            f"install it with: pip install 'cllama-deploy[{extra}]'"
        ) from exc
