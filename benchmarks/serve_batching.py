"""Continuous batching benchmark: our server vs ``python -m llama_cpp.server`` vs llama.cpp's C++
``llama-server --parallel N``, on the same GGUF, same threads, clients in one async process.

    .venv/bin/python benchmarks/serve_batching.py [--work DIR] [--threads 1 2] [--rounds 2] [--quick]

Model: a random LLaMA of TinyLlama-1.1B shape (22 layers, hidden 2048, FFN 5632, 32 heads, 4 KV
heads) on the real 49953-piece Chinese-LLaMA vocabulary (LLaMA's tokenizer.model merged with
chinese_sp.model by our tokenizer merge, from /work/shared/data), converted by our converter and
quantized to Q4_K_M. Built once into --work (set-up, not timed).

Measured for every server, at every thread count, in alternating order over --rounds:
- aggregate completion tokens/s, time to first token and inter-token latency (p50/p99) with 1, 4 and
  8 concurrent streaming clients (``/v1/completions``, greedy, EOS blocked with logit_bias, so every
  request generates exactly --max-tokens tokens; every prompt distinct, ~40 tokens);
- a 1,000-token prompt joining 4 running streams: the running streams' inter-token p99 while the long
  prompt is prefilled, against their p50 before it joined (bar for ours: <= 3x), and the long
  prompt's time to first token (not for llama_cpp.server, which serves one request at a time);
- (ours, and llama-server for reference) the time to first token of the 5th turn of a chat that
  re-sends its history, with the prefix cache on vs off (bar: <= 0.5x).
Bars from issue 8: at 8 clients >= 0.9x llama-server's aggregate tokens/s, at 1 client >= 0.95x.

For our server the script also reads /metrics around each scenario: the share of wall time spent
inside llama_decode, the scheduler's per-step overhead outside it, and the mean sequences per step,
which is what bounds us when a bar is missed.

The clients are a minimal asyncio HTTP/1.1 + SSE reader (no httpx), so the measuring process costs
little CPU. llama_cpp.server needs llama-cpp-python's [server] extras; they are pip-installed into
--work/lcp-server-deps (not the project's venv) on first use. llama-server is the binary built by
/work/shared/tools/build-llama-tools.sh (--llama-server to point elsewhere); never built here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data")
LLAMA_SERVER_DEFAULT = Path.home() / ".cache/cllama-bench/llama-build/bin/llama-server"
LLAMA_SERVER = LLAMA_SERVER_DEFAULT
N_CTX = 2048  # per sequence, every server
FLASH_ATTN = "off"  # ours (--flash-attn); llama-server runs its default (auto: on for CPUs)
PARALLEL = 8
EOS = 2
WORDS_EN = ("river village morning light story garden market winter teacher window mountain letter "
            "silver harbor people bridge lantern summer forest quiet").split()
WORDS_ZH = list("北京上海河流村庄早晨故事花园市场冬天老师窗户山信银港口人们桥灯夏天森林安静中国学习工作")


# --------------------------------------------------------------------------------------------- set-up


def build_model(work: Path) -> Path:
    """Q4_K_M of a random TinyLlama-shape model on the 49953 vocabulary (cached in ``work``)."""
    out = work / "tinyllama-shape-49953-Q4_K_M.gguf"
    if out.exists():
        return out
    code = f"""
import sys, shutil
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.deploy_vs_seed import make_tokenizer, make_base
from cllama_deploy.gguf.convert import ConvertConfig, convert
from cllama_deploy.gguf.quantize import QuantizeConfig, quantize
work = Path({str(work)!r})
tok = make_tokenizer(work / "tokenizer" / "tokenizer.model")
base = make_base(work / "base-hf", tok)
f16 = work / "base-f16.gguf"
convert(ConvertConfig(model_dir=base, out=f16, outtype="f16", show_progress=False))
quantize(QuantizeConfig(input=f16, output=Path({str(out)!r}), type="Q4_K_M"), show_progress=False)
shutil.rmtree(base)
f16.unlink()
"""
    # in its own process: the parent (the clients) stays small
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def lcp_server_deps(work: Path) -> Path:
    target = work / "lcp-server-deps"
    if not (target / "sse_starlette").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                        "--no-deps", "sse-starlette", "starlette-context", "pydantic-settings",
                        "python-dotenv"], check=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1:port, ready when /v1/models answers."""

    def __init__(self, name: str, cmd: list[str], port: int, model_id: str, env: dict):
        self.name, self.cmd, self.port, self.model_id, self.env = name, cmd, port, model_id, env
        self.proc = None
        self.log: list[str] = []

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env)
        threading.Thread(target=lambda: self.log.extend(iter(self.proc.stderr.readline, "")),
                         daemon=True).start()
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n" + "".join(self.log[-30:]))
            try:
                status, _ = asyncio.run(get(self.port, "/v1/models"))
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.log[-30:]))

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def servers(model: Path, threads: int, work: Path, which: list[str]) -> dict:
    t = str(threads)
    env = {**os.environ, "CLLAMA_N_THREADS": t, "OMP_NUM_THREADS": t}
    out = {}
    if "ours" in which or "ours-nocache" in which:
        base = [sys.executable, "-m", "cllama_deploy", "serve", f"bench={model}", "--threads", t,
                "--n-ctx", str(N_CTX), "--parallel", str(PARALLEL), "--no-access-log", "--log-level",
                "warning", "--max-queue", "256", "--flash-attn", FLASH_ATTN, "--port"]
        if "ours" in which:
            p = free_port()
            out["ours"] = Server("ours", base + [str(p)], p, "bench", env)
        if "ours-nocache" in which:
            p = free_port()
            out["ours-nocache"] = Server("ours-nocache", base + [str(p), "--no-prefix-cache"], p,
                                         "bench", env)
    if "llama_cpp.server" in which:
        p = free_port()
        deps = lcp_server_deps(work)
        lenv = {**env, "PYTHONPATH": str(deps)}
        out["llama_cpp.server"] = Server("llama_cpp.server", [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", t,
            "--n_threads_batch", t, "--n_ctx", str(N_CTX), "--port", str(p), "--host", "127.0.0.1",
            "--interrupt_requests", "False"],  # by default a new request cuts the running stream
            p, str(model), lenv)
    if "llama-server" in which:
        p = free_port()
        out["llama-server"] = Server("llama-server", [
            str(LLAMA_SERVER), "-m", str(model), "-t", t, "-tb", t, "-c", str(N_CTX * PARALLEL),
            "-np", str(PARALLEL), "--port", str(p), "--host", "127.0.0.1", "--no-webui"],
            p, "bench", env)
    return out


# --------------------------------------------------------------------------------------------- client


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(body):
        j = body.index(b"\r\n", i)
        n = int(body[i:j].split(b";")[0], 16)
        if n == 0:
            break
        out += body[j + 2:j + 2 + n]
        i = j + 2 + n + 2
    return bytes(out)


async def stream_completion(port: int, body: dict, out: dict | None = None) -> dict:
    """POST a streaming completion; timestamps of every event that carries text (also filled into
    ``out`` as they come, for a caller that cancels the stream)."""
    payload = json.dumps({**body, "stream": True}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                 + b"\r\n\r\n" + payload)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    chunked = b"transfer-encoding: chunked" in head.lower()
    stamps: list[float] = [] if out is None else out.setdefault("stamps", [])
    texts: list[str] = []
    finish, usage, buf = None, None, b""

    def handle(line: bytes) -> None:
        nonlocal finish, usage
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            return
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            if ch.get("text"):
                stamps.append(time.perf_counter())
                texts.append(ch["text"])
            finish = ch.get("finish_reason") or finish

    async def raw():
        if not chunked:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                yield data
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)

    async for data in raw():
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            handle(line.rstrip(b"\r"))
    writer.close()
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {buf[:300]!r}")
    return {"t0": t0, "stamps": stamps, "texts": texts, "finish": finish, "usage": usage}


_SP = {}


def n_tokens(text: str) -> int:
    """Prompt tokens (BOS included) with the benchmark model's tokenizer."""
    if "sp" not in _SP:
        import sentencepiece as spm

        _SP["sp"] = spm.SentencePieceProcessor(model_file=str(_SP["path"]))
    return 1 + len(_SP["sp"].encode(text))


def prompt_text(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        out.append(rng.choice(WORDS_ZH) + rng.choice(WORDS_ZH) if rng.random() < 0.4
                   else rng.choice(WORDS_EN))
    return " ".join(out)


def body(server: Server, prompt: str, max_tokens: int) -> dict:
    return {"model": server.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "top_k": 1, "repeat_penalty": 1.0, "logit_bias": {str(EOS): -100.0}}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def gaps(r: dict) -> list[float]:
    s = r["stamps"]
    return [b - a for a, b in zip(s, s[1:])]


async def load_run(server: Server, clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[prompt_text(rng, 24) for _ in range(per_client)] for _ in range(clients)]

    async def client(i):
        return [await stream_completion(server.port, body(server, p, max_tokens)) for p in prompts[i]]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*[client(i) for i in range(clients)]) for r in rs]
    wall = time.perf_counter() - t0
    bad = [r["finish"] for r in results if r["finish"] != "length"]
    tokens = sum((r["usage"] or {}).get("completion_tokens", max_tokens) for r in results)
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [g for r in results for g in gaps(r)]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 3), "ttft_p50_ms": round(pct(ttft, 50) * 1e3, 1),
            "ttft_p99_ms": round(pct(ttft, 99) * 1e3, 1), "itl_p50_ms": round(pct(itl, 50) * 1e3, 1),
            "itl_p99_ms": round(pct(itl, 99) * 1e3, 1), "not_length": bad}


async def join_run(server: Server, seed: int, long_tokens: int = 1000) -> dict:
    """4 running streams; a ~1000-token prompt joins; their inter-token gaps before (once all four
    are generating) and during its prefill."""
    rng = random.Random(seed)
    partial = [{} for _ in range(4)]
    running = [asyncio.ensure_future(stream_completion(server.port, body(
        server, prompt_text(rng, 24), 1000), partial[i])) for i in range(4)]
    # the four are prefilled and generating: each has streamed 10 tokens (or 60 s passed)
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and not all(len(p.get("stamps", ())) >= 10 for p in partial):
        await asyncio.sleep(0.1)
    t_steady = max((p["stamps"][0] for p in partial if p.get("stamps")), default=0.0)
    long_prompt = prompt_text(rng, 20)
    while n_tokens(long_prompt) < long_tokens:
        long_prompt += " " + prompt_text(rng, 10)
    t_join = time.perf_counter()
    joined = await stream_completion(server.port, body(server, long_prompt, 8))
    t_first = joined["stamps"][0] if joined["stamps"] else time.perf_counter()
    await asyncio.sleep(2.0)
    outlived = all(not f.done() for f in running)
    for f in running:  # disconnect: the servers cancel the generations
        f.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    results = partial
    before, during = [], []
    for r in results:
        s = r.get("stamps", [])
        for a, b in zip(s, s[1:]):
            if b <= t_join:
                if a >= t_steady:  # steady decoding: all four started (not their prefill steps)
                    before.append(b - a)
            elif a < t_first:  # a gap that overlaps the long prompt's prefill
                during.append(b - a)
    p50, p99 = pct(before, 50), pct(during, 99)
    return {"join_ttft_s": round(t_first - t_join, 3), "long_prompt_tokens": n_tokens(long_prompt),
            "itl_p50_before_ms": round(p50 * 1e3, 1),
            "itl_p99_during_ms": round(p99 * 1e3, 1), "itl_max_during_ms": round(max(during,
                                                                                  default=0) * 1e3, 1),
            "gaps_during": len(during), "streams_outlived_join": outlived, "p99_over_p50": round(p99 / p50, 2) if p50 else None}


async def chat_run(server: Server, seed: int, turns: int = 5) -> dict:
    """A chat re-sending its whole history each turn (Alpaca format, as text); TTFT per turn."""
    rng = random.Random(seed)
    history = ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n" + prompt_text(rng, 60))
    ttfts = []
    for _ in range(turns):
        history += "\n\n### Instruction:\n" + prompt_text(rng, 40) + "\n\n### Response: "
        r = await stream_completion(server.port, body(server, history, 32))
        ttfts.append(r["stamps"][0] - r["t0"])
        history += "".join(r["texts"])  # the answer as streamed, re-sent with the next turn
    return {"ttft_ms": [round(t * 1e3, 1) for t in ttfts], "prompt_chars_last": len(history)}


async def metrics(server: Server) -> dict:
    status, data = await get(server.port, "/metrics")
    out = {}
    if status != 200:
        return out
    for line in data.decode().splitlines():
        m = re.match(r'^(cllama_(?:decode_seconds_total|step_seconds_total|decode_steps_total|'
                     r'step_sequences_sum|step_sequences_count|step_tokens_sum|'
                     r'prompt_tokens_cached_total|prompt_tokens_computed_total))\{[^}]*\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def delta(a: dict, b: dict, wall: float) -> dict:
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
    steps = d.get("cllama_decode_steps_total", 0)
    if not steps:
        return {}
    dec, step = d["cllama_decode_seconds_total"], d["cllama_step_seconds_total"]
    return {"steps": int(steps), "decode_share_of_wall": round(dec / wall, 3),
            "step_overhead_ms": round((step - dec) / steps * 1e3, 2),
            "decode_ms_per_step": round(dec / steps * 1e3, 1),
            "mean_sequences_per_step": round(d["cllama_step_sequences_sum"] / d["cllama_step_sequences_count"], 2),
            "mean_tokens_per_step": round(d["cllama_step_tokens_sum"] / d["cllama_step_sequences_count"], 2)}


# --------------------------------------------------------------------------------------------- main


def measure(server: Server, args, seed: int) -> dict:
    res: dict = {"load": {}, "ours_internals": {}}
    asyncio.run(stream_completion(server.port, body(server, "warm up", 8)))
    for clients in args.clients:
        per = max(2, args.requests // clients) if clients == 1 else args.per_client
        m0 = asyncio.run(metrics(server)) if server.name.startswith("ours") else {}
        r = asyncio.run(load_run(server, clients, per, args.max_tokens, seed + clients))
        res["load"][clients] = r
        if m0:
            res["ours_internals"][clients] = delta(m0, asyncio.run(metrics(server)), r["wall_s"])
        print(f"  {server.name:16s} {clients} clients: {r['tok_s']:7.2f} tok/s  ttft p50 "
              f"{r['ttft_p50_ms']:7.0f} ms p99 {r['ttft_p99_ms']:7.0f}  itl p50 {r['itl_p50_ms']:6.1f} "
              f"p99 {r['itl_p99_ms']:6.1f} ms {res['ours_internals'].get(clients, '')}", flush=True)
    if not args.no_join and server.name != "llama_cpp.server":  # serial: the prompt waits for the four
        res["join"] = asyncio.run(join_run(server, seed + 100))
        print(f"  {server.name:16s} 1000-token join: {res['join']}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/cllama-batching-bench")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2, help="each server measured this often, alternating")
    ap.add_argument("--servers", nargs="+", default=["ours", "llama-server", "llama_cpp.server"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2, help="requests per client at 4 and 8 clients")
    ap.add_argument("--requests", type=int, default=4, help="requests at 1 client")
    ap.add_argument("--chats", type=int, default=3, help="5-turn chats per cache setting")
    ap.add_argument("--no-join", action="store_true")
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--flash-attn", default="off", choices=["off", "on", "auto"],
                    help="ours' --flash-attn (what bounds us against llama-server, which runs it auto)")
    ap.add_argument("--llama-server", default=str(LLAMA_SERVER_DEFAULT))
    ap.add_argument("--quick", action="store_true", help="1 thread, 1 round, small counts (script check)")
    args = ap.parse_args()
    global FLASH_ATTN
    FLASH_ATTN = args.flash_attn
    global LLAMA_SERVER
    LLAMA_SERVER = Path(args.llama_server)  # noqa: PLW0603
    if args.quick:
        args.threads, args.rounds, args.requests, args.per_client, args.chats = [1], 1, 2, 1, 1
    if "llama-server" in args.servers and not LLAMA_SERVER.exists():
        print(f"llama-server not found at {LLAMA_SERVER}: skipping it")
        args.servers = [s for s in args.servers if s != "llama-server"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    _SP["path"] = work / "tokenizer" / "tokenizer.model"
    print(f"model: {model} ({model.stat().st_size / 1e6:.0f} MB); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    out: dict = {"model": str(model), "n_ctx": N_CTX, "parallel": PARALLEL, "max_tokens": args.max_tokens,
                 "runs": []}
    for threads in args.threads:
        for rnd in range(args.rounds):
            order = args.servers if rnd % 2 == 0 else list(reversed(args.servers))
            for name in order:
                with servers(model, threads, work, [name])[name] as srv:
                    print(f"threads {threads} round {rnd + 1}: {name} (load {os.getloadavg()[0]:.2f})",
                          flush=True)
                    r = measure(srv, args, seed=1000 * rnd)
                out["runs"].append({"threads": threads, "round": rnd, "server": name, **r})
        if not args.no_chat:
            out.setdefault("chat", {})[threads] = chat_study(model, threads, work, args)
    summary = summarize(out, args)
    out["summary"] = summary
    (work / "results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"full results: {work / 'results.json'}")
    return 0


def chat_study(model: Path, threads: int, work: Path, args) -> dict:
    names = ["ours", "ours-nocache"] + (["llama-server"] if "llama-server" in args.servers else [])
    res = {}
    for name in names:
        with servers(model, threads, work, [name])[name] as srv:
            asyncio.run(stream_completion(srv.port, body(srv, "warm up", 4)))
            runs = [asyncio.run(chat_run(srv, seed=7000 + i)) for i in range(args.chats)]
        res[name] = {"ttft_ms_by_turn": [round(statistics.median(r["ttft_ms"][t] for r in runs), 1)
                                         for t in range(5)]}
        print(f"  chat threads {threads} {name}: {res[name]}", flush=True)
    on, off = res["ours"]["ttft_ms_by_turn"][4], res["ours-nocache"]["ttft_ms_by_turn"][4]
    res["turn5_ttft_on_over_off"] = round(on / off, 3)
    return res


def summarize(out: dict, args) -> dict:
    summary: dict = {}
    for threads in args.threads:
        rows = [r for r in out["runs"] if r["threads"] == threads]
        s: dict = {}
        for name in args.servers:
            mine = [r for r in rows if r["server"] == name]
            s[name] = {}
            for c in args.clients:
                vals = [r["load"][c]["tok_s"] for r in mine]
                s[name][c] = {"tok_s_median": round(statistics.median(vals), 2),
                              "tok_s_spread": [min(vals), max(vals)],
                              "ttft_p50_ms": statistics.median(r["load"][c]["ttft_p50_ms"] for r in mine),
                              "itl_p50_ms": statistics.median(r["load"][c]["itl_p50_ms"] for r in mine),
                              "itl_p99_ms": statistics.median(r["load"][c]["itl_p99_ms"] for r in mine)}
            if not args.no_join and name != "llama_cpp.server":
                s[name]["join_p99_over_p50"] = [r["join"]["p99_over_p50"] for r in mine]
                s[name]["join_ttft_s"] = [r["join"]["join_ttft_s"] for r in mine]
        if "ours" in s and "llama-server" in s:
            s["ours_over_llama_server"] = {c: round(s["ours"][c]["tok_s_median"]
                                                    / s["llama-server"][c]["tok_s_median"], 3)
                                           for c in args.clients}
            bars = {}
            if 8 in args.clients:
                bars["8_clients_>=0.9"] = s["ours_over_llama_server"][8] >= 0.9
            if 1 in args.clients:
                bars["1_client_>=0.95"] = s["ours_over_llama_server"][1] >= 0.95
            s["bars"] = bars
        if "ours" in s and "llama_cpp.server" in s:
            s["ours_over_llama_cpp_server"] = {c: round(s["ours"][c]["tok_s_median"]
                                                        / s["llama_cpp.server"][c]["tok_s_median"], 3)
                                               for c in args.clients}
        if not args.no_join and "ours" in s:
            s.setdefault("bars", {})["join_p99_<=3x_p50"] = all(
                x is not None and x <= 3 for x in s["ours"]["join_p99_over_p50"])
        chat = out.get("chat", {}).get(threads)
        if chat:
            s["chat_turn5_ttft_on_over_off"] = chat["turn5_ttft_on_over_off"]
            s.setdefault("bars", {})["chat_turn5_<=0.5"] = chat["turn5_ttft_on_over_off"] <= 0.5
        summary[threads] = s
    return summary


if __name__ == "__main__":
    sys.exit(main())
