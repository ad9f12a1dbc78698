"""`bench`: llama-bench's pp/tg convention, batched decoding and the memory-bandwidth bound (no timing
assertions: speeds are only checked to be measured and consistent)."""

from __future__ import annotations

import json
import statistics

import pytest

from cllama_deploy.cli import main
from cllama_deploy.evaluation.bench import BenchConfig, Speed, bench, weight_bytes
from tests.evaluation import builders_eval as be


def test_bench_report(ev_models, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", str(ev_models.base_gguf), "--threads", "1", "--batch", "1,2", "--batch", "3",
                 "--n-prompt", "32", "--n-gen", "8", "--reps", "2", "--json", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    tests = {t["test"]: t for t in r["tests"]}
    assert set(tests) == {"pp32", "tg8"}
    for t in tests.values():
        assert t["threads"] == 1 and len(t["samples_ts"]) == 2 and t["tokens_per_second"] > 0
        assert t["tokens_per_second"] == pytest.approx(statistics.fmean(t["samples_ts"]), rel=1e-3)
    assert [b["batch"] for b in r["batched"]] == [1, 2, 3]
    for b in r["batched"]:
        assert b["tokens"] == 8 * b["batch"] and b["tokens_per_second"] > 0
        assert b["per_sequence_tokens_per_second"] == pytest.approx(b["tokens_per_second"] / b["batch"], rel=1e-2)
    (bw,) = r["memory_bandwidth"]
    assert bw["bytes_per_second"] > 1e8
    assert bw["tg_bound_tokens_per_second"] == pytest.approx(bw["bytes_per_second"] / r["bytes_per_token"], rel=1e-3)


def test_bytes_per_token(ev_models, tmp_path):
    """One embedding row per token when the output matrix is separate; the whole matrix when tied."""
    import gguf

    w = weight_bytes(ev_models.base_gguf)
    reader = gguf.GGUFReader(str(ev_models.base_gguf))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert w.total == sum(int(t.n_bytes) for t in reader.tensors)
    assert w.per_token == w.total - int(emb.n_bytes) + int(emb.n_bytes) // int(emb.shape[1])


def test_speed_uses_llama_bench_s_stdev():
    s = Speed("tg4", 1, 4, [0.5, 0.25, 1.0])
    assert s.samples == [8.0, 16.0, 4.0]
    assert s.mean == pytest.approx(28 / 3) and s.stdev == pytest.approx(statistics.stdev([8.0, 16.0, 4.0]))
    assert Speed("tg4", 1, 4, [0.5]).stdev == 0.0


def test_default_threads_and_skips(ev_models, monkeypatch):
    monkeypatch.setenv("CLLAMA_N_THREADS", "1")
    cfg = BenchConfig(model=ev_models.base_gguf, batch=["0"], n_prompt=0, n_gen=4, reps=1)
    assert cfg.thread_counts == [1] and cfg.batch_sizes == []
    r = bench(cfg)
    assert [s.test for s in r.speeds] == ["tg4"] and r.batched == []


@pytest.mark.parametrize("args, message", [
    (["--batch", "two"], "--batch 'two': expected integers separated by commas"),
    (["--threads", "0"], "--threads 0: every value must be >= 1"),
    (["--reps", "0"], "--reps must be >= 1"),
    (["--n-prompt", "0", "--n-gen", "0"], "nothing to measure"),
])
def test_user_errors_are_one_line_exit_2(args, message, ev_models, capsys):
    assert main(["bench", str(ev_models.base_gguf), *args]) == 2
    be.assert_one_line_error(capsys, message)


def test_not_a_gguf(tmp_path, capsys):
    (tmp_path / "m.gguf").write_bytes(b"nope")
    assert main(["bench", str(tmp_path / "m.gguf")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
