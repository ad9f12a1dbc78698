"""Atomic file output and hashing.

Outputs are written to ``<path>.partial``, fsynced, then renamed into place, so a killed run never
leaves a file at the final path that looks complete (DESIGN habit 5).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and nothing
    appears at ``path``. ``durable=False`` skips the fsyncs, for scratch files that a later step
    consumes and deletes: the rename alone already protects them against a killed process (only a
    power loss could leave them short).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    if tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_replaceable_dir(path: str | os.PathLike, flag: str, owned: Callable[[str], bool], *, what: str,
                          marker: str | None = None, force: bool = False, force_flag: str | None = None,
                          replaces: bool = True) -> None:
    """Refuse an output directory that a stage would replace (:func:`atomic_dir`) or write into although it
    holds something else.

    ``path`` may be missing, empty, or one of the stage's own earlier outputs: every entry is a name the
    stage writes (``owned(name)``) and, with ``marker``, the stage's marker file is there (so another
    program's output with the same file names is not taken for ours). ``force`` skips the check.
    ``replaces``: the stage replaces the directory as a whole (else it writes its files into it).

    Raises:
        ConfigError: naming ``flag``, a few of the foreign entries and the way out.
    """
    from cllama_deploy.errors import ConfigError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a directory")
    if force or not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    foreign = [n for n in names if not owned(n)]
    if not foreign and (marker is None or marker in names):
        return
    held = (f"holds files that {what} did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
            if foreign else f"holds files that {what} did not write (no {marker})")
    if replaces:
        way = f", or pass {force_flag} to replace it" if force_flag else ""
        raise ConfigError(f"{flag} {out} {held}; choose a new or empty directory{way} (it is replaced as a whole)")
    way = f", or pass {force_flag} to write into it anyway (the other files stay)" if force_flag else ""
    raise ConfigError(f"{flag} {out} {held}; choose a new or empty directory{way}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    An existing directory at ``path`` is replaced only once the new one is complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
