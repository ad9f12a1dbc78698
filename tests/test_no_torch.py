"""The deploy and serve path needs no torch: merge, convert, quantize, inspect, deploy and serve run in a
subprocess where importing torch, transformers, peft, accelerate or datasets fails as if they were not
installed (the fixtures are built with them here, in the test process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from tests import builders
from tests.gguf import builders_gguf as bg
from tests.pipeline import builders_pipeline as bp

BLOCKED = ("torch", "transformers", "peft", "accelerate", "datasets")

# Prepended to every child: a meta-path finder that refuses the training stack, and an exit check that
# none of it got into sys.modules some other way.
PRELUDE = textwrap.dedent(f"""
    import atexit, importlib.abc, sys
    BLOCKED = {BLOCKED!r}

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_no_torch)", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())

    @atexit.register
    def _check():
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("LEAKED: " + ",".join(leaked) if leaked else "NO-TORCH-OK", file=sys.stderr, flush=True)
""")


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(code)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny base LLaMA and a PEFT LoRA for it (built with torch, here)."""
    root = tmp_path_factory.mktemp("no_torch")
    tok = bg.base_tokenizer(root / "tok" / "tokenizer.model")
    base = bg.tame(builders.make_tiny_llama(root / "base", bg.sp_size(tok), num_heads=4, num_kv_heads=2,
                                            tokenizer_model=tok, seed=3))
    bp.make_lora(base, root / "lora", seed=4)
    return base, root / "lora"


def test_the_block_works():
    proc = subprocess.run(_child("import torch"), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked by test_no_torch" in proc.stderr


def test_merge_convert_quantize_inspect_deploy_without_torch(inputs, tmp_path):
    base, lora = inputs
    steps = [
        ["merge", "--base", str(base), "--lora", str(lora), "--out", str(tmp_path / "merged"), "-q"],
        ["convert", str(tmp_path / "merged"), "--out", str(tmp_path / "m-f16.gguf"), "-q"],
        ["quantize", str(tmp_path / "m-f16.gguf"), str(tmp_path / "m-q4.gguf"), "--type", "Q4_K_M",
         "--threads", "1"],
        ["inspect", str(tmp_path / "m-q4.gguf"), "--json", "--no-tensors"],
        ["tokenizer", "from-gguf", str(tmp_path / "m-q4.gguf"), "--out", str(tmp_path / "rebuilt.model")],
        ["deploy", "--base", str(base), "--lora", str(lora), "--quant", "Q4_K_M", "--quant", "F16",
         "--out", str(tmp_path / "deploy"), "--name", "tiny", "--threads", "1", "-q"],
    ]
    code = f"""
        from cllama_deploy.cli import main
        for argv in {steps!r}:
            rc = main(argv)
            print(f"RC {{rc}} {{argv[0]}}", file=sys.stderr, flush=True)
            if rc:
                sys.exit(rc)
    """
    env = {**os.environ, "CLLAMA_N_THREADS": "1", "CLLAMA_DEBUG": ""}
    proc = subprocess.run(_child(code), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[2] for line in proc.stderr.splitlines() if line.startswith("RC 0 ")] == \
        [s[0] for s in steps]
    assert proc.stderr.rstrip().endswith("NO-TORCH-OK"), proc.stderr[-2000:]
    for path in ("m-q4.gguf", "rebuilt.model", "deploy/tiny-Q4_K_M.gguf", "deploy/tiny-F16.gguf",
                 "deploy/manifest.json"):
        assert (tmp_path / path).is_file(), path


def test_serve_without_torch(inputs, tmp_path):
    from cllama_deploy.gguf.convert import ConvertConfig, convert

    base, _ = inputs
    gguf = tmp_path / "tiny.gguf"
    convert(ConvertConfig(model_dir=base, out=gguf, outtype="f16", show_progress=False))
    flag = tmp_path / "check-now"
    # uvicorn re-raises SIGTERM after a clean shutdown, so atexit never runs: a thread reports the
    # modules once the requests are answered
    code = f"""
        import os, threading, time

        def report():
            while not os.path.exists({str(flag)!r}):
                time.sleep(0.05)
            _check()

        threading.Thread(target=report, daemon=True).start()
        from cllama_deploy.cli import main
        sys.exit(main(["serve", {str(gguf)!r}, "--port", "0", "--threads", "1", "--graceful-timeout", "5"]))
    """
    env = {**os.environ, "CLLAMA_N_THREADS": "1"}
    proc = subprocess.Popen(_child(code), stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("listening on" in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", "".join(lines))
        assert found, "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{found.group(1)}"
        while time.monotonic() < deadline and not _ready(url):  # listening comes before the model loads
            time.sleep(0.1)
        body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        while r.status_code == 503 and time.monotonic() < deadline:  # still loading (Retry-After)
            time.sleep(0.2)
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        r = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "hi"}, timeout=120)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64, r.text
        flag.touch()
        deadline = time.monotonic() + 30
        while not any("NO-TORCH-OK" in x or "LEAKED" in x for x in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode in (0, -signal.SIGTERM), "".join(lines)[-3000:]  # -SIGTERM: uvicorn's clean exit
    assert any("NO-TORCH-OK" in x for x in lines), "".join(lines)[-2000:]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
