"""`deploy`: merge → convert → quantize in one pass, the manifest, re-runs and interrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.gguf import builders_gguf as bg

QUANTS = ["F32", "F16", "Q8_0", "Q4_K_M"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, deploy_inputs):
    from cllama_deploy.pipeline import DeployConfig, deploy

    base, loras, _, _ = deploy_inputs
    out = tmp_path_factory.mktemp("deployed") / "out"
    result = deploy(DeployConfig(base=base, loras=loras, quants=QUANTS, out=out, name="tiny-alpaca", threads=1,
                                 show_progress=False))
    return out, result


def _prompt_tokens(tok):
    import sentencepiece as spm

    from cllama_deploy.prompts import build_prompt

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    return [1] + sp.encode(build_prompt("用一句话介绍北京。Introduce Beijing."))


def test_deploy_f32_equals_peft_merge_and_f16_greedy(deployed, deploy_inputs):
    out, result = deployed
    _, _, reference, tok = deploy_inputs
    tokens = _prompt_tokens(tok)
    ref = bg.torch_logits(reference, tokens)
    got = bg.llama_logits(bg.load_llama(out / "tiny-alpaca-F32.gguf", n_ctx=256), tokens)
    assert np.max(np.abs(got - ref)) < 1e-3
    ref_greedy = bg.torch_greedy(reference, tokens, 32)
    assert bg.llama_greedy(bg.load_llama(out / "tiny-alpaca-F16.gguf", n_ctx=256), tokens, 32) == ref_greedy
    q8 = bg.llama_logits(bg.load_llama(out / "tiny-alpaca-Q8_0.gguf", n_ctx=256), tokens)
    assert np.mean(np.argmax(q8, -1) == np.argmax(ref, -1)) >= 0.9
    q4 = bg.load_llama(out / "tiny-alpaca-Q4_K_M.gguf", n_ctx=256)
    assert len(bg.llama_greedy(q4, tokens, 8)) == 8


def test_manifest_and_modelfiles(deployed, deploy_inputs):
    from cllama_deploy.files import sha256_file

    out, result = deployed
    base, loras, _, _ = deploy_inputs
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True
    assert [s["name"] for s in m["steps"]] == ["convert", "quantize Q4_K_M"]
    assert all(s["status"] == "done" and s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in m["steps"])
    files = {Path(f["path"]).name: f for f in m["inputs"]["base"]["files"]}
    assert files["model.safetensors"]["sha256"] == sha256_file(base / "model.safetensors")
    assert [Path(e["path"]) for e in m["inputs"]["loras"]] == [p.resolve() for p in loras]
    assert any(f["name"] == "adapter_model.safetensors" for f in m["inputs"]["loras"][0]["files"])
    assert {"cllama_deploy", "gguf", "llama_cpp_python", "numpy"} <= set(m["versions"])
    assert m["options"]["quants"] == QUANTS and m["options"]["intermediate"] == "F32"
    assert [o["type"] for o in m["outputs"]] == QUANTS
    for o in m["outputs"]:
        path = out / o["file"]
        assert o["file"] == f"tiny-alpaca-{o['type']}.gguf"
        assert path.stat().st_size == o["size"] and sha256_file(path) == o["sha256"]
        modelfile = (out / o["modelfile"]).read_text()
        assert f"FROM ./{o['file']}" in modelfile
        assert "### Instruction:" in modelfile and 'PARAMETER stop "### Instruction:"' in modelfile
    q4 = next(o for o in m["outputs"] if o["type"] == "Q4_K_M")
    assert q4["bits_per_weight"] > 4
    assert not (out / ".work").exists() and not list(out.rglob("*.partial"))
    assert not (out / "tiny-alpaca-hf").exists()  # no merged HF model unless --keep-hf


def test_rerun_skips_finished_steps(deployed, deploy_inputs):
    from cllama_deploy.pipeline import DeployConfig, deploy

    out, first = deployed
    base, loras, _, _ = deploy_inputs
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    again = deploy(DeployConfig(base=base, loras=loras, quants=QUANTS, out=out, name="tiny-alpaca", threads=1,
                                show_progress=False))
    assert [s.status for s in again.steps] == ["skipped", "skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == mtimes
    assert [o.sha256 for o in again.outputs] == [o.sha256 for o in first.outputs]
    # one more type: only its quantization runs (the F32 output serves as the intermediate)
    more = deploy(DeployConfig(base=base, loras=loras, quants=QUANTS + ["Q5_K_M"], out=out, name="tiny-alpaca",
                               threads=1, show_progress=False))
    assert [(s.name, s.status) for s in more.steps] == [("convert", "skipped"), ("quantize Q4_K_M", "skipped"),
                                                       ("quantize Q5_K_M", "done")]


def test_keep_hf_and_f16_intermediate(tmp_path, deploy_inputs):
    """Only llama.cpp types: a hidden F16 intermediate, removed at the end; --keep-hf writes the HF model."""
    from cllama_deploy.pipeline import DeployConfig, deploy

    base, loras, reference, tok = deploy_inputs
    res = deploy(DeployConfig(base=base, loras=loras, quants=["q5_k_m"], out=tmp_path, keep_hf=True,
                              threads=1, show_progress=False))
    assert [o.path.name for o in res.outputs] == ["sft_lora-Q5_K_M.gguf"]
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["options"]["intermediate"] == "F16"
    assert not (tmp_path / ".work").exists()
    hf = tmp_path / "sft_lora-hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == bg.sp_size(tok)


def _run_killed(tmp_path, out, args, patch: str, wait_for) -> None:
    """Run the CLI in a subprocess with ``patch`` applied, SIGKILL it once ``wait_for(out)`` is true."""
    script = tmp_path / "slow_cli.py"
    script.write_text(patch + "\nfrom cllama_deploy.cli import main\nimport sys\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not wait_for(out):
            if proc.poll() is not None:
                raise AssertionError(f"finished before it could be killed: {proc.stderr.read().decode()}")
            assert time.time() < deadline, "timed out waiting for the step to start"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _looks_complete_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.gguf"))


SLOW_CONVERT = """
import time
import cllama_deploy.gguf.convert as c
_orig = c._encode
def _slow(data, qtype):
    time.sleep(0.05)
    return _orig(data, qtype)
c._encode = _slow
"""

SLOW_QUANTIZE = """
import time
import llama_cpp
_orig = llama_cpp.llama_model_quantize
def _slow(*args):
    rc = _orig(*args)
    time.sleep(60)
    return rc
llama_cpp.llama_model_quantize = _slow
"""


def test_killed_runs_leave_no_complete_looking_file_and_resume(tmp_path, deploy_inputs):
    import gguf

    base, loras, _, _ = deploy_inputs
    out = tmp_path / "out"
    args = ["deploy", "--base", str(base), "--lora", str(loras[0]), "--lora", str(loras[1]), "--quant", "F16",
            "--quant", "Q4_K_M", "--out", str(out), "--name", "k", "--threads", "1", "-q"]

    # killed while converting: only .partial files, the manifest (if any) is not complete
    _run_killed(tmp_path, out, args, SLOW_CONVERT, lambda o: any(o.rglob("*.gguf.partial")))
    assert _looks_complete_files(out) == []
    if (out / "manifest.json").exists():
        assert json.loads((out / "manifest.json").read_text())["complete"] is False

    # killed while quantizing (llama.cpp has written the whole .partial, it is not yet renamed)
    _run_killed(tmp_path, out, args, SLOW_QUANTIZE, lambda o: (o / "k-Q4_K_M.gguf.partial").exists()
                and json.loads((o / "manifest.json").read_text() or "{}").get("steps"))
    assert _looks_complete_files(out) == ["k-F16.gguf"]  # finished and renamed before the kill
    gguf.GGUFReader(str(out / "k-F16.gguf"))  # complete and readable
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and [s["name"] for s in m["steps"]] == ["convert"]

    # re-run: the conversion is reused, the quantization runs, everything ends complete
    from cllama_deploy.cli import main

    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True
    assert [(s["name"], s["status"]) for s in m["steps"]] == [("convert", "skipped"), ("quantize Q4_K_M", "done")]
    assert _looks_complete_files(out) == ["k-F16.gguf", "k-Q4_K_M.gguf"]
    assert not list(out.rglob("*.partial"))


def test_deploy_errors(tmp_path, deploy_inputs, capsys):
    from cllama_deploy.cli import main

    base, loras, _, _ = deploy_inputs

    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "importance matrix" in err(["deploy", "--base", str(base), "--lora", str(loras[0]), "--quant", "IQ2_XXS",
                                       "--out", str(tmp_path / "o")])
    assert "--quant" in err(["deploy", "--base", str(base), "--quant", "Q4_K_Z", "--out", str(tmp_path / "o")])
    assert "--lora" in err(["deploy", "--base", str(base), "--lora", str(tmp_path / "missing"),
                            "--out", str(tmp_path / "o")])
    # a tokenizer that does not match the embeddings: refused before any work, nothing written
    import shutil

    bad = tmp_path / "bad_base"
    shutil.copytree(base, bad)
    shutil.copy(deploy_inputs[3], bad / "tokenizer.model")  # the merged tokenizer: more pieces than rows
    msg = err(["deploy", "--base", str(bad), "--quant", "Q4_K_M", "--out", str(tmp_path / "o2")])
    assert "tokenizer" in msg and "rows" in msg
    assert not list((tmp_path / "o2").glob("*.gguf*"))
