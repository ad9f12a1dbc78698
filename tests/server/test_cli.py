"""`cllama-deploy serve` as an operator runs it: settings file, several models, port 0, JSON access
log, and graceful shutdown (SIGTERM lets an in-flight stream finish)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from cllama_deploy.cli import main
from tests.server import builders_server as bs


def test_bad_flags_exit_2(tiny_gguf_path, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tiny_gguf_path), "--port", "99999"]) == 2
    assert main(["serve", str(tiny_gguf_path), "--chat-template", "nope"]) == 2
    bad = tmp_path / "s.yaml"
    bad.write_text("modles: [x]\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "modles" in capsys.readouterr().err
    assert main(["serve"]) == 2


def _serve_until_exit(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``cllama-deploy serve ARGS`` and wait for it to exit on its own (a server that keeps
    running past ``timeout`` fails the test instead of hanging it)."""
    env = {**os.environ, "CLLAMA_N_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cllama_deploy", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"serve kept running with a model that cannot load; stderr:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_serve_of_a_file_that_is_not_a_gguf_exits_2_with_one_line(tmp_path):
    """Issue 14 item 4: a config.json (say) given as the model: one line, exit 2, before listening."""
    cfg = tmp_path / "config.json"
    cfg.write_text('{"architectures": ["LlamaForCausalLM"]}')
    done = _serve_until_exit([str(cfg)])
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert "not a GGUF file" in lines[0] and str(cfg) in lines[0]
    assert "listening on" not in done.stderr


def test_serve_of_a_gguf_that_llama_cpp_cannot_load_stops_with_exit_2(tiny_gguf_path, tmp_path):
    """A GGUF that passes the magic check but does not load (cut short): the server stops after
    start-up with the error as its last line (no traceback), instead of answering 503 forever."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf_path.read_bytes()[:100_000])
    done = _serve_until_exit([str(cut)])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "could not load" in last and str(cut) in last


def test_serve_subprocess_graceful_shutdown(tiny_gguf_path, tmp_path):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        "models:\n"
        f"  - path: {tiny_gguf_path}\n    id: tiny\n"
        f"  - path: {tiny_gguf_path}\n    id: tiny-2\n    chat_template: alpaca-2\n"
        "n_ctx: 8192\nthreads: 1\nmax_queue: 8\n")
    env = {**os.environ, "CLLAMA_N_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cllama_deploy", "serve", "--config", str(cfg),
                             "--port", "0", "--graceful-timeout", "60"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        assert bs.wait_until(lambda: any("listening on" in x for x in lines), 120), lines
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        url = f"http://127.0.0.1:{port}"
        assert bs.wait_until(lambda: _ok(url + "/health"), 120), lines
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["tiny", "tiny-2"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-2", "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny-2"

        result = {}

        def stream():
            body = {"model": "tiny", "prompt": "go", "max_tokens": 6000, "stream": True,
                    "logit_bias": {"2": -100}, "temperature": 0}
            result["status"], result["events"] = bs.stream_post(url + "/v1/completions", body, timeout=300)

        t = threading.Thread(target=stream)
        t.start()
        # wait until the stream is running, then ask the server to stop
        assert bs.wait_until(lambda: _running(url) == 1, 60)
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        assert result["status"] == 200
        events = result["events"]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events[:-1] if e["choices"][0]["text"]) > 1
        # uvicorn re-raises the signal once shut down: "terminated by SIGTERM" is the clean exit
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    access = [json.loads(x) for x in lines if x.startswith("{")]
    paths = {a["path"] for a in access}
    assert {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= paths
    done = [a for a in access if a["path"] == "/v1/completions"][-1]
    assert done["status"] == 200 and done["completion_tokens"] == 6000 and done["model"] == "tiny"
    assert done["finish_reason"] == "length" and "request_id" in done and "duration_ms" in done


def _ok(u: str) -> bool:
    try:
        return httpx.get(u, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _running(url: str) -> int:
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return -1
    m = re.search(r'cllama_requests_running\{model="tiny"\} (\S+)', text)
    return int(float(m.group(1))) if m else -1


@pytest.mark.parametrize("flag", ["--help"])
def test_help(flag, capsys):
    assert main(["serve", flag]) == 0
    out = capsys.readouterr().out
    for opt in ("--api-key", "--n-ctx", "--threads", "--max-queue", "--config", "--chat-template",
                "--kv-cache-type", "--flash-attn"):
        assert opt in out
