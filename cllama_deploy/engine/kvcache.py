"""Which tokens sit in which KV cells: a tree of cell runs shared between running sequences, and the
prefix cache of finished sequences' KV kept in host memory for reuse.

In llama.cpp's unified KV cache several sequences may own the same cell: ``llama_memory_seq_cp`` of a
position range adds the destination sequence to the source's cells, and the tree mirrors that
(:meth:`KVTree.fork`). With one stream per sequence (what the engine uses) a copy makes new cells,
recorded with :meth:`KVTree.extend`.
A node is a run of cells (consecutive positions holding ``tokens``); ``refs`` are the sequences that
own all of its cells. A sequence is the path from the root to its last node. Forking a prefix shares
nodes (splitting one when the prefix ends inside it); decoding appends cells to a sequence; removing
a sequence frees the nodes nobody else owns. Two runs with the same tokens computed separately are
different cells, so children are a list, not a map by token.

So the tree can answer, without asking llama.cpp:
- the longest prefix of a prompt already in the KV of a running sequence, and a sequence that owns
  it (the source for ``seq_cp``);
- how many cells are in use (shared cells counted once), for the admission budget.

Pure Python with no llama.cpp calls: the scheduler performs the matching ``seq_cp``/``seq_rm``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass(eq=False)
class _Node:
    start: int  # position of the first cell
    tokens: list[int]
    parent: Optional["_Node"]
    refs: set[int] = field(default_factory=set)
    children: list["_Node"] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class KVTree:
    """Cells of every resident sequence; see the module docstring."""

    def __init__(self) -> None:
        self._root = _Node(0, [], None)
        self._paths: dict[int, list[_Node]] = {}
        self.used_cells = 0

    # -- queries -----------------------------------------------------------------------------------
    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._paths

    def length(self, seq_id: int) -> int:
        path = self._paths.get(seq_id)
        return path[-1].end if path else 0

    def tokens(self, seq_id: int) -> list[int]:
        out: list[int] = []
        for node in self._paths.get(seq_id, ()):
            out.extend(node.tokens)
        return out

    def sequences(self) -> list[int]:
        return list(self._paths)

    def match(self, tokens: Sequence[int], among: Optional[set[int]] = None) -> tuple[Optional[int], int]:
        """Longest prefix of ``tokens`` held in the KV: ``(a sequence owning it, its length)``.

        ``among`` restricts the owners considered. Returns ``(None, 0)`` when nothing matches.
        """
        best: tuple[Optional[int], int] = (None, 0)
        todo = [(self._root, 0)]  # runs with equal tokens may exist side by side: try them all
        while todo:
            node, pos = todo.pop()
            if pos >= len(tokens):
                continue
            for child in node.children:
                owners = child.refs if among is None else child.refs & among
                if not owners or child.tokens[0] != tokens[pos]:
                    continue
                n = _common(child.tokens, tokens, pos)
                if pos + n > best[1]:
                    best = (min(owners), pos + n)
                if n == len(child.tokens):
                    todo.append((child, pos + n))
        return best

    def exclusive_cells(self, seq_id: int) -> int:
        """Cells that removing ``seq_id`` would free."""
        return sum(len(n.tokens) for n in self._paths.get(seq_id, ()) if n.refs == {seq_id})

    # -- updates -----------------------------------------------------------------------------------
    def fork(self, dst: int, src: int, length: int) -> None:
        """``dst`` (absent or empty) now owns ``src``'s first ``length`` cells (``seq_cp``)."""
        if self._paths.get(dst):
            raise ValueError(f"sequence {dst} is not empty")
        if length <= 0:
            self._paths[dst] = []
            return
        path = self._paths[src]
        if length > path[-1].end:
            raise ValueError(f"sequence {src} holds {path[-1].end} cells, not {length}")
        shared: list[_Node] = []
        for node in list(path):  # _split inserts into the paths
            if node.start >= length:
                break
            if node.end > length:
                node = self._split(node, length - node.start)
            shared.append(node)
        for node in shared:
            node.refs.add(dst)
        self._paths[dst] = shared

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Fresh cells decoded for ``seq_id`` at its next positions."""
        if not tokens:
            return
        path = self._paths.setdefault(seq_id, [])
        last = path[-1] if path else None
        if last is not None and last.refs == {seq_id} and not last.children:
            last.tokens.extend(tokens)
        else:
            parent = last or self._root
            node = _Node(parent.end if last is not None else 0, list(tokens), parent, {seq_id})
            parent.children.append(node)
            path.append(node)
        self.used_cells += len(tokens)

    def remove(self, seq_id: int) -> int:
        """Drop ``seq_id`` (``seq_rm`` of the whole sequence); returns the cells freed."""
        path = self._paths.pop(seq_id, None)
        freed = 0
        for node in reversed(path or ()):
            node.refs.discard(seq_id)
            if not node.refs:
                node.parent.children.remove(node)
                freed += len(node.tokens)
        self.used_cells -= freed
        return freed

    def truncate(self, seq_id: int, length: int) -> int:
        """Keep ``seq_id``'s first ``length`` cells (``seq_rm(seq, length, -1)``); returns cells freed."""
        path = self._paths.get(seq_id)
        if not path or path[-1].end <= length:
            return 0
        freed = 0
        while path and path[-1].start >= length:
            node = path.pop()
            node.refs.discard(seq_id)
            if not node.refs:
                node.parent.children.remove(node)
                freed += len(node.tokens)
        if path and path[-1].end > length:
            node = path[-1]
            if node.refs == {seq_id} and not node.children:
                cut = node.end - length
                del node.tokens[length - node.start:]
                freed += cut
            else:
                self._split(node, length - node.start)
                tail = path.pop()  # the split put the tail after the head in every owner's path
                tail.refs.discard(seq_id)
                if not tail.refs:  # pragma: no cover - a split node has several owners
                    node.children.remove(tail)
                    freed += len(tail.tokens)
        self.used_cells -= freed
        return freed

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after ``at`` cells; returns the head (same object), the tail is its child."""
        tail = _Node(node.start + at, node.tokens[at:], node, set(node.refs), node.children)
        for c in tail.children:
            c.parent = tail
        node.tokens = node.tokens[:at]
        node.children = [tail]
        for seq in node.refs:
            path = self._paths[seq]
            path.insert(path.index(node) + 1, tail)
        return node


def _common(run: list[int], tokens: Sequence[int], pos: int) -> int:
    n = min(len(run), len(tokens) - pos)
    i = 0
    while i < n and run[i] == tokens[pos + i]:
        i += 1
    return i


@dataclass(eq=False)
class CachedPrefix:
    """A finished sequence's KV, saved to host memory: its tokens and llama.cpp's state bytes."""

    tokens: np.ndarray  # int32, the tokens its cells held, in position order
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.tokens.nbytes


class PrefixCache:
    """Finished sequences' KV kept in host memory for later prompts, least recently used evicted
    first, bounded by ``capacity`` entries and ``max_bytes``.

    Kept out of the KV cache on purpose: a step attends over every occupied cell of a stream (of all
    of them, masked, in a unified cache), so finished sequences left resident would slow every
    running sequence's step (measured in a unified cache: 37 → 72 ms per token at one sequence
    beside 16 cached ones, TinyLlama shape, 1 thread).
    Restoring a cached prefix copies its cells back (``llama_state_seq_set_data``), a memcpy.
    """

    def __init__(self, capacity: int, max_bytes: int):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._lru: "OrderedDict[int, CachedPrefix]" = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._lru)

    def add(self, tokens: Sequence[int], data: bytes) -> None:
        """Keep a sequence's KV; an entry whose tokens are a prefix of these is dropped (this one
        serves every prompt it served)."""
        if self.capacity <= 0 or not tokens:
            return
        entry = CachedPrefix(np.asarray(tokens, dtype=np.int32), data)
        if entry.nbytes > self.max_bytes:
            return
        for key, old in list(self._lru.items()):
            n = len(old.tokens)
            if n <= len(entry.tokens) and np.array_equal(old.tokens, entry.tokens[:n]):
                self._drop(key)
        self._lru[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes
        while self._lru and (len(self._lru) > self.capacity or self.nbytes > self.max_bytes):
            self._drop(next(iter(self._lru)))

    def match(self, tokens: Sequence[int]) -> tuple[Optional[CachedPrefix], int]:
        """The entry sharing the longest prefix with ``tokens``, and that length (``(None, 0)`` if
        none); a hit counts as a use."""
        best: tuple[Optional[int], int] = (None, 0)
        want = np.asarray(tokens, dtype=np.int32)
        for key, entry in self._lru.items():
            n = min(len(entry.tokens), len(want))
            if n <= best[1]:
                continue
            diff = np.flatnonzero(entry.tokens[:n] != want[:n])
            common = int(diff[0]) if diff.size else n
            if common > best[1]:
                best = (key, common)
        if best[0] is None:
            return None, 0
        self._lru.move_to_end(best[0])
        return self._lru[best[0]], best[1]

    def clear(self) -> None:
        for key in list(self._lru):
            self._drop(key)

    def _drop(self, key: int) -> None:
        self.nbytes -= self._lru.pop(key).nbytes
