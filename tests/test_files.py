"""Atomic outputs: nothing appears at the final path unless the write completed."""

from __future__ import annotations

import os

import pytest

from cllama_deploy.files import atomic_dir, atomic_path, partial_path, sha256_file, write_text_atomic


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_path_publishes_only_on_success(tmp_path, durable, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target, durable=durable) as tmp:
        assert tmp == partial_path(target)
        tmp.write_bytes(b"complete")
        assert not target.exists()
    assert target.read_bytes() == b"complete" and not partial_path(target).exists()
    assert bool(synced) == durable


def test_atomic_path_failure_leaves_nothing_and_keeps_old(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and not partial_path(target).exists()


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert not partial_path(target).exists()
    with atomic_dir(target) as d:
        (d / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sha256_file(target / "c") == "4e07408562bedb8b60ce05c1decfe3ad16b72230967de01f640b7e4729b49fce"
