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
# Least share of positions where Q4_K_M's teacher-forced top-1 equals F16's, on the Alpaca prompt and 32
# generated tokens (168 positions). Measured 0.90 at 1 thread; the PT adapter alone (the SFT adapter
# missing from the merge) gives 0.55 against the full F16, and a broken or foreign file a few percent.
Q4_K_M_AGREEMENT = 0.7


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


def _copy_out(out: Path, dst: Path) -> Path:
    """A private copy of a deploy folder (mtimes kept, so its manifest still matches its files)."""
    import shutil

    return Path(shutil.copytree(out, dst))


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


def test_q4_k_m_is_the_merged_model_in_q4_k(deployed, deploy_inputs, tmp_path):
    """Q4_K_M loads in llama.cpp and its teacher-forced top-1 agrees with F16's within the bound; the
    tensors really are Q4_K (the model's rows are 256 long, so nothing falls back)."""
    from cllama_deploy.pipeline import DeployConfig, deploy

    out, result = deployed
    base, loras, reference, tok = deploy_inputs
    prompt = _prompt_tokens(tok)
    tokens = prompt + bg.torch_greedy(reference, prompt, 32)
    f16 = bg.teacher_forced_top1(out / "tiny-alpaca-F16.gguf", tokens)
    agree = float(np.mean(bg.teacher_forced_top1(out / "tiny-alpaca-Q4_K_M.gguf", tokens) == f16))
    assert agree >= Q4_K_M_AGREEMENT, agree
    report = next(s for s in result.steps if s.name == "quantize Q4_K_M").report
    assert report["tensor_types"].get("Q4_K", 0) >= 10 and not report["fallbacks"], report
    assert 4.5 < report["bits_per_weight"] < 6.0
    # the bound tells models apart: without the SFT adapter the F16 model agrees much less
    pt_only = deploy(DeployConfig(base=base, loras=loras[:1], quants=["F16"], out=tmp_path / "pt", name="pt",
                                  threads=1, show_progress=False))
    assert float(np.mean(bg.teacher_forced_top1(pt_only.outputs[0].path, tokens) == f16)) < Q4_K_M_AGREEMENT


def test_manifest_and_modelfiles(deployed, deploy_inputs):
    from cllama_deploy.files import sha256_file

    out, result = deployed
    base, loras, _, _ = deploy_inputs
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True
    assert [s["name"] for s in m["steps"]] == ["convert", "quantize Q4_K_M"]
    assert all(s["status"] == "done" and s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in m["steps"])
    assert m["peak_rss_bytes"] >= max(s["peak_rss_bytes"] for s in m["steps"])  # the whole run's
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


def test_rerun_skips_finished_steps(deployed, deploy_inputs, tmp_path):
    """Re-runs work on a private copy of the shared deploy folder (adding a type would change what the
    other tests of this module read)."""
    from cllama_deploy.pipeline import DeployConfig, deploy

    shared, first = deployed
    out = _copy_out(shared, tmp_path / "out")
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
    assert [o.path.name for o in res.outputs] == ["base-lora-Q5_K_M.gguf"]  # no training record: "-lora"
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["options"]["intermediate"] == "F16"
    assert not (tmp_path / ".work").exists()
    hf = tmp_path / "base-lora-hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == bg.sp_size(tok)
    assert (hf / "cllama_merge.json").is_file()  # the same writer as `merge`


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


def test_out_of_someone_else_is_refused(tmp_path, deploy_inputs, capsys):
    """deploy writes into --out and replaces NAME-hf/: a folder without our manifest is refused (issue 14
    item 2); --force writes into it and keeps the other files."""
    from cllama_deploy.cli import main

    base, loras, _, _ = deploy_inputs
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["deploy", "--base", str(base), "--lora", str(loras[0]), "--quant", "F16", "--out", str(out), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds files that deploy did not write (no manifest.json)" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(args + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()
    assert main(args) == 0  # our folder from now on


def test_default_name_is_the_base_and_the_stage(tmp_path, deploy_inputs, capsys):
    """Issue 14 item 10: not the last adapter's folder name (`sft_lora_model` for every `train sft`) but
    the base's name and the last adapter's training stage; deploy says which name it chose."""
    import shutil

    from cllama_deploy.pipeline import DeployConfig, default_name, deploy

    base, loras, _, _ = deploy_inputs
    run = tmp_path / "sft"
    sft = shutil.copytree(loras[1], run / "sft_lora_model")
    (run / "sft_training_config.json").write_text(json.dumps({"model_name_or_path": str(base),
                                                               "lora": [str(loras[0])], "output_dir": str(run)}))
    llama = shutil.copytree(base, tmp_path / "llama-7b-hf")
    assert default_name(llama, []) == "llama-7b"
    assert default_name(llama, [loras[0]]) == "llama-7b-lora"
    assert default_name(llama, [loras[0], sft]) == "llama-7b-sft"
    res = deploy(DeployConfig(base=llama, loras=[loras[0], sft], quants=["F16"], out=tmp_path / "o", threads=1))
    assert res.name == "llama-7b-sft" and [o.path.name for o in res.outputs] == ["llama-7b-sft-F16.gguf"]
    assert "name: llama-7b-sft" in capsys.readouterr().err


def test_a_step_is_one_function(deployed, deploy_inputs, tmp_path):
    """The step API: a new step is one function around Deployment.run (here: a file listing the outputs'
    sizes); it runs once and is skipped on a re-run with the same key and unchanged files."""
    from cllama_deploy.pipeline import DeployConfig, Deployment, FileRecord, convert_step, quantize_step

    base, loras, _, _ = deploy_inputs
    out = _copy_out(deployed[0], tmp_path / "out")
    calls = []

    def sizes_step(d: Deployment):
        def work(step):
            calls.append(1)
            path = d.out / "sizes.txt"
            path.write_text("".join(f"{p.name} {p.stat().st_size}\n" for p in sorted(d.final_path.values())))
            step.files = [FileRecord.of(path, d.out)]

        return d.run("sizes", lambda: d.key("sizes", sorted(d.final_path)), work)

    for _ in range(2):
        d = Deployment(DeployConfig(base=base, loras=loras, quants=QUANTS, out=out, name="tiny-alpaca", threads=1,
                                    show_progress=False))
        convert_step(d)
        for q in d.llama_types:
            quantize_step(d, q)
        step = sizes_step(d)
        d.finish([])
    assert calls == [1] and step.status == "skipped"
    m = json.loads((out / "manifest.json").read_text())
    assert [(s["name"], s["status"]) for s in m["steps"]] == [("convert", "skipped"), ("quantize Q4_K_M", "skipped"),
                                                              ("sizes", "skipped")]


def test_manifest_round_trip_and_unreadable(tmp_path, deployed):
    from cllama_deploy.pipeline import Manifest

    out, _ = deployed
    m = Manifest.load(out / "manifest.json")
    assert m.complete and m.finished("quantize Q4_K_M").report["bits_per_weight"] > 4
    assert all(f.sha256 for s in m.steps for f in s.files if not f.intermediate)
    m.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((out / "manifest.json").read_text())
    (tmp_path / "bad.json").write_text("{not json")
    assert Manifest.load(tmp_path / "bad.json") is None and Manifest.load(tmp_path / "missing.json") is None
