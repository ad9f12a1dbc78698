"""Benchmark: `cllama-deploy eval quant` and `bench` on a random TinyLlama-1.1B-shape model with the 49953-token
Chinese-LLaMA vocabulary, anchored on llama.cpp's own tools in the same run.

What it runs (setup not timed: the merged tokenizer from /work/shared/data, the random f16 base written by
benchmarks/deploy_vs_seed.py's builder, our F16 GGUF, the Debian Reference in Simplified Chinese as text):

1. ``cllama-deploy eval quant F16.gguf --types F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0`` (quantizing, then PPL, KL
   divergence, same top p, RMS Δp, prompt and generation tokens/s per type) with --json/--markdown/--plot;
2. the anchors, llama.cpp's C++ tools (built by /work/shared/tools/build-llama-tools.sh):
   ``llama-perplexity`` on the F16 and Q4_0 files (PPL must agree with ours: same method, same tokens), and
   ``llama-perplexity --kl-divergence-base`` / ``--kl-divergence`` for Q4_0 (mean KLD, same top p);
3. ``cllama-deploy bench Q4_0.gguf`` next to ``llama-bench`` (pp512, tg128, threads 1 and 2), alternating the
   two for ``--rounds`` rounds.

    .venv/bin/python benchmarks/eval_quant.py --work /tmp/eval-bench [--chunks 3] [--rounds 2] [--reps 3]

or in two parts of under 15 minutes each (the second adds to WORK/results.json of the first):

    .venv/bin/python benchmarks/eval_quant.py --work /tmp/eval-bench --skip-speed
    .venv/bin/python benchmarks/eval_quant.py --work /tmp/eval-bench --skip-quant --rounds 1

Prints a Markdown summary (also written to WORK/summary.md) and writes WORK/results.json. Run it on a quiet
machine (``flock -x /tmp/cllama-cpu.lock``): llama.cpp's speed collapses when another process takes a core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOOLS = Path(os.environ.get("LLAMA_TOOLS", Path.home() / ".cache" / "cllama-bench" / "llama-build" / "bin"))
CLI = [str(ROOT / ".venv" / "bin" / "cllama-deploy")]
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]

# The seed's table (Chinese-LLaMA-Alpaca wiki, "llama.cpp量化部署", Alpaca-Plus-7B on an M1 Max): file size (GB),
# PPL, ms/token at -t 2 (blank where the seed did not measure).
SEED_7B = {
    "F16": (13.77, 10.793, 144), "Q8_0": (7.75, 10.790, 103), "Q6_K": (5.65, 10.845, None),
    "Q5_K_M": (4.89, 10.869, None), "Q4_K_M": (4.18, 11.062, None), "Q4_0": (4.31, 12.416, 87),
}


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    print(f"    {seconds:.1f}s", flush=True)
    return seconds, p.stdout + p.stderr


def setup(work: Path) -> tuple[Path, Path]:
    from debian_text import debian_texts
    from deploy_vs_seed import make_base, make_tokenizer

    from cllama_deploy.gguf.convert import ConvertConfig, convert

    f16 = work / "tiny-F16.gguf"
    if not f16.is_file():
        tok = make_tokenizer(work / "tokenizer" / "tokenizer.model")
        base = make_base(work / "base", tok)
        convert(ConvertConfig(model_dir=base, out=f16, outtype="f16", show_progress=False))
    text = work / "debian-reference.zh-cn.txt"
    if not text.is_file():
        import gzip

        text.write_bytes(gzip.decompress(debian_texts()["debian_reference"].read_bytes()))
    return f16, text


def llama_ppl(model: Path, text: Path, chunks: int, threads: int, log: Path, extra: list[str] = ()) -> dict:
    seconds, out = run([str(TOOLS / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512", "-b", "512",
                        "--chunks", str(chunks), "-t", str(threads), "-fa", "off", *extra], log)
    res = {"seconds": round(seconds, 2)}
    if m := re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out):
        res.update(ppl=float(m.group(1)), ppl_stderr=float(m.group(2)))
    elif m := re.search(r"Mean PPL\(Q\)\s+:\s+([\d.]+)\s+±\s+([\d.]+)", out):  # the --kl-divergence run's form
        res.update(ppl=float(m.group(1)), ppl_stderr=float(m.group(2)))
    if m := re.search(r"Mean\s+KLD:\s+([-\d.]+)\s+±\s+([-\d.]+)", out):
        res.update(kld_mean=float(m.group(1)), kld_stderr=float(m.group(2)))
    if m := re.search(r"Same top p:\s+([\d.]+)\s+±\s+([\d.]+)", out):
        res.update(same_top_p=float(m.group(1)) / 100)
    if m := re.search(r"RMS Δp\s+:\s+([\d.]+)\s+±\s+([\d.]+)", out):
        res.update(rms_dp=float(m.group(1)) / 100)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/eval-bench"))
    ap.add_argument("--chunks", type=int, default=3, help="512-token windows scored per model")
    ap.add_argument("--threads", type=int, default=1, help="threads of the quality runs")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of bench vs llama-bench")
    ap.add_argument("--reps", type=int, default=3, help="repetitions inside each bench / llama-bench run")
    ap.add_argument("--gen-tokens", type=int, default=32, help="tokens of eval quant's generation test per type")
    ap.add_argument("--skip-quant", action="store_true",
                    help="only the speed comparison (keeps the quality part of an earlier WORK/results.json)")
    ap.add_argument("--skip-speed", action="store_true", help="only eval quant and its llama-perplexity anchors")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    f16, text = setup(work)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "chunks": args.chunks,
                     "threads": args.threads}
    if args.skip_quant and (work / "results.json").is_file():
        earlier = json.loads((work / "results.json").read_text())
        results.update({k: earlier[k] for k in ("eval_quant", "llama_perplexity", "threads") if k in earlier})
    env = dict(os.environ, CLLAMA_N_THREADS=str(args.threads))

    if not args.skip_quant:
        qjson = work / "quant.json"
        seconds, _ = run(CLI + ["eval", "quant", str(f16), "--types", ",".join(TYPES), "--text", str(text),
                                "--ctx", "512", "--chunks", str(args.chunks), "--threads", str(args.threads),
                                "--quant-threads", "2", "--out-dir", str(work / "q"), "--json", str(qjson),
                                "--gen-tokens", str(args.gen_tokens), "--speed-reps", "2",
                                "--markdown", str(work / "quant.md"), "--plot", str(work / "quant.png"), "-q"],
                         work / "quant.log", env)
        results["eval_quant"] = {"seconds": round(seconds, 1), "report": json.loads(qjson.read_text())}
        q4 = work / "q" / "tiny-Q4_0.gguf"
        results["llama_perplexity"] = {
            "F16": llama_ppl(f16, text, args.chunks, args.threads, work / "lp-f16.log",
                             ["--kl-divergence-base", str(work / "f16.kld")]),
            "Q4_0": llama_ppl(q4, text, args.chunks, args.threads, work / "lp-q4.log",
                              ["--kl-divergence-base", str(work / "f16.kld"), "--kl-divergence"]),
        }
        (work / "f16.kld").unlink(missing_ok=True)

    q4 = work / "q" / "tiny-Q4_0.gguf"
    speed = {"ours": [], "llama_bench": []}
    for r in range(0 if args.skip_speed else args.rounds):
        out = work / f"bench-{r}.json"
        run(CLI + ["bench", str(q4), "--threads", "1,2", "--batch", "1,2,4,8", "--reps", str(args.reps),
                   "--json", str(out), "-q"], work / f"bench-{r}.log")
        speed["ours"].append(json.loads(out.read_text()))
        _, text_out = run([str(TOOLS / "llama-bench"), "-m", str(q4), "-t", "1,2", "-p", "512", "-n", "128",
                           "-r", str(args.reps), "-fa", "0", "-o", "json"], work / f"llama-bench-{r}.log")
        speed["llama_bench"].append(json.loads(text_out[text_out.index("["): text_out.rindex("]") + 1]))
    if not args.skip_speed:
        results["speed"] = speed
    (work / "results.json").write_text(json.dumps(results, indent=2))
    summary = render(results)
    (work / "summary.md").write_text(summary)
    print(summary)
    return 0


def _lb_rate(rows: list[dict], test: str, threads: int) -> float | None:
    for row in rows:
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        if name == test and row["n_threads"] == threads:
            return float(row["avg_ts"])
    return None


def render(res: dict) -> str:
    lines = []
    if "eval_quant" in res:
        rep = res["eval_quant"]["report"]
        rows = {r["type"]: r for r in rep["rows"]}
        f16 = rows["F16"]
        lp = res["llama_perplexity"]
        lines += [f"`eval quant` ({res['eval_quant']['seconds']:.0f} s, {rep['chunks']} windows × 512 tokens, "
                  f"{rep['tokens_scored']} tokens scored, {res.get('threads', 1)} thread(s)):", "",
                  "| type | size MiB | bpw | size / F16 (seed 7B) | PPL ratio | mean KLD | same top p | RMS Δp | "
                  "prompt t/s | tg t/s | tg ms/tok | ms/tok vs F16 (seed 7B, -t 2) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in TYPES:
            r = rows[t]
            size_s, _, ms_s = SEED_7B[t]
            tg = r["generation"]["tokens_per_second"] if r["generation"] else 0
            f16_tg = f16["generation"]["tokens_per_second"] if f16["generation"] else 0
            seed_ms = f"{ms_s / SEED_7B['F16'][2]:.2f}" if ms_s else "-"
            lines.append(
                f"| {t} | {r['size_bytes'] / 2**20:.0f} | {r['bits_per_weight']:.2f} | "
                f"{r['size_bytes'] / f16['size_bytes']:.3f} ({size_s / SEED_7B['F16'][0]:.3f}) | "
                f"{r['ppl_ratio']:.5f} ± {r['ppl_ratio_stderr']:.5f} | {r['kld_mean']:.3g} ± {r['kld_stderr']:.2g} | "
                f"{100 * r['same_top_p']:.2f} % | {100 * r['rms_dp']:.4f} % | {r['prompt_tokens_per_second']:.1f} | "
                f"{tg:.2f} ± {r['generation']['stdev']:.2f} | {1000 / tg:.0f} | "
                f"{(f16_tg / tg) if tg else 0:.2f} ({seed_ms}) |")
        ours_f16 = rep["reference"]["ppl"]
        lines += ["", "Anchor, llama.cpp's `llama-perplexity` (same file, text, -c 512, same chunks, "
                  f"{res.get('threads', 1)} thread(s)):", "",
                  "| | ours | llama-perplexity | ratio |", "|---|---|---|---|",
                  f"| F16 PPL | {ours_f16:.4f} | {lp['F16'].get('ppl', float('nan')):.4f} | "
                  f"{ours_f16 / lp['F16'].get('ppl', float('nan')):.6f} |",
                  f"| Q4_0 PPL | {rows['Q4_0']['ppl']:.4f} | {lp['Q4_0'].get('ppl', float('nan')):.4f} | "
                  f"{rows['Q4_0']['ppl'] / lp['Q4_0'].get('ppl', float('nan')):.6f} |",
                  f"| Q4_0 mean KLD | {rows['Q4_0']['kld_mean']:.6f} | {lp['Q4_0'].get('kld_mean', float('nan')):.6f} | "
                  f"{rows['Q4_0']['kld_mean'] / lp['Q4_0'].get('kld_mean', float('nan')):.4f} |",
                  f"| Q4_0 same top p | {100 * rows['Q4_0']['same_top_p']:.3f} % | "
                  f"{100 * lp['Q4_0'].get('same_top_p', float('nan')):.3f} % | |",
                  f"| F16 windows, seconds | | {lp['F16']['seconds']:.1f} (whole run) | |"]
    if "speed" not in res:
        return "\n".join(lines) + "\n"
    sp = res["speed"]
    lines += ["", "`bench` vs `llama-bench` on Q4_0 (tokens/s, mean ± sd over rounds of the per-run means; "
              "ratio ours / llama-bench):", "", "| test | threads | ours | llama-bench | ratio |", "|---|---|---|---|---|"]
    for test in ("pp512", "tg128"):
        for th in (1, 2):
            ours = [next(t["tokens_per_second"] for t in run["tests"] if t["test"] == test and t["threads"] == th)
                    for run in sp["ours"]]
            theirs = [_lb_rate(rows, test, th) for rows in sp["llama_bench"]]
            theirs = [x for x in theirs if x]
            mo, mt = statistics.fmean(ours), statistics.fmean(theirs)
            sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
            lines.append(f"| {test} | {th} | {mo:.2f} ± {sd(ours):.2f} | {mt:.2f} ± {sd(theirs):.2f} | {mo / mt:.3f} |")
    last = sp["ours"][-1]
    lines += ["", "Batched decoding (ours, Q4_0, aggregate tokens/s of B sequences, last round) and the bandwidth bound:",
              "", "| threads | " + " | ".join(f"B={b['batch']}" for b in last["batched"] if b["threads"] == 1) +
              " | single-stream bound |", "|---|" + "---|" * (1 + sum(b["threads"] == 1 for b in last["batched"]))]
    for bw in last["memory_bandwidth"]:
        th = bw["threads"]
        cells = [f"{b['tokens_per_second']:.1f}" for b in last["batched"] if b["threads"] == th]
        lines.append(f"| {th} | " + " | ".join(cells) + f" | {bw['tg_bound_tokens_per_second']:.1f} "
                     f"({bw['gb_per_second']:.1f} GB/s) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
