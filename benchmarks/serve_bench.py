"""Serving benchmark: tokens/s and time to first token through our HTTP server, against
``Llama.create_completion`` in-process (the anchor) and ``python -m llama_cpp.server`` on the same GGUF.

    .venv/bin/python benchmarks/serve_bench.py [--work DIR] [--tokens 128] [--repeats 3] [--threads-study]

The model is a random LLaMA of a realistic small size (hidden 1024, 8 layers, 16 heads, the 32000-piece
LLaMA tokenizer from shared/data when present, else a 1000-piece test tokenizer), converted to q8_0 by
our converter. Every engine runs with n_threads=1 (see docs/serving.md) and greedy decoding, so all
three generate the same tokens. The three are measured in turn, round-robin, to share the machine's
noise. ``python -m llama_cpp.server`` needs llama-cpp-python's [server] extras (sse-starlette,
starlette-context, pydantic-settings), installed for this benchmark only.

Also measured: N concurrent streaming clients against each server (does every stream end with a
finish_reason?), and with --threads-study, in-process decode speed with n_threads 1 and 2, alone and
while another process keeps one core busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_TOKENIZER = ROOT.parent / "shared" / "data" / "llama-tokenizer" / "tokenizer.model"
PROMPT = "Once upon a time, in a small village by the river, there lived"


def build_model(work: Path) -> Path:
    out = work / "bench-1024x8-q8_0.gguf"
    if out.exists():
        return out
    from cllama_deploy.gguf.convert import ConvertConfig, convert
    from tests import builders

    tok = LLAMA_TOKENIZER if LLAMA_TOKENIZER.exists() else builders.train_llama_like_sp(
        work / "tok" / "tokenizer.model", vocab_size=1000)
    import sentencepiece as spm

    n_vocab = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    hf = builders.make_tiny_llama(work / "hf", n_vocab, hidden_size=1024, num_layers=8, num_heads=16,
                                  num_kv_heads=16, intermediate_size=2816, max_position_embeddings=2048,
                                  tokenizer_model=tok)
    convert(ConvertConfig(model_dir=hf, out=out, outtype="q8_0", show_progress=False))
    return out


# --------------------------------------------------------------------------------------------- anchors


def in_process(llm, n_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, count = [], 0
    for chunk in llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, repeat_penalty=1.0,
                                       stream=True):
        stamps.append(time.perf_counter())
        count += 1
        if chunk["choices"][0]["finish_reason"]:
            break
    return _rates(t0, stamps, count)


def _rates(t0: float, stamps: list[float], n_tokens: int) -> dict:
    first, last = stamps[0], stamps[-1]
    return {"ttft_s": first - t0, "tok_s": (n_tokens - 1) / (last - first) if last > first else 0.0,
            "total_s": last - t0, "tokens": n_tokens}


def http_stream(url: str, n_tokens: int, model: str, usage: bool) -> dict:
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0.0,
            "repeat_penalty": 1.0, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    stamps, text_chunks, tokens = [], 0, None
    with httpx.Client(timeout=600) as c:
        t0 = time.perf_counter()
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if ev.get("choices") and ev["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                    text_chunks += 1
    return _rates(t0, stamps, tokens if tokens is not None else text_chunks)


def start_server(cmd: list[str], url_pattern: str | None, port: int | None, env: dict) -> tuple:
    import httpx

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.time() + 300
    url = f"http://127.0.0.1:{port}" if port else None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + "".join(lines[-20:]))
        if url is None:
            m = re.search(url_pattern, "".join(lines))
            if m:
                url = m.group(1)
        if url:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines[-20:]))


def concurrent_streams(url: str, model: str, clients: int, rounds: int, n_tokens: int) -> dict:
    import httpx

    async def one(c):
        body = {"model": model, "prompt": PROMPT, "max_tokens": n_tokens, "stream": True,
                "temperature": 0.8}
        finish, chunks, done = None, 0, False
        try:
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ev = json.loads(line[6:])
                        for ch in ev.get("choices") or []:
                            chunks += 1
                            finish = ch.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            return {"finish": None, "error": str(exc), "chunks": chunks, "done": done}
        return {"finish": finish, "chunks": chunks, "done": done}

    async def main():
        out = []
        async with httpx.AsyncClient(timeout=600) as c:
            for _ in range(rounds):
                out += await asyncio.gather(*[one(c) for _ in range(clients)])
        return out

    res = asyncio.run(main())
    ok = sum(1 for r in res if r["finish"] in ("stop", "length"))
    return {"streams": len(res), "with_finish_reason": ok,
            "chunks_min": min(r["chunks"] for r in res), "chunks_max": max(r["chunks"] for r in res)}


# --------------------------------------------------------------------------------------------- threads


def threads_study(model: Path, n_tokens: int) -> list[dict]:
    import llama_cpp

    rows = []
    for busy in (False, True):
        hog = None
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            for n in (1, 2):
                llm = llama_cpp.Llama(str(model), n_ctx=512, n_threads=n, n_threads_batch=n, verbose=False)
                in_process(llm, 8)  # warm-up
                r = in_process(llm, n_tokens)
                rows.append({"n_threads": n, "other_core_busy": busy, "tok_s": round(r["tok_s"], 2)})
                del llm
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/cllama-serve-bench")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads-study", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    print(f"model: {model} ({model.stat().st_size / 1e6:.0f} MB)", flush=True)

    import llama_cpp

    env = {**os.environ, "CLLAMA_N_THREADS": "1"}
    ours, ours_url = start_server([sys.executable, "-m", "cllama_deploy", "serve", f"bench={model}",
                                   "--port", "0", "--threads", "1", "--n-ctx", "1024",
                                   "--no-access-log"],
                                  r"listening on (http://127\.0\.0\.1:\d+)", None, env)
    their_port = 18000 + os.getpid() % 1000
    theirs, theirs_url = start_server([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                                       "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "1024",
                                       "--port", str(their_port), "--host", "127.0.0.1"],
                                      None, their_port, env)
    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    results: dict[str, list[dict]] = {"in_process": [], "ours_http": [], "llama_cpp_server_http": []}
    try:
        in_process(llm, 8)
        http_stream(ours_url, 8, "bench", True)
        http_stream(theirs_url, 8, str(model), False)
        for r in range(args.repeats):
            results["in_process"].append(in_process(llm, args.tokens))
            results["ours_http"].append(http_stream(ours_url, args.tokens, "bench", True))
            results["llama_cpp_server_http"].append(http_stream(theirs_url, args.tokens, str(model), False))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['tok_s']:.2f} tok/s ttft {v[-1]['ttft_s'] * 1000:.0f} ms"
                                                 for k, v in results.items()), flush=True)
        del llm
        conc = {
            "ours": concurrent_streams(ours_url, "bench", args.clients, 3, 16),
            "llama_cpp_server": concurrent_streams(theirs_url, str(model), args.clients, 3, 16),
        }
    finally:
        for p in (ours, theirs):
            p.send_signal(signal.SIGTERM)
        for p in (ours, theirs):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()

    summary = {}
    for k, v in results.items():
        summary[k] = {m: round(statistics.median(x[m] for x in v), 4) for m in ("tok_s", "ttft_s", "total_s")}
        # other processes only ever slow a run down: the best run is the least disturbed one
        summary[k]["best_tok_s"] = round(max(x["tok_s"] for x in v), 4)
    base = summary["in_process"]
    for k in ("ours_http", "llama_cpp_server_http"):
        summary[k]["tok_s_ratio_vs_in_process"] = round(summary[k]["tok_s"] / base["tok_s"], 3)
        summary[k]["best_tok_s_ratio_vs_in_process"] = round(summary[k]["best_tok_s"] / base["best_tok_s"], 3)
        summary[k]["ttft_overhead_ms"] = round((summary[k]["ttft_s"] - base["ttft_s"]) * 1000, 1)
    out = {"model": str(model), "tokens": args.tokens, "repeats": args.repeats, "median": summary,
           f"concurrent_{args.clients}_clients_x3_rounds": conc}
    if args.threads_study:
        out["threads_study"] = threads_study(model, 64)
    print(json.dumps(out, indent=2))
    ratio = summary["ours_http"]["tok_s_ratio_vs_in_process"]
    print(f"ours/in-process tokens/s: {ratio:.3f} (bar 0.95): {'PASS' if ratio >= 0.95 else 'FAIL'}")
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
