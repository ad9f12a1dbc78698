"""The KV-cell tree against a model of llama.cpp's unified cache: cells are objects owned by sets of
sequences; ``seq_cp`` of a prefix shares cells, decoding adds fresh cells, ``seq_rm`` frees cells
nobody else owns. Random operation sequences (Hypothesis) must keep the tree and the model equal."""

from __future__ import annotations

import itertools

from hypothesis import given, settings, strategies as st

from cllama_deploy.engine.kvcache import KVTree, PrefixCache

SEQS = range(5)
ops = st.lists(st.one_of(
    st.tuples(st.just("extend"), st.sampled_from(SEQS), st.lists(st.integers(0, 3), min_size=1, max_size=6)),
    st.tuples(st.just("fork"), st.sampled_from(SEQS), st.sampled_from(SEQS), st.integers(0, 20)),
    st.tuples(st.just("remove"), st.sampled_from(SEQS)),
    st.tuples(st.just("truncate"), st.sampled_from(SEQS), st.integers(0, 20)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops, st.lists(st.integers(0, 3), max_size=12))
def test_tree_matches_a_model_of_shared_cells(operations, probe):
    tree = KVTree()
    fresh = itertools.count()
    model: dict[int, list[tuple[int, int]]] = {}  # seq -> [(cell id, token)]
    for op in operations:
        if op[0] == "extend":
            _, s, toks = op
            model.setdefault(s, []).extend((next(fresh), t) for t in toks)
            tree.extend(s, toks)
        elif op[0] == "fork":
            _, dst, src, n = op
            if dst == src or model.get(dst) or src not in model:
                continue
            n = min(n, len(model[src]))
            model[dst] = model[src][:n]
            tree.fork(dst, src, n)
        elif op[0] == "remove":
            model.pop(op[1], None)
            tree.remove(op[1])
        else:
            _, s, n = op
            if s in model:
                before = len({c for cells in model.values() for c, _ in cells})
                model[s] = model[s][:n]
                after = len({c for cells in model.values() for c, _ in cells})
                assert tree.truncate(s, n) == before - after
        for s, cells in model.items():
            assert tree.tokens(s) == [t for _, t in cells]
            assert tree.length(s) == len(cells)
        used = {c for cells in model.values() for c, _ in cells}
        assert tree.used_cells == len(used)
        for s, cells in model.items():
            others = {c for o, oc in model.items() if o != s for c, _ in oc}
            assert tree.exclusive_cells(s) == len({c for c, _ in cells} - others)
    # the longest resident prefix of any probe, and an owner that really holds it
    owner, n = tree.match(probe)
    best = max((_common([t for _, t in cells], probe) for cells in model.values()), default=0)
    assert n == best
    if n:
        assert tree.tokens(owner)[:n] == probe[:n]
    else:
        assert owner is None


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_fork_shares_cells_and_remove_frees_only_unshared_ones():
    tree = KVTree()
    tree.extend(0, [1, 2, 3, 4, 5])
    tree.fork(1, 0, 3)          # a second request reusing the first three prompt tokens
    tree.extend(1, [9, 9])
    assert tree.used_cells == 7
    assert tree.match([1, 2, 3, 4, 7]) == (0, 4)
    assert tree.match([1, 2, 3, 9]) == (1, 4)
    assert tree.remove(0) == 2  # cells 4, 5; the shared prefix stays with sequence 1
    assert tree.tokens(1) == [1, 2, 3, 9, 9] and tree.used_cells == 5
    # the same tokens computed separately are different cells: never merged
    tree.extend(2, [1, 2, 3])
    assert tree.used_cells == 8


def test_prefix_cache_is_lru_bounded_and_drops_prefixes():
    cache = PrefixCache(2, max_bytes=10_000)
    cache.add([1, 2, 3], b"a" * 100)
    cache.add([5, 6], b"b" * 100)
    entry, n = cache.match([1, 2, 9])  # a hit is a use: [5, 6] is now the oldest
    assert n == 2 and entry.tokens.tolist() == [1, 2, 3] and entry.data == b"a" * 100
    cache.add([7], b"c" * 100)  # over 2 entries: the least recently used goes
    assert len(cache) == 2 and cache.match([5, 6])[1] == 0 and cache.match([7, 1])[1] == 1
    # a sequence that extends a cached one replaces it (the next chat turn)
    cache.add([1, 2, 3, 4], b"d" * 100)
    assert len(cache) == 2 and cache.match([1, 2, 3, 4, 5])[0].data == b"d" * 100
    assert cache.nbytes == 200 + 4 * (1 + 4)
    # the byte bound evicts the oldest; an entry larger than the whole budget is not kept
    cache.add([8, 8], b"e" * 9_800)  # 220 + 9808 bytes > 10000: [7] (the oldest, 104) goes
    assert len(cache) == 2 and cache.match([7])[1] == 0 and cache.nbytes == 116 + 9_808
    cache.add([9], b"f" * 20_000)
    assert len(cache) == 2 and cache.match([9])[1] == 0
    assert cache.match([4, 4]) == (None, 0)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
