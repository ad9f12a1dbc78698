"""`chat` and `generate` on a GGUF need no torch: they run in a child where importing torch, transformers,
peft, accelerate or datasets fails as if they were not installed (tests/test_no_torch.py's block)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.test_no_torch import _child


def test_chat_and_generate_on_a_gguf_without_torch(tiny, tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("Hello there\n介绍一下北京\n", encoding="utf-8")
    out = tmp_path / "pred.json"
    code = f"""
        import io
        from cllama_deploy.cli import main
        rc = main(["generate", {str(tiny.gguf)!r}, "--data-file", {str(data)!r}, "--predictions", {str(out)!r},
                   "--with-prompt", "--max-tokens", "4", "--threads", "1", "-q"])
        print(f"RC {{rc}} generate", file=sys.stderr, flush=True)
        sys.stdin = io.StringIO("Hello there\\n/exit\\n")
        rc = main(["chat", {str(tiny.gguf)!r}, "--max-tokens", "4", "--threads", "1"]) or rc
        print(f"RC {{rc}} chat", file=sys.stderr, flush=True)
        sys.exit(rc)
    """
    env = {**os.environ, "CLLAMA_N_THREADS": "1", "CLLAMA_DEBUG": ""}
    proc = subprocess.run(_child(code), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RC 0 generate" in proc.stderr and "RC 0 chat" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith("NO-TORCH-OK"), proc.stderr[-2000:]
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 2
    assert "(reply cut at 4 tokens: --max-tokens)" in proc.stdout, proc.stdout
