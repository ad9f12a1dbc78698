"""`eval quant`: quantize, then KL divergence / PPL ratio / same top p / RMS Δp against the reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cllama_deploy.cli import main
from cllama_deploy.evaluation.quant import QuantEvalConfig, evaluate_quants, file_stem
from cllama_deploy.evaluation.stats import KLStats, percentile
from tests.evaluation import builders_eval as be

CTX = 64


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory, ev_models, ev_text):
    """`eval quant` through the CLI on the F32 GGUF (the reference), with every output file."""
    out = tmp_path_factory.mktemp("quant_cli")
    argv = ["eval", "quant", str(ev_models.base_gguf), "--types", "F32,F16", "--types", "Q8_0,Q4_0",
            "--text", str(ev_text), "--ctx", str(CTX), "--out-dir", str(out / "q"), "--gen-tokens", "8",
            "--speed-reps", "2", "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
            "--plot", str(out / "r.png"), "-q"]
    assert main(argv) == 0
    return out, json.loads((out / "r.json").read_text())


def test_kl_divergence_grows_as_bits_shrink_and_f32_to_f32_is_zero(cli_report):
    _, report = cli_report
    rows = {r["type"]: r for r in report["rows"]}
    assert list(rows) == ["F32", "F16", "Q8_0", "Q4_0"]
    f32 = rows["F32"]
    assert f32["kld_mean"] == 0.0 and f32["kld_max"] == 0.0
    assert f32["same_top_p"] == 1.0 and f32["rms_dp"] == 0.0 and f32["ppl_ratio"] == 1.0
    assert 0 < rows["F16"]["kld_mean"] < rows["Q8_0"]["kld_mean"] < rows["Q4_0"]["kld_mean"]
    assert rows["F16"]["same_top_p"] >= rows["Q8_0"]["same_top_p"] >= rows["Q4_0"]["same_top_p"]
    assert rows["F32"]["bits_per_weight"] > rows["F16"]["bits_per_weight"] > rows["Q8_0"]["bits_per_weight"] \
        > rows["Q4_0"]["bits_per_weight"]
    assert report["tokens_scored"] == report["chunks"] * (CTX - 1 - CTX // 2)
    for r in rows.values():
        assert r["tokens"] == report["tokens_scored"]
        assert r["kld_min"] <= r["kld_percentiles"]["50"] <= r["kld_percentiles"]["99"] <= r["kld_max"]
        assert r["generation"]["test"] == "tg8" and r["generation"]["tokens_per_second"] > 0
        assert r["prompt_tokens_per_second"] > 0
    assert math.isclose(report["reference"]["ppl"], rows["F32"]["ppl"])


def test_markdown_and_png_exist_and_parse(cli_report):
    out, report = cli_report
    md = (out / "r.md").read_text(encoding="utf-8").splitlines()
    header = next(line for line in md if line.startswith("| type | size MiB"))
    table = md[md.index(header) + 2: md.index(header) + 2 + len(report["rows"])]
    assert [line.split("|")[1].strip() for line in table] == [r["type"] for r in report["rows"]]
    assert all(len(line.split("|")) == len(header.split("|")) for line in table)
    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "r.png")).shape[2] in (3, 4)


def test_existing_files_are_reused(cli_report, ev_models, ev_text):
    out, _ = cli_report
    q8 = out / "q" / f"{file_stem(ev_models.base_gguf)}-Q8_0.gguf"
    before = q8.stat().st_mtime_ns
    report = evaluate_quants(QuantEvalConfig(input=ev_models.base_gguf, types=["Q8_0", "F32"], text=ev_text, ctx=CTX,
                                             chunks=2, out_dir=out / "q", gen_tokens=0, show_progress=False))
    q8_row, f32_row = report.rows
    assert q8_row.file.reused and q8_row.file.path == q8 and q8.stat().st_mtime_ns == before
    assert f32_row.file.path == ev_models.base_gguf  # the input itself, not a copy


def test_a_type_that_fell_back_says_so(ev_models, ev_text, tmp_path):
    """The tiny model's rows (64 values) are not a multiple of a k-quant's 256: llama.cpp writes Q6_K's
    matrices as another type, and the report says so instead of showing Q6_K's figures as Q6_K's."""
    report = evaluate_quants(QuantEvalConfig(input=ev_models.base_gguf, types=["Q8_0", "Q6_K"], text=ev_text, ctx=CTX,
                                             chunks=2, out_dir=tmp_path, gen_tokens=0, show_progress=False))
    q8, q6 = report.rows
    assert q8.file.fallback == {} and q6.file.fallback and sum(q6.file.fallback.values()) <= q6.file.matrices
    assert q6.to_dict()["fallback_matrices"] == q6.file.fallback
    assert [n for n in report.notes if n.startswith("Q6_K: ")] == [q6.file.fallback_note()]
    assert not any(n.startswith("Q8_0") for n in report.notes)
    again = evaluate_quants(QuantEvalConfig(input=ev_models.base_gguf, types=["Q6_K"], text=ev_text, ctx=CTX,
                                            chunks=2, out_dir=tmp_path, gen_tokens=0, show_progress=False))
    assert again.rows[0].file.reused and again.rows[0].file.fallback == q6.file.fallback  # read back from the file


def test_hf_reference(ev_models, ev_text, tmp_path):
    report = evaluate_quants(QuantEvalConfig(input=ev_models.base_gguf, types=["F32", "Q4_0"], text=ev_text, ctx=CTX,
                                             reference=ev_models.base, out_dir=tmp_path, gen_tokens=0,
                                             show_progress=False))
    f32, q4 = (r.stats for r in report.rows)
    assert report.reference["backend"] == "hf" and not report.notes
    assert f32["kld_mean"] < 1e-6 and f32["same_top_p"] > 0.99 and abs(f32["ppl_ratio"] - 1) < 1e-3
    assert q4["kld_mean"] > 100 * f32["kld_mean"]


def test_kl_stats_against_a_direct_computation():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(150, 40)).astype(np.float32) * 3
    q = base + rng.normal(size=base.shape).astype(np.float32) * 0.3
    targets = rng.integers(0, 40, 150)
    st = KLStats()
    st.add(base[:70], q[:70], targets[:70], block=16)
    st.add(base[70:], q[70:], targets[70:])
    s = st.summary()

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, r = softmax(base.astype(np.float64)), softmax(q.astype(np.float64))
    kl = (p * np.log(p / r)).sum(1)
    dp = r[np.arange(150), targets] - p[np.arange(150), targets]
    assert math.isclose(s["kld_mean"], kl.mean(), rel_tol=1e-9)
    assert math.isclose(s["kld_stderr"], kl.std(ddof=1) / math.sqrt(150), rel_tol=1e-6)
    assert math.isclose(s["kld_percentiles"]["99"], np.percentile(kl, 99), rel_tol=1e-5)
    assert math.isclose(s["rms_dp"], math.sqrt((dp ** 2).mean()), rel_tol=1e-9)
    assert s["same_top_p"] == np.mean(base.argmax(1) == q.argmax(1))
    nll, nll_b = -np.log(r[np.arange(150), targets]), -np.log(p[np.arange(150), targets])
    assert math.isclose(s["ppl_ratio"], math.exp(nll.mean() - nll_b.mean()), rel_tol=1e-9)
    assert s["ln_ppl_ratio_stderr"] > 0


def test_percentile_is_llama_cpp_s():
    v = np.arange(11, dtype=np.float64)
    assert percentile(v, 0.5) == 5 and percentile(v, 0.99) == pytest.approx(9.9) and percentile(v, 1.0) == 10


def test_file_stem_drops_the_type_suffix(tmp_path):
    assert file_stem(tmp_path / "tiny-F16.gguf") == "tiny"
    assert file_stem(tmp_path / "ggml-model-f16.gguf") == "ggml-model"
    assert file_stem(tmp_path / "model.gguf") == "model"


@pytest.mark.parametrize("args, message", [
    (["--types", "Q9_9"], "--types 'Q9_9' is not a llama.cpp quantization type"),
    (["--types", "IQ2_XXS"], "needs an importance matrix"),
    (["--lora", "."], "--lora and --tokenizer apply to an HF --reference"),
    (["--reference", "nowhere"], "--reference nowhere: no such file or directory"),
])
def test_user_errors_are_one_line_exit_2(args, message, ev_models, ev_text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "quant", str(ev_models.base_gguf), "--text", str(ev_text), "-q", *args]) == 2
    be.assert_one_line_error(capsys, message)
