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


def test_prefix_cache_is_lru():
    cache = PrefixCache(2)
    cache.add(5)
    cache.add(6)
    cache.touch(5)
    assert cache.oldest() == 6
    cache.discard(6)
    assert cache.oldest() == 5 and len(cache) == 1
